"""What a unit card shows besides its dissection label: top dataset images with outlines, AM prototypes, x-features.

All of it comes from stored artefacts, read once and cached:

* **top images**: ``top_images.safetensors`` of the dissection (:mod:`semlens.units.top_images`); each image is
  looked up *by file name* in the project's Broden-format data, drawn with the 1-px boundary of the unit's concept
  mask (magenta, :data:`CONCEPT_RGB`) over the 1-px boundary of the unit's thresholded activation region (cyan,
  :data:`REGION_RGB`; one forward pass of that image through the card's model version, the threshold from
  ``units.csv``), upscaled nearest-neighbour to at least :data:`CARD_SIDE` px. The PNGs are kept in an LRU cache.
* **prototypes**: ``semlens maximize`` output directories attached to the project (``summary.csv`` names the layer,
  units and variant; ``unit_XXXX_<variant>.png`` are the images).
* **x-features**: ``semlens embed`` output directories attached to the project; for a unit of the embedding's layer,
  the x-features whose encoder loads most on it (see :func:`encoder_loadings`), named by ``xfeatures.csv``.

A card without any of these still renders; :class:`UnitMedia` returns a note saying why something is missing.
"""

from __future__ import annotations

import csv
import io
import json
import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["UnitMedia", "TopImage", "Prototype", "XFeature", "boundary", "outlined_png", "encoder_loadings",
           "CONCEPT_RGB", "REGION_RGB", "CARD_SIDE", "TOP_K"]

CONCEPT_RGB = (255, 0, 255)  # the concept mask's outline
REGION_RGB = (0, 255, 255)  # the unit's thresholded activation region's outline
CARD_SIDE = 192  # px: top images are upscaled (nearest neighbour) by an integer factor to at least this side
TOP_K = 8  # top images on a card


def boundary(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool: the pixels of ``mask`` (H, W) bool with a 4-neighbour outside it (outside the image counts as
    outside, so a mask touching the border is closed there)."""
    p = np.pad(mask, 1, constant_values=False)
    inner = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return mask & ~inner


def _upscale(mask: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(h, w) bool -> (H, W) bool numpy by nearest neighbour (``F.interpolate(mode="nearest")``)."""
    up = torch.nn.functional.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0]
    return up.bool().numpy()


def outlined_png(image: torch.Tensor, concept: torch.Tensor, region: torch.Tensor | None = None,
                 side: int = CARD_SIDE) -> bytes:
    """PNG bytes of ``image`` (3, H, W) float in [0, 1], upscaled by ``s = ceil(side / max(H, W))`` (nearest), with
    the boundary (:func:`boundary`) of ``region`` (sh, sw) bool in :data:`REGION_RGB`, then that of ``concept``
    (sh, sw) bool in :data:`CONCEPT_RGB` on top; both masks are upscaled nearest-neighbour to (s·H, s·W) first."""
    from PIL import Image

    h, w = image.shape[-2:]
    s = max(1, math.ceil(side / max(h, w)))
    arr = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    arr = np.ascontiguousarray(arr.repeat(s, axis=0).repeat(s, axis=1))
    for mask, rgb in ((region, REGION_RGB), (concept, CONCEPT_RGB)):
        if mask is not None:
            arr[boundary(_upscale(mask, (h * s, w * s)))] = rgb
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def encoder_loadings(emb: Any) -> torch.Tensor:
    """(G, k, d) float: how much each x-feature ``i`` of group ``g`` loads on each input unit ``u`` of the layer.

    The product of the linear maps of ``emb.encoder_module(g)`` (ReLUs left out), standardisation folded in, so in
    x-feature units per unit of raw (pooled) activation: the encoder weight itself for PCA, TopK and NMF; the
    encoder's linear path for the SRAE's three-layer encoder. Computed once from the stored weights (no data)."""
    out = []
    for g in range(emb.n_groups):
        w: torch.Tensor | None = None
        for m in emb.encoder_module(g).modules():
            if isinstance(m, torch.nn.Linear):
                w = m.weight.detach().float() if w is None else m.weight.detach().float() @ w
        if w is None:
            raise ValueError(f"the {emb.method} embedding's encoder has no linear map")
        out.append(w)
    return torch.stack(out)


