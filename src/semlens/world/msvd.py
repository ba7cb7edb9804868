"""MSVD-style caption corpora: write the built-in clips, read ours or a real features corpus.

Layout::

    root/captions.csv            video_id,caption   (one row per caption)
    root/splits/train.txt        one video id per line (also val.txt, test.txt)
    root/features/<video_id>.npy (T, D) float per-frame features   (optional)
    root/frames/<video_id>.npy   (T, 3, S, S) uint8 frames          (optional)
    root/truth.csv               video_id,actor,color,action,scene (built-in clips only)

The original MSVD annotation table (``VideoID,Start,End,...,Language,Description``) is read too:
ids become ``<VideoID>_<Start>_<End>`` and only English descriptions are kept.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from semlens.world.clips import ClipSet

__all__ = ["CaptionCorpus", "CorpusFormatError", "read_features", "write_clip_corpus"]

SPLITS = ("train", "val", "test")


class CorpusFormatError(ValueError):
    """A caption corpus whose files are corrupt or inconsistent (the message names the file)."""


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def write_clip_corpus(cs: ClipSet, root: str | os.PathLike,
                      features: Tensor | np.ndarray | Mapping[str, Tensor | np.ndarray] | None = None,
                      write_frames: bool | None = None) -> Path:
    """Write ``cs`` as an MSVD-style corpus into ``root`` and return ``root``.

    ``features``: (N, T, D) per-frame features (or ``video_id -> (T, D)``) written to ``features/``.
    Frames are written to ``frames/`` when ``write_frames`` (default: when no features are given).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "captions.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["video_id", "caption"])
        for vid, caps in zip(cs.video_ids, cs.captions, strict=True):
            w.writerows([vid, c] for c in caps)
    (root / "splits").mkdir(exist_ok=True)
    for name, idx in cs.splits.items():
        (root / "splits" / f"{name}.txt").write_text("".join(f"{cs.video_ids[i]}\n" for i in idx))
    with open(root / "truth.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        fields = list(cs.truth)
        w.writerow(["video_id", *fields])
        for i, vid in enumerate(cs.video_ids):
            w.writerow([vid, *(cs.truth_names[k][int(cs.truth[k][i])] for k in fields)])
    if features is not None:
        (root / "features").mkdir(exist_ok=True)
        for i, vid in enumerate(cs.video_ids):
            feat = features[vid] if isinstance(features, Mapping) else features[i]
            arr = feat.detach().cpu().numpy() if isinstance(feat, Tensor) else np.asarray(feat)
            if arr.ndim != 2:
                raise ValueError(f"features of {vid} must be (T, D), got shape {arr.shape}")
            _save_npy(root / "features" / f"{vid}.npy", arr.astype(np.float32))
    if write_frames or (write_frames is None and features is None):
        (root / "frames").mkdir(exist_ok=True)
        for i, vid in enumerate(cs.video_ids):
            _save_npy(root / "frames" / f"{vid}.npy", cs.frames[i].numpy())
    return root


def _read_captions(path: Path) -> dict[str, list[str]]:
    if not path.is_file():
        raise FileNotFoundError(f"caption table not found: {path}")
    captions: dict[str, list[str]] = {}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            msvd = {"VideoID", "Start", "End", "Description"} <= set(fields)
            if not msvd and not {"video_id", "caption"} <= set(fields):
                raise CorpusFormatError(f"{path} needs columns video_id,caption (or MSVD's VideoID,Start,End,"
                                        f"Description); found {fields}")
            for line, row in enumerate(reader, start=2):
                if msvd:
                    if (row.get("Language") or "English") != "English":
                        continue
                    vid = f"{row['VideoID']}_{row['Start']}_{row['End']}"
                    text = row["Description"]
                else:
                    vid, text = row["video_id"], row["caption"]
                if not vid:
                    raise CorpusFormatError(f"{path}, line {line}: empty video id")
                if text is None or not text.strip():
                    raise CorpusFormatError(f"{path}, line {line}: empty caption for video {vid!r}")
                captions.setdefault(vid, []).append(text.strip())
    except (UnicodeDecodeError, csv.Error) as err:
        raise CorpusFormatError(f"cannot parse {path}: {err}") from err
    if not captions:
        raise CorpusFormatError(f"{path} holds no captions")
    return captions


def _feature_array(path: Path) -> np.ndarray:
    """The (T, D) array of a feature file, memory-mapped (errors name the file)."""
    if not path.is_file():
        raise FileNotFoundError(f"feature file not found: {path}")
    try:
        arr = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as err:
        raise CorpusFormatError(f"corrupt feature file {path}: {err}") from err
    if arr.ndim != 2 or arr.shape[0] < 1 or not np.issubdtype(arr.dtype, np.number):
        raise CorpusFormatError(f"{path} must hold a (T, D) numeric array, found shape {arr.shape} {arr.dtype}")
    return arr


def read_features(root: str | os.PathLike, vid: str, feature_dim: int | None = None) -> Tensor:
    """Per-frame features ``root/features/<vid>.npy`` of an MSVD-style corpus, (T, D) float32, read without
    opening the rest of the corpus; ``feature_dim`` D is checked when given."""
    path = Path(root) / "features" / f"{vid}.npy"
    arr = _feature_array(path)
    if feature_dim is not None and arr.shape[1] != feature_dim:
        raise CorpusFormatError(f"{path} has D={arr.shape[1]}, corpus has D={feature_dim}")
    arr = np.array(arr)  # into memory (the memory map is read-only)
    if not np.isfinite(arr).all():
        raise CorpusFormatError(f"{path} contains NaN or inf")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


class CaptionCorpus:
    """An MSVD-style corpus on disk (ours or real per-frame features), validated when opened.

    ``video_ids`` (in caption-table order), ``captions[video_id] -> list[str]``, ``split(name)``,
    ``features(video_id) -> (T, D) float32`` (from ``features/``), ``frames(video_id) -> (T, 3, S, S)
    uint8`` (from ``frames/``), ``feature_dim`` (``None`` without features), ``truth`` (``video_id ->
    dict`` from ``truth.csv`` when present). Unknown video ids, empty captions, split entries without
    captions, missing or corrupt feature files and inconsistent feature dimensions raise errors naming
    the file.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"caption corpus directory not found: {self.root}")
        self.captions = _read_captions(self.root / "captions.csv")
        self.video_ids = list(self.captions)
        self._splits: dict[str, list[str]] = {}
        for name in SPLITS:
            path = self.root / "splits" / f"{name}.txt"
            if not path.is_file():
                continue
            ids = [s.strip() for s in path.read_text().splitlines() if s.strip()]
            unknown = [v for v in ids if v not in self.captions]
            if unknown:
                raise CorpusFormatError(f"{path} lists video ids without captions: {unknown[:5]}")
            self._splits[name] = ids
        self.feature_dim: int | None = None
        fdir = self.root / "features"
        if fdir.is_dir():
            needed = sorted({v for ids in self._splits.values() for v in ids}) or self.video_ids
            dims: dict[int, str] = {}
            for vid in needed:
                shape = self._feature_shape(vid)
                dims.setdefault(shape[1], vid)
                if len(dims) > 1:
                    a, b = list(dims.items())[:2]
                    raise CorpusFormatError(
                        f"inconsistent feature dimensions in {fdir}: {a[1]}.npy has D={a[0]}, {b[1]}.npy has D={b[0]}")
            self.feature_dim = next(iter(dims)) if dims else None
        self.truth = self._read_truth()

    def _feature_shape(self, vid: str) -> tuple[int, int]:
        shape = _feature_array(self.root / "features" / f"{vid}.npy").shape
        return int(shape[0]), int(shape[1])

    def _read_truth(self) -> dict[str, dict[str, str]] | None:
        path = self.root / "truth.csv"
        if not path.is_file():
            return None
        with open(path, newline="") as f:
            return {row.pop("video_id"): row for row in csv.DictReader(f)}

    def __len__(self) -> int:
        return len(self.video_ids)

    @property
    def split_names(self) -> list[str]:
        return list(self._splits)

    def split(self, name: str) -> list[str]:
        """Video ids of split ``name`` (``"train"``, ``"val"``, ``"test"``)."""
        if name not in self._splits:
            raise KeyError(f"split {name!r} not found in {self.root / 'splits'} (have: {self.split_names})")
        return list(self._splits[name])

    def _check_id(self, vid: str) -> None:
        if vid not in self.captions:
            raise KeyError(f"unknown video id {vid!r} in corpus {self.root}")

    def features(self, vid: str) -> Tensor:
        """Per-frame features of ``vid``, (T, D) float32."""
        self._check_id(vid)
        if self.feature_dim is None and not (self.root / "features").is_dir():
            raise FileNotFoundError(f"corpus {self.root} has no features/ directory")
        return read_features(self.root, vid, self.feature_dim)

    def frames(self, vid: str) -> Tensor:
        """Frames of ``vid``, (T, 3, S, S) uint8 (built-in corpora written with frames)."""
        self._check_id(vid)
        path = self.root / "frames" / f"{vid}.npy"
        if not path.is_file():
            raise FileNotFoundError(f"frame file not found: {path}")
        try:
            arr = np.load(path)
        except (ValueError, OSError, EOFError) as err:
            raise CorpusFormatError(f"corrupt frame file {path}: {err}") from err
        if arr.ndim != 4 or arr.shape[1] != 3 or arr.dtype != np.uint8:
            raise CorpusFormatError(f"{path} must hold (T, 3, S, S) uint8 frames, found {arr.shape} {arr.dtype}")
        return torch.from_numpy(arr)

    def stack_features(self, ids: Sequence[str]) -> Tensor:
        """Features of ``ids`` stacked to (N, T, D) (all clips must have the same T)."""
        feats = [self.features(v) for v in ids]
        lengths = {f.shape[0] for f in feats}
        if len(lengths) > 1:
            raise CorpusFormatError(f"clips of {self.root} have different frame counts {sorted(lengths)}")
        return torch.stack(feats)
