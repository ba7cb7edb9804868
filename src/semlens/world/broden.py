"""Broden-format datasets: write the built-in concept images, read ours or a real Broden directory.

Format (NetDissect ``joinseg.py``): ``index.csv`` with columns
``image,split,ih,iw,sh,sw,color,object,material,part,scene,texture``; each category cell holds
``;``-separated entries, a decimal number (whole-image label) or a PNG file under ``images/`` whose
label is ``R + 256 * G``; an empty cell means "not annotated". ``category.csv``
(``name,first,last,count,frequency``), ``label.csv`` (``number,name,category,frequency,coverage,syns``),
``c_<category>.csv`` (``code,number,name,frequency,coverage``).

semlens adds two optional files for the classification task of the concept world: ``classes.csv``
(``label,name``) and ``task.csv`` (``image,label,evidence``; ``evidence`` is a PNG mask, 1 = evidence).
"""

from __future__ import annotations

import csv
import io
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from semlens.runtime import progress
from semlens.world.concepts import CHUNK, VOCABULARY, ConceptImages, ConceptVocabulary, _generate_chunk

__all__ = ["BrodenBatch", "BrodenDataset", "BrodenFormatError", "read_images", "write_broden", "write_concepts"]

INDEX_COLUMNS = ["image", "split", "ih", "iw", "sh", "sw", "color", "object", "material", "part", "scene", "texture"]
PIXEL_CATEGORIES = ("color", "object", "part", "texture")
PNG_LEVEL = 1


class BrodenFormatError(ValueError):
    """A Broden directory whose files are corrupt or inconsistent (the message names the file)."""


def _default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


# ----------------------------------------------------------------------------------------------
# writing


def _encode_labels(maps: Tensor) -> np.ndarray:
    """(N, H, W) int64 label numbers -> (N, H, W, 3) uint8 with R = low byte, G = high byte."""
    m = maps.numpy()
    if m.min(initial=0) < 0 or m.max(initial=0) >= 65536:
        raise ValueError("label numbers must lie in [0, 65535] to be stored as R + 256 G")
    out = np.zeros((*m.shape, 3), dtype=np.uint8)
    out[..., 0] = m & 255
    out[..., 1] = m >> 8
    return out


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=PNG_LEVEL)
    return buf.getvalue()


@dataclass
class _Chunk:
    """What writing a chunk of images produces for the dataset-level tables."""

    rows: list[list[str]]
    task: list[list[str]]
    frequency: Tensor  # (V,) images containing each concept
    pixels: Tensor  # (V,) pixels covered by each concept (scene: whole image)
    evidence: np.ndarray  # (n, S, ceil(S / 8)) packed bits


