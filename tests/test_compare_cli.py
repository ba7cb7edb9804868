"""``semlens evaluate-explanations`` end to end on a tiny user model and an .npz data set."""

from __future__ import annotations

import json

import numpy as np
import torch
from typer.testing import CliRunner

from semlens.checkpoint import save_weights
from semlens.cli.main import app

MODEL_SRC = '''
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self, num_classes=3, image_size=16):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))

def factory(num_classes=3, image_size=16):
    return Net(num_classes, image_size)
'''


def _setup(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "evalmodel_cli.py").write_text(MODEL_SRC)
    monkeypatch.syspath_prepend(str(tmp_path))
    import evalmodel_cli

    torch.manual_seed(0)
    save_weights(evalmodel_cli.factory(), tmp_path / "w.safetensors", config={"num_classes": 3})
    g = np.random.default_rng(0)
    evidence = np.zeros((12, 16, 16), dtype=bool)
    evidence[:, 4:10, 3:9] = True
    np.savez(tmp_path / "d.npz", images=g.random((12, 3, 16, 16), dtype=np.float32),
             labels=g.integers(0, 3, 12), evidence=evidence)


def test_cli_writes_ranked_table(tmp_path, monkeypatch):
    _setup(tmp_path, monkeypatch)
    res = CliRunner().invoke(app, [
        "evaluate-explanations", "--model", "evalmodel_cli:factory", "--weights", "w.safetensors",
        "--data", "d.npz", "--methods", "random", "--out", "out", "--patch-size", "4", "--n-boot", "50",
        "--device", "cpu"])
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "out" / "ranking.json").read_text())
    assert saved["n_examples"] == 12 and saved["table"][0]["method"] == "random"
    # a random map on a 36-of-256-pixel mask: rank accuracy near 36/256
    assert abs(saved["table"][0]["relevance_rank_accuracy"] - 36 / 256) < 0.1
    assert (tmp_path / "out" / "report.html").stat().st_size > 1000
    assert (tmp_path / "out" / "perturbation_curves.png").exists()


def test_cli_bad_input_is_one_clear_line(tmp_path, monkeypatch):
    _setup(tmp_path, monkeypatch)
    base = ["evaluate-explanations", "--model", "evalmodel_cli:factory", "--weights", "w.safetensors",
            "--methods", "random", "--device", "cpu"]
    res = CliRunner().invoke(app, [*base, "--data", "missing.npz"])
    assert res.exit_code == 2 and "data not found" in res.output
    np.savez(tmp_path / "bad.npz", images=np.zeros((2, 3, 16, 16), np.float32), labels=np.zeros(2, int),
             evidence=np.zeros((2, 16, 16), bool))
    res = CliRunner().invoke(app, [*base, "--data", "bad.npz", "--patch-size", "4"])
    assert res.exit_code == 2 and "empty evidence mask" in res.output
    res = CliRunner().invoke(app, [*base, "--data", "d.npz", "--weights", "nope.safetensors"])
    assert res.exit_code == 2 and "nope.safetensors" in res.output


def test_cli_reads_broden_directory_with_evidence(tmp_path, monkeypatch):
    from semlens.world import generate_concepts, write_broden

    _setup(tmp_path, monkeypatch)
    ci = generate_concepts(n=6, size=16, seed=2)
    write_broden(ci, tmp_path / "broden")
    from semlens.cli.evaluate import load_eval_data

    images, labels, evidence = load_eval_data(tmp_path / "broden")
    assert torch.allclose(images, ci.images, atol=1 / 255) and torch.equal(labels, ci.labels)
    assert torch.equal(evidence, ci.evidence)
    import evalmodel_cli

    save_weights(evalmodel_cli.factory(num_classes=12), tmp_path / "w12.safetensors")  # no config: from labels
    res = CliRunner().invoke(app, [
        "evaluate-explanations", "--model", "evalmodel_cli:factory", "--weights", "w12.safetensors",
        "--data", "broden", "--methods", "random", "--out", "out", "--patch-size", "4", "--n-boot", "20",
        "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "out" / "ranking.json").read_text())["n_examples"] == 6
