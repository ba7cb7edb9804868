"""The Sparse Reconstruction Autoencoder (Qi, Khorram & Li, arXiv 1709.05360) as a scikit-learn-style estimator.

``SRAE(k=5, target=3).fit(store)`` learns ``k`` non-negative x-features of one layer from which a linear head
rebuilds the explained class's logit (one-vs-all; one SRAE per class when ``target`` lists several), or all logits at
once (``mode="joint"``: one SRAE, ``k`` shared x-features, a ``k → C`` head). Training: layer-wise pretraining of three
plain autoencoders, a least-squares head on their codes, then fine-tuning of
``α_pred L_faith + α_rec L_SR + α_PT L_PT`` (Adam, lr 1e-3, weight decay 1e-4, lr × 0.1 every 40 epochs) inside the
acceptance loop: an SRAE is accepted when ≥ 2 x-features have positive mean contribution and the second largest is
≥ 0.3 × the largest; otherwise α_rec × 1.2, α_PT × 0.8 and it is fine-tuned again from the pretrained weights
(up to ``max_rounds``). The one-vs-all SRAEs of all classes train side by side as one batched network.
"""

from __future__ import annotations

from typing import Any

import torch

from semlens.embed.acceptance import PT_FACTOR, REC_FACTOR, accept
from semlens.embed.activations import ActivationStore
from semlens.embed.base import Embedding
from semlens.embed.ica_start import IndependentStart, fit_independent_start
from semlens.embed.losses import PULL_AWAY_VARIANTS, RECONSTRUCTION_VARIANTS, SILENCE, pull_away_vectors
from semlens.embed.nets import SRAENet, default_hidden
from semlens.runtime import progress

__all__ = ["SRAE", "pull_away_batched", "INITS"]

#: where an SRAE's fine-tuning starts (the ``init`` argument)
INITS = ("pretrain", "ica")


def pull_away_batched(s: torch.Tensor, along: str, eps: float = 1e-8) -> torch.Tensor:
    """Pull-away per copy: ``s`` ``(T, N, k, m)`` → ``(T,)`` (mean over the ``m`` outputs); see ``losses.pull_away``."""
    t, n, k, m = s.shape
    if along == "images":
        v = s.permute(0, 3, 1, 2).reshape(t * m, n, k)
    else:
        v = s.permute(0, 3, 2, 1).reshape(t * m, k, n)
    corr = along == "correlation"
    return pull_away_vectors(v, centred=corr, silence=SILENCE if corr else 0.0, eps=eps).view(t, m).mean(1)


