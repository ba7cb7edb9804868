"""Trainer with a custom step (sequence model): batch sources, parameter groups, per-epoch seeding, terms that
read step outputs and log more, callbacks and model selection; resume stays bit-identical."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from semlens import distributed
from semlens.checkpoint import CheckpointError, load_state_dict, read_config
from semlens.train import (
    ModelSelection,
    StepOutput,
    TrainConfig,
    Trainer,
)


class Seqs:
    """A BatchSource of variable-length sequences (N, T, 3) whose target is the sum of the valid steps' first
    channel; epoch e keeps ``keep`` samples of a permutation seeded 100 + e."""

    def __init__(self, n: int = 40, keep: int | None = None, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 6, 3, generator=g)
        self.lengths = torch.randint(2, 7, (n,), generator=g)
        valid = torch.arange(6)[None, :] < self.lengths[:, None]
        self.y = (self.x[..., 0] * valid).sum(1)
        self.keep = keep or n

    def __len__(self) -> int:
        return self.keep

    def epoch_order(self, epoch: int) -> torch.Tensor:
        return torch.randperm(len(self.x), generator=torch.Generator().manual_seed(100 + epoch))[: self.keep]

    def batch(self, idx: torch.Tensor, device: torch.device):
        return self.x[idx].to(device), self.lengths[idx], self.y[idx].to(device)


class SeqNet(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.rnn = nn.GRU(3, 8, batch_first=True)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prediction (B,) and the last valid hidden state (B, 8)."""
        out, _ = self.rnn(x)
        h = out[torch.arange(len(x)), lengths - 1]
        return self.head(self.drop(h)).squeeze(1), h


def seq_step(model: nn.Module, batch) -> StepOutput:
    x, lengths, y = batch
    pred, h = model(x, lengths)
    loss = ((pred - y) ** 2).mean()
    return StepOutput(loss, len(y), {"abs_err": float((pred - y).detach().abs().sum())}, {"hidden": h, "target": y})


class HiddenEnergy:
    """0.1 × mean squared hidden state, read from the step's outputs; also logs the unweighted value."""

    layers: list[str] = []
    inputs = ("hidden",)
    name = "energy"

    def __call__(self, model, acts):
        e = acts["hidden"].pow(2).mean()
        return 0.1 * e, {"hidden_sq": float(e.detach())}


def _groups(model: SeqNet) -> list[dict]:
    return [{"params": list(model.rnn.parameters())}, {"params": list(model.head.parameters()), "weight_decay": 0.1}]


def _trainer(model: SeqNet, epochs: int, tmp=None, checkpoint_every: int | None = None, **kw) -> Trainer:
    cfg = TrainConfig(epochs=epochs, batch_size=8, lr=1e-2, optimizer="adam", weight_decay=0.0, seed=0,
                      device="cpu", grad_clip=1.0, show_progress=False, checkpoint_every=checkpoint_every)
    return Trainer(model, Seqs(keep=36), config=cfg, extra_terms=[HiddenEnergy()], checkpoint_dir=tmp,
                   model_config={"model": "seqnet"}, step=seq_step, param_groups=_groups(model),
                   epoch_seed=lambda e: 7 * 1000 + e, **kw)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _no_time(hist):
    return [{k: v for k, v in h.items() if k != "seconds"} for h in hist]


def test_custom_step_equals_the_plain_loop_logs_terms_and_resumes_bit_identically(tmp_path):
    model = SeqNet()
    hist = _trainer(model, 3).fit()
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert list(hist[0]) == ["epoch", "loss", "task_loss", "energy", "abs_err", "hidden_sq", "lr", "seconds"]
    assert hist[0]["energy"] == pytest.approx(0.1 * hist[0]["hidden_sq"], rel=1e-5)
    assert hist[-1]["task_loss"] < hist[0]["task_loss"]

    # the same by hand: Adam over the groups, seeded per epoch, the source's order, the step + term, clipping
    ref = SeqNet()
    opt = torch.optim.Adam(_groups(ref), lr=1e-2, weight_decay=0.0)
    src, term = Seqs(keep=36), HiddenEnergy()
    ref.train()
    for epoch in range(3):
        torch.manual_seed(7 * 1000 + epoch)
        order = src.epoch_order(epoch)
        for s in range(0, len(order), 8):
            out = seq_step(ref, src.batch(order[s: s + 8], torch.device("cpu")))
            total = out.loss + sum([term(ref, out.outputs)[0]])
            opt.zero_grad(set_to_none=True)
            total.backward()
            nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
            opt.step()
    assert _same(model.state_dict(), ref.state_dict())

    # interrupted after one epoch (constant learning rate: more epochs may follow), resumed: bit-identical
    _trainer(SeqNet(), 1, tmp_path).fit()
    resumed = SeqNet(seed=3)
    hist2 = _trainer(resumed, 3, tmp_path).fit()
    assert _same(resumed.state_dict(), model.state_dict()) and _no_time(hist2) == _no_time(hist)
    assert read_config(tmp_path / "last.safetensors")["model"] == "seqnet"


