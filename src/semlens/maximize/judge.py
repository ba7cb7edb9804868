"""The concept judge: a multi-label classifier of which concepts an image shows, to score prototypes.

A judge is another network than the one whose units are visualised (default: ``resnet-small``, width 0.5,
its own seed), trained on concept *presence* read from the pixel masks (and image-level labels) of a
Broden-format dataset: target (i, c) = 1 when at least one pixel of image i carries concept c. It is used
by :func:`concept_hits`: a prototype of a unit labelled with a colour hits when at least 5 % of its pixels
are nearest to that colour of the concept world's palette; any other concept hits when the judge's
probability of it is at least 0.5.

A judge file (``.safetensors``) holds the network's weights and a JSON config ``semlens_judge``: the
model spec and keyword arguments, the concept vocabulary (name, category) in output order, the input
shape and the channel statistics of the training images. :func:`load_judge` never unpickles anything
and refuses, with a one-line error naming the file, a judge fitted on another input shape or channel
statistics than the data (:meth:`Judge.check_compatible`) or asked about a concept it does not know.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from semlens.checkpoint import CheckpointError, load_finite_state, read_config, save_weights, sub_state
from semlens.errors import suggest

__all__ = ["Judge", "JudgeError", "fit_judge", "fit_judge_broden", "broden_presence", "save_judge", "load_judge",
           "concept_scores", "concept_hits", "score_hits", "by_palette", "JUDGE_MODEL", "JUDGE_WIDTH", "COLOUR_MIN",
           "PROB_MIN"]

JUDGE_MODEL = "resnet-small"
JUDGE_WIDTH = 0.5
#: a colour unit's prototype hits when at least this share of its pixels is nearest to the colour
COLOUR_MIN = 0.05
#: any other unit's prototype hits when the judge's probability of the concept is at least this
PROB_MIN = 0.5
_KEY = "semlens_judge"


class JudgeError(ValueError):
    """A judge file that is unusable, or a question the judge cannot answer (names the file)."""


@dataclass
class Judge:
    """A fitted judge: ``module`` maps (B, C, H, W) images in [0, 1] to (B, K) logits, one per concept of
    ``concepts`` ((name, category) in output order); ``shape`` (C, H, W), ``channel_mean`` and ``channel_std``
    (C,) describe its training images; ``source`` names the file it was loaded from (for error messages)."""

    module: nn.Module
    concepts: list[tuple[str, str]]
    shape: tuple[int, int, int]
    channel_mean: Tensor
    channel_std: Tensor
    model: str = JUDGE_MODEL
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    source: str = "the judge"
    losses: list[float] = field(default_factory=list)  # training losses of a judge fitted here (not saved)

    def index(self, name: str, category: str = "") -> int:
        """Output index of concept ``name`` of ``category`` (any category when ``category`` is empty)."""
        found = [i for i, (n, c) in enumerate(self.concepts) if n == name and (c == category or not category)]
        if len(found) != 1:
            what = f"{name!r} ({category})" if category else repr(name)
            hint = suggest(name, [n for n, _ in self.concepts])
            many = " (several categories: give one)" if found else ""
            raise JudgeError(f"{self.source} does not know concept {what}{many}; it knows {len(self.concepts)} "
                             f"concepts of categories {sorted({c for _, c in self.concepts})}.{hint}")
        return found[0]

    def probabilities(self, images: Tensor, batch_size: int = 128) -> Tensor:
        """(B, K) probability of each concept for images (B, C, H, W), clamped to [0, 1]."""
        x = images.clamp(0, 1)
        dev = next(iter(self.module.parameters()), torch.zeros(0)).device
        with torch.no_grad():
            logits = torch.cat([self.module(x[s:s + batch_size].to(dev)).cpu() for s in range(0, len(x), batch_size)])
        return torch.sigmoid(logits)

    def check_compatible(self, shape: Sequence[int], channel_mean: Tensor, channel_std: Tensor,
                         what: str = "the data") -> None:
        """Refuse images of another shape, or data with other channel statistics, than the judge's training images
        (the same rule as for priors: a channel mean further than half a standard deviation away)."""
        if tuple(shape) != self.shape:
            c, h, w = self.shape
            raise JudgeError(f"{self.source} was fitted on inputs of {c} channels × {h}×{w}, {what} have "
                             f"{shape[0]} channels × {shape[1]}×{shape[2]}")
        from semlens.maximize.stats import channel_means_differ

        if channel_means_differ(channel_mean, channel_std, self.channel_mean, self.channel_std):
            raise JudgeError(f"{self.source} was fitted on images with channel means "
                             f"{[round(v, 3) for v in self.channel_mean.tolist()]}, {what} have "
                             f"{[round(v, 3) for v in channel_mean.tolist()]} (other data or normalisation?)")

    def config(self) -> dict[str, Any]:
        return {"model": self.model, "model_kwargs": self.model_kwargs, "concepts": [list(c) for c in self.concepts],
                "input_shape": list(self.shape), "channel_mean": self.channel_mean.tolist(),
                "channel_std": self.channel_std.tolist(),
                "targets": "concept presence: >= 1 pixel of a mask, or an image-level label"}


def _as_float(x: Tensor) -> Tensor:
    """uint8 images (0..255, as :func:`fit_judge_broden` keeps them) -> float in [0, 1]; float ones unchanged."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x


