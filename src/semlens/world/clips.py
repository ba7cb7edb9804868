"""Captioned clips: actors from the concept world perform actions over scenes, with structured truth.

All frames of a chunk of clips are rendered at once (clips x frames as one batch) with the concept
world's painter; trajectories are tensor functions of the frame time. Captions come from
:mod:`semlens.world.captions_grammar`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from semlens.world.captions_grammar import describe
from semlens.world.concepts import (
    _COLOR_IDX,
    OBJECT_COLORS,
    OBJECTS,
    SCENES,
    ObjectParams,
    canvas_rgb,
    new_canvas,
    random_object_params,
    render_objects,
    render_scenes,
)

__all__ = ["ACTORS", "ACTIONS", "ClipSet", "generate_clips", "action_probe", "pooled_frame_features"]

ACTORS = ["circle", "square", "triangle", "diamond", "star", "face", "car"]
ACTIONS = ["move-left", "move-right", "move-up", "move-down", "grow", "shrink", "rotate", "bounce", "appear",
           "disappear"]
CLIP_CHUNK = 32


@dataclass
class ClipSet:
    """N clips of T frames with captions and truth.

    frames: (N, T, 3, S, S) uint8; actor_masks: (N, T, S, S) bool, visible actor pixels;
    captions: N lists of >= 15 strings; video_ids: N strings; truth: field -> (N,) int64 for
    ``"actor"``, ``"color"``, ``"action"``, ``"scene"`` with names in ``truth_names[field]``;
    splits: ``"train"``/``"val"``/``"test"`` -> clip indices.
    """

    frames: Tensor
    actor_masks: Tensor
    captions: list[list[str]]
    video_ids: list[str]
    truth: dict[str, Tensor]
    truth_names: dict[str, list[str]]
    splits: dict[str, list[int]]

    def __len__(self) -> int:
        return self.frames.shape[0]

    def frames_float(self, idx: Tensor | slice | list[int] | int | None = None) -> Tensor:
        """Frames of ``idx`` (default all) as float32 in [0, 1], shape (n, T, 3, S, S)."""
        f = self.frames if idx is None else self.frames[idx]
        return f.float().div_(255)

    def describe_truth(self, i: int) -> dict[str, str]:
        """The truth of clip ``i`` as names."""
        return {k: self.truth_names[k][int(v[i])] for k, v in self.truth.items()}


def _chunk_clips(seed: int, chunk: int, frames: int, size: int, noise: float, count: int = CLIP_CHUNK
                 ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Clips of chunk ``chunk`` (``count`` < CLIP_CHUNK renders fewer at once; used to measure batching)."""
    g = torch.Generator().manual_seed((seed * 1_000_033 + chunk * 104_729 + 7) % (2**63 - 1))
    n, t = count, frames
    allowed = torch.tensor([(a, k) for a in range(len(ACTORS)) for k in range(len(ACTIONS))
                            if not (ACTORS[a] == "circle" and ACTIONS[k] == "rotate")])
    pick = allowed[torch.randint(len(allowed), (n,), generator=g)]
    actor, action = pick[:, 0], pick[:, 1]
    color = torch.randint(len(OBJECT_COLORS), (n,), generator=g)
    scene = torch.randint(len(SCENES), (n,), generator=g)
    kind = torch.tensor([OBJECTS.index(a) for a in ACTORS])[actor]
    color_idx = torch.tensor([_COLOR_IDX[c] for c in OBJECT_COLORS])[color]
    base = random_object_params(g, n, kind, color_idx, (0.14, 0.2), (0.35, 0.65), p_texture=0.0)
    # a static distractor of another kind, drawn behind the actor
    d_kind = (kind + 1 + torch.randint(len(OBJECTS) - 1, (n,), generator=g)) % len(OBJECTS)
    d_color = torch.tensor([_COLOR_IDX[c] for c in OBJECT_COLORS])[torch.randint(len(OBJECT_COLORS), (n,),
                                                                                 generator=g)]
    dist = random_object_params(g, n, d_kind, d_color, (0.08, 0.12), (0.12, 0.88), p_texture=0.3)
    dist.active = torch.rand(n, generator=g) < 0.5
    u = torch.rand(n, 6, generator=g)
    tau = torch.linspace(0, 1, t)[None, :].expand(n, t)  # (n, t)

    def per_frame(v: Tensor) -> Tensor:
        return v[:, None].expand(n, t).clone()

    cx, cy, scale, theta = per_frame(base.cx), per_frame(base.cy), per_frame(base.scale), per_frame(base.theta)
    active = torch.ones(n, t, dtype=torch.bool)
    start, end = 0.7 + 0.08 * u[:, :1], 0.3 - 0.08 * u[:, 1:2]
    lateral = start + (end - start) * tau  # from ~0.7 to ~0.3
    act = action[:, None]

    def is_(name: str) -> Tensor:
        return act == ACTIONS.index(name)

    cx = torch.where(is_("move-left"), lateral, cx)
    cx = torch.where(is_("move-right"), 1 - lateral, cx)
    cy = torch.where(is_("move-up"), lateral, cy)
    cy = torch.where(is_("move-down"), 1 - lateral, cy)
    small, large = 0.07 + 0.02 * u[:, 2:3], 0.24 + 0.03 * u[:, 3:4]
    cx = torch.where(is_("grow") | is_("shrink"), 0.5 + (cx - 0.5) * 0.3, cx)
    cy = torch.where(is_("grow") | is_("shrink"), 0.5 + (cy - 0.5) * 0.3, cy)
    scale = torch.where(is_("grow"), small + (large - small) * tau, scale)
    scale = torch.where(is_("shrink"), large + (small - large) * tau, scale)
    spin = torch.where(u[:, 4:5] < 0.5, -1.0, 1.0) * 1.5 * math.pi
    theta = torch.where(is_("rotate"), theta + spin * tau, theta)
    ground = 0.68 + 0.05 * u[:, 5:6]
    cy = torch.where(is_("bounce"), ground - 0.32 * torch.sin(2 * math.pi * tau).abs(), cy)
    switch = 0.3 + 0.3 * u[:, :1]
    active = torch.where(is_("appear"), tau >= switch, active)
    active = torch.where(is_("disappear"), tau < switch, active)

    def flat(v: Tensor) -> Tensor:
        return v.reshape(n * t, *v.shape[2:])

    def repeat(o: ObjectParams) -> ObjectParams:
        return ObjectParams(**{k: getattr(o, k).repeat_interleave(t, dim=0) for k in o.__dataclass_fields__})

    actor_p = repeat(base)
    actor_p.cx, actor_p.cy, actor_p.scale, actor_p.theta = flat(cx), flat(cy), flat(scale), flat(theta)
    actor_p.active = flat(active)
    colors, jitter = render_scenes(scene, size, g)
    canvas = new_canvas(colors.repeat_interleave(t, dim=0), jitter.repeat_interleave(t, dim=0))
    visible = render_objects(canvas, [repeat(dist), actor_p], g)
    clean = canvas_rgb(canvas)
    noisy = (clean + noise * torch.randn(clean.shape, generator=g)).clamp(0, 1)
    frames = (noisy * 255).round().to(torch.uint8).reshape(n, t, 3, size, size)
    truth = {"actor": actor, "color": color, "action": action, "scene": scene}
    return frames, visible[1].reshape(n, t, size, size), truth


