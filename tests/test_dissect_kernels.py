"""The fused CPU kernels of dissection (numba) against the tensor path, and the speculative table bound."""

from __future__ import annotations

import concurrent.futures

import numpy as np
import pytest
import torch

from _dissect_helpers import LABELS, random_dataset, reference_iou, tiny_net
from semlens.units import TensorSegmentationDataset, dissect
from semlens.units import dissect_kernels as K
from semlens.units.backend import Backend
from semlens.units.dissect_passes import _LabelEncoder
from semlens.units.segmentation import DissectionError
from semlens.units.upsample import _SparseUpsampler, bilinear_axis


@pytest.fixture(params=[1, 2], ids=["1 thread", "2 threads"])
def pool(request):
    if request.param == 1:
        yield None, 1
        return
    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        yield ex, 2


def _blocks_from_mask(acts: torch.Tensor, bound: torch.Tensor) -> set[tuple[int, int, int]]:
    """Blocks (image, unit, cell) with a clamped corner above the bound, by loops."""
    B, C, h, w = acts.shape
    out = set()
    for b in range(B):
        for u in range(C):
            a = acts[b, u]
            for y in range(h):
                for x in range(w):
                    y1, x1 = min(y + 1, h - 1), min(x + 1, w - 1)
                    corners = a[[y, y, y1, y1], [x, x1, x, x1]]
                    if bool((corners > bound[u]).any()):
                        out.add((b, u, y * w + x))
    return out


def _top_buffer(C: int, bound: torch.Tensor, k: int, cap: int) -> K.TopBuffer:
    return K.TopBuffer(np.empty((C, cap), np.float32), np.zeros(C, np.int64), bound.float().numpy().copy(), k)


@pytest.mark.parametrize("shape", [(3, 5, 4, 6), (2, 40, 7, 3), (4, 3, 1, 5)])
def test_scan_finds_every_block_and_every_value_above_its_bound(shape, pool):
    g = torch.Generator().manual_seed(sum(shape))
    acts = torch.randn(*shape, generator=g)
    acts[0, 0] = 0.25  # a flat plane exactly at its bound: nothing above
    block_bound = acts.transpose(0, 1).reshape(shape[1], -1).quantile(0.7, dim=1)
    block_bound[0] = 0.25
    value_bound = block_bound - 0.3
    B, C, h, w = shape
    top = _top_buffer(C, value_bound, k=B * h * w, cap=B * h * w + 1)  # room for every cell: no cut
    coords, corners = K.scan(acts, block_bound, top, pool[0], pool[1], hint=3)  # hint too small: table pass again
    got = {tuple(c) for c in coords.long().t().tolist()}
    assert got == _blocks_from_mask(acts, block_bound)
    assert coords.shape[1] == len(got)  # no block twice
    b, u, cell = coords.long()
    y, x = cell // w, cell % w
    y1, x1 = (y + 1).clamp(max=h - 1), (x + 1).clamp(max=w - 1)
    expected = torch.stack([acts[b, u, y, x], acts[b, u, y, x1], acts[b, u, y1, x], acts[b, u, y1, x1]])
    assert torch.equal(corners, expected)
    for unit in range(C):  # fed once each, although the undersized table made the kernel run twice
        row = torch.from_numpy(top.values[unit, :top.count[unit]])
        ref = acts[:, unit][acts[:, unit] > value_bound[unit]]
        assert torch.equal(row.sort().values, ref.sort().values)


def test_scan_cuts_full_rows_to_their_k_largest_exactly(pool):
    """A small buffer is cut many times during one scan; the k largest values per unit survive, bound rises."""
    acts = torch.randn(6, 4, 9, 9, generator=torch.Generator().manual_seed(5)).round(decimals=1)  # many ties
    k = 7
    top = _top_buffer(4, torch.full((4,), float("-inf")), k=k, cap=k + 5)
    assert K.scan(acts, None, top, pool[0], pool[1]) is None
    top.keep_top(k)
    per_unit = acts.transpose(0, 1).reshape(4, -1)
    assert (top.count == k).all()
    for unit in range(4):
        assert np.array_equal(np.sort(top.values[unit, :k]), per_unit[unit].sort().values[-k:].numpy())
        assert top.bound[unit] == per_unit[unit].sort().values[-k]


@pytest.mark.parametrize("n,k", [(1, 1), (2, 1), (50, 50), (200, 13), (1000, 999), (300, 150)])
def test_select_top_agrees_with_a_sort_including_ties(n, k):
    rng = np.random.default_rng(n + k)
    for values in (rng.normal(size=n), rng.integers(0, 3, size=n).astype(float), np.zeros(n), np.arange(n) * 1.0):
        row = values.astype(np.float32).copy()
        m = K._jit("_select_top")(row, n, k)
        expected = np.sort(values.astype(np.float32))[::-1][:k]
        assert np.array_equal(np.sort(row[:k])[::-1], expected)
        assert m == expected[-1]
        assert np.array_equal(np.sort(row), np.sort(values.astype(np.float32)))  # a permutation


