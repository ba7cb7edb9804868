"""Naming neurons by prediction-difference maximization (PDM, Dong et al. 2017) and
scoring how selective the named neurons are for their topic (§1.10).

For every neuron ``j`` of the representation ``v̄`` (N, D) and a map ``f: (M, D) -> (M, K)`` to topic
probabilities, the dataset-mean prediction difference is

    Δ[j, t] = mean_k ( f(v̄_k)[t] - f(v̄_k with neuron j removed)[t] )

and neuron ``j`` is named ``t*(j) = argmax_t Δ[j, t]`` (no topic when ``max_t Δ[j, t] <= 0``).
Two exact paths, both without a loop over neurons × videos:

* **closed form** for a linear topic map ``f(v) = W v + b``, optionally followed by a softmax
  (:class:`LinearTopicMap`, or an ``nn.Linear``): removing neuron ``j`` (setting it to ``c_j``) moves the
  logits of every video by ``-W[:, j] (v_j - c_j)``, so all ``D`` perturbed logit vectors are one broadcast
  (N, D, K) — no masked copies of ``v̄`` and no re-evaluation of ``f``'s matrix product;
* **batched masking** for any other ``f``: a chunk of ``c`` neurons gives a (N, c, D) tensor of masked
  copies that goes through ``f`` in one call.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from semlens.artefacts import ArtefactError, load_artefact, model_signature, save_artefact
from semlens.stats import auc

if TYPE_CHECKING:
    from semlens.captioning.topics import TopicModel

__all__ = ["NeuronTopics", "LinearTopicMap", "prediction_difference", "name_neurons", "auc", "topic_selectivity",
           "contains_topic"]

TopicMap = Callable[[torch.Tensor], torch.Tensor]
_KIND, _VERSION = "neuron-topics", 1


class LinearTopicMap:
    """f(v) = softmax(v Wᵀ + b) (or v Wᵀ + b with ``softmax=False``): (M, D) -> (M, K).

    weight: (K, D); bias: (K,) or ``None``. Callable like any topic map; :func:`prediction_difference`
    recognises it (and a bare ``nn.Linear``) and uses the closed form.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, softmax: bool = True):
        if weight.dim() != 2:
            raise ValueError(f"weight must be (K, D); got {tuple(weight.shape)}")
        if bias is not None and bias.shape != weight.shape[:1]:
            raise ValueError(f"bias must be ({weight.shape[0]},); got {tuple(bias.shape)}")
        self.weight = weight.detach()
        self.bias = bias.detach() if bias is not None else None
        self.softmax = softmax

    @classmethod
    def from_linear(cls, layer: nn.Linear, softmax: bool = True) -> LinearTopicMap:
        return cls(layer.weight, layer.bias, softmax=softmax)

    def logits(self, v: torch.Tensor) -> torch.Tensor:
        z = v.to(self.weight) @ self.weight.T
        return z + self.bias if self.bias is not None else z

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        z = self.logits(v)
        return torch.softmax(z, -1) if self.softmax else z


def _as_linear(f: object) -> LinearTopicMap | None:
    if isinstance(f, LinearTopicMap):
        return f
    if isinstance(f, nn.Linear):
        return LinearTopicMap.from_linear(f, softmax=False)
    return None


def _check_rep(vbar: torch.Tensor) -> None:
    if vbar.dim() != 2 or vbar.shape[0] == 0 or vbar.shape[1] == 0:
        raise ValueError(f"representation must be (N, D) with N, D > 0; got {tuple(vbar.shape)}")
    if not torch.isfinite(vbar).all():
        raise ValueError("representation contains NaN or inf")