def _channel_stats(images: Tensor, batch_size: int = 512) -> tuple[Tensor, Tensor]:
    c = images.shape[1]
    total, sq, count = torch.zeros(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64), 0
    for s in range(0, len(images), batch_size):
        x = _as_float(images[s:s + batch_size]).double().transpose(0, 1).reshape(c, -1)
        total += x.sum(dim=1)
        sq += (x * x).sum(dim=1)
        count += x.shape[1]
    mean = total / count
    std = (sq / count - mean * mean).clamp_min(0).sqrt()
    return mean.float(), std.float()


def fit_judge(images: Tensor, targets: Tensor, concepts: Sequence[tuple[str, str]], seed: int = 0, epochs: int = 3,
              batch_size: int = 64, lr: float = 2e-3, model: str = JUDGE_MODEL, width: float = JUDGE_WIDTH) -> Judge:
    """Fit a judge on ``images`` (N, C, H, W), float in [0, 1] or uint8, and multi-label ``targets`` (N, K) in
    {0, 1}, column k = concept ``concepts[k]`` (name, category): ``model`` built after ``torch.manual_seed(seed)``,
    Adam ``lr`` on the binary cross-entropy, ``epochs`` passes of shuffled batches of ``batch_size``."""
    from semlens.models import build_model
    from semlens.train import fit_module, shuffled_batches

    if images.dim() != 4 or images.shape[2] != images.shape[3]:
        raise ValueError(f"a judge needs square images (N, C, H, H), got {tuple(images.shape)}")
    if targets.dim() != 2 or targets.shape[0] != images.shape[0] or targets.shape[1] != len(concepts):
        raise ValueError(f"targets {tuple(targets.shape)} do not fit {images.shape[0]} images × "
                         f"{len(concepts)} concepts")
    if epochs < 1 or len(images) < 1:
        raise ValueError(f"need at least 1 image and 1 epoch, got {len(images)} image(s), {epochs} epoch(s)")
    kwargs = {"num_classes": int(targets.shape[1]), "image_size": int(images.shape[-1]), "width": width}
    torch.manual_seed(seed)
    module = build_model(model, **kwargs)
    module.train()
    losses = fit_module(module.parameters(),
                        lambda idx: nn.functional.binary_cross_entropy_with_logits(module(_as_float(images[idx])),
                                                                                   targets[idx]),
                        shuffled_batches(len(images), batch_size, epochs, seed), lr=lr)
    mean, std = _channel_stats(images)
    return Judge(module.eval(), [(str(n), str(c)) for n, c in concepts], tuple(images.shape[1:]), mean, std,
                 model, kwargs, losses=losses)


def broden_presence(batch: Any, top: int) -> Tensor:
    """(B, top + 1) bool: concept number n is present in image b of a :class:`~semlens.world.BrodenBatch` when a
    pixel of one of its masks carries n or n is one of its image-level labels (column 0, "nothing", is False)."""
    b = batch.images.shape[0]
    present = torch.zeros(b, top + 1, dtype=torch.bool)
    for labels in [*batch.pixel.values(), *batch.image_level.values()]:
        flat = labels.reshape(b, -1)
        if flat.numel() == 0:
            continue
        if int(flat.min()) < 0 or int(flat.max()) > top:
            raise ValueError(f"label number {int(flat.max())} outside label.csv's 0..{top}")
        present.scatter_(1, flat, True)
    present[:, 0] = False
    return present


