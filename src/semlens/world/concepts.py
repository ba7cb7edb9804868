"""Concept images with pixel-exact ground truth, generated with tensor ops over whole batches.

The world: scenes (background layouts), objects (simple shapes and composites made of named parts),
colours, textures. Every image holds one *key* object whose (shape, colour) pair decides the class,
plus distractor objects whose (shape, colour) pair never belongs to a class, so a classifier needs
the conjunction of shape and colour. The key object's visible pixels form the evidence mask.

Images are generated in fixed chunks of :data:`CHUNK` images, each from its own seeded generator, so
image ``i`` depends only on ``(seed, i)`` (a longer dataset extends a shorter one) and chunks can be
produced in parallel.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ConceptVocabulary",
    "ConceptImages",
    "generate_concepts",
    "COLORS",
    "OBJECT_COLORS",
    "OBJECTS",
    "PARTS",
    "TEXTURES",
    "SCENES",
    "CLASSES",
    "COLOR_JITTER",
    "CHUNK",
    "VOCABULARY",
    "render_objects",
    "render_scenes",
    "new_canvas",
    "canvas_rgb",
    "concept_presence",
]

CHUNK = 256
COLOR_JITTER = 0.04  # max absolute per-channel colour jitter (per object / per image background)

# name -> RGB in [0, 1]. Pairwise distances exceed 2 * sqrt(3) * COLOR_JITTER (checked in tests),
# so the nearest palette colour of a clean pixel is always its labelled colour.
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.88, 0.10, 0.10),
    "orange": (1.00, 0.55, 0.05),
    "yellow": (0.96, 0.90, 0.10),
    "green": (0.10, 0.68, 0.15),
    "blue": (0.10, 0.20, 0.90),
    "purple": (0.55, 0.12, 0.75),
    "pink": (1.00, 0.55, 0.78),
    "brown": (0.48, 0.26, 0.08),
    "grey": (0.48, 0.48, 0.48),
    "cyan": (0.10, 0.85, 0.90),
    "black": (0.04, 0.04, 0.04),
    "white": (0.97, 0.97, 0.97),
    "sky-blue": (0.55, 0.75, 0.97),
    "grass-green": (0.45, 0.66, 0.28),
    "sand": (0.86, 0.74, 0.45),
    "water": (0.08, 0.45, 0.58),
    "beige": (0.88, 0.84, 0.70),
    "wood": (0.70, 0.47, 0.26),
    "navy": (0.05, 0.08, 0.33),
    "light-grey": (0.70, 0.72, 0.80),
    "dark-green": (0.10, 0.30, 0.12),
}
OBJECT_COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "grey", "cyan"]
OBJECTS = ["circle", "square", "triangle", "diamond", "cross", "ring", "star", "house", "face", "tree", "car"]
PARTS = ["wall", "roof", "door", "window", "head", "eye", "mouth", "crown", "trunk", "body", "wheel"]
TEXTURES = ["horizontal-stripes", "vertical-stripes", "diagonal-stripes", "checker", "dots", "zigzag", "blotches"]
SCENES = ["meadow", "beach", "sea", "room", "night", "snowfield", "forest"]
# The classification task: class = (object, colour) of the key object.
CLASSES: list[tuple[str, str]] = [
    ("circle", "red"), ("circle", "blue"), ("square", "green"), ("square", "red"),
    ("triangle", "blue"), ("triangle", "yellow"), ("star", "yellow"), ("star", "purple"),
    ("house", "purple"), ("house", "green"), ("face", "orange"), ("face", "cyan"),
]

_MAIN = "main"
_LBL = torch.int16  # label maps while painting (values < 2**15)


@dataclass(frozen=True)
class ConceptVocabulary:
    """Global concept numbering shared by all categories (0 = ``"-"``, nothing)."""

    names: list[str]
    category: list[str]

    def numbers(self, category: str) -> list[int]:
        """Global numbers of the concepts of ``category`` (``"color"``, ``"object"``, ...)."""
        found = [i for i, c in enumerate(self.category) if c == category]
        if not found:
            raise KeyError(f"unknown concept category {category!r}; known: {sorted(set(self.category) - {'-'})}")
        return found

    def number(self, category: str, name: str) -> int:
        """Global number of the concept ``name`` in ``category``."""
        for i in self.numbers(category):
            if self.names[i] == name:
                return i
        raise KeyError(f"no concept {name!r} in category {category!r}")

    def __len__(self) -> int:
        return len(self.names)


def _build_vocabulary() -> ConceptVocabulary:
    names, cats = ["-"], ["-"]
    for cat, items in (("color", list(COLORS)), ("object", OBJECTS), ("part", PARTS),
                       ("texture", TEXTURES), ("scene", SCENES)):
        names += items
        cats += [cat] * len(items)
    return ConceptVocabulary(names, cats)


VOCABULARY = _build_vocabulary()
_COLOR_IDX = {n: i for i, n in enumerate(COLORS)}
_PALETTE = torch.tensor(list(COLORS.values()), dtype=torch.float32)  # (n_colors, 3)
_COLOR_BASE = VOCABULARY.numbers("color")[0]
_OBJECT_BASE = VOCABULARY.numbers("object")[0]
_PART_BASE = VOCABULARY.numbers("part")[0]
_TEXTURE_BASE = VOCABULARY.numbers("texture")[0]
_SCENE_BASE = VOCABULARY.numbers("scene")[0]


@dataclass
class ConceptImages:
    """A batch of concept images with ground truth.

    images: (N, 3, S, S) float32 in [0, 1] (multiples of 1/255); labels: (N,) int64 class index;
    evidence: (N, S, S) bool, pixels of the key object that decides the label;
    pixel_labels: category -> (N, S, S) int64 global concept number (0 = none) for
    ``"color"``, ``"object"``, ``"part"``, ``"texture"``; scene: (N,) int64 global concept number.
    """

    images: Tensor
    labels: Tensor
    evidence: Tensor
    pixel_labels: dict[str, Tensor]
    scene: Tensor
    class_names: list[str] = field(default_factory=lambda: [f"{c} {o}" for o, c in CLASSES])
    vocabulary: ConceptVocabulary = VOCABULARY

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def size(self) -> int:
        return self.images.shape[-1]

    def subset(self, index: Tensor | slice | list[int]) -> ConceptImages:
        """The images selected by ``index`` (same vocabulary and classes)."""
        return ConceptImages(
            self.images[index], self.labels[index], self.evidence[index],
            {k: v[index] for k, v in self.pixel_labels.items()}, self.scene[index],
            list(self.class_names), self.vocabulary,
        )

    def dataset(self) -> torch.utils.data.TensorDataset:
        """``(image, label)`` pairs for training."""
        return torch.utils.data.TensorDataset(self.images, self.labels)

    @staticmethod
    def concat(parts: list[ConceptImages]) -> ConceptImages:
        if not parts:
            raise ValueError("nothing to concatenate")
        return ConceptImages(
            torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]),
            torch.cat([p.evidence for p in parts]),
            {k: torch.cat([p.pixel_labels[k] for p in parts]) for k in parts[0].pixel_labels},
            torch.cat([p.scene for p in parts]), list(parts[0].class_names), parts[0].vocabulary,
        )


# ----------------------------------------------------------------------------------------------
# Shapes: each takes local coordinates u, v of shape (b, H, W) (object frame, unit half-size) and
# returns painting layers (mask, part name or None, colour: "main" or (colour, alternative colour
# used when the main colour equals it)). Layers are painted in order.
Layer = tuple[Tensor, str | None, str | tuple[str, str]]


def _circle(u: Tensor, v: Tensor) -> list[Layer]:
    return [(u * u + v * v <= 0.95**2, None, _MAIN)]


def _square(u: Tensor, v: Tensor) -> list[Layer]:
    return [((u.abs() <= 0.8) & (v.abs() <= 0.8), None, _MAIN)]


def _triangle(u: Tensor, v: Tensor) -> list[Layer]:
    return [((v <= 0.75) & (v >= -0.95 + 1.75 * u.abs()), None, _MAIN)]


def _diamond(u: Tensor, v: Tensor) -> list[Layer]:
    return [(u.abs() * 1.25 + v.abs() <= 1.0, None, _MAIN)]


def _cross(u: Tensor, v: Tensor) -> list[Layer]:
    a, b = u.abs(), v.abs()
    return [(((a <= 0.3) & (b <= 0.95)) | ((b <= 0.3) & (a <= 0.95)), None, _MAIN)]


def _ring(u: Tensor, v: Tensor) -> list[Layer]:
    r2 = u * u + v * v
    return [((r2 <= 0.95**2) & (r2 >= 0.5**2), None, _MAIN)]


def _star(u: Tensor, v: Tensor) -> list[Layer]:
    r = torch.sqrt(u * u + v * v)
    phi = torch.atan2(v, u) + math.pi / 2
    w = (torch.cos(5 * phi) + 1) / 2
    return [(r <= 0.38 + 0.62 * w**3, None, _MAIN)]


def _house(u: Tensor, v: Tensor) -> list[Layer]:
    wall = (u.abs() <= 0.72) & (v >= -0.08) & (v <= 0.9)
    roof = (v < -0.08) & (v >= -0.95) & (u.abs() <= 0.92 * (v + 0.95) / 0.87)
    door = (u.abs() <= 0.18) & (v >= 0.38) & (v <= 0.9)
    window = ((u.abs() - 0.46).abs() <= 0.14) & ((v - 0.22).abs() <= 0.13)
    return [(wall, "wall", _MAIN), (roof, "roof", ("brown", "grey")), (door, "door", ("black", "black")),
            (window, "window", ("white", "white"))]


def _face(u: Tensor, v: Tensor) -> list[Layer]:
    head = u * u + v * v <= 0.95**2
    eye = (u.abs() - 0.36) ** 2 + (v + 0.22) ** 2 <= 0.15**2
    mouth = (u.abs() <= 0.42) & ((v - 0.42).abs() <= 0.1)
    return [(head, "head", _MAIN), (eye, "eye", ("black", "black")), (mouth, "mouth", ("red", "brown"))]


def _tree(u: Tensor, v: Tensor) -> list[Layer]:
    trunk = (u.abs() <= 0.17) & (v >= 0.1) & (v <= 0.95)
    crown = u * u + (v + 0.28) ** 2 <= 0.64**2
    return [(trunk, "trunk", ("brown", "grey")), (crown, "crown", _MAIN)]


def _car(u: Tensor, v: Tensor) -> list[Layer]:
    body = ((u.abs() <= 0.95) & (v >= -0.12) & (v <= 0.4)) | ((u.abs() <= 0.52) & (v >= -0.52) & (v < -0.12))
    window = (u.abs() <= 0.4) & (v >= -0.44) & (v <= -0.18)
    wheel = (u.abs() - 0.55) ** 2 + (v - 0.42) ** 2 <= 0.21**2
    return [(body, "body", _MAIN), (window, "window", ("white", "white")), (wheel, "wheel", ("black", "black"))]


SHAPE_FNS: dict[str, Callable[[Tensor, Tensor], list[Layer]]] = {
    "circle": _circle, "square": _square, "triangle": _triangle, "diamond": _diamond, "cross": _cross,
    "ring": _ring, "star": _star, "house": _house, "face": _face, "tree": _tree, "car": _car,
}
assert list(SHAPE_FNS) == OBJECTS


def _frac(t: Tensor) -> Tensor:
    return t - torch.floor(t)


def _texture_pattern(tex: Tensor, x: Tensor, y: Tensor, period: Tensor, phase: Tensor,
                     g: torch.Generator) -> Tensor:
    """True where a textured object shows its main colour (everywhere for plain objects, ``tex < 0``).

    The main colour covers the larger share of every texture (so the object keeps its colour name).

    tex: (b,) texture index in TEXTURES or -1; x, y: (H, W) normalised image coordinates;
    period, phase: (b,). Returns (b, H, W) bool.
    """
    h, w = x.shape
    out = torch.ones(tex.shape[0], h, w, dtype=torch.bool)
    for k in range(len(TEXTURES)):
        sel = (tex == k).nonzero().squeeze(1)
        if sel.numel() == 0:
            continue
        p = period[sel][:, None, None]
        xs = x[None] / p + phase[sel][:, None, None]
        ys = y[None] / p + phase[sel][:, None, None]
        if k == 0:
            pat = _frac(ys) < 0.6
        elif k == 1:
            pat = _frac(xs) < 0.6
        elif k == 2:
            pat = _frac(0.7 * (xs + ys)) < 0.6
        elif k == 3:
            pat = (torch.floor(xs) + torch.floor(ys)) % 2 == 0
        elif k == 4:
            pat = (_frac(xs) - 0.5) ** 2 + (_frac(ys) - 0.5) ** 2 > 0.3**2
        elif k == 5:
            pat = _frac(ys + 0.6 * (2 * _frac(xs / 2) - 1).abs()) < 0.6
        else:
            field_ = torch.rand(sel.numel(), 1, 12, 12, generator=g)
            pat = F.interpolate(field_, size=(h, w), mode="bilinear", align_corners=False)[:, 0] > 0.35
        out[sel] = pat
    return out


@dataclass
class ObjectParams:
    """Per-image parameters of one object slot; every field has shape (B,) unless noted."""

    kind: Tensor  # int64 index into OBJECTS
    color: Tensor  # int64 index into COLORS (main colour)
    cx: Tensor  # centre x, normalised [0, 1]
    cy: Tensor
    scale: Tensor  # half-size, normalised
    theta: Tensor  # rotation (radians)
    texture: Tensor  # int64: -1 = plain, else index into TEXTURES
    tex_color: Tensor  # int64 COLORS index of the texture's second colour
    tex_period: Tensor
    tex_phase: Tensor
    jitter: Tensor  # (B, 3) colour offset
    active: Tensor  # bool


def random_object_params(g: torch.Generator, b: int, kind: Tensor, color: Tensor, scale_range: tuple[float, float],
                         center_range: tuple[float, float], p_texture: float = 0.4) -> ObjectParams:
    """Draw placement, rotation, texture and jitter for ``b`` objects of the given kinds and colours."""
    u = torch.rand(b, 12, generator=g)
    lo, hi = center_range
    # near-upright poses (a square turned by 45 degrees would be a diamond); stars turn freely
    free = torch.tensor([OBJECTS[k] == "star" for k in range(len(OBJECTS))])[kind]
    theta = torch.where(free, (u[:, 3] * 2 - 1) * math.pi, (u[:, 3] * 2 - 1) * 0.35)
    textured = u[:, 4] < p_texture
    texture = torch.where(textured, (u[:, 5] * len(TEXTURES)).long().clamp_max(len(TEXTURES) - 1), -1)
    tex_color = torch.where(u[:, 6] < 0.5, _COLOR_IDX["black"], _COLOR_IDX["white"])
    jitter = (torch.rand(b, 3, generator=g) * 2 - 1) * COLOR_JITTER
    return ObjectParams(
        kind=kind, color=color, cx=lo + (hi - lo) * u[:, 0], cy=lo + (hi - lo) * u[:, 1],
        scale=scale_range[0] + (scale_range[1] - scale_range[0]) * u[:, 2], theta=theta,
        texture=texture, tex_color=tex_color, tex_period=0.07 + 0.06 * u[:, 7], tex_phase=u[:, 8] * 4,
        jitter=jitter, active=torch.ones(b, dtype=torch.bool),
    )


def _grid(size: int) -> tuple[Tensor, Tensor]:
    c = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    y, x = torch.meshgrid(c, c, indexing="ij")
    return x, y


def new_canvas(scene_colors: Tensor, scene_jitter: Tensor) -> dict[str, Tensor]:
    """A canvas over scene backgrounds: label maps (B, H, W) int64 and per-pixel owner slot (-1 = scene).

    scene_colors: (B, H, W) int64 global colour numbers; scene_jitter: (B, 3) background colour offset.
    """
    scene_colors = scene_colors.to(_LBL)
    zeros = torch.zeros_like(scene_colors)
    return {"color": scene_colors, "object": zeros, "part": zeros.clone(), "texture": zeros.clone(),
            "owner": torch.full_like(scene_colors, -1), "jitter": scene_jitter[:, None, :]}


def render_objects(canvas: dict[str, Tensor], objects: list[ObjectParams], g: torch.Generator) -> list[Tensor]:
    """Paint objects in order onto ``canvas`` (in place; see :func:`new_canvas`); return visible masks.

    Only integer label maps are painted; :func:`canvas_rgb` turns them into colours at the end.
    Returns a list of (B, H, W) bool masks, the pixels where each object is visible after all
    later objects were painted.
    """
    b, h, w = canvas["color"].shape
    x, y = _grid(h)
    jitters = [canvas["jitter"]]
    for slot, o in enumerate(objects):
        s_col = torch.full((b, h, w), -1, dtype=_LBL)
        s_part = torch.zeros((b, h, w), dtype=_LBL)
        s_tex = torch.zeros((b, h, w), dtype=_LBL)
        for k, name in enumerate(OBJECTS):
            sel = ((o.kind == k) & o.active).nonzero().squeeze(1)
            if sel.numel() == 0:
                continue
            m = sel.numel()
            s = o.scale[sel][:, None, None]
            dx = (x[None] - o.cx[sel][:, None, None]) / s
            dy = (y[None] - o.cy[sel][:, None, None]) / s
            ct, st = torch.cos(o.theta[sel])[:, None, None], torch.sin(o.theta[sel])[:, None, None]
            u, v = ct * dx + st * dy, -st * dx + ct * dy
            main = o.color[sel].to(_LBL)
            texture = o.texture[sel].to(_LBL)
            textured = (texture >= 0)[:, None, None]
            pattern = _texture_pattern(texture, x, y, o.tex_period[sel], o.tex_phase[sel], g)
            main_col = torch.where(textured & ~pattern, o.tex_color[sel].to(_LBL)[:, None, None], main[:, None, None])
            main_tex = torch.where(textured, texture[:, None, None] + _TEXTURE_BASE, 0)
            col = torch.full((m, h, w), -1, dtype=_LBL)
            part = torch.zeros((m, h, w), dtype=_LBL)
            tex = torch.zeros((m, h, w), dtype=_LBL)
            for mask, part_name, colour in SHAPE_FNS[name](u, v):
                if colour == _MAIN:
                    col = torch.where(mask, main_col, col)
                    tex = torch.where(mask, main_tex, tex)
                else:
                    first, alt = _COLOR_IDX[colour[0]], _COLOR_IDX[colour[1]]
                    col = torch.where(mask, torch.where(main == first, alt, first).to(_LBL)[:, None, None], col)
                    tex = torch.where(mask, 0, tex)
                if part_name:
                    part = torch.where(mask, VOCABULARY.number("part", part_name), part)
            s_col[sel], s_part[sel], s_tex[sel] = col, part, tex
        covered = s_col >= 0
        canvas["color"] = torch.where(covered, s_col + _COLOR_BASE, canvas["color"])
        canvas["object"] = torch.where(covered, (o.kind[:, None, None] + _OBJECT_BASE).to(_LBL), canvas["object"])
        canvas["part"] = torch.where(covered, s_part, canvas["part"])
        canvas["texture"] = torch.where(covered, s_tex, canvas["texture"])
        canvas["owner"] = torch.where(covered, slot, canvas["owner"])
        jitters.append(o.jitter[:, None, :])
    canvas["jitter"] = torch.cat(jitters, dim=1)
    owner = canvas["owner"]
    return [owner == slot for slot in range(len(objects))]


def canvas_rgb(canvas: dict[str, Tensor]) -> Tensor:
    """Clean colours of a painted canvas: palette colour plus its owner's jitter, (B, 3, H, W) in [0, 1]."""
    b = canvas["color"].shape[0]
    jit = canvas["jitter"][torch.arange(b)[:, None, None], canvas["owner"].long() + 1]
    return (_PALETTE[canvas["color"].long() - _COLOR_BASE] + jit).clamp(0, 1).permute(0, 3, 1, 2).contiguous()


