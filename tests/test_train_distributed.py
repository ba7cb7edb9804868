"""Data-parallel training: two gloo processes under torchrun equal one process.

One ``torchrun --nproc_per_node=2`` launch runs every distributed scenario (process start-up dominates the
cost): a float64 and a float32 run with a BlockNorm weight term, an activation term, an unused parameter,
momentum, weight decay, gradient clipping, a cosine schedule and a last batch of 3 samples (27 = 6·4 + 3);
an interrupted + resumed run; a BatchNorm net; the SyncBatchNorm-on-CPU error. The single-process
references are computed here, in the pytest process.

Tolerances: the two runs add the same numbers in a different order (each rank's slice mean is scaled by
n_r/b and the two slices' gradients are summed by all_reduce, instead of one mean over the batch), so they
agree to rounding, not bit for bit: within 1e-12 in float64 and 1e-6 in float32 after 14 optimizer steps
(measured: 3e-17 and 1.5e-8). The tests fail by > 2e-3 if BlockNorm is counted on both ranks or the
last batch's slices are weighted 1/2 instead of n_r/b.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from semlens.train import TrainConfig, Trainer
from semlens.train.regularizers import BlockNorm

TESTS = Path(__file__).resolve().parent
N, BATCH, EPOCHS = 27, 4, 2  # 7 steps per epoch, the last one with 3 samples: slices of 2 and 1


class _Net(nn.Module):
    def __init__(self, bn: bool) -> None:
        super().__init__()
        layers = [nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 5, 3)]
        if bn:
            layers.append(nn.BatchNorm2d(5))
        layers += [nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3)]
        self.body = nn.Sequential(*layers)
        self.unused = nn.Linear(2, 2)  # never gets a gradient: must not move (no weight decay, no momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _net(seed: int, dtype: torch.dtype, bn: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    return _Net(bn).to(dtype)


def cli_net(num_classes: int, image_size: int = 64) -> nn.Module:
    """A model factory for ``semlens train --model test_train_distributed:cli_net`` (no dropout, no BatchNorm)."""
    return nn.Sequential(nn.Conv2d(3, 4, 5, stride=2), nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, num_classes))


def _data(dtype: torch.dtype, n: int = N, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 8, 8, generator=g, dtype=torch.float64)
    y = (x[:, 0].mean((1, 2)) > 0.5).long() + (x[:, 1].mean((1, 2)) > 0.5).long()
    return TensorDataset(x.to(dtype), y)


class Energy:
    """Per-sample mean of squared activations of layer "body.2" (an activation term); may abort at a given call."""

    name = "energy"
    layers = ["body.2"]

    def __init__(self, fail_at: int = 0) -> None:
        self.calls, self.fail_at = 0, fail_at

    def __call__(self, model: nn.Module, activations: dict[str, torch.Tensor]) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("interrupted")
        return 0.05 * activations["body.2"].pow(2).mean()


def _config(**kw) -> TrainConfig:
    base = dict(epochs=EPOCHS, batch_size=BATCH, lr=0.05, optimizer="sgd", momentum=0.9, weight_decay=1e-3,
                lr_schedule="cosine", grad_clip=1.0, seed=3, device="cpu", show_progress=False)
    return TrainConfig(**(base | kw))


def _terms(fail_at: int = 0) -> list:
    return [BlockNorm(p=2, q=1, groups=2, strength=1e-2), Energy(fail_at)]


SCRIPT = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {tests!r})
    import torch
    import semlens.train.trainer as trainer_module
    from semlens import distributed
    from torch.utils.data import TensorDataset
    from semlens.train import Trainer
    from _train_helpers import Plain
    from test_train_distributed import N, _config, _data, _net, _terms

    distributed.init_from_env(backend="gloo")
    r = distributed.rank()
    root = sys.argv[1]
    writes, bars = [], []
    if r != 0:  # record every file write this rank's trainer attempts
        real_save, real_weights = torch.save, trainer_module.save_weights
        torch.save = lambda *a, **k: (writes.append("torch.save"), real_save(*a, **k))[1]
        trainer_module.save_weights = lambda *a, **k: (writes.append("save_weights"), real_weights(*a, **k))[1]
    real_progress = trainer_module.progress
    trainer_module.progress = lambda it, **k: (bars.append(bool(k.get("enabled"))), real_progress(it, **k))[1]

    def same_on_all_ranks(model):
        flat = torch.cat([t.detach().reshape(-1).double() for t in model.state_dict().values()])
        return all(torch.equal(t, flat) for t in distributed.all_gather(flat))

    out = {{}}
    for tag, dtype in (("f64", torch.float64), ("f32", torch.float32)):
        model = _net(100 + r, dtype)  # a different init on each rank: rank 0's is broadcast
        tr = Trainer(model, _data(dtype), _data(dtype, n=11, seed=1), _config(show_progress=True),
                     extra_terms=_terms(), checkpoint_dir=f"{{root}}/{{tag}}")
        hist = tr.fit()
        tr.save(f"{{root}}/{{tag}}/final.safetensors")
        out[tag] = {{k: v.clone() for k, v in model.state_dict().items()}}
        out[tag + "_hist"] = [[h[k] for k in ("loss", "task_loss", "BlockNorm", "energy", "train_acc", "val_acc")]
                             for h in hist]
        out[tag + "_same"] = same_on_all_ranks(model)

    # interrupted at the 11th step (last checkpoint: step 9), then resumed by fresh trainers on every rank
    try:
        Trainer(_net(100 + r, torch.float64), _data(torch.float64), _data(torch.float64, n=11, seed=1),
                _config(checkpoint_every=3), extra_terms=_terms(fail_at=11), checkpoint_dir=root + "/resume").fit()
        raise AssertionError("the run was not interrupted")
    except RuntimeError as err:
        assert "interrupted" in str(err)
    state = torch.load(root + "/resume/last.pt", weights_only=True)
    out["interrupted_at"] = state["global_step"]
    model = _net(8 + r, torch.float64)
    hist = Trainer(model, _data(torch.float64), _data(torch.float64, n=11, seed=1), _config(checkpoint_every=3),
                   extra_terms=_terms(), checkpoint_dir=root + "/resume").fit()
    out["resumed"] = {{k: v.clone() for k, v in model.state_dict().items()}}
    out["resumed_hist"] = [[h[k] for k in ("loss", "BlockNorm", "train_acc", "val_acc")] for h in hist]

    # a generic Dataset (DataLoader path) with batches of 3 and a last batch of 1: rank 1 gets an empty slice
    model = _net(100 + r, torch.float64)
    Trainer(model, Plain(_data(torch.float64, n=7)), None, _config(batch_size=3)).fit()
    out["plain"] = {{k: v.clone() for k, v in model.state_dict().items()}}
    # NaN in a sample of rank 1's slice only: both ranks raise (no rank is left waiting in a collective)
    x, y = _data(torch.float64).tensors
    x = x.clone()
    bad = Trainer(_net(1, torch.float64), TensorDataset(x, y), None, _config(batch_size=N))
    x[int(bad._epoch_order(0)[20]), 0, 0, 0] = float("nan")  # one batch of 27: rank 1 has positions 14-26
    try:
        bad.fit()
        raised = 0
    except ValueError as err:
        raised = int("NaN" in str(err))
    out["nan_raised"] = int(distributed.all_reduce_sum(torch.tensor([raised])).item())

    # BatchNorm: rank 0's running statistics are broadcast, so parameters and buffers stay identical
    bn = _net(5, torch.float32, bn=True)
    bn_tr = Trainer(bn, _data(torch.float32), None, _config(epochs=1))
    bn_tr.fit()
    out["bn_same"] = same_on_all_ranks(bn)
    out["bn_acc"] = bn_tr.evaluate(_data(torch.float32, n=13, seed=2), batch_size=4)
    sync = torch.nn.SyncBatchNorm.convert_sync_batchnorm(_net(5, torch.float32, bn=True))
    try:
        Trainer(sync, _data(torch.float32), None, _config(epochs=1)).fit()
        out["sync_error"] = ""
    except ValueError as err:
        out["sync_error"] = str(err)

    counts = distributed.all_gather(torch.tensor([len(writes), sum(bars), len(bars)]))
    out["rank1_writes"], out["rank1_bars_shown"], out["rank1_bars"] = counts[1].tolist()
    out["rank0_bars_shown"] = counts[0].tolist()[1]
    if r == 0:
        torch.save(out, root + "/result.pt")
    distributed.shutdown()
    """
)