@dataclass(frozen=True)
class TopImage:
    """One of a unit's top dataset images: its rank (0 = best), dataset row and file name at dissection time, the
    unit's spatial maximum on it (activation units), and why it cannot be shown (``""`` = it can)."""

    rank: int
    row: int
    name: str
    value: float
    missing: str = ""


@dataclass(frozen=True)
class Prototype:
    """An activation-maximization prototype of a unit: its PNG, the variant and the activation it reached."""

    path: Path
    variant: str
    activation: float
    source: str  # the maximize output directory's name


@dataclass(frozen=True)
class XFeature:
    """An x-feature of an attached embedding loading on a unit: group ``g`` (its explained classes), index ``i``,
    loading (x-feature units per unit of activation; see :func:`encoder_loadings`), concept names from
    ``xfeatures.csv`` (empty when it has none) and the embedding's directory name and method."""

    classes: tuple[str, ...]
    index: int
    loading: float
    concepts: tuple[str, ...]
    source: str
    method: str


class UnitMedia:
    """The unit-card artefacts of a project, loaded once (thread-safe).

    dissection: the dissection output directory (``None``: none); data: the project's Broden-format directory for a
    classifier (``None`` for a captioner); prototypes / embeddings: attached output directories; class_names: the
    task's class names (x-feature groups are named with them); cache_size: rendered PNGs kept (LRU).
    """

    def __init__(self, dissection: Path | None, data: Path | None, prototypes: list[Path], embeddings: list[Path],
                 class_names: list[str] | None = None, cache_size: int = 1024) -> None:
        from semlens.units.top_images import FILE_NAME, TopImagesError, load_top_images

        self.data, self.class_names = data, list(class_names or [])
        self.top, self.top_note = None, ""
        if dissection is None:
            self.top_note = "no dissection is recorded for this project"
        elif not (dissection / FILE_NAME).is_file():
            self.top_note = (f"the dissection in {dissection} has no {FILE_NAME} (written by `semlens dissect` since "
                             "the unit cards show top images; dissect again to see them)")
        else:
            try:
                self.top = load_top_images(dissection / FILE_NAME)
            except TopImagesError as err:
                self.top_note = f"top images unavailable: {err}"
        if self.top is not None and data is None:
            self.top, self.top_note = None, "this project's data has no images (captioner project)"
        if self.top is not None and not self.top.names:
            self.top, self.top_note = None, (f"{dissection / FILE_NAME} names no image files (the dissection read "
                                             "in-memory data)")
        self._lock = threading.Lock()
        self._dataset: Any = None
        self._rows: dict[str, int] | None = None
        self._pngs: OrderedDict[tuple, bytes] = OrderedDict()
        self.cache_size = cache_size
        # attached outputs that cannot be read are left out, each with a note on every card (the card still works)
        self.notes: list[str] = []
        self.prototypes: dict[tuple[str, int], list[Prototype]] = {}
        for d in prototypes:
            try:
                for key, found in self._index_prototypes(d).items():
                    self.prototypes.setdefault(key, []).extend(found)
            except (OSError, ValueError) as err:
                self.notes.append(f"prototypes left out: {err}")
        self.embedding_info: dict[Path, dict[str, Any]] = {}
        for d in embeddings:
            try:
                self.embedding_info[d] = self._embedding_meta(d)
            except (OSError, ValueError) as err:
                self.notes.append(f"x-features left out: {err}")
        self.embedding_dirs = list(self.embedding_info)
        self._embeddings: dict[Path, tuple[Any, torch.Tensor, dict[tuple[int, int], str]] | str] = {}

    # ---- top images -----------------------------------------------------------------------------------------
    @property
    def dataset(self) -> Any:
        """The project's Broden dataset (index parsed once) and its rows by image file name."""
        with self._lock:
            if self._dataset is None:
                from semlens.world import BrodenDataset

                ds = BrodenDataset(self.data)
                self._rows = {name: i for i, name in enumerate(ds.images)}
                self._dataset = ds
            return self._dataset

    def top_images(self, layer: str, unit: int, k: int = TOP_K) -> tuple[list[TopImage], str]:
        """The unit's first ``k`` top images (each with why it cannot be shown, if so) and a note for the card
        (``""`` when nothing is missing)."""
        if self.top is None:
            return [], self.top_note
        try:
            entries = self.top.of(layer, unit)[:k]
        except KeyError as err:
            return [], f"top images unavailable: {err.args[0]}"
        try:
            self.dataset  # noqa: B018 - parse the index once (fills self._rows)
        except (OSError, ValueError) as err:  # the project's data is gone or corrupt: the card says so
            return [], f"top images unavailable: {err}"
        rows = self._rows or {}
        out = []
        for rank, (row, value, name) in enumerate(entries):
            missing = "" if name is not None and name in rows else \
                f"image {name or f'row {row}'} is not in the project's data {self.data}"
            out.append(TopImage(rank, row, name or "", value, missing))
        note = "" if out else "the dissection recorded no top images for this unit"
        if any(t.missing for t in out):
            note = "some top images are not in the project's data (was the unit dissected on another dataset?)"
        return out, note

    def top_png(self, key: tuple, layer: str, unit: int, rank: int, concept: str, threshold: float,
                model: Callable[[], tuple[torch.nn.Module, threading.Lock]] | None) -> bytes:
        """PNG of the unit's top image ``rank`` outlined (see :func:`outlined_png`), cached under ``key`` + the
        arguments. ``model()`` gives the model (and the lock to hold while running it) for the activation region;
        ``None`` or a NaN threshold: the concept outline only. Both masks are at the data's mask size."""
        from semlens.serve.project_view import NotFound
        from semlens.units.dissect_report import activation_region, concept_mask

        cached = self.cached((*key, layer, unit, rank))
        if cached is not None:
            return cached
        images, _ = self.top_images(layer, unit)
        if not 0 <= rank < len(images):
            raise NotFound(f"unit {unit} of layer {layer!r} has no top image {rank}")
        top = images[rank]
        if top.missing:
            raise NotFound(top.missing)
        ds = self.dataset
        batch = ds.load_batch([self._rows[top.name]])  # type: ignore[index]
        seg = tuple(ds.seg_size)
        mask = torch.zeros(seg, dtype=torch.bool)
        for num in (n for n, name, _ in ds.labels if name == concept and n > 0):
            mask |= concept_mask(batch, num, seg)[0]
        region = None
        if model is not None and not math.isnan(threshold):
            net, lock = model()
            with lock:
                device = next(net.parameters()).device
                try:
                    region = activation_region(net, batch.images.to(device), layer, unit, threshold, seg)[0]
                except (KeyError, IndexError, RuntimeError):  # a dissection of another model: the mask alone
                    region = None
        png = outlined_png(batch.images[0], torch.as_tensor(mask), region)
        with self._lock:
            self._pngs[(*key, layer, unit, rank)] = png
            while len(self._pngs) > self.cache_size:
                self._pngs.popitem(last=False)
        return png

    def cached(self, key: tuple) -> bytes | None:
        """A PNG :meth:`top_png` rendered before under ``key`` + (layer, unit, rank), or ``None``."""
        with self._lock:
            png = self._pngs.get(key)
            if png is not None:
                self._pngs.move_to_end(key)
            return png

    # ---- prototypes -----------------------------------------------------------------------------------------
    @staticmethod
    def _index_prototypes(d: Path) -> dict[tuple[str, int], list[Prototype]]:
        """(layer, unit) -> prototypes of one maximize output, from its ``summary.csv`` (files that exist only)."""
        index: dict[tuple[str, int], list[Prototype]] = {}
        summary = d / "summary.csv"
        if not summary.is_file():
            raise FileNotFoundError(f"prototypes directory {d} has no summary.csv (not a `semlens maximize` output)")
        with open(summary, newline="") as f:
            for r in csv.DictReader(f):
                try:
                    unit, variant, act = int(r["unit"]), r["variant"], float(r["activation"])
                except (KeyError, TypeError, ValueError) as err:
                    raise ValueError(f"corrupt prototypes table {summary}: {err!r}") from err
                png = d / f"unit_{unit:04d}_{variant}.png"
                if png.is_file():
                    index.setdefault((r.get("layer", ""), unit), []).append(Prototype(png, variant, act, d.name))
        return index

    def prototypes_of(self, layer: str, unit: int) -> list[Prototype]:
        """The unit's prototypes from the attached maximize outputs (empty when there are none)."""
        return list(self.prototypes.get((layer, unit), []))

    # ---- x-features -----------------------------------------------------------------------------------------
    @staticmethod
    def _embedding_meta(d: Path) -> dict[str, Any]:
        path = d / "embedding.json"
        if not path.is_file():
            raise FileNotFoundError(f"embedding directory {d} has no embedding.json (not a `semlens embed` output)")
        try:
            meta = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"corrupt embedding file {path}: {err}") from err
        return meta

    def _embedding(self, d: Path) -> tuple[Any, torch.Tensor, dict[tuple[int, int], str]] | str:
        """(embedding, loadings (G, k, d), (class, x-feature) -> concept name), loaded once; or why it cannot be
        (a message naming the file, also kept)."""
        with self._lock:
            if d not in self._embeddings:
                from safetensors import SafetensorError

                from semlens.embed.io import load_embedding

                try:
                    emb = load_embedding(d)
                    names: dict[tuple[int, int], str] = {}
                    table = d / "xfeatures.csv"
                    if table.is_file():
                        with open(table, newline="") as f:
                            for r in csv.DictReader(f):
                                names[(int(r["class"]), int(r["xfeature"]))] = r["concept"]
                    self._embeddings[d] = (emb, encoder_loadings(emb), names)
                except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as err:
                    self._embeddings[d] = f"x-features of {d} left out: {err}"
            return self._embeddings[d]

    def notes_for(self, layer: str) -> list[str]:
        """Why attached outputs are left out of ``layer``'s cards (unreadable directories or embeddings)."""
        out = list(self.notes)
        for d in self.embedding_dirs:
            loaded = self._embeddings.get(d)
            if isinstance(loaded, str) and self.embedding_info[d].get("layer") == layer:
                out.append(loaded)
        return out

    def xfeatures_of(self, layer: str, unit: int, k: int = 5) -> list[XFeature]:
        """The ``k`` x-features loading most (by |loading|) on ``unit``, over the attached embeddings of ``layer``."""
        rows = []
        for d in self.embedding_dirs:
            if self.embedding_info[d].get("layer") != layer:
                continue
            loaded = self._embedding(d)
            if isinstance(loaded, str):
                continue  # said by notes_for
            emb, load, names = loaded
            if not 0 <= unit < load.shape[2]:
                continue
            for g in range(load.shape[0]):
                classes = [c for c in emb.classes_ if emb.group_of(c)[0] == g]
                for i in range(load.shape[1]):
                    concepts = tuple(dict.fromkeys(names[(c, i)] for c in classes if (c, i) in names))
                    rows.append(XFeature(tuple(self._class(c) for c in classes), i, float(load[g, i, unit]), concepts,
                                         d.name, emb.method))
        return sorted(rows, key=lambda x: -abs(x.loading))[:k]

    def _class(self, c: int) -> str:
        return self.class_names[c] if c < len(self.class_names) else str(c)
