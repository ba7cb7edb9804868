"""Segmentation datasets for Network Dissection: the protocol :func:`semlens.units.dissect.dissect` reads, a
batch of images with concept masks, an in-memory dataset, and the input checks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


class DissectionError(ValueError):
    """Input that dissection cannot work with (a message names the culprit)."""


@dataclass
class SegmentationBatch:
    """A batch of images with concept annotations (the fields of ``semlens.world.BrodenBatch``).

    images: (B, 3, H, W) float in [0, 1]; pixel[cat]: (B, K, sh, sw) int64 concept numbers (0 = none);
    image_level[cat]: (B, K) int64 whole-image concept numbers; annotated[cat]: (B,) bool.
    """

    images: torch.Tensor
    pixel: dict[str, torch.Tensor] = field(default_factory=dict)
    image_level: dict[str, torch.Tensor] = field(default_factory=dict)
    annotated: dict[str, torch.Tensor] = field(default_factory=dict)


class SegmentationDataset(Protocol):
    """What dissection reads: ``semlens.world.BrodenDataset`` or :class:`TensorSegmentationDataset`."""

    categories: list[str]
    labels: list[tuple[int, str, str]]  # (concept number, name, primary category)

    def __len__(self) -> int: ...

    def load_batch(self, indices: Sequence[int]) -> Any: ...


class TensorSegmentationDataset:
    """An in-memory Broden-like dataset from tensors (hand-made data, tests, custom annotations).

    images: (N, 3, H, W) float; labels: (number, name, category) per concept (numbers ≥ 1);
    pixel: category -> (N, K, sh, sw) int64; image_level: category -> (N, K) int64;
    annotated: category -> (N,) bool (default: the image has a non-zero entry in that category).
    """

    def __init__(self, images: torch.Tensor, labels: Sequence[tuple[int, str, str]],
                 pixel: Mapping[str, torch.Tensor] | None = None,
                 image_level: Mapping[str, torch.Tensor] | None = None,
                 annotated: Mapping[str, torch.Tensor] | None = None) -> None:
        if images.ndim != 4:
            raise DissectionError(f"images must be (N, 3, H, W), got shape {tuple(images.shape)}")
        self.images = images
        self.pixel = dict(pixel or {})
        self.image_level = dict(image_level or {})
        self.labels = [(int(n), str(s), str(c)) for n, s, c in labels]
        self.categories = list(dict.fromkeys([*self.pixel, *self.image_level]))
        n = images.shape[0]
        for cat, t in [*self.pixel.items(), *self.image_level.items()]:
            if t.shape[0] != n:
                raise DissectionError(f"annotations of category {cat!r} cover {t.shape[0]} images, not {n}")
        self.annotated = {}
        for cat in self.categories:
            if annotated is not None and cat in annotated:
                self.annotated[cat] = annotated[cat].bool()
                continue
            flag = torch.zeros(n, dtype=torch.bool)
            if cat in self.pixel:
                flag |= self.pixel[cat].reshape(n, -1).gt(0).any(1)
            if cat in self.image_level:
                flag |= self.image_level[cat].reshape(n, -1).gt(0).any(1)
            self.annotated[cat] = flag
        self.image_size = tuple(images.shape[-2:])
        seg = {tuple(t.shape[-2:]) for t in self.pixel.values()}
        self.seg_size = seg.pop() if len(seg) == 1 else self.image_size

    def __len__(self) -> int:
        return self.images.shape[0]

    def load_batch(self, indices: Sequence[int]) -> SegmentationBatch:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return SegmentationBatch(
            images=self.images[idx],
            pixel={c: t[idx] for c, t in self.pixel.items()},
            image_level={c: t[idx] for c, t in self.image_level.items()},
            annotated={c: t[idx] for c, t in self.annotated.items()},
        )


def _check_images(images: Any, expected: tuple[int, ...] | None, indices: Sequence[int]) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise DissectionError(f"dataset images must be a (B, C, H, W) tensor, got {shape}")
    if expected is not None and tuple(images.shape[1:]) != expected:
        raise DissectionError(
            f"mismatched image size: images {indices[:3]}... are {tuple(images.shape[1:])}, the first image is "
            f"{expected}; resize the dataset to one size"
        )
    # one reduction pass: a NaN/Inf anywhere makes the sum non-finite; the exact test runs only then (a sum of
    # finite values can overflow, so the elementwise test decides)
    if not bool(torch.isfinite(images.sum())) and not bool(torch.isfinite(images).all()):
        raise DissectionError(f"images {list(indices)[:5]}... contain NaN or Inf")
    return images

