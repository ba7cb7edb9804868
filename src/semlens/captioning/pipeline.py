"""The captioner's pipeline end to end (Dong et al., CVPR 2017): frame features -> topics -> LSTM-B / LSTM-I
-> coco-caption scores -> neuron names (PDM) -> selectivity. Each stage lives in its own module of this
package (:mod:`~semlens.captioning.topics`, :mod:`~semlens.captioning.features`, :mod:`~semlens.captioning.model`,
:mod:`~semlens.captioning.training`, :mod:`~semlens.captioning.naming`, :mod:`~semlens.captioning.evaluation`);
this module chains them.

Typical use::

    prep = prepare(features, captions, splits, n_topics=20)        # dicts keyed by video id
    model, hist = train_captioner(prep, lam=1.0, epochs=20)          # LSTM-I (lam=0: LSTM-B)
    scores = evaluate_captioner(model, prep.test)                    # BLEU-1..4, METEOR, ROUGE-L, CIDEr
    analysis = analyze_neurons(model, prep)                          # PDM names, selectivity AUC
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from semlens.captioning.model import AttentiveCaptioner, CaptionerConfig, Vocabulary
from semlens.captioning.naming import LinearTopicMap, NeuronTopics, contains_topic, name_neurons, topic_selectivity
from semlens.captioning.topics import TopicModel
from semlens.captioning.training import (
    CaptionData,
    CaptionTrainConfig,
    CaptionTrainer,
    fit_topic_head,
    mean_representations,
)
from semlens.runtime import progress, resolve_device
from semlens.stats import linear_probe

__all__ = ["Prepared", "prepare", "prepare_corpus", "train_captioner", "generate",
           "evaluate_captioner", "analyze_neurons", "linear_probe", "topic_activation_profile", "correction_artefacts"]


@dataclass
class Prepared:
    """Split datasets with shared vocabulary and topic model."""

    train: CaptionData
    val: CaptionData | None
    test: CaptionData
    vocab: Vocabulary
    topics: TopicModel
    extra: dict[str, Any] = field(default_factory=dict)


def prepare(features: Mapping[str, Any], captions: Mapping[str, Sequence[str]], splits: Mapping[str, Sequence[str]],
            n_topics: int = 20, min_count: int = 1, max_len: int = 20, topic_kwargs: Mapping[str, Any] | None = None,
            seed: int = 0, vocab: Vocabulary | None = None, topic_model: TopicModel | None = None) -> Prepared:
    """Build vocabulary and LDA topics on the training split and tensor datasets for every split.

    features: video id -> (T, F) array; captions: video id -> sentences; splits: "train"/"val"/"test"
    -> video ids ("val" optional). A given ``vocab`` / fitted ``topic_model`` is used instead of fitting
    one (e.g. those of a trained model). Unknown ids, empty captions and inconsistent dimensions raise.
    """
    for split in ("train", "test"):
        if not splits.get(split):
            raise ValueError(f"split {split!r} is empty or missing")
    for split, ids in splits.items():
        for vid in ids:
            if vid not in captions:
                raise KeyError(f"video id {vid!r} of split {split!r} has no captions")
            if vid not in features:
                raise KeyError(f"video id {vid!r} of split {split!r} has no features")
    train_ids = list(splits["train"])
    if vocab is None:
        vocab = Vocabulary.build([c for v in train_ids for c in captions[v]], min_count=min_count)
    tm = topic_model or TopicModel(n_topics, seed=seed, **dict(topic_kwargs or {})).fit(
        {v: captions[v] for v in train_ids})

    def data(ids: Sequence[str]) -> CaptionData:
        s = torch.from_numpy(tm.transform({v: captions[v] for v in ids}))
        return CaptionData([torch.as_tensor(np.asarray(features[v]), dtype=torch.float32) for v in ids],
                           [captions[v] for v in ids], vocab, s, max_len=max_len, video_ids=ids)

    val = data(splits["val"]) if splits.get("val") else None
    return Prepared(data(train_ids), val, data(splits["test"]), vocab, tm)


def prepare_corpus(corpus: Any, **kwargs: Any) -> Prepared:
    """:func:`prepare` from a :class:`semlens.world.CaptionCorpus` (precomputed per-frame features)."""
    splits = {s: list(corpus.split(s)) for s in ("train", "val", "test") if s in corpus.split_names}
    ids = [v for s in splits.values() for v in s]
    feats = {v: corpus.features(v) for v in progress(ids, total=len(ids), desc="features")}
    return prepare(feats, {v: corpus.captions[v] for v in ids}, splits, **kwargs)


def train_captioner(prep: Prepared, lam: float = 0.0, *, epochs: int = 20, batch_size: int = 64, lr: float = 1e-3,
                    hidden: int = 512, embed: int = 512, decoder_hidden: int = 512, attention: int = 256,
                    dropout: float = 0.5, captions_per_video: int | None = None, seed: int = 0, device: str = "auto",
                    checkpoint_dir: str | os.PathLike | None = None, select_every: int = 0,
                    patience: int | None = None, topic_dropout: float = 0.0, topic_weight_decay: float = 0.0
                    ) -> tuple[AttentiveCaptioner, list[dict]]:
    """Train LSTM-B (``lam=0``) or LSTM-I (``lam>0``); returns the model (eval mode) and its history.

    ``topic_dropout`` (dropout on v̄ before f) and ``topic_weight_decay`` (L2 on f) regularise the
    interpretive loss; they change nothing for ``lam=0``.

    ``select_every > 0``: keep the weights with the best validation CIDEr (evaluated every that many
    epochs; needs ``prep.val``) and stop after ``patience`` evaluations without improvement. The history's
    last entry then carries ``selected_epoch``.
    """
    torch.manual_seed(seed)
    cfg = CaptionerConfig(feature_dim=prep.train.feature_dim, vocab=prep.vocab.words, n_topics=prep.topics.n_topics,
                          hidden=hidden, embed=embed, decoder_hidden=decoder_hidden, attention=attention,
                          dropout=dropout, max_len=int(prep.train.tokens.shape[1]) - 2,
                          topic_dropout=topic_dropout if lam > 0 else 0.0,
                          extra={"lam": lam})
    model = AttentiveCaptioner(cfg)
    trainer = CaptionTrainer(model, prep.train, CaptionTrainConfig(epochs=epochs, batch_size=batch_size, lr=lr,
                                                                   lam=lam, seed=seed, device=device,
                                                                   captions_per_video=captions_per_video,
                                                                   select_every=select_every, patience=patience,
                                                                   topic_weight_decay=topic_weight_decay),
                             val=prep.val, checkpoint_dir=checkpoint_dir)
    hist = trainer.fit()
    if hist:
        hist[-1]["selected_epoch"] = trainer.selected_epoch
    return model, hist


@torch.no_grad()
def generate(model: AttentiveCaptioner, data: CaptionData, beam: int = 5, batch_size: int = 128) -> dict[str, str]:
    """Video id -> generated caption (batched beam search; model mode restored)."""
    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    try:
        out: dict[str, str] = {}
        starts = range(0, data.n_videos, batch_size)
        for s in progress(starts, total=len(starts), desc="decoding"):
            idx = torch.arange(s, min(data.n_videos, s + batch_size))
            feats, lengths = data.video_batch(idx, dev)
            for k, cap in zip(idx.tolist(), model.decode_batch(feats, lengths, beam=beam), strict=True):
                out[data.video_ids[k]] = cap
        return out
    finally:
        model.train(was)


def evaluate_captioner(model: AttentiveCaptioner, data: CaptionData, beam: int = 5, meteor: bool = True
                       ) -> dict[str, float]:
    """coco-caption scores of the model's captions on ``data`` against all references."""
    from semlens.captioning.evaluation import score_captions

    cands = generate(model, data, beam=beam)
    refs = dict(zip(data.video_ids, data.captions, strict=True))
    return score_captions(refs, cands, meteor=meteor)


