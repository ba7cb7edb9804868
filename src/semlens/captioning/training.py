"""Training stage of the captioner: the interpretive (topic) loss of Dong et al. (CVPR 2017),

    L = mean_k ( λ ‖f(v̄_k) − s_k‖²  −  Σ_t log p(y_t | y_<t, x_k) )

with ``v̄_k`` the temporal mean of the encoder states over the valid frames of video ``k`` and ``s_k``
its LDA topic distribution (LSTM-B is ``λ = 0``; LSTM-I is ``λ > 0``), trained by the library's one
:class:`~semlens.train.Trainer`: :class:`CaptionStep` (teacher forcing over (video, sentence) pairs, the
caption NLL as task loss, v̄ handed on), :class:`CaptionBatches` (seeded shuffling, optional
``captions_per_video``, padding), :class:`InterpretiveLoss` (the λ-weighted topic term, an extra term of the
trainer) and :class:`~semlens.train.ModelSelection` on validation CIDEr. :class:`CaptionTrainer` is that
configuration, with the captioner's settings (:class:`CaptionTrainConfig`) and history layout.

A resumed run reproduces an uninterrupted run exactly (same weights), because the shuffling order and
dropout RNG of every epoch are derived from ``(seed, epoch)`` and the best weights so far are saved.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from semlens.captioning.model import PAD, AttentiveCaptioner, Vocabulary, pad_features, tokenize
from semlens.checkpoint import CheckpointError
from semlens.outputs import save_json
from semlens.runtime import resolve_device
from semlens.train import Callback, ModelSelection, StepOutput, TrainConfig, Trainer, fit_module, full_batches

__all__ = ["InterpretiveLoss", "CaptionStep", "CaptionBatches", "caption_nll", "topic_loss", "CaptionData",
           "CaptionTrainConfig", "CaptionTrainer", "epoch_seed", "mean_representations", "fit_topic_head",
           "validation_cider"]


def caption_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-caption negative log-likelihood (B,): sum over non-PAD positions of −log p(y_t).

    logits: (B, L, V); targets: (B, L) int64 with PAD = 0 at padded positions (ignored).
    """
    if logits.shape[:2] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} disagree")
    nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=PAD, reduction="none")  # (B, L)
    return nll.sum(1)


def topic_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """‖f(v̄) − s‖² per video (B,). pred, target: (B, K) topic distributions."""
    if pred.shape != target.shape:
        raise ValueError(f"topic prediction {tuple(pred.shape)} and target {tuple(target.shape)} disagree")
    return ((pred - target) ** 2).sum(-1)


class InterpretiveLoss:
    """The topic part of the interpretive loss as an extra term of :class:`~semlens.train.Trainer`:
    ``lam`` · mean over the batch of ‖f(v̄) − s‖², with f(v̄) = ``model.topics(v̄)`` (topic dropout in training).

    Reads the step outputs ``vbar`` (B, D) and ``topic_target`` (B, K) or ``None`` (see :class:`CaptionStep`);
    returns ``(value, {"topic": mean ‖f(v̄) − s‖²})`` (NaN without targets). ``lam = 0`` gives the LSTM-B
    objective: the topic loss is still computed and logged, but adds nothing (no gradient reaches f).
    """

    name = "lam_topic"
    layers: list[str] = []
    inputs = ("vbar", "topic_target")

    def __init__(self, lam: float = 1.0):
        if lam < 0:
            raise ValueError(f"lam must be >= 0; got {lam}")
        self.lam = float(lam)

    def __call__(self, model: nn.Module, acts: dict[str, torch.Tensor | None]
                 ) -> tuple[torch.Tensor, dict[str, float]]:
        vbar, target = acts["vbar"], acts["topic_target"]
        pred = model.topics(vbar)  # type: ignore[operator]  # (B, K); draws the topic dropout even when unused
        if target is None:
            if self.lam > 0:
                raise ValueError("the interpretive loss (lam > 0) needs topic targets")
            return vbar.new_zeros(()), {"topic": float("nan")}  # type: ignore[union-attr]
        lt = topic_loss(pred, target).mean()
        return (self.lam * lt if self.lam > 0 else lt.new_zeros(())), {"topic": float(lt.detach())}