def generate_clips(n: int = 300, frames: int = 16, size: int = 64, seed: int = 0, captions_per_clip: int = 20,
                   noise: float = 0.03, split_fractions: tuple[float, float, float] = (0.6, 0.1, 0.3)) -> ClipSet:
    """Generate ``n`` clips of ``frames`` frames of ``size`` x ``size`` pixels, deterministic in ``seed``.

    Each clip: one actor (ACTORS x 10 colours) performing one of ACTIONS over one of the scenes, an
    optional static distractor, ``captions_per_clip`` distinct captions and its truth. Clip ``i``
    depends only on ``(seed, i)``. Splits are a seeded permutation cut by ``split_fractions``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if frames < 2:
        raise ValueError(f"frames must be >= 2 (actions need time), got {frames}")
    if not 16 <= size <= 512:
        raise ValueError(f"size must be within [16, 512], got {size}")
    if captions_per_clip < 1:
        raise ValueError(f"captions_per_clip must be >= 1, got {captions_per_clip}")
    if len(split_fractions) != 3 or min(split_fractions) < 0 or abs(sum(split_fractions) - 1) > 1e-6:
        raise ValueError(f"split_fractions must be 3 non-negative numbers summing to 1, got {split_fractions}")
    parts = [_chunk_clips(seed, c, frames, size, noise) for c in range((n + CLIP_CHUNK - 1) // CLIP_CHUNK)]
    fr = torch.cat([p[0] for p in parts])[:n]
    masks = torch.cat([p[1] for p in parts])[:n]
    truth = {k: torch.cat([p[2][k] for p in parts])[:n] for k in parts[0][2]}
    names = {"actor": list(ACTORS), "color": list(OBJECT_COLORS), "action": list(ACTIONS), "scene": list(SCENES)}
    captions = []
    for i in range(n):
        rng = np.random.default_rng([seed, i, 2017])
        t = {k: names[k][int(truth[k][i])] for k in truth}
        captions.append(describe(t["actor"], t["color"], t["action"], t["scene"], captions_per_clip, rng))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 99)).tolist()
    n_train = round(split_fractions[0] * n)
    n_val = round(split_fractions[1] * n)
    splits = {"train": sorted(perm[:n_train]), "val": sorted(perm[n_train:n_train + n_val]),
              "test": sorted(perm[n_train + n_val:])}
    return ClipSet(fr, masks, captions, [f"clip{i:05d}" for i in range(n)], truth, names, splits)


def pooled_frame_features(frames: Tensor, grid: int = 8) -> Tensor:
    """A model-free frame encoder: average-pool each frame to ``grid`` x ``grid``.

    frames: (N, T, 3, S, S) uint8 or float in [0, 1]. Returns (N, T, 3 * grid * grid) float32.
    """
    f = frames.float() / 255 if frames.dtype == torch.uint8 else frames.float()
    n, t = f.shape[:2]
    return nn.functional.adaptive_avg_pool2d(f.flatten(0, 1), grid).reshape(n, t, -1)


class _TemporalNet(nn.Module):
    """Temporal segment pooling: mean features of ``segments`` equal time segments, concatenated, then an MLP.

    With ``segments=0`` it sees the middle frame only (the single-frame baseline).
    """

    def __init__(self, d: int, classes: int, hidden: int, segments: int) -> None:
        super().__init__()
        self.segments = segments
        self.mlp = nn.Sequential(nn.Linear(d * max(segments, 1), hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, x: Tensor) -> Tensor:  # x: (N, T, D)
        t = x.shape[1]
        if self.segments == 0:
            z = x[:, t // 2]
        else:
            z = torch.cat([c.mean(1) for c in x.tensor_split(self.segments, dim=1)], dim=1)
        return self.mlp(z)


def action_probe(features: Tensor, actions: Tensor, train: list[int], test: list[int], steps: int = 300,
                 hidden: int = 64, seed: int = 0, lr: float = 3e-3, segments: int = 4) -> dict[str, float]:
    """Accuracy of telling actions apart from per-frame features, with and without time.

    features: (N, T, D) float; actions: (N,) int64. Trains a small temporal model (features averaged
    over ``segments`` time segments, concatenated, one-hidden-layer MLP) and a single-frame baseline
    (the same MLP on the middle frame) with Adam for ``steps`` steps on batches of 256 training clips drawn
    with replacement (:func:`semlens.train.fit_module`). Returns
    ``{"temporal": acc, "single_frame": acc, "chance": 1 / classes}`` on ``test``.
    """
    from semlens.train import fit_module, sampled_batches

    if features.dim() != 3 or features.shape[0] != actions.shape[0]:
        raise ValueError(f"features must be (N, T, D) with N = len(actions); got {tuple(features.shape)}")
    x = features.float()
    mu, sd = x[train].mean((0, 1)), x[train].std((0, 1)) + 1e-6
    x = (x - mu) / sd
    classes = int(actions.max()) + 1
    out = {"chance": 1.0 / classes}
    xt, yt = x[train], actions[train]
    for name, segs in (("temporal", segments), ("single_frame", 0)):
        torch.manual_seed(seed)
        net = _TemporalNet(x.shape[2], classes, hidden, segs)
        fit_module(net.parameters(), lambda idx, net=net: nn.functional.cross_entropy(net(xt[idx]), yt[idx]),
                   sampled_batches(len(train), 256, steps, seed), lr=lr, weight_decay=1e-4)
        with torch.no_grad():
            out[name] = (net(x[test]).argmax(1) == actions[test]).float().mean().item()
    return out