def topic_activation_profile(names: NeuronTopics, vbar: torch.Tensor, s: torch.Tensor, threshold: float = 0.1,
                             orientation: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per topic t: mean v̄ of t's neurons on videos with t ("in") and without ("out"): (K,) each, NaN
    for topics without neurons. vbar: (N, D); s: (N, K); orientation: optional (D,) ±1 per neuron
    (from :func:`topic_selectivity`) so that negatively coding neurons do not cancel positive ones."""
    if orientation is not None:
        vbar = vbar * orientation.to(vbar.dtype)
    has = contains_topic(s, threshold).double()
    K = s.shape[1]
    member = torch.zeros(vbar.shape[1], K, dtype=torch.float64)
    named = names.topic >= 0
    member[named.nonzero().flatten(), names.topic[named]] = 1.0
    per_topic = vbar.double() @ member / member.sum(0).clamp(min=1)  # (N, K)
    inn = (per_topic * has).sum(0) / has.sum(0).clamp(min=1)
    out = (per_topic * (1 - has)).sum(0) / (1 - has).sum(0).clamp(min=1)
    empty = member.sum(0) == 0
    nan = torch.full_like(inn, float("nan"))
    return {"in": torch.where(empty, nan, inn), "out": torch.where(empty, nan, out)}


def analyze_neurons(model: AttentiveCaptioner, prep: Prepared, refit_head: bool = True,
                    removal: str = "zero", split: str = "test", method: str = "auto",
                    head_weight_decay: float = 1e-2) -> dict[str, Any]:
    """Name the D neurons of v̄ by PDM on the training videos and score their topic selectivity on ``split``.

    This is semlens' one neuron-naming procedure, used by every path (``semlens caption neurons``,
    ``semlens feedback init`` for a captioner, ``reproduce dong``, the demo and its web-app project):
    a topic map f fitted on the *frozen* representation v̄ of the training videos (a copy of the model's
    topic head: the model's own f is untouched; L2 penalty ``head_weight_decay`` · ‖W‖², without which the
    head overfits the training videos and predicts held-out topics worse than a constant), then PDM of f
    over v̄. Names are then a property of the representation alone, whatever λ the model was trained with
    (an LSTM-B has no trained f at all). ``refit_head=False`` names through the model's own jointly trained f
    instead (the paper's way, only meaningful for λ > 0; ``reproduce dong`` reports it beside the main
    figure). PDM uses the closed form for the softmax-linear f (``method``, see
    :func:`semlens.captioning.naming.prediction_difference`).
    Returns names, selectivity, v̄ per split, the topic-prediction error on ``split`` and activation profiles.
    """
    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test'; got {split!r}")
    data = prep.test if split == "test" else prep.val
    if data is None:
        raise ValueError("the prepared data has no validation split")
    head = model.topic_head
    head_loss = None
    if refit_head:
        head = copy.deepcopy(model.topic_head)
        head_loss = fit_topic_head(model, prep.train, head=head, weight_decay=head_weight_decay)
    vtr = mean_representations(model, prep.train)
    vte, seq = mean_representations(model, data, return_sequences=True)
    f = LinearTopicMap.from_linear(head, softmax=True)
    dev = f.weight.device
    names = name_neurons(f, vtr.to(dev), prep.topics.topic_names(), removal=removal, method=method)
    sel = topic_selectivity(names, vtr, prep.train.topics, vte, data.topics)
    topic_err = float(((f(vte.to(dev)).cpu() - data.topics) ** 2).sum(1).mean())
    return {"names": names, "selectivity": sel, "vbar_train": vtr, "vbar_test": vte, "v_test": seq,
            "topic_error_test": topic_err, "head_refit_loss": head_loss, "split": split,
            "profile": topic_activation_profile(names, vte, data.topics, orientation=sel["orientation"])}


def correction_artefacts(weights: str | os.PathLike, corpus_dir: str | os.PathLike, *,
                         topics: str | os.PathLike | None = None, names: str | os.PathLike | None = None,
                         device: str | torch.device = "cpu") -> Any:
    """What a captioner correction project is made from (:class:`semlens.correct.project.Artefacts`): the
    neuron → topic table (read from ``names``, written by ``semlens caption neurons --out X.safetensors``, or
    named now by :func:`analyze_neurons`) and the topic references over the corpus's training split.

    ``topics``: the topic model JSON (default: the one stored in ``names``); a table made with another topic
    model is refused."""
    from semlens.correct.captioner import fit_topic_references
    from semlens.correct.project import Artefacts
    from semlens.world import CaptionCorpus

    model = AttentiveCaptioner.load(weights, map_location=resolve_device(device)).eval()
    if topics is not None:
        tm = TopicModel.load(topics)
    elif names is not None:
        tm = NeuronTopics.load_topic_model(names)
    else:
        raise ValueError("give the topic model (--topics) or a neuron table (--names) that carries it")
    corpus = CaptionCorpus(corpus_dir)
    splits = {s: list(corpus.split(s)) for s in ("train", "test")}
    ids = splits["train"] + splits["test"]
    prep = prepare({v: corpus.features(v) for v in ids}, {v: corpus.captions[v] for v in ids}, splits,
                   vocab=model.vocab, topic_model=tm, max_len=model.config.max_len)
    table = NeuronTopics.load(names, topic_model=tm, model=model) if names is not None else \
        analyze_neurons(model, prep)["names"]
    refs = fit_topic_references(model, table.topic_names, prep.train.feats, prep.train.lengths, prep.train.topics)
    return Artefacts(table, refs, lambda path: table.save(path, topic_model=tm, model=model))