def _launch(tmp_path: Path) -> dict:
    script = tmp_path / "job.py"
    script.write_text(SCRIPT.format(tests=str(TESTS)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SEMLENS_PROGRESS": "0"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(tmp_path / "result.pt", weights_only=True)


def _single(dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], list[list[float]]]:
    model = _net(100, dtype)
    tr = Trainer(model, _data(dtype), _data(dtype, n=11, seed=1), _config(), extra_terms=_terms())
    hist = tr.fit()
    rows = [[h[k] for k in ("loss", "task_loss", "BlockNorm", "energy", "train_acc", "val_acc")] for h in hist]
    return model.state_dict(), rows


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def dist_result(tmp_path_factory) -> dict:
    return _launch(tmp_path_factory.mktemp("ddp"))


@pytest.mark.parametrize(("tag", "dtype", "tol"), [("f64", torch.float64, 1e-12), ("f32", torch.float32, 1e-6)])
def test_two_processes_equal_one_process(dist_result, tag, dtype, tol):
    ref, ref_hist = _single(dtype)
    init = _net(100, dtype).state_dict()
    assert _max_diff(ref, init) > 1e-2  # training moved the weights ...
    assert torch.equal(ref["unused.weight"], init["unused.weight"])  # ... but not the gradient-free ones
    got = dist_result[tag]
    assert torch.equal(got["unused.weight"], init["unused.weight"])
    assert _max_diff(got, ref) <= tol
    assert dist_result[tag + "_same"]  # parameters identical on both ranks
    for row, ref_row in zip(dist_result[tag + "_hist"], ref_hist, strict=True):
        assert row[:4] == pytest.approx(ref_row[:4], rel=1e-5)  # loss, task, BlockNorm (once), energy
        assert row[4:] == ref_row[4:]  # train and (sharded) val accuracy: the same counts


def test_resumed_distributed_run_equals_uninterrupted_run(dist_result):
    assert dist_result["interrupted_at"] == 9
    assert _max_diff(dist_result["resumed"], dist_result["f64"]) == 0.0  # same ops, same order: bit-identical
    assert [[r[0], r[2], r[4], r[5]] for r in dist_result["f64_hist"]] == dist_result["resumed_hist"]


def test_generic_dataset_empty_slices_and_nan_inputs(dist_result):
    model = _net(100, torch.float64)
    Trainer(model, _data(torch.float64, n=7), None, _config(batch_size=3)).fit()
    assert _max_diff(dist_result["plain"], model.state_dict()) <= 1e-12
    assert dist_result["nan_raised"] == 2


def test_batchnorm_state_stays_identical_and_sync_batchnorm_on_cpu_is_refused(dist_result):
    assert dist_result["bn_same"]
    assert 0.0 <= dist_result["bn_acc"] <= 1.0 and dist_result["bn_acc"] * 13 == round(dist_result["bn_acc"] * 13)
    assert "SyncBatchNorm" in dist_result["sync_error"] and "CUDA" in dist_result["sync_error"]


def test_only_rank_zero_writes_and_shows_progress(dist_result, tmp_path):
    assert dist_result["rank1_writes"] == 0
    assert dist_result["rank1_bars"] > 0 and dist_result["rank1_bars_shown"] == 0
    assert dist_result["rank0_bars_shown"] == 2 * EPOCHS  # the f64 and f32 runs asked for bars


def test_cli_under_torchrun_equals_one_process(tmp_path):
    from typer.testing import CliRunner

    from semlens.checkpoint import load_state_dict
    from semlens.cli.main import app

    runner = CliRunner()
    data = tmp_path / "concepts"
    r = runner.invoke(app, ["data", "concepts", "--out", str(data), "--n", "40", "--size", "32", "--workers", "1"])
    assert r.exit_code == 0, r.output
    # the built-in models use dropout (per-rank masks: equivalent, not equal), so a plain net is trained here
    args = ["train", "--model", "test_train_distributed:cli_net", "--data", str(data), "--epochs", "2",
            "--batch-size", "6",
            "--optimizer", "sgd", "--lr", "0.05", "--device", "cpu"]
    r = runner.invoke(app, [*args, "--out", str(tmp_path / "one")])
    assert r.exit_code == 0, r.output
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SEMLENS_PROGRESS": "0",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "semlens.cli.main", *args, "--out", str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("(2 processes)") == 1  # rank 0 alone reports
    files = sorted(str(p.relative_to(tmp_path / "two")) for p in (tmp_path / "two").rglob("*"))
    assert files == [".semlens-output", "checkpoints", "checkpoints/last.pt", "checkpoints/last.safetensors",
                     "history.json", "model.safetensors"]  # the marker: a directory semlens created
    one = load_state_dict(tmp_path / "one" / "model.safetensors")
    two = load_state_dict(tmp_path / "two" / "model.safetensors")
    assert _max_diff(one, two) <= 1e-6