class CaptionStep:
    """The captioner's training step: teacher forcing on a batch ``(feats (B, T, F), lengths (B,), tokens (B, L),
    topics (B, K) or None)`` of :meth:`CaptionData.batch`.

    Task loss: mean over the batch of the caption NLL (:func:`caption_nll`, PAD ignored). Outputs for the
    extra terms: ``vbar`` (B, D), the mean encoder state over the valid frames, and ``topic_target``.
    """

    def __call__(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> StepOutput:
        feats, lengths, tok, s = batch
        logits, v, mask = model(feats, lengths, tok)
        vbar = model.mean_rep(v, mask)  # type: ignore[operator]
        nll = caption_nll(logits, tok[:, 1:]).mean()
        return StepOutput(nll, int(tok.shape[0]), outputs={"vbar": vbar, "topic_target": s})


class CaptionData:
    """Videos (padded per-frame features), their captions and topic targets, as tensors.

    features: list of (T_k, F) float tensors, one per video; captions: list of caption lists;
    topics: (N, K) topic targets (or ``None``); vocab encodes captions (words beyond ``max_len`` cut).
    Every (video, caption) pair is one training sample (Dong et al. 2017).
    """

    def __init__(self, features: Sequence[torch.Tensor], captions: Sequence[Sequence[str]], vocab: Vocabulary,
                 topics: torch.Tensor | None = None, max_len: int = 20, video_ids: Sequence[str] | None = None):
        if len(features) != len(captions):
            raise ValueError(f"{len(features)} feature sequences but {len(captions)} caption lists")
        self.video_ids = list(video_ids) if video_ids is not None else [str(i) for i in range(len(features))]
        feats = [torch.as_tensor(f, dtype=torch.float32) for f in features]
        for vid, f in zip(self.video_ids, feats, strict=True):
            if f.dim() != 2 or not torch.isfinite(f).all():
                raise ValueError(f"features of video {vid!r} must be finite (T, F); got shape {tuple(f.shape)}")
        dims = {f.shape[1] for f in feats}
        if len(dims) > 1:
            raise ValueError(f"inconsistent feature dimensions across videos: {sorted(dims)}")
        self.feats, self.lengths = pad_features(feats)  # (N, T, F), (N,)
        self.captions = [list(c) for c in captions]
        rows, owner = [], []
        for k, caps in enumerate(self.captions):
            if not caps:
                raise ValueError(f"video {self.video_ids[k]!r} has no captions")
            for c in caps:
                try:
                    rows.append(vocab.encode(c, max_len=max_len))
                except ValueError as err:
                    raise ValueError(f"video {self.video_ids[k]!r}: {err}") from err
                owner.append(k)
        L = max(len(r) for r in rows)
        self.tokens = torch.full((len(rows), L), PAD, dtype=torch.long)
        for i, r in enumerate(rows):  # one copy per sentence at construction
            self.tokens[i, : len(r)] = torch.tensor(r)
        self.owner = torch.tensor(owner, dtype=torch.long)  # (P,) video of each sentence
        self.topics = torch.as_tensor(topics, dtype=torch.float32) if topics is not None else None
        if self.topics is not None and (self.topics.dim() != 2 or self.topics.shape[0] != len(feats)):
            raise ValueError(f"topics must be ({len(feats)}, K); got {tuple(self.topics.shape)}")

    def first_per_video(self, order: torch.Tensor, k: int) -> torch.Tensor:
        """Positions in ``order`` (a permutation of sentence indices) of the first ``k`` sentences of each video."""
        owner = self.owner[order]
        pos = torch.arange(len(order))
        by_owner = torch.argsort(owner * len(order) + pos)  # grouped by video, in order of appearance
        starts = torch.searchsorted(owner[by_owner], owner[by_owner], right=False)
        rank = torch.empty_like(pos)
        rank[by_owner] = torch.arange(len(order)) - starts
        return (rank < k).nonzero().flatten()

    @property
    def n_videos(self) -> int:
        return self.feats.shape[0]

    @property
    def n_pairs(self) -> int:
        return self.tokens.shape[0]

    @property
    def feature_dim(self) -> int:
        return self.feats.shape[2]

    def batch(self, pair_idx: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(feats (B,T,F), lengths (B,), tokens (B,L), topics (B,K)) for sentence indices, trimmed to the batch."""
        vid = self.owner[pair_idx]
        lengths = self.lengths[vid]
        tok = self.tokens[pair_idx]
        L = int((tok != PAD).sum(1).max())
        s = self.topics[vid].to(device) if self.topics is not None else None
        return self.feats[vid, : int(lengths.max())].to(device), lengths.to(device), tok[:, :L].to(device), s

    def video_batch(self, idx: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = self.lengths[idx]
        return self.feats[idx, : int(lengths.max())].to(device), lengths.to(device)


class CaptionBatches:
    """The :class:`~semlens.train.steps.BatchSource` of :class:`CaptionData`: every (video, sentence) pair is a
    sample; epoch ``e`` shuffles the pairs with a generator seeded ``seed * 100_003 + e`` and, with
    ``captions_per_video``, keeps only each video's first that many sentences of the shuffled order. Batches are
    :meth:`CaptionData.batch` (padded to the batch's longest video and caption)."""

    def __init__(self, data: CaptionData, seed: int = 0, captions_per_video: int | None = None) -> None:
        self.data, self.seed, self.captions_per_video = data, seed, captions_per_video
        counts = torch.bincount(data.owner, minlength=data.n_videos)
        self._size = int(counts.clamp(max=captions_per_video).sum()) if captions_per_video else data.n_pairs

    def __len__(self) -> int:
        return self._size

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """(n,) sentence indices of epoch ``epoch`` in training order."""
        g = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        order = torch.randperm(self.data.n_pairs, generator=g)
        if self.captions_per_video:
            order = order[self.data.first_per_video(order, self.captions_per_video)]
        return order

    def batch(self, idx: torch.Tensor, device: torch.device) -> tuple[torch.Tensor | None, ...]:
        return self.data.batch(idx, device)


def epoch_seed(seed: int, epoch: int) -> int:
    """The captioner's seed of epoch ``epoch`` (0-based): its shuffling order and its dropout masks."""
    return seed * 100_003 + epoch


@dataclass
class CaptionTrainConfig:
    """The captioner's training settings (see :class:`CaptionTrainer`)."""

    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3
    lam: float = 0.0  # interpretive-loss weight λ (0 = LSTM-B)
    captions_per_video: int | None = None  # per epoch, this many random captions of each video (None = all)
    grad_clip: float = 5.0
    weight_decay: float = 0.0
    topic_weight_decay: float = 0.0  # L2 (Adam weight decay) on the topic head f only; regularises λ‖f(v̄) − s‖²
    seed: int = 0
    device: str = "auto"
    select_every: int = 0  # evaluate validation CIDEr every this many epochs and keep the best weights (0 = off)
    patience: int | None = None  # stop after this many evaluations without improvement (None = never)

    def train_config(self) -> TrainConfig:
        """The :class:`~semlens.train.TrainConfig` of these settings (Adam, constant learning rate)."""
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, optimizer="adam",
                           weight_decay=self.weight_decay, seed=self.seed, device=self.device,
                           grad_clip=self.grad_clip or None)


class _CaptionRecord(Callback):
    """The captioner's history record: ``loss``, ``nll``, ``topic``, ``epoch`` (0-based), ``seconds``,
    ``clips_per_s``, ``lam_topic`` (λ·topic) and, with validation data, ``val_nll`` / ``val_topic``; also writes
    ``history.json`` next to the checkpoint."""

    def __init__(self, owner: CaptionTrainer) -> None:
        self.owner = owner

    def on_epoch_end(self, trainer: Trainer, epoch: int, record: dict[str, Any]) -> None:
        o, secs = self.owner, max(trainer.epoch_seconds, 1e-9)
        rec = {"loss": record["loss"], "nll": record["task_loss"], "topic": record["topic"], "epoch": epoch,
               "seconds": secs, "clips_per_s": trainer.epoch_samples / secs, "lam_topic": o.cfg.lam * record["topic"]}
        if o.val_data is not None:
            rec |= {f"val_{k}": v for k, v in o.evaluate_loss(o.val_data).items()}
        record.clear()
        record.update(rec)


class _HistoryFile(Callback):
    """Writes ``history.json`` (the history including the epoch just done) to the checkpoint directory."""

    def on_epoch_end(self, trainer: Trainer, epoch: int, record: dict[str, Any]) -> None:
        if trainer.checkpoint_dir is not None:
            save_json([*trainer.history, record], trainer.checkpoint_dir / "history.json")


class CaptionTrainer:
    """Train an :class:`AttentiveCaptioner` on :class:`CaptionData` with :class:`~semlens.train.Trainer`: Adam with the
    topic head f in its own parameter group (weight decay + ``topic_weight_decay``), gradient clipping,
    :class:`CaptionStep` + :class:`InterpretiveLoss`, :class:`CaptionBatches`, dropout re-seeded per epoch.

    With ``checkpoint_dir``, the trainer writes ``last.safetensors`` (weights + captioner config, loadable with
    :meth:`AttentiveCaptioner.load`) and ``last.pt`` (optimizer, RNG, history) after every epoch, plus
    ``history.json`` and (with model selection) ``best.safetensors``; :meth:`fit` resumes from them.

    Model selection (``select_every > 0``, needs ``val``): every ``select_every`` epochs (and after the last)
    the validation videos are captioned greedily and scored with CIDEr (:func:`validation_cider`); the
    best weights are restored when training ends, and training stops early after ``patience`` evaluations
    without improvement.
    """

    def __init__(self, model: AttentiveCaptioner, train: CaptionData, config: CaptionTrainConfig,
                 val: CaptionData | None = None, checkpoint_dir: str | os.PathLike | None = None):
        _check_caption_setup(model, train, config, val)
        self.cfg = config
        self.device = resolve_device(config.device)
        self.model = model.to(self.device)
        self.train_data, self.val_data = train, val
        self.loss = InterpretiveLoss(config.lam)
        self.step = CaptionStep()
        self.selection = (ModelSelection(lambda m: validation_cider(m, val), every=config.select_every,  # type: ignore[arg-type]
                                         key="val_CIDEr", patience=config.patience) if config.select_every else None)
        head = {id(p) for p in model.topic_head.parameters()}
        groups = [{"params": [p for p in model.parameters() if id(p) not in head]},
                  {"params": list(model.topic_head.parameters()),
                   "weight_decay": config.weight_decay + config.topic_weight_decay}]
        self.trainer = Trainer(model, CaptionBatches(train, config.seed, config.captions_per_video),
                               config=config.train_config(), extra_terms=[self.loss], checkpoint_dir=checkpoint_dir,
                               model_config={"captioner": model.config.to_json()}, step=self.step,
                               param_groups=groups,
                               callbacks=[_CaptionRecord(self), *([self.selection] if self.selection else []),
                                          _HistoryFile()],
                               epoch_seed=lambda e: epoch_seed(config.seed, e))
        self.dir = self.trainer.checkpoint_dir

    @property
    def optim(self) -> torch.optim.Optimizer:
        """The optimizer of the last :meth:`fit`; before that, one configured as :meth:`fit` builds it."""
        return self.trainer.optimizer or self.trainer.make_optimizer()

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.trainer.history

    @property
    def best_epoch(self) -> int:
        return self.selection.best_epoch if self.selection else -1

    @property
    def best_score(self) -> float:
        return self.selection.best_score if self.selection else float("-inf")

    @property
    def best_state(self) -> dict[str, torch.Tensor] | None:
        return self.selection.best_state if self.selection else None

    def _check_checkpoint(self) -> None:
        """Refuse a checkpoint of another captioner (config or vocabulary) or of the old trainer's format."""
        if self.dir is None or not (self.dir / "last.safetensors").is_file():
            return
        if not (self.dir / "last.pt").is_file():
            raise CheckpointError(f"{self.dir} holds a checkpoint without last.pt (written before semlens trained the "
                                  "captioner with its one Trainer); it cannot be resumed: use another checkpoint_dir")
        saved = AttentiveCaptioner.load(self.dir / "last.safetensors", vocab=self.model.vocab)
        if saved.config.to_json() | {"extra": {}} != self.model.config.to_json() | {"extra": {}}:
            raise CheckpointError(f"checkpoint in {self.dir} has a different captioner config; "
                                  "use another checkpoint_dir")

    @torch.no_grad()
    def evaluate_loss(self, data: CaptionData, batch_size: int = 256) -> dict[str, float]:
        """Mean caption NLL and topic loss on ``data`` (eval mode; model mode restored)."""
        was = self.model.training
        self.model.eval()
        try:
            nll = tl = 0.0
            for start in range(0, data.n_pairs, batch_size):
                idx = torch.arange(start, min(data.n_pairs, start + batch_size))
                out = self.step(self.model, data.batch(idx, self.device))
                _, parts = InterpretiveLoss(0.0)(self.model, out.outputs)
                nll += float(out.loss) * len(idx)
                tl += parts["topic"] * len(idx)
            return {"nll": nll / data.n_pairs, "topic": tl / data.n_pairs}
        finally:
            self.model.train(was)

    def fit(self) -> list[dict[str, Any]]:
        """Train for ``config.epochs`` epochs (resuming from ``checkpoint_dir``); returns the history. The model is
        left in eval mode, holding the selected weights."""
        self._check_checkpoint()
        try:
            return self.trainer.fit()
        finally:
            self.model.eval()

    @property
    def selected_epoch(self) -> int:
        """Epoch whose weights the model holds after :meth:`fit` (the last one without model selection)."""
        return self.best_epoch if self.best_state is not None else (self.history[-1]["epoch"] if self.history
                                                                     else -1)


def _check_caption_setup(model: AttentiveCaptioner, train: CaptionData, config: CaptionTrainConfig,
                         val: CaptionData | None) -> None:
    """Refuse data that does not fit the model, and inconsistent settings."""
    if train.feature_dim != model.config.feature_dim:
        raise ValueError(f"training features have dimension {train.feature_dim}, the model expects "
                         f"{model.config.feature_dim}")
    for name, d in (("training", train), ("validation", val)):
        if d is not None and d.topics is not None and d.topics.shape[1] != model.config.n_topics:
            raise ValueError(f"{name} topic targets have {d.topics.shape[1]} topics, the model "
                             f"{model.config.n_topics}")
    if config.lam > 0 and train.topics is None:
        raise ValueError("lam > 0 (LSTM-I) needs topic targets in the training data")
    if config.select_every < 0 or (config.patience is not None and config.patience < 1):
        raise ValueError(f"select_every must be >= 0 and patience >= 1 or None; got {config.select_every}, "
                         f"{config.patience}")
    if config.select_every and val is None:
        raise ValueError("model selection (select_every > 0) needs validation data")
    if config.weight_decay < 0 or config.topic_weight_decay < 0:
        raise ValueError(f"weight decays must be >= 0; got {config.weight_decay}, {config.topic_weight_decay}")


@torch.no_grad()
def validation_cider(model: AttentiveCaptioner, data: CaptionData, batch_size: int = 256) -> float:
    """CIDEr-D (pycocoevalcap) of greedy captions on ``data`` against all its references, on the captioner's
    own word tokens (no Java: cheap enough to run every epoch). Model mode restored."""
    from pycocoevalcap.cider.cider import Cider

    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    try:
        res: dict[int, list[str]] = {}
        for start in range(0, data.n_videos, batch_size):
            idx = torch.arange(start, min(data.n_videos, start + batch_size))
            feats, lengths = data.video_batch(idx, dev)
            for k, row in zip(idx.tolist(), model.greedy(feats, lengths).tolist(), strict=True):
                res[k] = [model.vocab.decode(row) or "<empty>"]
        gts = {k: [" ".join(tokenize(c)) for c in data.captions[k]] for k in res}
        return float(Cider().compute_score(gts, res)[0])
    finally:
        model.train(was)


@torch.no_grad()
def mean_representations(model: AttentiveCaptioner, data: CaptionData, batch_size: int = 256,
                         return_sequences: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """v̄ (N, D) per video (eval mode, model mode restored); with ``return_sequences`` also v (N, T, D)."""
    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    try:
        outs, seqs = [], []
        for start in range(0, data.n_videos, batch_size):
            idx = torch.arange(start, min(data.n_videos, start + batch_size))
            feats, lengths = data.video_batch(idx, dev)
            v, mask = model.encode(feats, lengths)
            outs.append(model.mean_rep(v, mask).cpu())
            if return_sequences:
                full = v.new_zeros(len(idx), data.feats.shape[1], v.shape[2])
                full[:, : v.shape[1]] = v
                seqs.append(full.cpu())
        vbar = torch.cat(outs)
        return (vbar, torch.cat(seqs)) if return_sequences else vbar
    finally:
        model.train(was)


def fit_topic_head(model: AttentiveCaptioner, data: CaptionData, steps: int = 500, lr: float = 0.05,
                   seed: int = 0, head: nn.Linear | None = None, val: CaptionData | None = None,
                   weight_decay: float = 0.0, eval_every: int = 10) -> float:
    """Fit a topic head ``f`` on the frozen encoder's v̄ by ``steps`` steps of full-batch Adam
    (:func:`semlens.train.fit_module`) on ‖softmax(f(v̄)) − s‖² (+ ``weight_decay`` · ‖W‖²); v̄: (N, D), s: (N, K).

    ``head``: the ``nn.Linear`` (D -> K) to fit (re-initialised first); default the model's own
    ``topic_head``. With ``val``, the head is evaluated on the validation videos every ``eval_every``
    steps and the parameters with the lowest validation topic loss are kept (early stopping: a head fitted
    to the training videos alone overfits them). Used to name the neurons of every model with one
    procedure (LSTM-B has no trained f). Returns the training topic loss of the kept head. No other
    parameter is touched.
    """
    if data.topics is None or (val is not None and val.topics is None):
        raise ValueError("fit_topic_head needs topic targets in the data")
    dev = next(model.parameters()).device
    vbar = mean_representations(model, data).to(dev)
    s = data.topics.to(dev)
    head = model.topic_head if head is None else head
    if head.in_features != vbar.shape[1] or head.out_features != s.shape[1]:
        raise ValueError(f"head maps {head.in_features} -> {head.out_features}; need {vbar.shape[1]} -> {s.shape[1]}")
    vval = mean_representations(model, val).to(dev) if val is not None else None
    sval = val.topics.to(dev) if val is not None else None  # type: ignore[union-attr]
    torch.manual_seed(seed)
    head.reset_parameters()
    best_val, best = float("inf"), None

    def head_loss(_idx: torch.Tensor | None) -> torch.Tensor:  # full batch: every training video every step
        return topic_loss(torch.softmax(head(vbar), -1), s).mean() + weight_decay * head.weight.pow(2).sum()

    def keep_best(step: int) -> None:
        nonlocal best_val, best
        if vval is not None and ((step + 1) % eval_every == 0 or step + 1 == steps):
            with torch.no_grad():
                lv = float(topic_loss(torch.softmax(head(vval), -1), sval).mean())
            if lv < best_val:
                best_val, best = lv, {k: v.detach().clone() for k, v in head.state_dict().items()}

    fit_module(head.parameters(), head_loss, full_batches(steps), lr=lr, after_step=keep_best)
    if best is not None:
        head.load_state_dict(best)
    with torch.no_grad():
        return float(topic_loss(torch.softmax(head(vbar), -1), s).mean())
