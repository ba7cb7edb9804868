"""Per-sample objectives for activation maximization, read from layers named by dotted path.

An :class:`Objective` maps the activations of a batch of B inputs to B scores (one per sample).
It is a weighted sum of *terms*; each term reads one layer and has its own per-sample parameters
(a unit index, a position, a direction), so one objective can hold 64 different channels, each
for one sample of the batch. The algebra (``+``, ``-``, ``*`` by a scalar or a (B,) tensor) is
elementwise over the batch: sample b's score never depends on another sample's input, except in
the explicit :func:`diversity` term, which couples the samples of one *group* only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Objective", "Term", "channel", "neuron", "class_logit", "direction", "diversity", "unit_objective"]


def _as_index(units: int | Sequence[int] | Tensor) -> Tensor:
    t = torch.as_tensor(units, dtype=torch.long).reshape(-1)
    if t.numel() == 0:
        raise ValueError("no units given")
    if bool((t < 0).any()):
        raise ValueError(f"unit indices must be >= 0, got {t[t < 0][:5].tolist()}")
    return t


@dataclass
class Term:
    """One read-out of layer ``layer`` for a batch of B samples.

    kind: ``"channel"`` (mean over space of channel ``index[b]``), ``"neuron"`` (channel
    ``index[b]`` at ``pos[b] = (y, x)``, or the plain feature for 2-D activations), ``"direction"``
    (``<act[b] mean over space, vectors[b]>``), ``"diversity"`` (see :func:`diversity`).
    """

    layer: str
    kind: str
    index: Tensor | None = None  # (B,) int64
    pos: Tensor | None = None  # (B, 2) int64
    vectors: Tensor | None = None  # (B, C) float
    groups: Tensor | None = None  # (B,) int64, diversity only

    @property
    def batch(self) -> int:
        for t in (self.index, self.vectors, self.groups):
            if t is not None:
                return t.shape[0]
        raise ValueError("term without per-sample parameters")

    def evaluate(self, act: Tensor) -> Tensor:
        """Per-sample value (B,) of this term on activations ``act`` (B, C, ...) of its layer."""
        b = act.shape[0]
        if b != self.batch:
            raise ValueError(f"objective on {self.layer!r} is for {self.batch} samples, the batch has {b}")
        rows = torch.arange(b, device=act.device)
        if self.kind == "diversity":
            return _diversity_value(act, self.groups.to(act.device))
        if self.index is not None and bool((self.index >= act.shape[1]).any()):
            bad = self.index[self.index >= act.shape[1]][:5].tolist()
            raise ValueError(f"unit index {bad} out of range for layer {self.layer!r} with {act.shape[1]} units")
        if self.kind == "channel":
            sel = act[rows, self.index.to(act.device)]
            return sel.reshape(b, -1).mean(dim=1)
        if self.kind == "neuron":
            sel = act[rows, self.index.to(act.device)]
            if sel.dim() == 1:
                return sel
            if sel.dim() != 3:
                raise ValueError(f"neuron objective needs (B, C) or (B, C, H, W) activations at {self.layer!r}")
            p = self.pos.to(act.device)
            centre = torch.tensor([sel.shape[1] // 2, sel.shape[2] // 2], device=act.device)
            p = torch.where(p < 0, centre, p)
            if bool((p[:, 0] >= sel.shape[1]).any() or (p[:, 1] >= sel.shape[2]).any()):
                raise ValueError(f"neuron position out of range for {self.layer!r} of spatial size "
                                 f"{tuple(sel.shape[1:])}")
            return sel[rows, p[:, 0], p[:, 1]]
        if self.kind == "direction":
            flat = act.reshape(b, act.shape[1], -1).mean(dim=2)
            v = self.vectors.to(device=act.device, dtype=act.dtype)
            if v.shape[1] != flat.shape[1]:
                raise ValueError(f"direction of size {v.shape[1]} for layer {self.layer!r} with {flat.shape[1]} units")
            return (flat * v).sum(dim=1)
        raise ValueError(f"unknown objective kind {self.kind!r}")

    def take(self, idx: Tensor) -> Term:
        """The same term restricted to samples ``idx``."""
        def sub(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[idx]
        return Term(self.layer, self.kind, sub(self.index), sub(self.pos), sub(self.vectors), sub(self.groups))


class Objective:
    """A per-sample score: ``sum_k coef_k[b] * term_k(act)[b]`` for each sample b of a batch of B.

    ``a + b``, ``a - b``, ``s * a`` (s a float or a (B,) tensor) keep it per-sample.
    :meth:`cat` puts objectives for different samples into one batch (each gets zero weight on the
    other's samples), :meth:`repeat` tiles every sample (e.g. for several seeds per unit).
    """

    def __init__(self, terms: list[Term], coefs: list[Tensor]) -> None:
        if not terms:
            raise ValueError("an objective needs at least one term")
        sizes = {t.batch for t in terms} | {c.shape[0] for c in coefs}
        if len(sizes) != 1:
            raise ValueError(f"objective terms disagree on the batch size: {sorted(sizes)}")
        self.terms, self.coefs = terms, coefs
        self.batch = sizes.pop()

    @classmethod
    def single(cls, term: Term) -> Objective:
        return cls([term], [torch.ones(term.batch)])

    @property
    def layers(self) -> list[str]:
        """Dotted names of the layers read (each once, in first-use order)."""
        return list(dict.fromkeys(t.layer for t in self.terms))

    def __call__(self, acts: dict[str, Tensor]) -> Tensor:
        """Per-sample scores (B,) from ``acts``: layer name -> activations (B, ...)."""
        total = None
        for term, coef in zip(self.terms, self.coefs, strict=True):
            act = acts[term.layer]
            v = term.evaluate(act) * coef.to(device=act.device, dtype=act.dtype)
            total = v if total is None else total + v
        return total

    def __add__(self, other: Objective) -> Objective:
        if other.batch != self.batch:
            raise ValueError(f"cannot add objectives for {self.batch} and {other.batch} samples")
        return Objective(self.terms + other.terms, self.coefs + other.coefs)

    def __neg__(self) -> Objective:
        return Objective(list(self.terms), [-c for c in self.coefs])

    def __sub__(self, other: Objective) -> Objective:
        return self + (-other)

    def __mul__(self, s: float | Tensor) -> Objective:
        s = torch.as_tensor(s, dtype=torch.float32)
        if s.dim() > 0 and s.shape != (self.batch,):
            raise ValueError(f"scale must be a scalar or of shape ({self.batch},), got {tuple(s.shape)}")
        return Objective(list(self.terms), [c * s for c in self.coefs])

    __rmul__ = __mul__

    def take(self, idx: Tensor | Sequence[int]) -> Objective:
        """The objective of samples ``idx`` only (for one-at-a-time runs)."""
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        return Objective([t.take(idx) for t in self.terms], [c[idx] for c in self.coefs])

    def for_views(self, views: int) -> Objective:
        """The objective of ``views`` view-major copies of the batch (row v·B + b is view v of sample b);
        diversity groups are kept apart per view, so a sample's views never repel each other."""
        b = self.batch
        out = self.take(torch.arange(b).repeat(views))
        view = torch.arange(views).repeat_interleave(b)
        for t in out.terms:
            if t.groups is not None:
                t.groups = t.groups + view * (int(t.groups.max()) - int(t.groups.min()) + 1)
        return out

    def repeat(self, n: int) -> Objective:
        """Each sample repeated ``n`` times in a row (sample b -> rows b*n .. b*n+n-1)."""
        return self.take(torch.arange(self.batch).repeat_interleave(n))

    @staticmethod
    def cat(parts: Sequence[Objective]) -> Objective:
        """One objective over the concatenated batches of ``parts``."""
        sizes = [p.batch for p in parts]
        total, terms, coefs, start = sum(sizes), [], [], 0
        for p, n in zip(parts, sizes, strict=True):
            pad = torch.zeros(total, dtype=torch.long)
            pad[start:start + n] = torch.arange(n)
            outside = torch.ones(total, dtype=torch.bool)
            outside[start:start + n] = False
            for t, c in zip(p.terms, p.coefs, strict=True):
                full = torch.zeros(total, dtype=c.dtype)
                full[start:start + n] = c
                term = t.take(pad)
                if term.groups is not None:  # rows of other parts: each alone, so they never interact
                    lone = int(term.groups.min()) - 1 - torch.arange(int(outside.sum()))
                    term.groups[outside] = lone
                terms.append(term)
                coefs.append(full)
            start += n
        return Objective(terms, coefs)


def channel(layer: str, units: int | Sequence[int] | Tensor) -> Objective:
    """Mean over space of channel ``units[b]`` of ``layer``, one unit per sample (B = len(units))."""
    return Objective.single(Term(layer, "channel", index=_as_index(units)))


def neuron(layer: str, units: int | Sequence[int] | Tensor, y: int | Sequence[int] = -1,
           x: int | Sequence[int] = -1) -> Objective:
    """Channel ``units[b]`` of ``layer`` at position ``(y[b], x[b])`` (-1: the centre; ignored for
    (B, C) layers such as logits)."""
    idx = _as_index(units)
    pos = torch.stack([torch.as_tensor(y, dtype=torch.long).expand(idx.shape[0]),
                       torch.as_tensor(x, dtype=torch.long).expand(idx.shape[0])], dim=1)
    return Objective.single(Term(layer, "neuron", index=idx, pos=pos))


def class_logit(classes: int | Sequence[int] | Tensor, layer: str = "") -> Objective:
    """The logit of class ``classes[b]`` (the model's output when ``layer`` is ``""``)."""
    return neuron(layer, classes)


def direction(layer: str, vectors: Tensor) -> Objective:
    """``<mean over space of act[b], vectors[b]>``; ``vectors`` (B, C) or (C,) for a single sample."""
    v = torch.as_tensor(vectors, dtype=torch.float32)
    v = v.unsqueeze(0) if v.dim() == 1 else v
    return Objective.single(Term(layer, "direction", vectors=v))


def diversity(layer: str, groups: Sequence[int] | Tensor) -> Objective:
    """Minus the mean cosine similarity of sample b's Gram matrix at ``layer`` to those of the other
    samples of its group (``groups[b]``; a sample alone in its group scores 0). Add it with a weight,
    e.g. ``obj + 0.5 * diversity("features.conv3", groups)``, to spread the seeds of one unit apart."""
    return Objective.single(Term(layer, "diversity", groups=torch.as_tensor(groups, dtype=torch.long).reshape(-1)))


def _diversity_value(act: Tensor, groups: Tensor) -> Tensor:
    b = act.shape[0]
    flat = act.reshape(b, act.shape[1], -1)
    gram = torch.nn.functional.normalize((flat @ flat.transpose(1, 2)).reshape(b, -1), dim=1)
    sim = gram @ gram.T
    same = (groups[:, None] == groups[None, :]) & ~torch.eye(b, dtype=torch.bool, device=act.device)
    count = same.sum(dim=1).clamp_min(1)
    return -(sim * same).sum(dim=1) / count


def unit_objective(kind: str, layer: str, units: Sequence[int] | Tensor) -> Objective:
    """Objective by name: ``"channel"``, ``"neuron"`` (centre position) or ``"class"``."""
    if kind == "channel":
        return channel(layer, units)
    if kind == "neuron":
        return neuron(layer, units)
    if kind == "class":
        return class_logit(units, layer)
    raise ValueError(f"unknown objective kind {kind!r}: use channel, neuron or class")