class SRAE(Embedding):
    """Sparse Reconstruction Autoencoder.

    Args:
        k: number of x-features (5 in the reference driver).
        target: class index, list of class indices, or ``"all"`` (every logit); which logits are explained.
        mode: ``"one-vs-all"`` (one SRAE per class, 1-output head; the paper's setting) or ``"joint"`` (one SRAE,
            ``C``-output head; the pull-away is averaged over outputs).
        hidden: encoder widths ``(h1, h2)``; default :func:`~semlens.embed.nets.default_hidden`.
        alpha_pred, alpha_rec, alpha_pt, q: loss weights and log-penalty scale (defaults: the reference driver's
            ``[1, 100, 1, 15, 5]`` for pull-away along features).
        pull_away: ``"correlation"`` (default: decorrelated contributions, silent x-features count as redundant),
            ``"features"`` (the reference's cos² between the raw columns of ``S = x ⊙ w``) or ``"images"`` (the
            reference driver's default, rows). Why the default deviates from the reference: with cos² of raw
            non-negative columns, independent sparse sources are not orthogonal (cos = p/2 for Exp(1) amplitudes
            firing with probability p) and shrinking a column's support lowers it; an x-feature that contributes
            nothing (all-zero column) counts as orthogonal; so the term is lowered by silencing x-features. See
            docs/embed.md ("Planted dictionary").
        reconstruction: ``"dimension"`` (batch mean inside the log, reference) or ``"element"``.
        epochs, pretrain_epochs, batch_size, lr, weight_decay: optimisation (reference: batch 50, lr 1e-3, wd 1e-4).
        max_rounds, min_positive, accept_ratio: the acceptance loop.
        restart: what a rejected SRAE is retrained from: ``"fresh"`` (default; a new layer-wise pretraining with
            another seed, so x-features that died in the last pretraining get another chance) or ``"pretrained"``
            (the first round's pretrained weights; only the loss weights change).
        revive_dead: how many times a pretraining stage redraws units that fire on no vector of the split (default
            3; 0: never), see :meth:`_pretrain`.
        init: where fine-tuning starts: ``"pretrain"`` (the paper's layer-wise pretrained autoencoder and a
            least-squares head) or ``"ica"`` (then, in addition, encoder and decoder are distilled for
            ``distill_epochs`` onto the ``k`` independent components of the layer (FastICA on the first
            ``ica_samples`` vectors) that carry most of the explained logit, see :mod:`semlens.embed.ica_start`; on a
            planted dictionary this is what makes the x-features the decision's atoms, docs/embed.md).
        standardize_target: divide each explained logit by its standard deviation before the faithfulness MSE
            (default False: raw logits, centred, as in the reference code, so ``α_pred`` weighs logit units).
        seed, device: reproducibility and placement.

    Learned attributes: ``mean_``/``scale_`` ``(d,)`` layer standardisation; ``classes_``; ``network_`` (batched
    :class:`SRAENet`); ``y_mean_``/``y_scale_`` ``(G, m)``; ``accepted_`` ``(G,)`` bool; ``rounds_`` ``(G,)``;
    ``alpha_rec_``/``alpha_pt_`` ``(G,)`` final weights; ``history_`` (one dict per round).
    """

    method = "srae"

    def __init__(self, k: int = 5, target: int | list[int] | str = 0, mode: str = "one-vs-all",
                 hidden: tuple[int, int] | None = None, alpha_pred: float = 1.0, alpha_rec: float = 15.0,
                 alpha_pt: float = 5.0, q: float = 100.0, pull_away: str = "correlation",
                 reconstruction: str = "dimension", epochs: int = 20, pretrain_epochs: int = 2, batch_size: int = 50,
                 lr: float = 1e-3, weight_decay: float = 1e-4, dropout: float = 0.02, max_rounds: int = 5,
                 min_positive: int = 2, accept_ratio: float = 0.3, standardize_target: bool = False,
                 restart: str = "fresh", revive_dead: int = 3, init: str = "pretrain", distill_epochs: int = 10,
                 ica_samples: int = 20000, seed: int = 0, device: str = "cpu") -> None:
        self.k = k
        self.init = init
        self.distill_epochs = distill_epochs
        self.ica_samples = ica_samples
        self.revive_dead = revive_dead
        self.restart = restart
        self.standardize_target = standardize_target
        self.target = target
        self.mode = mode
        self.hidden = hidden
        self.alpha_pred = alpha_pred
        self.alpha_rec = alpha_rec
        self.alpha_pt = alpha_pt
        self.q = q
        self.pull_away = pull_away
        self.reconstruction = reconstruction
        self.epochs = epochs
        self.pretrain_epochs = pretrain_epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.dropout = dropout
        self.max_rounds = max_rounds
        self.min_positive = min_positive
        self.accept_ratio = accept_ratio
        self.seed = seed
        self.device = device

    # ------------------------------------------------------------------ configuration checks
    def _validate(self, store: ActivationStore) -> None:
        super()._validate(store)
        if self.mode not in ("one-vs-all", "joint"):
            raise ValueError(f"mode must be 'one-vs-all' or 'joint', got {self.mode!r}")
        if self.pull_away not in PULL_AWAY_VARIANTS:
            raise ValueError(f"pull_away must be one of {PULL_AWAY_VARIANTS}, got {self.pull_away!r}")
        if self.reconstruction not in RECONSTRUCTION_VARIANTS:
            raise ValueError(f"reconstruction must be one of {RECONSTRUCTION_VARIANTS}, got {self.reconstruction!r}")
        if self.restart not in ("fresh", "pretrained"):
            raise ValueError(f"restart must be 'fresh' or 'pretrained', got {self.restart!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.max_rounds < 1 or self.epochs < 0 or self.pretrain_epochs < 0 or self.revive_dead < 0:
            raise ValueError("max_rounds must be >= 1 and epochs, pretrain_epochs, revive_dead >= 0")
        if self.distill_epochs < 0 or self.ica_samples < 2:
            raise ValueError("distill_epochs must be >= 0 and ica_samples >= 2")

    # ------------------------------------------------------------------ fit
    def fit(self, data: ActivationStore | Any, y: Any = None) -> SRAE:
        """Fit on an :class:`ActivationStore` (or arrays ``z`` ``(N, d)``, ``y`` ``(N,)``/``(N, C)``); returns self."""
        store = self._begin_fit(data, y)
        gen = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed)
        groups = len(self.classes_) if self.mode == "one-vs-all" else 1
        self.n_out_ = 1 if self.mode == "one-vs-all" else len(self.classes_)
        self._target_moments(store)
        self._hidden = self.hidden or default_hidden(store.dim, self.k)
        self.pretrain_revived_: list[list[int]] = []
        self.ica_start_ = self._fit_independent_start(store) if self.init == "ica" else None
        self.pretrained_ = self._pretrained(store, list(range(groups)), gen)
        self.network_ = self.pretrained_.subset(list(range(groups)))
        self._acceptance_loop(store, groups)
        return self

    def _pretrained(self, store: ActivationStore, groups: list[int], gen: torch.Generator) -> SRAENet:
        """Layer-wise pretrained SRAEs for ``groups`` (one shared unsupervised pretraining, per-group heads)."""
        base = self._pretrain(store, self._hidden, gen)
        net = SRAENet(len(groups), store.dim, self.k, self.n_out_, self._hidden, self.dropout, gen).to(self._dev)
        for p, q in zip(net.parameters(), base.parameters(), strict=True):
            p.data.copy_(q.data.expand_as(p))
        if self.ica_start_ is not None:
            self._distill(store, net, groups, gen)
        self._fit_head(store, net, groups)
        return net

    def _ica_sample(self, store: ActivationStore) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``ica_samples`` standardised vectors ``(n, d)`` and their targets ``(G, n, m)``."""
        zs, ys, n = [], [], 0
        for z, logits, _ in store.batches(4096):
            zs.append(self.standardize(z.to(self._dev)))
            ys.append(self._targets(logits))
            n += len(z)
            if n >= self.ica_samples:
                break
        return torch.cat(zs)[:self.ica_samples], torch.cat(ys, 1)[:, :self.ica_samples]

    def _fit_independent_start(self, store: ActivationStore) -> IndependentStart:
        """FastICA on the first ``ica_samples`` vectors and the components each group starts on (``init="ica"``)."""
        z, y = self._ica_sample(store)
        y2 = y[:, :, 0].T if self.mode == "one-vs-all" else y[0]
        return fit_independent_start(z.cpu(), y2.cpu(), self.k, joint=self.mode == "joint", seed=self.seed)

    def _distill(self, store: ActivationStore, net: SRAENet, groups: list[int], gen: torch.Generator) -> None:
        """Train encoder and decoder of each copy onto its independent components (``init="ica"``): MSE of the last
        encoder layer's pre-activation to the targets (so no x-feature is lost to a dead ReLU) + MSE of the decoder's
        reconstruction of ``z`` from the targets; Adam 1e-3, ``distill_epochs`` over the ICA sample."""
        start = self.ica_start_
        assert start is not None
        z, _ = self._ica_sample(store)
        target = start.targets(z, groups if self.mode == "one-vs-all" else None)  # (G, n, k)
        opt = torch.optim.Adam(list(net.enc.parameters()) + list(net.dec.parameters()), lr=1e-3)
        for _ in range(self.distill_epochs):
            order = torch.randperm(len(z), generator=gen).to(self._dev)
            for i in order.split(self.batch_size):
                h = torch.relu(net.enc[1](torch.relu(net.enc[0](z[i]))))
                t = target[:, i]
                loss = ((net.enc[2](h) - t) ** 2).mean() + ((net.decode(t) - z[i]) ** 2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

    @property
    def _dev(self) -> torch.device:
        return torch.device(self.device)

    def _target_moments(self, store: ActivationStore) -> None:
        cls = torch.tensor(self.classes_)
        s = torch.zeros(len(cls), dtype=torch.float64)
        ss = torch.zeros_like(s)
        for _, logits, _ in store.batches(4096):
            yv = logits[:, cls].double()
            s += yv.sum(0)
            ss += (yv * yv).sum(0)
        n = len(store)
        mean = s / n
        std = (ss / n - mean * mean).clamp(min=0).sqrt().clamp(min=1e-6)
        if not self.standardize_target:
            std = torch.ones_like(std)
        shape = (len(cls), 1) if self.mode == "one-vs-all" else (1, len(cls))
        self.y_mean_, self.y_scale_ = mean.float().view(shape), std.float().view(shape)

    def _targets(self, logits: torch.Tensor) -> torch.Tensor:
        """Standardised targets ``(G, B, m)`` from logits ``(B, C)``."""
        yv = logits[:, self.classes_].to(self._dev)
        if self.mode == "one-vs-all":
            return ((yv.T - self.y_mean_.to(self._dev)) / self.y_scale_.to(self._dev)).unsqueeze(-1)
        return ((yv - self.y_mean_.to(self._dev)) / self.y_scale_.to(self._dev)).unsqueeze(0)

    def _pretrain(self, store: ActivationStore, hidden: tuple[int, int], gen: torch.Generator) -> SRAENet:
        """Greedy layer-wise pretraining of three plain autoencoders (MSE, Adam 1e-3); one copy.

        A ReLU unit that fires on no vector of the split after a stage is dead for good (zero gradient), and since the
        one pretraining is copied to every class, a dead x-feature is dead in all of them: each SRAE then has fewer
        than ``k`` x-features to pass the acceptance test with. Such units are redrawn (``revive_dead``): new random
        weights, the bias set so that the unit fires on half of the split, a fresh optimiser, one more epoch of the
        stage; at most ``revive_dead`` times per stage. ``pretrain_revived_`` gets one entry per pretraining (round 1
        and each fresh restart): the number of redrawn units per stage.
        """
        net = SRAENet(1, store.dim, self.k, self.n_out_, hidden, 0.0, gen).to(self._dev)
        pairs = [(net.enc[0], net.dec[2], False), (net.enc[1], net.dec[1], True), (net.enc[2], net.dec[0], True)]
        revived = [0, 0, 0]
        for stage, (enc, dec, relu_out) in enumerate(pairs):
            epochs = self.pretrain_epochs
            for attempt in range(self.revive_dead + 1):
                opt = torch.optim.Adam(list(enc.parameters()) + list(dec.parameters()), lr=1e-3)
                for _ in range(epochs):
                    for z, _, _ in store.batches(self.batch_size, shuffle=True, generator=gen):
                        h = self._stage_input(net, z, stage)
                        rec = dec(torch.relu(enc(h)))
                        rec = torch.relu(rec) if relu_out else rec
                        loss = ((rec - h) ** 2).mean()
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                if not self.pretrain_epochs or attempt == self.revive_dead:
                    break
                dead = self._dead_units(store, net, stage)
                if not bool(dead.any()):
                    break
                self._redraw(store, net, stage, dead, gen)
                revived[stage] += int(dead.sum())
                epochs = 1
        self.pretrain_revived_.append(revived)
        return net

    def _stage_input(self, net: SRAENet, z: torch.Tensor, stage: int) -> torch.Tensor:
        """Input ``(1, B, width)`` of pretraining stage ``stage``: standardised ``z`` through the earlier encoders."""
        with torch.no_grad():
            h = self.standardize(z.to(self._dev)).unsqueeze(0)
            for j in range(stage):
                h = torch.relu(net.enc[j](h))
        return h

    def _dead_units(self, store: ActivationStore, net: SRAENet, stage: int) -> torch.Tensor:
        """``(width,)`` bool: units of encoder ``stage`` that fire (> 0) on no vector of the split (streamed)."""
        fired = torch.zeros(net.enc[stage].weight.shape[-1], dtype=torch.bool, device=self._dev)
        with torch.no_grad():
            for z, _, _ in store.batches(4096):
                fired |= (net.enc[stage](self._stage_input(net, z, stage))[0] > 0).any(0)
        return ~fired

    def _redraw(self, store: ActivationStore, net: SRAENet, stage: int, dead: torch.Tensor,
                gen: torch.Generator) -> None:
        """New weights for the ``dead`` units of encoder ``stage`` (and their decoder rows), biases at the median of
        their pre-activation over the first 4 096 vectors, so each fires on about half of the data."""
        enc, dec = net.enc[stage], net.dec[2 - stage]
        n_in, idx = enc.weight.shape[1], dead.nonzero().flatten()
        bound = 1.0 / n_in ** 0.5
        with torch.no_grad():
            w = (torch.rand(n_in, len(idx), generator=gen) * 2 - 1) * bound
            enc.weight[0, :, idx] = w.to(enc.weight)
            z, _, _ = next(store.batches(4096))
            pre = self._stage_input(net, z, stage)[0] @ enc.weight[0, :, idx]
            enc.bias[0, 0, idx] = -pre.median(0).values
            out_bound = 1.0 / dec.weight.shape[1] ** 0.5
            rows = (torch.rand(len(idx), dec.weight.shape[2], generator=gen) * 2 - 1) * out_bound
            dec.weight[0, idx, :] = rows.to(dec.weight)

    def _fit_head(self, store: ActivationStore, net: SRAENet, groups: list[int]) -> None:
        """Least-squares head on the pretrained codes (streamed normal equations, ridge 1e-4)."""
        g, k1 = net.copies, self.k + 1
        xtx = torch.zeros(g, k1, k1, dtype=torch.float64, device=self._dev)
        xty = torch.zeros(g, k1, self.n_out_, dtype=torch.float64, device=self._dev)
        net.eval()
        with torch.no_grad():
            for z, logits, _ in store.batches(4096):
                x = net.encode(self.standardize(z.to(self._dev)))
                xa = torch.cat([x, torch.ones_like(x[..., :1])], -1).double()
                xtx += xa.transpose(1, 2) @ xa
                y = self._targets(logits)
                y = y[groups] if self.mode == "one-vs-all" else y
                xty += xa.transpose(1, 2) @ y.double()
            eye = torch.eye(k1, dtype=torch.float64, device=self._dev)
            sol = torch.linalg.solve(xtx + 1e-4 * len(store) * eye, xty)
            net.head.weight.copy_(sol[:, :-1].float())
            net.head.bias.copy_(sol[:, -1:].float())

    def _losses(self, net: SRAENet, z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per-copy loss terms ``(G,)``: faithfulness, sparse reconstruction, pull-away."""
        x, y_hat, z_hat = net(z)
        faith = ((y_hat - y) ** 2).mean((1, 2))
        diff2 = (z_hat - z.unsqueeze(0)) ** 2
        if self.reconstruction == "dimension":
            rec = torch.log1p(self.q * diff2.mean(1)).mean(1)
        else:
            rec = torch.log1p(self.q * diff2).mean((1, 2))
        s = x.unsqueeze(-1) * net.head.weight.unsqueeze(1)  # (G, B, k, m): w_i x_i per output
        pt = pull_away_batched(s, self.pull_away)
        return faith, rec, pt

    def _finetune(self, net: SRAENet, groups: list[int], a_rec: torch.Tensor, a_pt: torch.Tensor,
                  gen: torch.Generator, desc: str) -> float:
        opt = torch.optim.Adam(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=40, gamma=0.1)
        net.train()
        last = float("nan")
        for _ in progress(range(self.epochs), total=self.epochs, desc=desc):
            for z, logits, _ in self._store.batches(self.batch_size, shuffle=True, generator=gen):
                y = self._targets(logits)
                y = y[groups] if self.mode == "one-vs-all" else y
                faith, rec, pt = self._losses(net, self.standardize(z.to(self._dev)), y)
                loss = (self.alpha_pred * faith + a_rec * rec + a_pt * pt).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                last = float(loss.detach()) / net.copies
            sched.step()
        net.eval()
        return last

    def _acceptance_loop(self, store: ActivationStore, groups: int) -> None:
        self._store = store
        try:
            dev = self._dev
            a_rec = torch.full((groups,), float(self.alpha_rec), device=dev)
            a_pt = torch.full((groups,), float(self.alpha_pt), device=dev)
            pending = list(range(groups))
            self.accepted_ = torch.zeros(groups, dtype=torch.bool)
            self.rounds_ = torch.zeros(groups, dtype=torch.int64)
            self.history_: list[dict[str, Any]] = []
            for rnd in range(1, self.max_rounds + 1):
                gen = torch.Generator().manual_seed(self.seed * 1000 + rnd)
                self._pending = pending
                if rnd == 1 or self.restart == "pretrained":
                    start = self.pretrained_.subset(pending)
                else:  # retrain from scratch: a new layer-wise pretraining (revives units dead in the last one)
                    start = self._pretrained(store, pending, torch.Generator().manual_seed(self.seed * 1000 + rnd))
                net = self._init_round(start, rnd)
                loss = self._finetune(net, pending, a_rec[pending], a_pt[pending], gen, f"SRAE round {rnd}")
                mean_c = self._mean_contributions(net)  # (g, m, k)
                ok = accept(mean_c, self.min_positive, self.accept_ratio).all(1).cpu()
                self.network_.assign(pending, net)
                self.history_.append({
                    "round": rnd, "groups": [self._group_label(g) for g in pending],
                    "alpha_rec": a_rec[pending].tolist(), "alpha_pt": a_pt[pending].tolist(),
                    "accepted": ok.tolist(), "loss": loss,
                    "mean_contribution": (mean_c * self._scale_of(pending).unsqueeze(-1)).tolist(),
                })
                for j, g in enumerate(pending):
                    self.rounds_[g] = rnd
                    self.accepted_[g] = bool(ok[j])
                rejected = [g for j, g in enumerate(pending) if not bool(ok[j])]
                idx = torch.tensor(rejected, dtype=torch.long, device=dev)
                a_rec[idx] *= REC_FACTOR
                a_pt[idx] *= PT_FACTOR
                pending = rejected
                if not pending:
                    break
            self.alpha_rec_, self.alpha_pt_ = a_rec.cpu(), a_pt.cpu()
        finally:
            del self._store

    def _scale_of(self, groups: list[int]) -> torch.Tensor:
        """``(g, m)`` target scales (logit units per standardised unit) of the given groups."""
        scale = self.y_scale_.to(self._dev)
        return scale[groups] if self.mode == "one-vs-all" else scale

    def _init_round(self, net: SRAENet, rnd: int) -> SRAENet:
        """The network a round starts from (the pretrained weights); a hook for tests and variants."""
        return net

    def _group_label(self, g: int) -> int | str:
        return self.classes_[g] if self.mode == "one-vs-all" else "joint"

    def _mean_contributions(self, net: SRAENet) -> torch.Tensor:
        """Mean of ``w_i x_i`` over the training data, ``(G, m, k)`` (standardised target units)."""
        total = torch.zeros(net.copies, self.k, device=self._dev, dtype=torch.float64)
        with torch.no_grad():
            for z, _, _ in self._store.batches(4096):
                total += net.encode(self.standardize(z.to(self._dev))).sum(1).double()
        mean_x = (total / len(self._store)).float()
        return mean_x.unsqueeze(1) * net.head.weight.transpose(1, 2)

    # ------------------------------------------------------------------ the shared embedding API
    @property
    def n_groups(self) -> int:
        return self.network_.copies

    def group_of(self, c: int) -> tuple[int, int]:
        j = self.class_position(c)
        return (j, 0) if self.mode == "one-vs-all" else (0, j)

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.network_.encode(self.standardize(z.to(self._dev))).transpose(0, 1).cpu()

    def head_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.network_.head.weight.detach().cpu()  # (G, k, m), standardised units
        b = self.network_.head.bias.detach().cpu()[:, 0]  # (G, m)
        return w * self.y_scale_.unsqueeze(1), b * self.y_scale_ + self.y_mean_

    def reconstruct(self, z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            zs = self.network_.decode(self.network_.encode(self.standardize(z.to(self._dev)))).cpu()
        return (zs * self.scale_ + self.mean_).transpose(0, 1)

    def encoder_module(self, g: int) -> torch.nn.Module:
        enc = self.network_.enc
        first = enc[0].linear(g)
        with torch.no_grad():  # fold the standardisation into the first layer: W (z - μ)/σ = (W/σ) z - W μ/σ
            first.bias -= (first.weight / self.scale_) @ self.mean_
            first.weight /= self.scale_
        return torch.nn.Sequential(first, torch.nn.ReLU(), enc[1].linear(g), torch.nn.ReLU(), enc[2].linear(g),
                                   torch.nn.ReLU())

    def _state(self) -> dict[str, torch.Tensor]:
        return {f"network.{k}": v for k, v in self.network_.state_dict().items()} | {
            "y_mean": self.y_mean_, "y_scale": self.y_scale_, "accepted": self.accepted_, "rounds": self.rounds_}

    def _load_state(self, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        groups, m = state["y_mean"].shape if self.mode == "one-vs-all" else (1, state["y_mean"].shape[1])
        hidden = tuple(meta["hidden"])
        self.n_out_ = 1 if self.mode == "one-vs-all" else m
        self.network_ = SRAENet(groups, meta["n_features_in"], self.k, self.n_out_, hidden, self.dropout)
        self.network_.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("network.")})
        self.network_.eval()
        self.y_mean_, self.y_scale_ = state["y_mean"], state["y_scale"]
        self.accepted_, self.rounds_ = state["accepted"].bool(), state["rounds"]
        self.history_ = meta.get("history", [])

    def _meta(self) -> dict[str, Any]:
        h1 = self.network_.enc[0].weight.shape[2]
        h2 = self.network_.enc[1].weight.shape[2]
        return {"hidden": [h1, h2], "history": getattr(self, "history_", [])}