def fit_judge_broden(data: str | os.PathLike, limit: int | None = None, seed: int = 0, epochs: int = 3,
                     batch_size: int = 64, read_batch: int = 256, **options: Any) -> Judge:
    """Fit a judge (see :func:`fit_judge`) on the first ``limit`` images of a Broden-format directory ``data``
    (e.g. written by ``semlens data concepts``). Images are read ``read_batch`` at a time; of each batch only
    the images (kept as uint8) and each concept's presence (:func:`broden_presence`) are kept. The vocabulary
    is label.csv's concepts (name, primary category) by number."""
    from semlens.world import BrodenDataset, BrodenFormatError

    ds = BrodenDataset(data)
    n = len(ds) if limit is None else min(limit, len(ds))
    if n < 1:
        raise ValueError(f"--limit {limit} leaves no image of {data}")
    top = len(ds.labels) - 1
    numbers = [num for num, name, _ in ds.labels[1:] if name != "-"]
    if not numbers:
        raise BrodenFormatError(f"{Path(data) / 'label.csv'} names no concept")
    concepts = [(ds.labels[k][1], ds.labels[k][2]) for k in numbers]
    images, targets = [], []
    for _, batch in ds.iter_batches(read_batch, range(n)):
        images.append((batch.images * 255).round_().to(torch.uint8))
        try:
            targets.append(broden_presence(batch, top)[:, numbers].float())
        except ValueError as err:
            raise BrodenFormatError(f"{ds.root}: {err}") from err
    return fit_judge(torch.cat(images), torch.cat(targets), concepts, seed=seed, epochs=epochs,
                     batch_size=batch_size, **options)


