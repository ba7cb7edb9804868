"""Shared helpers for the dissection tests: a tiny random dataset and a float64 loop reference."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from semlens.units import TensorSegmentationDataset

LABELS = [(1, "red", "color"), (2, "green", "color"), (3, "blue", "color"), (4, "dog", "object"),
          (5, "cat", "object"), (6, "beach", "scene"), (7, "forest", "scene")]


def tiny_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 2))


def random_dataset(n: int = 6, size: int = 12, seg: int = 8, seed: int = 0) -> TensorSegmentationDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, size, size, generator=g)
    color = torch.randint(0, 4, (n, 2, seg, seg), generator=g)
    obj = torch.tensor([0, 4, 5])[torch.randint(0, 3, (n, 1, seg, seg), generator=g)]
    obj[: n // 3] = 0  # some images carry no object annotation
    scene = torch.tensor([0, 6, 7])[torch.randint(0, 3, (n, 1), generator=g)]
    return TensorSegmentationDataset(images, LABELS, pixel={"color": color, "object": obj},
                                     image_level={"scene": scene})


def reference_upsample(a: torch.Tensor, seg: tuple[int, int]) -> np.ndarray:
    """Bilinear resampling (align_corners=False) of (N, C, h, w) to seg by plain loops in float64."""
    N, C, h, w = a.shape
    src = a.double().numpy()

    def axis(i: int, n_in: int, n_out: int) -> tuple[int, int, float]:
        pos = max(0.0, (i + 0.5) * (n_in / n_out) - 0.5)
        lo = min(int(np.floor(pos)), n_in - 1)
        return lo, min(lo + 1, n_in - 1), pos - lo

    out = np.zeros((N, C, *seg))
    for i in range(seg[0]):
        i0, i1, ly = axis(i, h, seg[0])
        for j in range(seg[1]):
            j0, j1, lx = axis(j, w, seg[1])
            top = (1 - lx) * src[:, :, i0, j0] + lx * src[:, :, i0, j1]
            bottom = (1 - lx) * src[:, :, i1, j0] + lx * src[:, :, i1, j1]
            out[:, :, i, j] = (1 - ly) * top + ly * bottom
    return out


def reference_iou(model: nn.Module, ds: TensorSegmentationDataset, layer: str, thresholds: torch.Tensor,
                  seg: tuple[int, int]) -> np.ndarray:
    """IoU by plain loops over images, units, pixels and label sets (counts in Python ints, IoU in float64)."""
    acts = {}
    h = dict(model.named_modules())[layer].register_forward_hook(lambda m, i, o: acts.__setitem__("a", o.detach()))
    with torch.no_grad():
        model(ds.images)
    h.remove()
    up = reference_upsample(acts["a"], seg)
    np.testing.assert_allclose(up, F.interpolate(acts["a"], size=seg, mode="bilinear").double().numpy(), atol=1e-5)
    mask = up > thresholds.double().numpy().reshape(1, -1, 1, 1)
    numbers = [n for n, _, _ in ds.labels]
    cat_of = {n: c for n, _, c in ds.labels}
    cats = ds.categories
    N, C = mask.shape[:2]
    inter = np.zeros((C, len(numbers)), dtype=np.int64)
    act = np.zeros((C, len(cats)), dtype=np.int64)
    lab = np.zeros(len(numbers), dtype=np.int64)
    for x in range(N):
        annotated = [bool(ds.annotated[c][x]) for c in cats]
        image_labels = {int(v) for c in ds.image_level for v in ds.image_level[c][x].tolist() if v > 0}
        for i in range(seg[0]):
            for j in range(seg[1]):
                present = set(image_labels)
                for c in ds.pixel:
                    present |= {int(v) for v in ds.pixel[c][x, :, i, j].tolist() if v > 0}
                for lbl in present:
                    lab[numbers.index(lbl)] += 1
                for u in range(C):
                    if mask[x, u, i, j]:
                        for k, a in enumerate(annotated):
                            act[u, k] += int(a)
                        for lbl in present:
                            inter[u, numbers.index(lbl)] += 1
    iou = np.zeros((C, len(numbers)))
    for u in range(C):
        for li, lbl in enumerate(numbers):
            a = act[u, cats.index(cat_of[lbl])]
            iou[u, li] = inter[u, li] / (a + lab[li] - inter[u, li] + 1e-10)
    return iou