def test_mid_epoch_checkpoint_of_a_custom_step_resumes_exactly(tmp_path):
    model = SeqNet()
    _trainer(model, 2).fit()

    class Stop(Exception):
        pass

    # killed during epoch 2 (5 steps per epoch), after the checkpoint of global step 6 (its first step)
    tr = _trainer(SeqNet(), 2, tmp_path, checkpoint_every=6)
    real = tr._local_step

    def dying(opt, batch, epoch, step):
        if epoch == 1 and step == 3:
            raise Stop
        return real(opt, batch, epoch, step)

    tr._local_step = dying  # type: ignore[method-assign]
    with pytest.raises(Stop):
        tr.fit()
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step_in_epoch"] == 1
    resumed = SeqNet(seed=4)
    _trainer(resumed, 2, tmp_path).fit()
    assert _same(resumed.state_dict(), model.state_dict())


def test_model_selection_keeps_the_best_epoch_stops_and_resumes(tmp_path):
    scores = [0.1, 0.5, 0.3, 0.2, 0.6, 0.7]

    def run(epochs: int, tmp=None, patience=None, seed: int = 0):
        model = SeqNet(seed=seed)
        holder: list[Trainer] = []
        sel = ModelSelection(lambda m: scores[len(holder[0].history)], key="val_score", patience=patience)
        tr = _trainer(model, epochs, tmp, callbacks=[sel])
        holder.append(tr)
        return model, tr.fit(), sel

    best, hist, sel = run(5)
    assert [h["val_score"] for h in hist] == scores[:5] and sel.best_epoch == 4
    model, hist, sel = run(5, patience=2)  # epochs 3 and 4 (0-based 2, 3) fail to beat epoch 1: stop
    assert len(hist) == 4 and sel.best_epoch == 1 and sel.best_score == 0.5
    plain = SeqNet()
    _trainer(plain, 2).fit()
    assert _same(model.state_dict(), plain.state_dict())  # the best epoch's weights are restored
    # killed after 3 epochs, resumed: the best weights come back from best.safetensors, the stop is the same
    run(3, tmp_path, patience=2)
    assert read_config(tmp_path / "best.safetensors") == {"model": "seqnet", "epoch": 1, "val_score": 0.5}
    assert _same(load_state_dict(tmp_path / "best.safetensors"), plain.state_dict())
    m2, hist2, sel2 = run(5, tmp_path, patience=2, seed=9)
    assert len(hist2) == 4 and sel2.best_epoch == 1 and _same(m2.state_dict(), plain.state_dict())
    (tmp_path / "best.safetensors").unlink()
    with pytest.raises(CheckpointError, match="best.safetensors"):
        run(5, tmp_path, patience=2)
    with pytest.raises(ValueError, match="patience"):
        ModelSelection(lambda m: 0.0, patience=0)


def test_custom_step_refusals(monkeypatch):
    model = SeqNet()
    cfg = TrainConfig(epochs=1, device="cpu", show_progress=False)
    with pytest.raises(ValueError, match="val_data"):
        Trainer(model, Seqs(), Seqs(), cfg, step=seq_step)
    with pytest.raises(ValueError, match="loss_fn"):
        Trainer(model, Seqs(), None, cfg, loss_fn=nn.functional.mse_loss, step=seq_step)
    with pytest.raises(TypeError, match="BatchSource"):
        Trainer(model, TensorDataset(torch.zeros(4, 3), torch.zeros(4)), None, cfg, step=seq_step)

    class Wants:
        layers: list[str] = []
        inputs = ("logits",)

        def __call__(self, model, acts):
            return acts["logits"].sum()

    with pytest.raises(KeyError, match="'logits'.*gives \\['hidden', 'target'\\]"):
        Trainer(model, Seqs(), None, cfg, extra_terms=[Wants()], step=seq_step).fit()
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    with pytest.raises(ValueError, match="one process"):
        Trainer(model, Seqs(), None, cfg, step=seq_step)


def test_classification_resumes_with_more_epochs_unless_the_schedule_decays(tmp_path):
    from test_trainer import _cfg, _data, _model

    full = _model()
    hist = Trainer(full, _data(), None, _cfg(epochs=2)).fit()
    Trainer(_model(), _data(), None, _cfg(epochs=1), checkpoint_dir=tmp_path).fit()
    more = _model(seed=4)
    hist2 = Trainer(more, _data(), None, _cfg(epochs=2), checkpoint_dir=tmp_path).fit()
    assert _same(more.state_dict(), full.state_dict()) and _no_time(hist2) == _no_time(hist)
    assert list(hist[0]) == ["epoch", "loss", "task_loss", "train_acc", "lr", "seconds"]
    with pytest.raises(CheckpointError, match="epochs"):
        Trainer(_model(), _data(), None, _cfg(epochs=3, lr_schedule="cosine"), checkpoint_dir=tmp_path).fit()
