"""Explaining files: read inputs (images, ``.npy``), attribute, write relevance and one heatmap per sample.

This is the library side of ``semlens explain``; the command only parses arguments and calls
:func:`explain_files`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from semlens.errors import UserInputError
from semlens.explain.graph_check import LINEAR_TYPES, InputShapeError, UnsupportedModelError, probe_model
from semlens.explain.heatmap import heatmap_png
from semlens.outputs import OutputDir, distinct_stems

__all__ = ["load_input", "parse_params", "expected_input", "explain_files", "ExplainOptions", "RULE_PARAMS"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
#: rule parameter -> the methods it applies to are those with this word in their name
RULE_PARAMS = {"epsilon": "epsilon", "gamma": "gamma"}


def load_input(path: Path, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
               ) -> tuple[torch.Tensor, bool]:
    """One input file as float32 ``(N, C, H, W)`` and whether it was a single sample.

    Images and integer arrays (uint8 ``.npy``) are divided by 255, like a PNG; float arrays are kept.
    ``.npy`` may be ``(C, H, W)`` or ``(N, C, H, W)``. With ``mean``/``std`` (one value per channel, or one
    for all) the result is ``(x - mean) / std``.
    """
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        arr = _read_npy(path)
        single = arr.ndim == 3
        x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        if arr.dtype == np.uint8:
            x = x / 255.0
        x = x.unsqueeze(0) if single else x
    elif suffix in IMAGE_SUFFIXES:
        x, single = _read_image(path), True
    else:
        raise UserInputError(f"{path}: unsupported input type {suffix!r} (use an image file or a .npy array)")
    return normalize(x, mean, std, path), single


def _read_npy(path: Path) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise UserInputError(f"cannot read {path} as a .npy array: {err}") from err
    if arr.dtype.kind not in "fiu":
        raise UserInputError(f"{path}: array of dtype {arr.dtype} is not numeric")
    if arr.ndim not in (3, 4):
        raise UserInputError(f"{path}: expected (C, H, W) or (N, C, H, W), got shape {arr.shape}")
    return arr


def _read_image(path: Path) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("L" if img.mode in ("L", "I", "I;16", "1") else "RGB")
            arr = np.asarray(img, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as err:
        raise UserInputError(f"cannot read image {path}: {err}") from err
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr)).unsqueeze(0)


def normalize(x: torch.Tensor, mean: Sequence[float] | None, std: Sequence[float] | None,
              path: Path | str = "input") -> torch.Tensor:
    """``(x - mean) / std`` per channel of ``x`` ``(N, C, H, W)``; ``None`` leaves ``x`` as it is."""
    if mean is None and std is None:
        return x
    c = x.shape[1]
    m = torch.as_tensor(list(mean) if mean is not None else [0.0], dtype=x.dtype)
    s = torch.as_tensor(list(std) if std is not None else [1.0], dtype=x.dtype)
    for name, v in (("--mean", m), ("--std", s)):
        if v.numel() not in (1, c):
            raise UserInputError(f"{path}: {name} has {v.numel()} values but the input has {c} channels")
    if (s <= 0).any():
        raise UserInputError(f"--std must be positive, got {s.tolist()}")
    return (x - m.view(1, -1, 1, 1)) / s.view(1, -1, 1, 1)


def parse_params(method: str, items: Sequence[str]) -> dict[str, float]:
    """``["epsilon=1e-3", "gamma=0.5"]`` -> ``{"epsilon": 0.001, "gamma": 0.5}``, checked against ``method``."""
    params: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise UserInputError(f"--param {item!r}: expected NAME=VALUE (e.g. epsilon=1e-3)")
        if key not in RULE_PARAMS:
            raise UserInputError(f"--param {key!r}: unknown rule parameter; known: {', '.join(RULE_PARAMS)}")
        if RULE_PARAMS[key] not in method:
            raise UserInputError(f"--param {key}: method {method!r} has no {key} rule (methods with "
                                 f"'{RULE_PARAMS[key]}' in their name take it)")
        try:
            v = float(value)
        except ValueError:
            raise UserInputError(f"--param {key}={value!r}: not a number") from None
        if not math.isfinite(v) or v < 0:
            raise UserInputError(f"--param {key}={value}: must be a finite number >= 0")
        params[key] = v
    return params


def expected_input(model: nn.Module, image_size: int | None = None) -> str:
    """The per-sample input shape the model reads, as text: ``"(3, 64, 64)"`` or ``"(3, H, W)"``."""
    first = next((m for m in model.modules() if isinstance(m, LINEAR_TYPES)), None)
    if first is None or isinstance(first, nn.Linear):
        return f"({first.in_features},)" if first is not None else "unknown"
    side = str(image_size) if image_size else None
    dims = [side or "H", side or "W"] if len(first.kernel_size) == 2 else ["..."]
    return f"({first.in_channels}, {', '.join(dims)})"


@dataclass
class ExplainOptions:
    """What :func:`explain_files` does with each input (see ``semlens explain --help``)."""

    method: str = "epsilon-plus-flat"
    target: int | str = "pred"
    params: dict[str, float] = field(default_factory=dict)
    low: float | None = None
    high: float | None = None
    layer: str | None = None
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    image_size: int | None = None
    min_side: int = 224
    colorbar: bool = False
    overlay: bool = False


def _check_fits(model: nn.Module, path: Path, x: torch.Tensor, opts: ExplainOptions) -> None:
    """Name the file, its shape and the expected one when ``x`` does not fit the model (channels checked
    against the first conv; sizes by one probe forward, so models with adaptive pooling take any size)."""
    want = expected_input(model, opts.image_size)
    first = next((m for m in model.modules() if isinstance(m, LINEAR_TYPES)), None)
    channels = getattr(first, "in_channels", None)
    if channels is not None and x.dim() >= 2 and x.shape[1] != channels:
        raise UserInputError(f"{path}: {x.shape[1]} channels (shape {tuple(x.shape)}); the model expects "
                             f"{channels} channels, {want} per sample")
    try:
        probe_model(model, x[:1])
    except InputShapeError as err:
        raise UserInputError(f"{path}: input of shape {tuple(x.shape[1:])} per sample does not fit the model, "
                             f"which expects {want} ({err})") from err


def _targets(model: nn.Module, x: torch.Tensor, target: int | str) -> torch.Tensor | int:
    if target != "pred":
        return int(target)
    with torch.no_grad():
        return model(x).argmax(1)


def explain_files(model: nn.Module, files: Sequence[Path], out: OutputDir, opts: ExplainOptions,
                  echo: Callable[[str], Any] = print) -> list[Path]:
    """For each input file X: ``X.npy`` (relevance, float32, the input's shape) and ``X.png`` (one heatmap
    per sample: ``X.png`` for a single image, ``X-0.png``, ``X-1.png`` ... for a batch). Same-name inputs
    get distinct names (:func:`semlens.outputs.distinct_stems`). Returns the written paths."""
    from semlens.explain import Attributor
    from semlens.runtime import progress

    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    loaded = [(f, *load_input(f, opts.mean, opts.std)) for f in files]
    for f, x, _ in loaded:
        _check_fits(model, f, x, opts)
    written: list[Path] = []
    stems = distinct_stems(files)
    with Attributor(model, opts.method, low=opts.low, high=opts.high, **opts.params) as attr:
        for (path, x, single), stem in progress(list(zip(loaded, stems, strict=True)), total=len(loaded),
                                                desc=f"explain ({opts.method})"):
            x = x.to(dev)
            tgt = _targets(model, x, opts.target)
            try:
                rel = attr(x, tgt, layer=opts.layer, low=opts.low, high=opts.high)
            except UnsupportedModelError:
                raise
            except ValueError as err:
                raise UserInputError(f"{path}: {err}") from err
            rel_np = rel.float().cpu().numpy()
            kept = rel_np[0] if single else rel_np
            written.append(out.write(f"{stem}.npy", lambda p, r=kept: _save_npy(p, r)))
            pngs = _write_pngs(out, stem, rel_np, x.cpu().numpy(), single, opts)
            written += pngs
            shown = tgt if isinstance(tgt, int) else tgt.tolist()
            echo(f"{path}: target {shown} -> {out.root / (stem + '.npy')}, {', '.join(str(p) for p in pngs)}")
    return written


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, arr)


def _write_pngs(out: OutputDir, stem: str, rel: np.ndarray, images: np.ndarray, single: bool,
                opts: ExplainOptions) -> list[Path]:
    paths = []
    for i in range(rel.shape[0]):
        r = rel[i] if rel.ndim >= 3 else rel[i][None, None]
        img = images[i] if opts.overlay and images[i].shape[-2:] == r.shape[-2:] else None
        name = f"{stem}.png" if single else f"{stem}-{i}.png"
        png = heatmap_png(r, img, min_side=opts.min_side, colorbar=opts.colorbar)
        paths.append(out.write(name, lambda p, b=png: Path(p).write_bytes(b)))
    return paths