def test_scan_skips_planes_by_their_maxima_without_changing_the_table():
    acts = torch.randn(4, 6, 5, 5, generator=torch.Generator().manual_seed(1))
    bound = torch.full((6,), 1.0)
    a = K.scan(acts, bound)
    b = K.scan(acts, bound, maxima=acts.amax(dim=(2, 3)))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # wrong (too small) maxima are trusted: planes they rule out are not read, which is what makes it fast
    assert K.scan(acts, bound, maxima=torch.full((4, 6), -5.0))[0].shape[1] == 0


@pytest.mark.parametrize("size,seg", [((5, 5), (8, 8)), ((7, 4), (16, 13)), ((16, 16), (6, 6)), ((3, 9), (3, 9))])
def test_tally_counts_equal_the_tensor_path(size, seg, pool):
    g = torch.Generator().manual_seed(size[0] + 7 * seg[1])
    B, C, L = 3, 4, 9
    acts = torch.randn(B, C, *size, generator=g)
    thresholds = acts.transpose(0, 1).reshape(C, -1).quantile(0.8, dim=1)
    labels = torch.randint(0, L, (B * seg[0] * seg[1], 2), generator=g).to(torch.uint8)
    up = _SparseUpsampler(size[0], size[1], seg, torch.device("cpu"))
    inter_ref = torch.zeros(C, L, dtype=torch.int64)
    count_ref = torch.zeros(B, C, dtype=torch.int64)
    P = seg[0] * seg[1]
    for bb, uu, pix in up.active_pixels(*up.block_table(acts, thresholds - 0.5), thresholds, max_elements=64):
        count_ref += torch.bincount(bb * C + uu, minlength=B * C).view(B, C)
        keys = (uu * L).unsqueeze(1) + labels[bb * P + pix].long()
        inter_ref += torch.bincount(keys.view(-1), minlength=C * L).view(C, L)
    table = K.scan(acts, thresholds - 0.5)
    iy0, _, ly = bilinear_axis(size[0], seg[0])
    ix0, _, lx = bilinear_axis(size[1], seg[1])
    inter = torch.zeros(C, L, dtype=torch.int64)
    count = K.tally(*table, thresholds, size[1], K.Axes(iy0, ly, size[0]), K.Axes(ix0, lx, size[1]), seg, labels, B,
                    inter, pool[0], pool[1])
    assert torch.equal(count, count_ref)
    assert torch.equal(inter, inter_ref)
    assert int(count.sum()) > 0


def test_label_encoding_equals_the_tensor_path(pool):
    g = torch.Generator().manual_seed(3)
    n, seg = 9, 6
    color = torch.randint(0, 4, (n, 2, seg, seg), generator=g)  # the two colour channels often repeat
    obj = torch.tensor([0, 4, 5, 6])[torch.randint(0, 4, (n, 1, seg, seg), generator=g)]  # 6: also a scene
    scene = torch.tensor([0, 6, 7])[torch.randint(0, 3, (n, 1), generator=g)]
    ds = TensorSegmentationDataset(torch.rand(n, 3, seg, seg), LABELS, pixel={"color": color, "object": obj},
                                   image_level={"scene": scene})
    batch = ds.load_batch(list(range(n)))
    enc = _LabelEncoder(ds.categories, 8, (seg, seg), torch.device("cpu"))
    enc.pool, enc.workers = pool
    fused = enc.encode(batch, n)
    plain = _LabelEncoder(ds.categories, 8, (seg, seg), torch.device("cpu"), Backend(fused=False)).encode(batch, n)
    assert torch.equal(fused.pixel, plain.pixel)
    assert torch.equal(fused.label_pixels, plain.label_pixels)
    assert int((plain.pixel == 0).sum()) > int((torch.cat([color, obj], 1) == 0).sum())  # duplicates were removed


@pytest.mark.parametrize("fused", [True, False])
def test_a_concept_number_outside_the_label_table_is_a_clear_error(fused):
    ds = random_dataset(n=4)
    ds.pixel["color"][2, 0, 1, 1] = 42
    with pytest.raises(DissectionError, match=r"'color'.*42.*label table"):
        dissect(tiny_net(), ds, ["0"], quantile=0.1, batch_size=2, device="cpu", backend=Backend(fused=fused))


def test_fused_numpy_and_torch_paths_give_identical_dissections():
    net, ds = tiny_net(), random_dataset(n=11, size=16, seg=10)
    runs = {}
    for name, fused, numpy_on in (("fused", True, True), ("numpy", False, True), ("torch", False, False)):
        runs[name] = dissect(net, ds, ["0", "2"], quantile=0.05, batch_size=4, device="cpu",
                             backend=Backend(numpy=numpy_on, fused=fused))
    for other in ("numpy", "torch"):
        assert torch.equal(runs["fused"].label_pixels, runs[other].label_pixels)
        for layer in ("0", "2"):
            a, b = runs["fused"].layers[layer], runs[other].layers[layer]
            for field in ("thresholds", "intersection", "activation", "top_images"):
                assert torch.equal(getattr(a, field), getattr(b, field)), (other, layer, field)