def save_judge(judge: Judge, path: str | os.PathLike) -> Path:
    """Write ``judge`` to ``path`` (.safetensors): weights ``module.*`` and the config ``semlens_judge``."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise JudgeError(f"judge file {path} must end in .safetensors")
    tensors = {f"module.{k}": v for k, v in judge.module.state_dict().items()}
    return save_weights(tensors, path, {_KEY: judge.config()})


def _pair_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(p, list) and len(p) == 2 and all(isinstance(s, str) for s in p)
                                           for p in value)


def load_judge(path: str | os.PathLike) -> Judge:
    """Load a judge written by :func:`save_judge` (safetensors only; never a pickle); its module is in eval mode."""
    from semlens.models import build_model

    path = Path(path)
    if path.suffix != ".safetensors":
        raise JudgeError(f"judge {path} must be a .safetensors file written by `semlens maximize fit-judge`")
    if not path.is_file():
        raise JudgeError(f"judge file not found: {path}")
    try:
        cfg = read_config(path).get(_KEY)
    except (CheckpointError, ValueError) as err:  # ValueError: metadata that is not JSON
        raise JudgeError(f"cannot read judge {path}: {str(err).splitlines()[0]}") from err
    if not isinstance(cfg, dict):
        raise JudgeError(f"{path} is not a semlens judge (no '{_KEY}' config; fit one with "
                         "`semlens maximize fit-judge`)")
    try:
        model, kwargs, concepts = cfg["model"], dict(cfg["model_kwargs"]), cfg["concepts"]
        shape = tuple(int(v) for v in cfg["input_shape"])
        mean, std = torch.tensor(cfg["channel_mean"]).float(), torch.tensor(cfg["channel_std"]).float()
    except (KeyError, TypeError, ValueError) as err:
        raise JudgeError(f"judge {path} has an incomplete config: {type(err).__name__}: {err}") from err
    if not isinstance(model, str) or ":" in model:
        raise JudgeError(f"judge {path} names model {model!r}; only built-in models are loaded from a judge file")
    if not _pair_list(concepts) or len(shape) != 3 or mean.shape != (shape[0],) or std.shape != (shape[0],):
        raise JudgeError(f"judge {path} has a malformed config (concepts, input_shape or channel statistics)")
    if kwargs.get("num_classes") != len(concepts):
        raise JudgeError(f"judge {path}: {kwargs.get('num_classes')} outputs for {len(concepts)} concepts")
    state = load_finite_state(path, "judge", JudgeError)
    try:
        module = build_model(model, **kwargs)
        module.load_state_dict(sub_state(state, "module."))
    except (KeyError, RuntimeError, TypeError, ValueError) as err:
        raise JudgeError(f"judge {path} does not match its config: {str(err).splitlines()[0]}") from err
    return Judge(module.eval().requires_grad_(False), [(n, c) for n, c in concepts], shape, mean, std,  # type: ignore[arg-type]
                 model, kwargs, source=f"judge {path}")


def _world_judge(module: nn.Module) -> Judge:
    """A bare module taken to output the concept world's concepts in vocabulary order (as the evaluation's judge)."""
    from semlens.world import VOCABULARY

    concepts = list(zip(VOCABULARY.names[1:], VOCABULARY.category[1:], strict=True))
    return Judge(module, concepts, (0, 0, 0), torch.zeros(0), torch.zeros(0))


def by_palette(name: str, category: str) -> bool:
    """Whether concept (``name``, ``category``) is scored by the concept world's palette: a colour of that palette.
    Any other concept, colours of other data sets included (e.g. Broden's ``red-c``), is scored by the judge."""
    from semlens.world.concepts import COLORS

    return category == "color" and name in COLORS


def concept_scores(images: Tensor, concepts: Sequence[tuple[str, str]], judge: Judge | nn.Module | None = None,
                   batch_size: int = 128) -> Tensor:
    """(B,) how much image b (B, C, H, W) shows concept ``concepts[b]`` = (name, category): for a colour of the
    concept world's palette (:func:`by_palette`), the share of its pixels nearest to that colour; otherwise (other
    data sets' colours included) the judge's probability of the concept. NaN where neither applies (no concept
    name, no judge, or a palette colour for images without 3 channels). ``judge``: a :class:`Judge`, or a bare
    module whose outputs are the concept world's concepts in vocabulary order. A concept the judge does not know
    raises :class:`JudgeError`."""
    from semlens.maximize.data import colour_share

    if len(concepts) != len(images):
        raise ValueError(f"{len(concepts)} concepts for {len(images)} images")
    if judge is not None and not isinstance(judge, Judge):
        judge = _world_judge(judge)
    x = images.clamp(0, 1)
    scores = torch.full((len(concepts),), float("nan"))
    palette = [by_palette(name, category) for name, category in concepts]
    rows = [b for b, (name, _) in enumerate(concepts) if name and not palette[b]]
    if judge is not None and rows:
        cols = [judge.index(*concepts[b]) for b in rows]
        probs = judge.probabilities(x, batch_size)
        scores[rows] = probs[rows, cols]
    for b, (name, _) in enumerate(concepts):
        if palette[b] and x.shape[1] == 3:
            scores[b] = colour_share(x[b:b + 1], name)[0]
    return scores


def concept_hits(images: Tensor, concepts: Sequence[tuple[str, str]], judge: Judge | nn.Module | None = None,
                 colour_min: float = COLOUR_MIN, prob_min: float = PROB_MIN) -> Tensor:
    """(B,) 1.0 where image b shows concept ``concepts[b]``, else 0.0 (NaN where :func:`concept_scores` is NaN):
    a colour's pixel share is at least ``colour_min``; any other concept's judge probability is at least
    ``prob_min``."""
    return score_hits(concept_scores(images, concepts, judge), concepts, colour_min, prob_min)


def score_hits(scores: Tensor, concepts: Sequence[tuple[str, str]], colour_min: float = COLOUR_MIN,
               prob_min: float = PROB_MIN) -> Tensor:
    """:func:`concept_hits` from scores (B,) already computed by :func:`concept_scores` for ``concepts``."""
    colour = torch.tensor([by_palette(n, c) for n, c in concepts], dtype=torch.bool)
    hits = (scores >= torch.where(colour, torch.tensor(colour_min), torch.tensor(prob_min))).float()
    return torch.where(torch.isnan(scores), scores, hits)