def render_scenes(scene: Tensor, size: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Backgrounds for scene indices ``scene`` (B,) into SCENES.

    Returns the colour map (B, S, S) int64 global numbers and a colour jitter (B, 3).
    """
    b = scene.shape[0]
    x, y = _grid(size)
    u = torch.rand(b, 4, generator=g)
    horizon = (0.35 + 0.25 * u[:, 0])[:, None, None]
    phase = u[:, 1][:, None, None]
    cells = torch.rand(b, 8, 8, generator=g) < 0.3
    idx = (torch.arange(size) * 8) // size
    cells = cells[:, idx[:, None], idx[None, :]]
    ci = _COLOR_IDX
    top = y[None] < horizon
    wave = y[None] < horizon + 0.03 * torch.sin(2 * math.pi * (x[None] / 0.15 + phase))
    star = cells & ((_frac(x[None] * 8) - 0.5) ** 2 + (_frac(y[None] * 8) - 0.5) ** 2 < 0.16**2)
    trunks = (_frac(x[None] / 0.22 + phase) < 0.2) & (y[None] > horizon - 0.15)
    pairs = {
        "meadow": (top, ci["sky-blue"], ci["grass-green"]),
        "beach": (top, ci["sky-blue"], ci["sand"]),
        "sea": (wave, ci["sky-blue"], ci["water"]),
        "room": (top, ci["beige"], ci["wood"]),
        "night": (star, ci["white"], ci["navy"]),
        "snowfield": (top, ci["light-grey"], ci["white"]),
        "forest": (trunks, ci["brown"], ci["dark-green"]),
    }
    mask = torch.zeros(b, size, size, dtype=torch.bool)
    for k, name in enumerate(SCENES):
        mask = torch.where((scene == k)[:, None, None], pairs[name][0], mask)
    first = torch.tensor([pairs[name][1] for name in SCENES])
    second = torch.tensor([pairs[name][2] for name in SCENES])
    cidx = torch.where(mask, first[scene][:, None, None], second[scene][:, None, None])
    jitter = (torch.rand(b, 3, generator=g) * 2 - 1) * COLOR_JITTER
    return cidx + _COLOR_BASE, jitter


def _chunk_generator(seed: int, chunk: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + chunk * 7919 + 12345) % (2**63 - 1))


def _class_tables() -> tuple[Tensor, Tensor, Tensor]:
    cls_kind = torch.tensor([OBJECTS.index(o) for o, _ in CLASSES])
    cls_color = torch.tensor([_COLOR_IDX[c] for _, c in CLASSES])
    pairs = {(OBJECTS.index(o), _COLOR_IDX[c]) for o, c in CLASSES}
    distract = [(k, _COLOR_IDX[c]) for k in range(len(OBJECTS)) for c in OBJECT_COLORS
                if (k, _COLOR_IDX[c]) not in pairs]
    return cls_kind, cls_color, torch.tensor(distract)


def _generate_chunk(seed: int, chunk: int, size: int, noise: float, masks: bool = True,
                    count: int = CHUNK) -> ConceptImages:
    """Images of chunk ``chunk`` (``count`` < CHUNK renders a smaller batch; used to measure batching)."""
    g = _chunk_generator(seed, chunk)
    b = count
    cls_kind, cls_color, distract = _class_tables()
    labels = torch.randint(len(CLASSES), (b,), generator=g)
    scene = torch.randint(len(SCENES), (b,), generator=g)
    canvas = new_canvas(*render_scenes(scene, size, g))

    def distractor(scale: tuple[float, float], p_active: float) -> ObjectParams:
        pick = distract[torch.randint(len(distract), (b,), generator=g)]
        o = random_object_params(g, b, pick[:, 0], pick[:, 1], scale, (0.12, 0.88))
        o.active = torch.rand(b, generator=g) < p_active
        return o

    d1 = distractor((0.09, 0.17), 1.0)
    d2 = distractor((0.09, 0.17), 0.6)
    key = random_object_params(g, b, cls_kind[labels], cls_color[labels], (0.19, 0.28), (0.28, 0.72), 0.3)
    d3 = distractor((0.07, 0.11), 0.4)
    visible = render_objects(canvas, [d1, d2, key, d3], g)
    clean = canvas_rgb(canvas)
    noisy = clean + noise * torch.randn(clean.shape, generator=g)
    images = torch.round(noisy.clamp(0, 1) * 255) / 255
    return ConceptImages(
        images=images, labels=labels, evidence=visible[2].clone(),
        pixel_labels={k: canvas[k].long() for k in ("color", "object", "part", "texture")} if masks else {},
        scene=scene + _SCENE_BASE,
    )


def generate_concepts(n: int = 1000, size: int = 64, seed: int = 0, noise: float = 0.04,
                      start: int = 0, masks: bool = True) -> ConceptImages:
    """Generate ``n`` concept images of ``size`` x ``size`` pixels (images ``start .. start+n-1`` of seed).

    Deterministic in ``(seed, image index)``. ``noise`` is the std of additive Gaussian pixel noise
    (``noise=0`` gives the clean images; all other content is unchanged). ``masks=False`` leaves
    ``pixel_labels`` empty (saves 4 x 8 bytes per pixel when only images, labels and evidence are needed).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 16 <= size <= 512:
        raise ValueError(f"size must be within [16, 512], got {size}")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    first, last = start // CHUNK, (start + n - 1) // CHUNK
    parts = [_generate_chunk(seed, c, size, noise, masks) for c in range(first, last + 1)]
    out = parts[0] if len(parts) == 1 else ConceptImages.concat(parts)
    off = start - first * CHUNK
    return out.subset(slice(off, off + n))


def concept_presence(images: ConceptImages, min_pixels: int = 1) -> Tensor:
    """Multi-label targets: which concepts each image shows, from its pixel masks and scene.

    Returns (N, C) float32 with C = ``len(images.vocabulary) - 1`` (every concept but ``"-"``; column
    ``c - 1`` is global concept ``c``): 1 where at least ``min_pixels`` pixels of a colour / object / part /
    texture map carry the concept, or where it is the image's scene. Needs ``pixel_labels`` (generate with
    ``masks=True``).
    """
    if not images.pixel_labels:
        raise ValueError("concept_presence needs pixel masks; generate the images with masks=True")
    if min_pixels < 1:
        raise ValueError(f"min_pixels must be >= 1, got {min_pixels}")
    n, c = len(images), len(images.vocabulary)
    counts = torch.zeros(n, c, dtype=torch.int64)
    for cat in ("color", "object", "part", "texture"):
        lab = images.pixel_labels[cat].reshape(n, -1).long()
        counts.scatter_add_(1, lab, torch.ones_like(lab))
    counts[:, 0] = 0  # "-": nothing
    present = counts >= min_pixels
    present[torch.arange(n), images.scene.long()] = True
    return present[:, 1:].float()
