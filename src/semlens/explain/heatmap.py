"""Heatmap rendering: relevance -> RGB image (diverging colormap centred on zero), optional overlay on the input."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

__all__ = ["heatmap_rgb", "save_heatmap", "upscale", "heatmap_png", "relevance_scale"]


def _to_numpy(t: torch.Tensor | np.ndarray) -> np.ndarray:
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def heatmap_rgb(relevance: torch.Tensor | np.ndarray, image: torch.Tensor | np.ndarray | None = None,
                percentile: float = 99.5, cmap: str = "bwr", alpha: float = 0.6) -> np.ndarray:
    """Render one relevance map as an ``(H, W, 3)`` uint8 image.

    Args:
        relevance: ``(C, H, W)`` (summed over channels) or ``(H, W)``.
        image: optional ``(3, H, W)`` or ``(1, H, W)`` input in [0, 1]; when given, the heatmap is blended over
            its grayscale version with weight ``alpha`` per pixel scaled by ``|relevance|``.
        percentile: the colour scale saturates at this percentile of ``|relevance|`` (robust to outliers).
        cmap: a diverging matplotlib colormap; zero relevance maps to its centre (white for ``bwr``).
    """
    from matplotlib import colormaps

    r = _as_map(relevance)
    scale = relevance_scale(r, percentile)
    v = np.clip(r / scale, -1.0, 1.0)
    rgb = colormaps[cmap]((v + 1.0) / 2.0)[..., :3]
    if image is not None:
        img = _to_numpy(image).astype(np.float64)
        if img.ndim != 3 or img.shape[1:] != r.shape:
            raise ValueError(f"overlay image must be (C, {r.shape[0]}, {r.shape[1]}), got {img.shape}")
        gray = np.clip(img.mean(0), 0, 1)[..., None].repeat(3, axis=2)
        w = alpha * np.abs(v)[..., None]
        rgb = (1 - w) * gray + w * rgb
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)


def _as_map(relevance: torch.Tensor | np.ndarray) -> np.ndarray:
    r = _to_numpy(relevance).astype(np.float64)
    if r.ndim == 3:
        r = r.sum(0)
    if r.ndim != 2:
        raise ValueError(f"relevance must be (C, H, W) or (H, W), got shape {r.shape}")
    return r


def relevance_scale(relevance: torch.Tensor | np.ndarray, percentile: float = 99.5) -> float:
    """The ``|relevance|`` at which the colour scale saturates (the ``percentile``; the max when that is 0)."""
    r = _as_map(relevance)
    scale = float(np.percentile(np.abs(r), percentile)) if r.size else 0.0
    if not np.isfinite(scale) or scale <= 0:
        scale = float(np.abs(r).max()) or 1.0
    return scale


def upscale(rgb: np.ndarray, min_side: int = 224) -> np.ndarray:
    """Nearest-neighbour upscaling of ``(H, W, 3)`` by the smallest integer factor giving a long side of at
    least ``min_side`` pixels (every input pixel becomes a k x k block: no interpolated values)."""
    k = max(1, -(-min_side // max(rgb.shape[:2])))
    return rgb.repeat(k, axis=0).repeat(k, axis=1) if k > 1 else rgb


def _colorbar(height: int, scale: float, cmap: str = "bwr") -> np.ndarray:
    """A vertical bar ``(height, 64, 3)``: +scale at the top, 0 in the middle, -scale at the bottom, labelled."""
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    v = np.linspace(1.0, -1.0, height)
    bar = (colormaps[cmap]((v + 1.0) / 2.0)[:, :3] * 255).round().astype(np.uint8)
    panel = np.full((height, 64, 3), 255, dtype=np.uint8)
    panel[:, 4:16] = bar[:, None, :]
    img = Image.fromarray(panel)
    draw = ImageDraw.Draw(img)
    for y, text in ((0, f"+{scale:.2g}"), (height // 2 - 5, "0"), (height - 11, f"-{scale:.2g}")):
        draw.text((19, max(0, y)), text, fill=(0, 0, 0))
    return np.asarray(img)


def heatmap_png(relevance: torch.Tensor | np.ndarray, image: torch.Tensor | np.ndarray | None = None,
                min_side: int = 224, colorbar: bool = False, percentile: float = 99.5) -> bytes:
    """PNG bytes of one sample's heatmap, upscaled (:func:`upscale`), with an optional colour bar."""
    import io

    from PIL import Image

    rgb = upscale(heatmap_rgb(relevance, image, percentile), min_side)
    if colorbar:
        rgb = np.concatenate([rgb, _colorbar(rgb.shape[0], relevance_scale(relevance, percentile))], axis=1)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def save_heatmap(path: str | os.PathLike, relevance: torch.Tensor | np.ndarray,
                 image: torch.Tensor | np.ndarray | None = None, percentile: float = 99.5) -> Path:
    """Write :func:`heatmap_rgb` of ``relevance`` to a PNG file and return its path."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(heatmap_rgb(relevance, image, percentile)).save(path)
    return path