@torch.no_grad()
def prediction_difference(f: TopicMap, vbar: torch.Tensor, removal: str = "zero", *, reference: torch.Tensor | None
                          = None, n_samples: int = 10, chunk: int | None = None, max_elements: int = 2**22,
                          seed: int = 0, method: str = "auto") -> torch.Tensor:
    """Δ (D, K) float32: mean drop of each topic probability when each neuron is removed.

    vbar: (N, D) representations (one row per video). ``removal``:
    ``"zero"`` sets the neuron to 0 (main definition), ``"mean"`` to its mean over ``reference``
    (default: ``vbar``), ``"marginal"`` averages over ``n_samples`` values drawn from its empirical
    distribution in ``reference`` (prediction-difference analysis). ``method``: ``"closed"`` (needs a
    :class:`LinearTopicMap` or ``nn.Linear``), ``"masking"`` (any ``f``), ``"auto"`` (closed when possible).
    ``chunk`` neurons are handled at once (default: as many as fit in ``max_elements`` floats).
    """
    _check_rep(vbar)
    if removal not in {"zero", "mean", "marginal"}:
        raise ValueError(f"unknown removal {removal!r}; use 'zero', 'mean' or 'marginal'")
    if method not in {"auto", "closed", "masking"}:
        raise ValueError(f"unknown method {method!r}; use 'auto', 'closed' or 'masking'")
    lin = _as_linear(f)
    if method == "closed" and lin is None:
        raise ValueError(f"method='closed' needs a LinearTopicMap or nn.Linear topic map; got {type(f).__name__}")
    N, D = vbar.shape
    if lin is not None and lin.weight.shape[1] != D:
        raise ValueError(f"the topic map expects {lin.weight.shape[1]} neurons; the representation has {D}")
    ref = vbar if reference is None else reference.to(vbar)
    if ref.dim() != 2 or ref.shape[1] != D:
        raise ValueError(f"reference must be (M, {D}); got {tuple(ref.shape)}")
    S = n_samples if removal == "marginal" else 1
    if removal == "marginal":
        g = torch.Generator(device="cpu").manual_seed(seed)
        pick = torch.randint(0, ref.shape[0], (S, D), generator=g).to(vbar.device)
        fill = ref.gather(0, pick)  # (S, D): sampled values per neuron
    elif removal == "mean":
        fill = ref.mean(0, keepdim=True)
    else:
        fill = vbar.new_zeros(1, D)
    if lin is not None and method != "masking":
        return _closed_form(lin, vbar, fill, chunk, max_elements)
    P = f(vbar)
    if P.dim() != 2 or P.shape[0] != N:
        raise ValueError(f"f must map (N, D) to (N, K); got {tuple(P.shape)} for N={N}")
    K = P.shape[1]
    c = chunk or max(1, min(D, max_elements // max(1, N * S * max(D, K))))
    out = vbar.new_empty(D, K)
    for start in range(0, D, c):  # chunk over neurons for memory; all videos at once
        j = torch.arange(start, min(D, start + c), device=vbar.device)
        onehot = torch.zeros(len(j), D, device=vbar.device, dtype=torch.bool)
        onehot[torch.arange(len(j)), j] = True  # (c, D)
        masked = torch.where(onehot[None, None], fill[:, None, None, :], vbar[None, :, None, :])  # (S, N, c, D)
        Q = f(masked.reshape(-1, D)).reshape(S, N, len(j), K).mean(0)  # (N, c, K)
        out[start:start + len(j)] = (P[:, None, :] - Q).mean(0)
    return out.float()


def _closed_form(lin: LinearTopicMap, vbar: torch.Tensor, fill: torch.Tensor, chunk: int | None,
                 max_elements: int) -> torch.Tensor:
    """Δ (D, K) for f = [softmax](W v + b): the logits of "v̄ with neuron j set to c" are z - W[:, j] (v̄_j - c_j).

    fill: (S, D) removal values (S samples are averaged). Linear f without softmax: Δ = Wᵀ · mean(v̄ - c).
    """
    W = lin.weight.to(vbar)  # (K, D)
    K, D = W.shape
    N, S = vbar.shape[0], fill.shape[0]
    if not lin.softmax:  # f is affine: the mean drop is exact without any (N, D, K) tensor
        return (W.T * (vbar[None] - fill[:, None]).mean((0, 1))[:, None]).float()
    z = lin.logits(vbar)  # (N, K)
    P = torch.softmax(z, -1)
    c = chunk or max(1, min(D, max_elements // max(1, N * S * K)))
    out = vbar.new_empty(D, K)
    for start in range(0, D, c):  # chunk over neurons only to bound memory (S, N, c, K)
        sl = slice(start, min(D, start + c))
        # perturbed logits z - W[:, j] (v̄_j - c_j), then a softmax over K written out (torch.softmax is
        # slow on CPU for many short rows)
        q = torch.addcmul(z[None, :, None, :], (vbar[None, :, sl] - fill[:, None, sl])[..., None], W.T[sl],
                          value=-1.0)  # (S, N, c, K)
        q.sub_(q.amax(-1, keepdim=True)).exp_()
        Q = (q / q.sum(-1, keepdim=True)).mean(0)  # (N, c, K)
        out[sl] = (P[:, None, :] - Q).mean(0)
    return out.float()


@dataclass
class NeuronTopics:
    """Result of PDM: ``differences`` (D, K), ``topic`` (D,) int64 (-1 = none), ``strength`` (D,) = max_t Δ."""

    differences: torch.Tensor
    topic: torch.Tensor
    strength: torch.Tensor
    topic_names: list[str]

    @property
    def n_topics(self) -> int:
        return self.differences.shape[1]

    def neurons_of(self, t: int) -> list[int]:
        """Neurons named ``t``, strongest first."""
        idx = (self.topic == t).nonzero().flatten()
        order = self.differences[idx, t].argsort(descending=True)
        return idx[order].tolist()

    def table(self, top: int | None = None) -> list[dict[str, object]]:
        """Neuron -> topic rows sorted by strength (named neurons only)."""
        named = (self.topic >= 0).nonzero().flatten()
        named = named[self.strength[named].argsort(descending=True)]
        if top is not None:
            named = named[:top]
        return [{"neuron": int(j), "topic": int(self.topic[j]), "topic_name": self.topic_names[int(self.topic[j])],
                 "strength": float(self.strength[j])} for j in named]

    def topic_table(self, max_neurons: int = 8) -> list[dict[str, object]]:
        """Per topic: number of neurons and the strongest ones."""
        rows = []
        for t in range(self.n_topics):
            ns = self.neurons_of(t)
            rows.append({"topic": t, "topic_name": self.topic_names[t], "n_neurons": len(ns),
                         "neurons": " ".join(map(str, ns[:max_neurons]))})
        return rows

    def to_json(self) -> dict[str, object]:
        return {"topic": self.topic.tolist(), "strength": self.strength.tolist(),
                "topic_names": self.topic_names, "differences": self.differences.tolist()}

    # ------------------------------------------------------------------ stored artefact
    def save(self, path: str | os.PathLike, topic_model: TopicModel | None = None, model: nn.Module | None = None
             ) -> Path:
        """Write the neuron → topic table (artefact ``neuron-topics`` v1) with the topic model it names topics
        of (vocabulary, priors and topic-word counts, so it can be rebuilt by :meth:`load_topic_model`) and
        the :func:`~semlens.artefacts.model_signature` of ``model``."""
        tensors = {"differences": self.differences.float(), "topic": self.topic.long(), "strength": self.strength}
        meta: dict[str, Any] = {"topic_names": list(self.topic_names), "n_neurons": int(self.topic.numel()),
                                "model": model_signature(model) if model is not None else ""}
        if topic_model is not None:
            if topic_model.n_topics != self.n_topics:
                raise ValueError(f"the topic model has {topic_model.n_topics} topics; the table names {self.n_topics}")
            d = dict(topic_model.to_json())
            tensors["topic_model/components"] = torch.as_tensor(np.asarray(d.pop("components"), dtype=np.float64))
            d.pop("top_words", None)
            meta["topic_model"], meta["topic_model_fingerprint"] = d, topic_model.fingerprint()
        return save_artefact(path, _KIND, _VERSION, tensors, meta)

    @classmethod
    def load(cls, path: str | os.PathLike, *, topic_model: TopicModel | None = None, model: nn.Module | None = None
             ) -> NeuronTopics:
        """Read a table written by :meth:`save`. A table made with another topic model (vocabulary or topics)
        than ``topic_model``, or for another architecture than ``model``, raises :class:`ArtefactError`."""
        tensors, h = load_artefact(path, _KIND, _VERSION)
        stored = h.get("topic_model_fingerprint")
        if topic_model is not None and stored and stored != topic_model.fingerprint():
            vocab = len(h["topic_model"]["vocabulary"])
            raise ArtefactError(f"neuron table {path} was named with another topic model ({vocab} words, fingerprint "
                                f"{stored}; this one: {len(topic_model.vocabulary_ or [])} words, "
                                f"{topic_model.fingerprint()})")
        if model is not None and h.get("model") and h["model"] != model_signature(model):
            raise ArtefactError(f"neuron table {path} was made for another model (signature {h['model']}, this model "
                                f"{model_signature(model)})")
        return cls(tensors["differences"], tensors["topic"], tensors["strength"], list(h["topic_names"]))

    @staticmethod
    def load_topic_model(path: str | os.PathLike) -> TopicModel:
        """The topic model stored with the table at ``path`` (an error when it was saved without one)."""
        from semlens.captioning.topics import TopicModel

        tensors, h = load_artefact(path, _KIND, _VERSION)
        if "topic_model" not in h:
            raise ArtefactError(f"neuron table {path} was saved without its topic model")
        return TopicModel.from_json({**h["topic_model"], "components": tensors["topic_model/components"].numpy()},
                                    str(path))


def name_neurons(f: TopicMap, vbar: torch.Tensor, topic_names: Sequence[str] | None = None, removal: str = "zero",
                 **kwargs: object) -> NeuronTopics:
    """Run PDM and name every neuron by its argmax topic (neurons with max Δ <= 0 stay unnamed, -1)."""
    delta = prediction_difference(f, vbar, removal=removal, **kwargs)  # type: ignore[arg-type]
    strength, topic = delta.max(1)
    topic = torch.where(strength > 0, topic, torch.full_like(topic, -1)).cpu()
    names = list(topic_names) if topic_names is not None else [f"topic {t}" for t in range(delta.shape[1])]
    if len(names) != delta.shape[1]:
        raise ValueError(f"{len(names)} topic names for {delta.shape[1]} topics")
    return NeuronTopics(delta.cpu(), topic, strength.cpu(), names)


def contains_topic(s: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """(N, K) bool: video contains topic t when s_t >= threshold or t = argmax s (Dong et al. 2017)."""
    top = torch.zeros_like(s, dtype=torch.bool)
    top[torch.arange(s.shape[0]), s.argmax(1)] = True
    return (s >= threshold) | top


def topic_selectivity(names: NeuronTopics, vbar_fit: torch.Tensor, s_fit: torch.Tensor, vbar_eval: torch.Tensor,
                      s_eval: torch.Tensor, threshold: float = 0.1) -> dict[str, object]:
    """How well each topic's named neurons separate held-out videos with / without the topic.

    Each neuron is oriented by the sign of (mean on videos with its topic − mean without) on the
    fitting set (``vbar_fit`` (N, D), topic targets ``s_fit`` (N, K)); a topic's score on a video is the
    mean oriented activation of its neurons; the AUC of that score on the evaluation set is the
    topic's selectivity (0.5 = chance). Also returns the index (μ_in − μ_out)/(μ_in + μ_out) on |v̄|
    per named neuron (Dong et al. 2017), and each neuron's ``orientation`` (D,) ±1. Topics without
    neurons or without both classes are skipped.
    """
    D, K = names.differences.shape
    for name, v, s in (("fit", vbar_fit, s_fit), ("eval", vbar_eval, s_eval)):
        _check_rep(v)
        if v.shape[1] != D or s.shape != (v.shape[0], K):
            raise ValueError(f"{name} set: need v̄ (N, {D}) and s (N, {K}); got {tuple(v.shape)}, {tuple(s.shape)}")
    vf, ve = vbar_fit.double().cpu(), vbar_eval.double().cpu()
    has_f, has_e = contains_topic(s_fit.cpu(), threshold), contains_topic(s_eval.cpu(), threshold)
    topic = names.topic
    named = topic >= 0
    t_idx = topic.clamp(min=0)
    in_f = has_f[:, t_idx].double()  # (N, D): video has neuron j's topic
    mu_in = (vf * in_f).sum(0) / in_f.sum(0).clamp(min=1)
    mu_out = (vf * (1 - in_f)).sum(0) / (1 - in_f).sum(0).clamp(min=1)
    sign = torch.where(mu_in >= mu_out, 1.0, -1.0).double()
    member = torch.zeros(D, K, dtype=torch.float64)
    member[named.nonzero().flatten(), topic[named]] = 1.0
    n_per = member.sum(0)
    score = (ve * sign) @ member / n_per.clamp(min=1)  # (N_eval, K)
    per_topic = auc(score, has_e)
    valid = (n_per > 0) & ~torch.isnan(per_topic)
    a_in = (ve.abs() * has_e[:, t_idx]).sum(0) / has_e[:, t_idx].sum(0).clamp(min=1)
    a_out = (ve.abs() * ~has_e[:, t_idx]).sum(0) / (~has_e[:, t_idx]).sum(0).clamp(min=1)
    index = (a_in - a_out) / (a_in + a_out).clamp(min=1e-12)
    return {
        "auc_per_topic": [float(x) if valid[t] else None for t, x in enumerate(per_topic)],
        "mean_auc": float(per_topic[valid].mean()) if valid.any() else float("nan"),
        "selectivity_index": float(index[named].mean()) if named.any() else float("nan"),
        "n_named": int(named.sum()),
        "n_topics_scored": int(valid.sum()),
        "orientation": sign.float(),
    }