def _write_chunk(root: Path, ci: ConceptImages, first: int, splits: Sequence[str]) -> _Chunk:
    """Encode and write the files of images ``first .. first+len(ci)-1`` (one write per file)."""
    n, size = len(ci), ci.size
    images = (ci.images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    encoded = {cat: _encode_labels(ci.pixel_labels[cat]) for cat in PIXEL_CATEGORIES}
    names = [f"{first + i:06d}" for i in range(n)]
    img_dir = root / "images"
    for i in range(n):
        files = [(f"{names[i]}.png", images[i])] + [(f"{names[i]}_{c}.png", encoded[c][i]) for c in PIXEL_CATEGORIES]
        for fname, arr in files:
            with open(img_dir / fname, "wb") as f:
                f.write(_png_bytes(arr))
    rows, task = [], []
    scene = ci.scene.tolist()
    labels = ci.labels.tolist()
    for i in range(n):
        cells = {cat: f"{names[i]}_{cat}.png" for cat in PIXEL_CATEGORIES}
        rows.append([f"{names[i]}.png", splits[i], str(size), str(size), str(size), str(size), cells["color"],
                     cells["object"], "", cells["part"], str(scene[i]), cells["texture"]])
        task.append([f"{names[i]}.png", str(labels[i])])
    v = len(ci.vocabulary)
    counts = torch.zeros(n, v, dtype=torch.long)
    for cat in PIXEL_CATEGORIES:
        flat = ci.pixel_labels[cat].reshape(n, -1) + (torch.arange(n) * v)[:, None]
        counts += torch.bincount(flat.reshape(-1), minlength=n * v).reshape(n, v)
    counts[torch.arange(n), ci.scene] += size * size
    counts[:, 0] = 0
    evidence = np.packbits(ci.evidence.numpy(), axis=-1)
    return _Chunk(rows, task, (counts > 0).sum(0), counts.sum(0), evidence)


def _write_tables(root: Path, vocab: ConceptVocabulary, chunks: list[_Chunk], size: int,
                  class_names: list[str]) -> None:
    """Write index.csv, label.csv, category.csv, c_<cat>.csv, classes.csv, task.csv and evidence.npy."""
    freq = torch.stack([c.frequency for c in chunks]).sum(0).tolist()
    cover = (torch.stack([c.pixels for c in chunks]).sum(0).double() / (size * size)).tolist()
    with open(root / "index.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(INDEX_COLUMNS)
        for c in chunks:
            w.writerows(c.rows)
    cats = [c for c in dict.fromkeys(vocab.category) if c != "-"]
    with open(root / "label.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["number", "name", "category", "frequency", "coverage", "syns"])
        for num in range(1, len(vocab)):
            w.writerow([num, vocab.names[num], f"{vocab.category[num]}({freq[num]})", freq[num],
                        f"{cover[num]:.6f}", ""])
    with open(root / "category.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["name", "first", "last", "count", "frequency"])
        for cat in cats:
            nums = vocab.numbers(cat)
            w.writerow([cat, min(nums), max(nums), len(nums), sum(freq[k] for k in nums)])
    for cat in cats:
        with open(root / f"c_{cat}.csv", "w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["code", "number", "name", "frequency", "coverage"])
            w.writerow([0, 0, "-", 0, "0.000000"])
            for code, num in enumerate(vocab.numbers(cat), start=1):
                w.writerow([code, num, vocab.names[num], freq[num], f"{cover[num]:.6f}"])
    with open(root / "classes.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["label", "name"])
        w.writerows([[i, name] for i, name in enumerate(class_names)])
    with open(root / "task.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["image", "label"])
        for c in chunks:
            w.writerows(c.task)
    np.save(root / "evidence.npy", np.concatenate([c.evidence for c in chunks]))


def _split_list(split: str | Sequence[str], n: int) -> list[str]:
    if isinstance(split, str):
        return [split] * n
    split = list(split)
    if len(split) != n:
        raise ValueError(f"split has {len(split)} entries for {n} images")
    return split


def write_broden(ci: ConceptImages, root: str | os.PathLike, split: str | Sequence[str] = "train") -> Path:
    """Write ``ci`` as a Broden-format dataset into ``root`` (created; existing tables are replaced).

    ``split`` is one split name for all images or one per image. Masks are stored at full image
    resolution (``sh = ih``). Besides the Broden tables, ``classes.csv``, ``task.csv`` (image, label)
    and ``evidence.npy`` (evidence masks, bits packed along the last axis) hold the classification task.
    Returns ``root``.
    """
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    chunk = _write_chunk(root, ci, 0, _split_list(split, len(ci)))
    _write_tables(root, ci.vocabulary, [chunk], ci.size, list(ci.class_names))
    return root


def _hash_split(i: int, seed: int, val_fraction: float) -> str:
    r = ((i * 2654435761 + seed * 40503 + 97) % 2**32) / 2**32
    return "val" if r < val_fraction else "train"


def _stream_job(root: Path, seed: int, c: int, n: int, size: int, noise: float, val_fraction: float,
                threads: int) -> tuple[_Chunk, list[str]]:
    if threads:
        torch.set_num_threads(threads)
    ci = _generate_chunk(seed, c, size, noise)
    m = min(CHUNK, n - c * CHUNK)
    ci = ci.subset(slice(0, m))
    splits = [_hash_split(c * CHUNK + i, seed, val_fraction) for i in range(m)]
    return _write_chunk(root, ci, c * CHUNK, splits), list(ci.class_names)


def write_concepts(root: str | os.PathLike, n: int, size: int = 64, seed: int = 0, noise: float = 0.04,
                   val_fraction: float = 0.3, workers: int | None = None, show_progress: bool | None = None) -> Path:
    """Generate ``n`` concept images chunk by chunk and stream them to a Broden directory ``root``.

    Same arguments as :func:`~semlens.world.generate_concepts`; image ``i`` is identical to
    ``generate_concepts(n, size, seed, noise).subset([i])``. Split ``"val"`` is drawn by a hash of the
    image index with probability ``val_fraction`` (Broden splits by filename hash), else ``"train"``.
    Chunks are generated and written in ``workers`` processes (default: all cores up to 8; 1 = in this
    process); the output does not depend on ``workers``. Returns ``root``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1], got {val_fraction}")
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    n_chunks = (n + CHUNK - 1) // CHUNK
    workers = min(workers or min(8, os.cpu_count() or 1), n_chunks)
    args = [(root, seed, c, n, size, noise, val_fraction, 1 if workers > 1 else 0) for c in range(n_chunks)]
    if workers == 1:
        results = (_stream_job(*a) for a in args)
        chunks = [r for r in progress(results, total=n_chunks, desc="write concepts", enabled=show_progress)]
    else:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            futures = [pool.submit(_stream_job, *a) for a in args]
            chunks = [f.result() for f in progress(futures, total=n_chunks, desc="write concepts",
                                                   enabled=show_progress)]
    _write_tables(root, VOCABULARY, [c for c, _ in chunks], size, chunks[0][1])
    return root


# ----------------------------------------------------------------------------------------------
# reading


@dataclass
class BrodenBatch:
    """Images and annotations of a batch of B Broden images.

    images: (B, 3, H, W) float32 in [0, 1]; pixel[cat]: (B, K, sh, sw) int64 label maps (0 = none,
    K = most PNG entries of any image in the batch); image_level[cat]: (B, K') int64 whole-image
    labels (0 = none); annotated[cat]: (B,) bool, the image's cell for ``cat`` is not empty.
    """

    images: Tensor
    pixel: dict[str, Tensor]
    image_level: dict[str, Tensor]
    annotated: dict[str, Tensor]


def _read_csv(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"Broden file not found: {path}")
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as err:
        raise BrodenFormatError(f"cannot parse {path}: {err}") from err
    missing = [c for c in required if c not in fields]
    if missing:
        raise BrodenFormatError(f"{path} lacks column(s) {missing} (has {fields})")
    return rows


def _open_png(path: Path, mode: str | None) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"Broden file not found: {path}")
    try:
        with Image.open(path) as im:
            im = im.convert(mode) if mode else im.convert("RGB")
            return np.asarray(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise BrodenFormatError(f"corrupt image file {path}: {err}") from err


def _image_tensor(arrays: Sequence[np.ndarray]) -> Tensor:
    """(B, 3, H, W) float in [0, 1] from B (H, W, 3) uint8 arrays."""
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255).contiguous()


def read_images(root: str | os.PathLike, names: Sequence[str], image_size: tuple[int, int] | None = None) -> Tensor:
    """The images ``root/images/<name>`` of a Broden-format directory as (B, 3, H, W) float in [0, 1], read
    without parsing its index (the values :meth:`BrodenDataset.load_batch` returns); ``image_size`` (h, w)
    is checked when given."""
    arrays = []
    for name in names:
        path = Path(root) / "images" / name
        img = _open_png(path, "RGB")
        if image_size is not None and img.shape[:2] != tuple(image_size):
            raise BrodenFormatError(f"image {path} has size {img.shape[:2]}, expected {tuple(image_size)}")
        arrays.append(img)
    if not arrays:
        raise ValueError("no image names given")
    return _image_tensor(arrays)


_Loaded = tuple[np.ndarray, dict[str, list[np.ndarray]], dict[str, list[int]]]


class BrodenDataset:
    """A Broden-format directory (ours or the real Broden), read lazily image by image.

    Attributes: ``categories`` (category names used), ``labels`` (list indexed by concept number of
    ``(number, name, primary category)``; entry 0 is ``(0, "-", "-")``), ``image_size`` and
    ``seg_size`` (``(h, w)``), ``splits`` (split name per image). When the directory holds the
    concept-world task (``task.csv``): ``task_labels`` ((N,) int64) and ``class_names``.
    """

    def __init__(self, root: str | os.PathLike, categories: Sequence[str] | None = None,
                 workers: int | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"Broden directory not found: {self.root}")
        self.workers = workers or _default_workers()
        index = _read_csv(self.root / "index.csv", ["image", "split", "ih", "iw", "sh", "sw"])
        if not index:
            raise BrodenFormatError(f"{self.root / 'index.csv'} lists no images")
        cat_rows = _read_csv(self.root / "category.csv", ["name"])
        known = [r["name"] for r in cat_rows if r["name"] in index[0]]
        if categories is None:
            self.categories = known
        else:
            unknown = [c for c in categories if c not in known]
            if unknown:
                raise KeyError(f"unknown Broden categories {unknown}; {self.root} has {known}")
            self.categories = list(categories)
        self._read_labels(known)
        try:
            sizes = {(int(r["ih"]), int(r["iw"]), int(r["sh"]), int(r["sw"])) for r in index}
        except ValueError as err:
            raise BrodenFormatError(f"{self.root / 'index.csv'}: non-integer image or segmentation size: {err}") \
                from err
        if len(sizes) != 1:
            raise BrodenFormatError(f"{self.root / 'index.csv'}: images of several sizes {sorted(sizes)[:5]}")
        ih, iw, sh, sw = sizes.pop()
        self.image_size, self.seg_size = (ih, iw), (sh, sw)
        self.images = [r["image"] for r in index]
        self.splits = [r["split"] for r in index]
        self._cells = {c: [[e for e in (r.get(c) or "").split(";") if e] for r in index] for c in self.categories}
        self._read_task()

    def _read_labels(self, categories: list[str]) -> None:
        rows = _read_csv(self.root / "label.csv", ["number", "name"])
        try:
            top = max(int(r["number"]) for r in rows)
        except ValueError as err:
            raise BrodenFormatError(f"{self.root / 'label.csv'}: non-integer label number: {err}") from err
        names = ["-"] * (top + 1)
        best: list[tuple[float, str]] = [(-1.0, "-")] * (top + 1)
        for r in rows:
            num = int(r["number"])
            names[num] = r["name"]
            for item in (r.get("category") or "").split(";"):
                if "(" in item and item.endswith(")"):
                    cat, count = item[:-1].split("(", 1)
                    if float(count) > best[num][0]:
                        best[num] = (float(count), cat)
        # primary category: largest coverage over the c_<cat>.csv tables where available (NetDissect)
        cover: list[tuple[float, str]] = [(-1.0, "-")] * (top + 1)
        for cat in categories:
            path = self.root / f"c_{cat}.csv"
            if not path.is_file():
                continue
            for r in _read_csv(path, ["number", "coverage"]):
                num = int(r["number"])
                if 0 < num <= top and float(r["coverage"]) > cover[num][0]:
                    cover[num] = (float(r["coverage"]), cat)
        self.labels = [(i, names[i], cover[i][1] if cover[i][0] >= 0 else best[i][1]) for i in range(top + 1)]
        self.labels[0] = (0, "-", "-")

    def _read_task(self) -> None:
        self.task_labels: Tensor | None = None
        self.class_names: list[str] | None = None
        if not (self.root / "task.csv").is_file():
            return
        task = {r["image"]: r["label"] for r in _read_csv(self.root / "task.csv", ["image", "label"])}
        classes = _read_csv(self.root / "classes.csv", ["label", "name"])
        self.class_names = [r["name"] for r in sorted(classes, key=lambda r: int(r["label"]))]
        missing = [im for im in self.images if im not in task]
        if missing:
            raise BrodenFormatError(f"{self.root / 'task.csv'} has no row for image(s) {missing[:5]}")
        self.task_labels = torch.tensor([int(task[im]) for im in self.images], dtype=torch.long)
        bad = (self.task_labels < 0) | (self.task_labels >= len(self.class_names))
        if bad.any():
            raise BrodenFormatError(f"{self.root / 'task.csv'}: labels outside classes.csv's "
                                    f"{len(self.class_names)} classes")

    def __len__(self) -> int:
        return len(self.images)

    def concept_names(self, category: str | None = None) -> list[str]:
        """Names indexed by concept number (``category`` given: other categories' names are ``"-"``)."""
        return [name if category is None or cat == category else "-" for _, name, cat in self.labels]

    def split_indices(self, split: str) -> list[int]:
        """Row indices of the images of ``split`` (e.g. ``"train"``, ``"val"``)."""
        found = [i for i, s in enumerate(self.splits) if s == split]
        if not found:
            raise KeyError(f"no images with split {split!r} in {self.root} (splits: {sorted(set(self.splits))})")
        return found

    def _load_one(self, i: int, categories: Sequence[str]) -> _Loaded:
        path = self.root / "images" / self.images[i]
        img = _open_png(path, "RGB")
        if img.shape[:2] != self.image_size:
            raise BrodenFormatError(f"image {path} has size {img.shape[:2]}, index.csv says {self.image_size}")
        pix: dict[str, list[np.ndarray]] = {}
        lev: dict[str, list[int]] = {}
        for cat in categories:
            pix[cat], lev[cat] = [], []
            for entry in self._cells[cat][i]:
                if entry.isdigit():
                    lev[cat].append(int(entry))
                    continue
                mpath = self.root / "images" / entry
                png = _open_png(mpath, "RGB").astype(np.int64)
                if png.shape[:2] != self.seg_size:
                    raise BrodenFormatError(f"mask {mpath} has size {png.shape[:2]}, index.csv says {self.seg_size}")
                pix[cat].append(png[:, :, 0] + png[:, :, 1] * 256)
        return img, pix, lev

    def _indices(self, indices: Sequence[int] | Tensor) -> list[int]:
        idx = [int(i) for i in (indices.tolist() if isinstance(indices, Tensor) else indices)]
        bad = [i for i in idx if not 0 <= i < len(self)]
        if bad:
            raise IndexError(f"image indices {bad[:5]} out of range for {len(self)} images in {self.root}")
        return idx

    def load_batch(self, indices: Sequence[int] | Tensor, categories: Sequence[str] | None = None) -> BrodenBatch:
        """Read images and annotations of ``indices`` (decoded in parallel threads).

        ``categories`` restricts the annotations read (default: the dataset's ``categories``).
        """
        idx = self._indices(indices)
        cats = list(self.categories if categories is None else categories)
        unknown = [c for c in cats if c not in self._cells]
        if unknown:
            raise KeyError(f"categories {unknown} not loaded from {self.root}; loaded: {self.categories}")
        if len(idx) <= 2 or self.workers == 1:
            loaded = [self._load_one(i, cats) for i in idx]
        else:
            with ThreadPoolExecutor(min(self.workers, len(idx))) as pool:
                loaded = list(pool.map(lambda i: self._load_one(i, cats), idx))
        b = len(idx)
        images = _image_tensor([x[0] for x in loaded])
        pixel, level, annotated = {}, {}, {}
        for cat in cats:
            k = max(len(x[1][cat]) for x in loaded)
            arr = np.zeros((b, k, *self.seg_size), dtype=np.int64)
            kl = max(len(x[2][cat]) for x in loaded)
            lv = np.zeros((b, kl), dtype=np.int64)
            for j, (_, pix, lev) in enumerate(loaded):
                for e, m in enumerate(pix[cat]):
                    arr[j, e] = m
                lv[j, : len(lev[cat])] = lev[cat]
            pixel[cat] = torch.from_numpy(arr)
            level[cat] = torch.from_numpy(lv)
            annotated[cat] = torch.tensor([bool(self._cells[cat][i]) for i in idx], dtype=torch.bool)
        return BrodenBatch(images, pixel, level, annotated)

    def iter_batches(self, batch_size: int, indices: Sequence[int] | Tensor | None = None,
                     show_progress: bool | None = None,
                     categories: Sequence[str] | None = None) -> Iterator[tuple[Tensor, BrodenBatch]]:
        """Yield ``(indices (B,) int64, BrodenBatch)`` over ``indices`` (default: all images) in order."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        idx = self._indices(range(len(self)) if indices is None else indices)
        starts = range(0, len(idx), batch_size)
        for s in progress(starts, total=len(starts), desc="Broden batches", enabled=show_progress):
            chunk = idx[s: s + batch_size]
            yield torch.tensor(chunk, dtype=torch.long), self.load_batch(chunk, categories)

    def load_evidence(self, indices: Sequence[int] | Tensor) -> Tensor:
        """Evidence masks of the concept-world task, (B, sh, sw) bool (from ``evidence.npy``)."""
        if self.task_labels is None:
            raise FileNotFoundError(f"{self.root} has no task.csv (not a semlens concept-world dataset)")
        path = self.root / "evidence.npy"
        if not path.is_file():
            raise FileNotFoundError(f"Broden file not found: {path}")
        try:
            bits = np.load(path, mmap_mode="r")
        except (ValueError, OSError) as err:
            raise BrodenFormatError(f"corrupt evidence file {path}: {err}") from err
        sh, sw = self.seg_size
        if bits.shape != (len(self), sh, (sw + 7) // 8):
            raise BrodenFormatError(f"{path} has shape {bits.shape}, expected {(len(self), sh, (sw + 7) // 8)}")
        idx = self._indices(indices)
        return torch.from_numpy(np.unpackbits(np.asarray(bits[idx]), axis=-1, count=sw).astype(bool))

    def load_task(self, split: str | None = None, batch_size: int = 512) -> tuple[Tensor, Tensor]:
        """All images and class labels of ``split`` (default all): ``(N, 3, H, W)`` float, ``(N,)`` int64."""
        if self.task_labels is None:
            raise FileNotFoundError(f"{self.root} has no task.csv (not a semlens concept-world dataset)")
        idx = self.split_indices(split) if split is not None else list(range(len(self)))
        images = [b.images for _, b in self.iter_batches(batch_size, idx, categories=[])]
        return torch.cat(images), self.task_labels[idx]
