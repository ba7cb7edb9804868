"""Training stage of the captioner: the interpretive (topic) loss of Dong et al. (CVPR 2017),

    L = mean_k ( λ ‖f(v̄_k) − s_k‖²  −  Σ_t log p(y_t | y_<t, x_k) )

with ``v̄_k`` the temporal mean of the encoder states over the valid frames of video ``k`` and ``s_k``
its LDA topic distribution (LSTM-B is ``λ = 0``; LSTM-I is ``λ > 0``), and the training loop of the
attentive captioner: teacher forcing over (video, sentence) pairs, padding and masking, seeded
shuffling/dropout, model selection on validation CIDEr with early stopping, and checkpoint/resume at
epoch boundaries.

A resumed run reproduces an uninterrupted run exactly (same weights), because the shuffling order and
dropout RNG of every epoch are derived from ``(seed, epoch)`` and the best weights so far are saved.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from semlens.captioning.model import PAD, AttentiveCaptioner, Vocabulary, pad_features, tokenize
from semlens.checkpoint import CheckpointError
from semlens.outputs import save_json
from semlens.runtime import progress, resolve_device

__all__ = ["InterpretiveLoss", "caption_nll", "topic_loss", "CaptionData", "CaptionTrainConfig", "CaptionTrainer",
           "mean_representations", "fit_topic_head", "validation_cider"]


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


class InterpretiveLoss(nn.Module):
    """Caption NLL plus ``lam`` × topic loss, averaged over the batch; returns (total, parts dict).

    ``lam = 0`` gives the LSTM-B objective (the topic term is still reported, without gradient).
    """

    def __init__(self, lam: float = 1.0):
        super().__init__()
        if lam < 0:
            raise ValueError(f"lam must be >= 0; got {lam}")
        self.lam = float(lam)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, topic_pred: torch.Tensor,
                topic_target: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, float]]:
        nll = caption_nll(logits, targets).mean()
        n_words = int((targets != PAD).sum().clamp(min=1))
        parts = {"nll": float(nll.detach()), "nll_per_word": float(nll.detach()) * targets.shape[0] / n_words,
                 "topic": float("nan")}
        if topic_target is None:
            if self.lam > 0:
                raise ValueError("the interpretive loss (lam > 0) needs topic targets")
            return nll, parts
        lt = topic_loss(topic_pred, topic_target).mean()
        parts["topic"] = float(lt.detach())
        return (nll + self.lam * lt if self.lam > 0 else nll), parts


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


@dataclass
class CaptionTrainConfig:
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


class CaptionTrainer:
    """Train an :class:`AttentiveCaptioner` on :class:`CaptionData` (Adam, teacher forcing).

    With ``checkpoint_dir``, writes ``last.safetensors`` (weights + config), ``last_optim.pt`` (optimizer,
    epoch), ``history.json`` and (with model selection) ``best.safetensors`` after every epoch, and
    :meth:`fit` resumes from them.

    Model selection (``select_every > 0``, needs ``val``): every ``select_every`` epochs (and after the last)
    the validation videos are captioned greedily and scored with CIDEr (:func:`validation_cider`); the
    best weights are restored when training ends, and training stops early after ``patience`` evaluations
    without improvement.
    """

    def __init__(self, model: AttentiveCaptioner, train: CaptionData, config: CaptionTrainConfig,
                 val: CaptionData | None = None, checkpoint_dir: str | os.PathLike | None = None):
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
        self.cfg = config
        self.device = resolve_device(config.device)
        self.model = model.to(self.device)
        self.train_data, self.val_data = train, val
        self.loss = InterpretiveLoss(config.lam)
        if config.weight_decay < 0 or config.topic_weight_decay < 0:
            raise ValueError(f"weight decays must be >= 0; got {config.weight_decay}, {config.topic_weight_decay}")
        head = {id(p) for p in model.topic_head.parameters()}
        groups = [{"params": [p for p in model.parameters() if id(p) not in head]},
                  {"params": list(model.topic_head.parameters()),
                   "weight_decay": config.weight_decay + config.topic_weight_decay}]
        self.optim = torch.optim.Adam(groups, lr=config.lr, weight_decay=config.weight_decay)
        self.dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.history: list[dict[str, float]] = []
        self.start_epoch = 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_score = float("-inf")
        self.best_epoch = -1

    # ------------------------------------------------------------- checkpointing
    def _save(self, epoch: int) -> None:
        assert self.dir is not None
        self.model.save(self.dir / "last.safetensors", extra={"epoch": epoch, "train": asdict(self.cfg)})
        tmp = self.dir / "last_optim.pt.tmp"
        torch.save({"optim": self.optim.state_dict(), "epoch": epoch}, tmp)
        os.replace(tmp, self.dir / "last_optim.pt")
        if self.best_epoch == epoch:
            self.model.save(self.dir / "best.safetensors", extra={"epoch": epoch, "val_CIDEr": self.best_score})
        save_json(self.history, self.dir / "history.json")

    def _resume(self) -> None:
        if self.dir is None or not (self.dir / "last.safetensors").is_file():
            return
        saved = AttentiveCaptioner.load(self.dir / "last.safetensors", vocab=self.model.vocab)
        if saved.config.to_json() | {"extra": {}} != self.model.config.to_json() | {"extra": {}}:
            raise CheckpointError(f"checkpoint in {self.dir} has a different captioner config; "
                                  "use another checkpoint_dir")
        self.model.load_state_dict(saved.state_dict())
        try:
            st = torch.load(self.dir / "last_optim.pt", map_location=self.device, weights_only=True)
            self.optim.load_state_dict(st["optim"])
            self.history = json.loads((self.dir / "history.json").read_text())
        except (FileNotFoundError, KeyError, RuntimeError, ValueError) as err:
            raise CheckpointError(f"incomplete or corrupt checkpoint in {self.dir}: {err}") from err
        self.start_epoch = int(st["epoch"]) + 1
        scored = [h for h in self.history if "val_CIDEr" in h]
        if scored:
            best = max(scored, key=lambda h: h["val_CIDEr"])  # first of equal scores, as during training
            self.best_score, self.best_epoch = float(best["val_CIDEr"]), int(best["epoch"])
            try:
                self.best_state = AttentiveCaptioner.load(self.dir / "best.safetensors",
                                                          vocab=self.model.vocab).state_dict()
            except FileNotFoundError as err:
                raise CheckpointError(f"checkpoint in {self.dir} lacks best.safetensors: {err}") from err

    # ------------------------------------------------------------------ training
    def _epoch(self, epoch: int) -> dict[str, float]:
        d = self.train_data
        g = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch)
        torch.manual_seed(self.cfg.seed * 100_003 + epoch)  # dropout masks
        order = torch.randperm(d.n_pairs, generator=g)
        if self.cfg.captions_per_video:
            order = order[d.first_per_video(order, self.cfg.captions_per_video)]
        self.model.train()
        sums = {"loss": 0.0, "nll": 0.0, "topic": 0.0}
        n = 0
        batches = range(0, len(order), self.cfg.batch_size)
        t0 = time.perf_counter()
        for start in progress(batches, total=len(batches), desc=f"epoch {epoch + 1}/{self.cfg.epochs}"):
            idx = order[start: start + self.cfg.batch_size]
            feats, lengths, tok, s = d.batch(idx, self.device)
            logits, v, mask = self.model(feats, lengths, tok)
            pred = self.model.topics(self.model.mean_rep(v, mask))
            loss, parts = self.loss(logits, tok[:, 1:], pred, s)
            self.optim.zero_grad(set_to_none=True)
            loss.backward()
            if self.cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            self.optim.step()
            b = len(idx)
            sums["loss"] += loss.item() * b
            sums["nll"] += parts["nll"] * b
            sums["topic"] += parts["topic"] * b
            n += b
        rec = {k: v / n for k, v in sums.items()} | {"epoch": epoch, "seconds": time.perf_counter() - t0,
                                                     "clips_per_s": n / (time.perf_counter() - t0)}
        rec["lam_topic"] = self.cfg.lam * rec["topic"]  # the topic term's share of the loss, per caption
        if self.val_data is not None:
            rec |= {f"val_{k}": v for k, v in self.evaluate_loss(self.val_data).items()}
        every = self.cfg.select_every
        if every and ((epoch + 1) % every == 0 or epoch + 1 == self.cfg.epochs):
            rec["val_CIDEr"] = validation_cider(self.model, self.val_data)  # type: ignore[arg-type]
            if rec["val_CIDEr"] > self.best_score:
                self.best_score, self.best_epoch = rec["val_CIDEr"], epoch
                self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return rec

    def _should_stop(self) -> bool:
        if not self.cfg.select_every or self.cfg.patience is None:
            return False
        since = [h for h in self.history if "val_CIDEr" in h and h["epoch"] > self.best_epoch]
        return len(since) >= self.cfg.patience

    @torch.no_grad()
    def evaluate_loss(self, data: CaptionData, batch_size: int = 256) -> dict[str, float]:
        """Mean caption NLL and topic loss on ``data`` (eval mode; model mode restored)."""
        was = self.model.training
        self.model.eval()
        try:
            nll = tl = 0.0
            for start in range(0, data.n_pairs, batch_size):
                idx = torch.arange(start, min(data.n_pairs, start + batch_size))
                feats, lengths, tok, s = data.batch(idx, self.device)
                logits, v, mask = self.model(feats, lengths, tok)
                pred = self.model.topics(self.model.mean_rep(v, mask))
                _, parts = self.loss(logits, tok[:, 1:], pred, s)
                nll += parts["nll"] * len(idx)
                tl += parts["topic"] * len(idx)
            return {"nll": nll / data.n_pairs, "topic": tl / data.n_pairs}
        finally:
            self.model.train(was)

    def fit(self) -> list[dict[str, float]]:
        """Train for ``config.epochs`` epochs (resuming from ``checkpoint_dir``); returns the history."""
        self._resume()
        try:
            for epoch in range(self.start_epoch, self.cfg.epochs):
                if self._should_stop():
                    break
                self.history.append(self._epoch(epoch))
                if self.dir is not None:
                    self._save(epoch)
            if self.best_state is not None:  # model selection: restore the best validation weights
                self.model.load_state_dict(self.best_state)
        finally:
            self.model.eval()
        return self.history

    @property
    def selected_epoch(self) -> int:
        """Epoch whose weights the model holds after :meth:`fit` (the last one without model selection)."""
        return self.best_epoch if self.best_state is not None else (self.history[-1]["epoch"] if self.history
                                                                     else -1)


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
    """Fit a topic head ``f`` on the frozen encoder's v̄ by full-batch Adam on ‖softmax(f(v̄)) − s‖²
    (+ ``weight_decay`` · ‖W‖²).

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
    torch.manual_seed(seed)
    head.reset_parameters()
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    best_val, best = float("inf"), None
    with torch.enable_grad():
        for step in range(steps):  # optimisation steps over the whole set (no per-sample loop)
            loss = topic_loss(torch.softmax(head(vbar), -1), s).mean() + weight_decay * head.weight.pow(2).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if vval is not None and ((step + 1) % eval_every == 0 or step + 1 == steps):
                with torch.no_grad():
                    lv = float(topic_loss(torch.softmax(head(vval), -1), val.topics.to(dev)).mean())  # type: ignore[union-attr]
                if lv < best_val:
                    best_val, best = lv, {k: v.detach().clone() for k, v in head.state_dict().items()}
    if best is not None:
        head.load_state_dict(best)
    with torch.no_grad():
        return float(topic_loss(torch.softmax(head(vbar), -1), s).mean())
