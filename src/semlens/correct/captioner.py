"""Correcting a video captioner through neurons named by prediction-difference maximization (Dong et al.
2017).

A remark "clip S misses topic t" becomes:

1. the neurons ``N(t)`` of the encoder state ``v`` that PDM named ``t`` (:class:`NeuronTopics`);
2. their reference activation: the mean over training videos containing ``t`` (``s_t >= threshold`` or
   ``t = argmax s``) of each neuron's time-mean over valid frames (:func:`engine.reference_activations`);
3. activation enhancement at *every valid time step* of S's ``v`` (attention reads the whole sequence);
   padded steps stay 0. The caption decoded from ``v*`` is the immediate fix;
4. correction propagation: only the encoder (BiLSTM) parameters are fine-tuned so that the model itself
   produces ``v*`` (``||v' - v*||^2 + mu ||theta' - theta||^2``, Adam lr 1e-4, <= 50 steps, mu = 1e-2);
   decoder and topic head stay unchanged.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from semlens.artefacts import model_signature
from semlens.captioning.model import AttentiveCaptioner, tokenize
from semlens.captioning.naming import NeuronTopics, contains_topic
from semlens.correct.engine import PropagationResult, enhance, propagate, reference_activations
from semlens.correct.references import ConceptReferences
from semlens.layers import frozen, suggest

__all__ = ["CaptionCorrector", "caption_mentions", "evaluate_caption_correction", "fit_topic_references"]

Topic = int | str


def caption_mentions(caption: str, topic_words: Sequence[str]) -> bool:
    """True when a word of ``caption`` (tokenized like the vocabulary) is one of ``topic_words``."""
    words = {w.lower() for w in topic_words}
    return any(w in words for w in tokenize(caption))


class CaptionCorrector:
    """Enhance and propagate corrections on an :class:`AttentiveCaptioner` in terms of named neurons.

    names: PDM neuron names of ``v`` (D neurons, K topics); references: (K, D) reference activation of every
    neuron per topic (rows of topics no training video contains may be NaN: using them raises).
    max_neurons: use only the strongest ``max_neurons`` neurons of a topic (default: all of them).
    :meth:`propagate` modifies ``model`` in place.
    """

    def __init__(self, model: AttentiveCaptioner, names: NeuronTopics, references: torch.Tensor | ConceptReferences,
                 *, max_neurons: int | None = None) -> None:
        if isinstance(references, ConceptReferences):
            if references.names != list(names.topic_names):
                raise ValueError("the references were made for other topics than the neuron names "
                                 f"({len(references.names)} vs {names.n_topics} topics)")
            references = references.mean
        D = model.rep_dim
        if names.topic.shape != (D,):
            raise ValueError(f"neuron names cover {tuple(names.topic.shape)} neurons but the model's v has D={D}")
        if references.shape != (names.n_topics, D):
            raise ValueError(f"references must be (K={names.n_topics}, D={D}); got {tuple(references.shape)}")
        if max_neurons is not None and max_neurons < 1:
            raise ValueError(f"max_neurons must be >= 1; got {max_neurons}")
        self.model, self.names, self.max_neurons = model, names, max_neurons
        self.references = references.detach().float().cpu()

    # ------------------------------------------------------------------ construction
    @classmethod
    def fit(cls, model: AttentiveCaptioner, names: NeuronTopics, feats: torch.Tensor, lengths: torch.Tensor,
            s: torch.Tensor, threshold: float = 0.1, *, batch_size: int = 256, max_neurons: int | None = None
            ) -> CaptionCorrector:
        """A corrector whose references come from training videos (see :func:`fit_topic_references`)."""
        refs = fit_topic_references(model, names.topic_names, feats, lengths, s, threshold, batch_size=batch_size)
        return cls(model, names, refs, max_neurons=max_neurons)

    # ------------------------------------------------------------------ topics and neurons
    def topic_index(self, topic: Topic) -> int:
        """Topic number of a name or number (KeyError naming the closest topics when unknown)."""
        tn = self.names.topic_names
        if isinstance(topic, str):
            if topic in tn:
                return tn.index(topic)
            raise KeyError(f"unknown topic {topic!r}.{suggest(topic, tn)} Topics: {', '.join(tn)}")
        if isinstance(topic, bool) or not isinstance(topic, int) or not 0 <= topic < len(tn):
            raise KeyError(f"unknown topic {topic!r}: topics are numbered 0..{len(tn) - 1}")
        return topic

    def neurons(self, topic: Topic) -> list[int]:
        """Neurons named ``topic``, strongest first (at most ``max_neurons``)."""
        t = self.topic_index(topic)
        ns = self.names.neurons_of(t)
        if not ns:
            carried = [self.names.topic_names[k] for k in range(self.names.n_topics) if self.names.neurons_of(k)]
            raise ValueError(f"no neuron carries topic {self.names.topic_names[t]!r} (number {t}); topics with "
                             f"neurons: {', '.join(carried) or 'none'}")
        return ns[: self.max_neurons] if self.max_neurons else ns

    def delta(self, topics: Sequence[Topic]) -> torch.Tensor:
        """(D,) amount added to every valid time step of v for the missing ``topics`` (each counted once)."""
        out = torch.zeros(self.references.shape[1])
        for t in dict.fromkeys(self.topic_index(x) for x in topics):
            ref = self.references[t]
            if not bool(torch.isfinite(ref).all()):
                raise ValueError(f"no training video contains topic {self.names.topic_names[t]!r}: "
                                 "its reference activation is undefined")
            out = enhance(out, self.neurons(t), ref)
        return out

    def _deltas(self, topics: Sequence[Sequence[Topic]], n: int) -> torch.Tensor:
        if isinstance(topics, (str, int)) or len(topics) != n:
            raise ValueError(f"topics must be one list of topics per sample ({n} samples); got {topics!r}")
        per_topic: dict[int, torch.Tensor] = {}
        index = torch.zeros(n, self.names.n_topics)
        for k, ts in enumerate(topics):  # parsing the remarks: one entry per (sample, topic) remark
            if isinstance(ts, (str, int)):
                raise ValueError(f"topics[{k}] must be a list of topics, got {ts!r}")
            for x in ts:
                t = self.topic_index(x)
                if t not in per_topic:
                    per_topic[t] = self.delta([t])
                index[k, t] = 1.0
        table = torch.zeros(self.names.n_topics, self.references.shape[1])
        for t, d in per_topic.items():
            table[t] = d
        return index @ table  # (n, D)

    # ------------------------------------------------------------------ enhancement and decoding
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def enhanced_states(self, feats: torch.Tensor, lengths: torch.Tensor, topics: Sequence[Sequence[Topic]]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """``v*`` (B, T, D): v with the reference of each sample's missing topics added on their neurons at
        every valid step (padded steps stay 0), and the frame mask (B, T). No gradients."""
        dev = self._device()
        feats, lengths = feats.to(dev), lengths.to(dev)
        deltas = self._deltas(topics, feats.shape[0]).to(dev)
        with torch.no_grad(), frozen(self.model):
            v, mask = self.model.encode(feats, lengths)
        return v + deltas.to(v.dtype)[:, None, :] * mask[..., None].to(v.dtype), mask

    def captions(self, feats: torch.Tensor, lengths: torch.Tensor, topics: Sequence[Sequence[Topic]] | None = None,
                 beam: int = 1) -> list[str]:
        """Captions of the videos; with ``topics`` decoded from the enhanced states (the immediate fix)."""
        dev = self._device()
        with torch.no_grad(), frozen(self.model):
            if topics is None:
                v, mask = self.model.encode(feats.to(dev), lengths.to(dev))
            else:
                v, mask = self.enhanced_states(feats, lengths, topics)
            ids = self.model.decode_states(v, mask, beam=beam)
        return [self.model.vocab.decode(row) for row in ids.tolist()]

    def propagate(self, feats: torch.Tensor, lengths: torch.Tensor, topics: Sequence[Sequence[Topic]], *,
                  mu: float = 1e-2, steps: int = 50, lr: float = 1e-4, batch_size: int | None = None,
                  stop: Callable[[nn.Module], bool] | None = None) -> PropagationResult:
        """Correction propagation over remarks ``topics[n]`` for video n: fine-tune only the encoder so its
        own ``v`` approaches ``v*`` (targets computed once, before training). Returns the loss history."""
        dev = self._device()
        feats, lengths = feats.to(dev), lengths.to(dev)
        targets, _ = self.enhanced_states(feats, lengths, topics)

        def represent(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
            return model.encode(feats[idx], lengths[idx])[0]  # type: ignore[operator]

        return propagate(self.model, torch.arange(feats.shape[0], device=dev), targets, representation=represent,
                         params=list(self.model.encoder.parameters()), mu=mu, steps=steps, lr=lr,
                         batch_size=batch_size, stop=stop)


@torch.no_grad()
def fit_topic_references(model: AttentiveCaptioner, topic_names: Sequence[str], feats: torch.Tensor,
                         lengths: torch.Tensor, s: torch.Tensor, threshold: float = 0.1, *, batch_size: int = 256
                         ) -> ConceptReferences:
    """References from training videos: feats (N, T, F), lengths (N,), topic targets s (N, K).

    Per topic t: mean over videos containing t (:func:`contains_topic`) of the time-mean of v over valid
    frames; (K, D), topics that no video contains get a NaN row (an error if a remark names them)."""
    K = len(topic_names)
    if s.dim() != 2 or s.shape[0] != feats.shape[0] or s.shape[1] != K:
        raise ValueError(f"s must be (N={feats.shape[0]}, K={K}); got {tuple(s.shape)}")
    vbar = _mean_states(model, feats, lengths, batch_size)  # (N, D)
    has = contains_topic(s.float(), threshold).to(vbar.device)  # (N, K)
    refs = torch.full((K, vbar.shape[1]), float("nan"))
    for t in range(K):  # K topics (not units or samples)
        if bool(has[:, t].any()):
            refs[t] = reference_activations(vbar, has[:, t]).cpu()
    return ConceptReferences(refs, has.sum(0).long().cpu(), list(topic_names), "v", model_signature(model))


@torch.no_grad()
def _mean_states(model: AttentiveCaptioner, feats: torch.Tensor, lengths: torch.Tensor, batch_size: int
                 ) -> torch.Tensor:
    """(N, D) time-mean of v over valid frames, in batches."""
    if feats.dim() != 3 or lengths.shape != feats.shape[:1]:
        raise ValueError(f"feats must be (N, T, F) and lengths (N,); got {tuple(feats.shape)}, {tuple(lengths.shape)}")
    dev = next(model.parameters()).device
    out = []
    with frozen(model):
        for a in range(0, feats.shape[0], batch_size):
            v, mask = model.encode(feats[a:a + batch_size].to(dev), lengths[a:a + batch_size].to(dev))
            out.append(model.mean_rep(v, mask))
    return torch.cat(out)


def evaluate_caption_correction(model: AttentiveCaptioner, names: NeuronTopics, train: Any, test: Any,
                                topic_words: Sequence[Sequence[str]], *, remark_fraction: float = 0.5,
                                threshold: float = 0.1, mu: float = 1e-2, steps: int = 50, lr: float = 1e-4,
                                beam: int = 1, max_neurons: int | None = None, seed: int = 0,
                                scores: bool = False, meteor: bool = False) -> dict[str, Any]:
    """The correction study on ``test`` (a :class:`CaptionData`; references fitted on ``train``).

    Misses: (clip, topic) pairs where the test clip contains topic t (its topic target, as in
    :func:`contains_topic`), t has named neurons, and the caption mentions no word of ``topic_words[t]``.
    Reports the fraction of misses fixed by enhancement; then the clips with misses are split at random
    (``remark_fraction`` become remarks), a copy of ``model`` is corrected by propagation on the remarks,
    and the fraction of misses now mentioned (without enhancement) is measured on the remark clips and
    on the *held-out* clips. ``scores`` adds coco-caption BLEU/METEOR before/after on the whole test set.
    The model given is not modified; the corrected copy is returned under ``"model"``.
    """
    if len(topic_words) != names.n_topics:
        raise ValueError(f"{len(topic_words)} topic word lists for {names.n_topics} topics")
    corr = CaptionCorrector.fit(model, names, train.feats, train.lengths, train.topics, threshold,
                                max_neurons=max_neurons)
    feats, lengths = test.feats, test.lengths
    before = corr.captions(feats, lengths, beam=beam)
    present = contains_topic(test.topics.float(), threshold)  # (N, K)
    carried = torch.tensor([bool(names.neurons_of(t)) and bool(torch.isfinite(corr.references[t]).all())
                            for t in range(names.n_topics)])
    mentioned = torch.tensor([[caption_mentions(c, w) for w in topic_words] for c in before], dtype=torch.bool)
    miss = present & carried[None] & ~mentioned
    clip, topic = miss.nonzero(as_tuple=True)
    out: dict[str, Any] = {"n_test": feats.shape[0], "n_misses": int(clip.numel()), "captions_before": before}
    if clip.numel() == 0:
        return out

    def fixed(caps: list[str], topics: torch.Tensor) -> torch.Tensor:
        return torch.tensor([caption_mentions(c, topic_words[int(t)]) for c, t in zip(caps, topics, strict=True)])

    enhanced = corr.captions(feats[clip], lengths[clip], [[int(t)] for t in topic], beam=beam)
    out["enhancement_fix_rate"] = float(fixed(enhanced, topic).float().mean())

    clips = clip.unique()
    gen = torch.Generator().manual_seed(seed)
    perm = clips[torch.randperm(clips.numel(), generator=gen)]
    n_remark = max(1, min(clips.numel() - 1, round(remark_fraction * clips.numel()))) if clips.numel() > 1 else 1
    remark_clips = perm[:n_remark]
    is_remark = torch.isin(clip, remark_clips)
    remark_topics = [[int(t) for t in topic[clip == c]] for c in remark_clips]
    fixed_model = copy.deepcopy(model)
    corr_fixed = CaptionCorrector(fixed_model, names, corr.references, max_neurons=max_neurons)
    history = corr_fixed.propagate(feats[remark_clips], lengths[remark_clips], remark_topics, mu=mu, steps=steps,
                                   lr=lr)
    after = corr_fixed.captions(feats, lengths, beam=beam)
    hit = fixed([after[int(c)] for c in clip], topic)
    out.update({
        "n_remark_clips": int(remark_clips.numel()), "n_heldout_clips": int(clips.numel() - remark_clips.numel()),
        "n_remark_misses": int(is_remark.sum()), "n_heldout_misses": int((~is_remark).sum()),
        "remark_fix_rate": float(hit[is_remark].float().mean()),
        "heldout_fix_rate": float(hit[~is_remark].float().mean()) if bool((~is_remark).any()) else float("nan"),
        "captions_after": after, "propagation": history, "model": fixed_model,
        "changed_captions": sum(a != b for a, b in zip(before, after, strict=True)),
    })
    if scores:
        from semlens.captioning.evaluation import score_captions

        refs = dict(zip(test.video_ids, test.captions, strict=True))
        out["scores_before"] = score_captions(refs, dict(zip(test.video_ids, before, strict=True)), meteor=meteor)
        out["scores_after"] = score_captions(refs, dict(zip(test.video_ids, after, strict=True)), meteor=meteor)
    return out