def _positive_net() -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.ReLU(), torch.nn.Conv2d(4, 5, 3))
    with torch.no_grad():
        for m in net:
            if isinstance(m, torch.nn.Conv2d):
                m.weight.abs_()
                m.bias.zero_()
    return net


@pytest.mark.parametrize("order", ["shuffled", "bright first"])
def test_wrong_threshold_guesses_re_run_the_spoiled_batches_and_change_nothing(order, monkeypatch):
    """Activations that scale with image brightness: on images sorted bright to dark (not exchangeable) the
    early guesses of the thresholds overshoot, so the cached tables of those batches lack blocks; those
    batches go through the model again. The counts always equal a streamed run and the float64 reference."""
    net, n, size, seg = _positive_net(), 48, 16, 10
    g = torch.Generator().manual_seed(5)
    brightness = torch.linspace(1.0, 0.05, n)
    if order == "shuffled":
        brightness = brightness[torch.randperm(n, generator=g)]
    images = torch.rand(n, 3, size, size, generator=g) * brightness.view(n, 1, 1, 1)
    color = torch.randint(0, 4, (n, 2, seg, seg), generator=g)
    obj = torch.tensor([0, 4, 5])[torch.randint(0, 3, (n, 1, seg, seg), generator=g)]
    scene = torch.tensor([0, 6, 7])[torch.randint(0, 3, (n, 1), generator=g)]
    ds = TensorSegmentationDataset(images, LABELS, pixel={"color": color, "object": obj}, image_level={"scene": scene})
    loads: list[list[int]] = []
    load = ds.load_batch
    monkeypatch.setattr(ds, "load_batch", lambda idx: loads.append(list(idx)) or load(idx))
    res = dissect(net, ds, ["0", "2"], quantile=0.02, batch_size=4, device="cpu")
    forwards = len(loads)
    streamed = dissect(net, ds, ["0", "2"], quantile=0.02, batch_size=4, device="cpu", cache_bytes=0)
    for name in ("0", "2"):
        assert torch.equal(res.layers[name].intersection, streamed.layers[name].intersection)
        assert torch.equal(res.layers[name].activation, streamed.layers[name].activation)
        ref = reference_iou(net, ds, name, res.layers[name].thresholds, (seg, seg))
        np.testing.assert_array_equal(res.layers[name].iou.numpy(), ref)
    # probe + 12 first-pass batches (+ the spoiled batches again)
    assert forwards == 13 if order == "shuffled" else 13 < forwards <= 25


def test_label_encoding_with_more_channels_than_the_presence_bits_equals_the_tensor_path():
    """70 pixel channels (beyond the 63 that the fused kernel tracks per number): duplicates between far
    channels are still removed exactly as the tensor path does."""
    g = torch.Generator().manual_seed(8)
    n, seg = 3, 4
    many = torch.randint(0, 5, (n, 70, seg, seg), generator=g)
    many[:, 66] = many[:, 2]  # far duplicates
    many[:, 69] = many[:, 65]
    labels = [(1, "a", "color"), (2, "b", "color"), (3, "c", "color"), (4, "d", "color")]
    ds = TensorSegmentationDataset(torch.rand(n, 3, seg, seg), labels, pixel={"color": many})
    batch = ds.load_batch(list(range(n)))
    enc = _LabelEncoder(ds.categories, 5, (seg, seg), torch.device("cpu"))
    fused = enc.encode(batch, n)
    plain = _LabelEncoder(ds.categories, 5, (seg, seg), torch.device("cpu"), Backend(fused=False)).encode(batch, n)
    assert torch.equal(fused.pixel, plain.pixel) and torch.equal(fused.label_pixels, plain.label_pixels)
    assert int((fused.pixel[:, 66] != 0).sum()) == 0 and int((fused.pixel[:, 69] != 0).sum()) == 0


def test_top_images_by_insertion_equal_the_tensor_merge_with_ties():
    """Batches in shuffled order, values with many ties: the insertion kernel keeps the same sorted lists
    (largest first, smaller index on ties) as the tensor path."""
    from semlens.units.dissect_passes import _TallyPass

    g = torch.Generator().manual_seed(2)
    C, n_img = 7, 60
    values = torch.randint(0, 5, (n_img, C), generator=g).float()
    order = torch.randperm(n_img, generator=g)
    fused = _TallyPass({"g": C}, {"l": C}, 3, 1, 5, torch.device("cpu"))
    plain = _TallyPass({"g": C}, {"l": C}, 3, 1, 5, torch.device("cpu"))
    for chunk in order.split(8):
        K.insert_top(fused.top_val["l"], fused.top_idx["l"], values[chunk], chunk)
        plain._merge_top("l", values[chunk].t(), chunk.view(1, -1).expand(C, -1))
    assert torch.equal(fused.top_val["l"], plain.top_val["l"]) and torch.equal(fused.top_idx["l"], plain.top_idx["l"])
    for u in range(C):  # the expected list by a plain sort
        ref = sorted(range(n_img), key=lambda i: (-float(values[i, u]), i))[:5]
        assert fused.top_idx["l"][u].tolist() == ref
