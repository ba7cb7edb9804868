"""`semlens explain` end to end with a user model (`usermod:factory`), and the demo step with a stand-in context."""

from __future__ import annotations

import sys
import textwrap
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from semlens.checkpoint import save_weights
from semlens.cli.main import app
from semlens.experiments.demo import DemoContext
from semlens.explain import attribute, list_methods

USERMOD = textwrap.dedent(
    """
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self, num_classes=3, width=4):
            super().__init__()
            self.conv = nn.Conv2d(3, width, 3, padding=1)
            self.bn = nn.BatchNorm2d(width)
            self.fc = nn.Linear(width * 4 * 4, num_classes)

        def forward(self, x):
            h = torch.relu(self.bn(self.conv(x)))
            return self.fc(nn.functional.adaptive_avg_pool2d(h, 4).flatten(1))

    def factory(num_classes=3, width=4):
        return Net(num_classes, width)
    """
)


@pytest.fixture()
def user_model(tmp_path, monkeypatch):
    name = "semlens_explain_usermod"
    (tmp_path / f"{name}.py").write_text(USERMOD)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(name, None)
    import importlib

    mod = importlib.import_module(name)
    torch.manual_seed(0)
    net = mod.factory(num_classes=5, width=6)
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.2, 0.2)
        net.bn.running_var.uniform_(0.5, 1.5)
    weights = save_weights(net, tmp_path / "w.safetensors", config={"model_kwargs": {"num_classes": 5, "width": 6}})
    yield f"{name}:factory", weights, net.eval()
    sys.modules.pop(name, None)


def test_cli_explain_end_to_end(user_model, tmp_path):
    spec, weights, net = user_model
    rng = np.random.default_rng(0)
    img = (rng.random((12, 12, 3)) * 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "cat.png")
    batch = rng.random((2, 3, 12, 12)).astype(np.float32)
    np.save(tmp_path / "batch.npy", batch)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["explain", "--model", spec, "--weights", str(weights), "--input", "cat.png",
                                   "batch.npy", "--method", "epsilon-gamma-box", "--target", "2", "--out", str(out),
                                   "--overlay", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    rel_img = np.load(out / "cat.npy")
    rel_batch = np.load(out / "batch.npy")
    assert rel_img.shape == (3, 12, 12) and rel_img.dtype == np.float32
    assert rel_batch.shape == (2, 3, 12, 12) and rel_batch.dtype == np.float32
    x_img = torch.from_numpy(img.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    expect = attribute(net, x_img, 2, "epsilon-gamma-box")[0].numpy()
    np.testing.assert_allclose(rel_img, expect, rtol=1e-5, atol=1e-7)
    expect_b = attribute(net, torch.from_numpy(batch), 2, "epsilon-gamma-box").numpy()
    np.testing.assert_allclose(rel_batch, expect_b, rtol=1e-5, atol=1e-7)
    # one PNG per sample, upscaled by the smallest integer factor reaching 224 px: 12 * 19 = 228, every input
    # pixel a 19 x 19 block of the native heatmap's colour (nearest neighbour, no interpolated values)
    from semlens.explain import heatmap_rgb

    with Image.open(out / "cat.png") as png:
        assert png.size == (228, 228) and png.mode == "RGB"
        big = np.asarray(png)
    native = heatmap_rgb(rel_img, x_img[0].numpy())
    np.testing.assert_array_equal(big[::19, ::19], native)
    np.testing.assert_array_equal(big, native.repeat(19, 0).repeat(19, 1))
    for i in range(2):
        with Image.open(out / f"batch-{i}.png") as png:
            assert png.size == (228, 228)
    assert not (out / "batch.png").exists()


def test_cli_errors_and_listing(user_model, tmp_path):
    spec, weights, _ = user_model
    runner = CliRunner()
    res = runner.invoke(app, ["explain", "--list-methods"])
    assert res.exit_code == 0 and all(m in res.output for m in list_methods())
    np.save(tmp_path / "bad.npy", np.zeros((4, 12, 12), dtype=np.float32))
    res = runner.invoke(app, ["explain", "--model", spec, "--weights", str(weights), "--input", "bad.npy",
                              "--target", "0", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "bad.npy" in res.output and "4 channels" in res.output
    np.save(tmp_path / "ok.npy", np.zeros((3, 12, 12), dtype=np.float32))
    res = runner.invoke(app, ["explain", "--model", spec, "--weights", str(weights), "--input", "ok.npy",
                              "--target", "7", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "out of range" in res.output
    res = runner.invoke(app, ["explain", "--model", spec, "--weights", str(weights), "--input", "missing.png",
                              "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "missing.png" in res.output
    res = runner.invoke(app, ["explain", "--model", spec, "--weights", str(weights), "--input", "ok.npy",
                              "--method", "nope", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "unknown method" in res.output


@dataclass
class _Concepts:
    images: torch.Tensor
    labels: torch.Tensor
    evidence: torch.Tensor
    class_names: list[str]




def test_demo_step_with_stand_in_context(tmp_path):
    from semlens.experiments.demo_steps import s20_explain

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                                torch.nn.Conv2d(4, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(6, 3)).eval()
    images = torch.rand(6, 3, 16, 16)
    evidence = torch.zeros(6, 16, 16, dtype=torch.bool)
    evidence[:, 4:12, 4:12] = True
    ctx = DemoContext(tmp_path, torch.device("cpu"), artifacts={"classifier": model, "concepts_test": _Concepts(
        images, torch.tensor([0, 1, 2, 0, 1, 2]), evidence, ["a", "b", "c"])})
    sections = s20_explain.run(ctx)
    html = "".join(sections[0].blocks)
    assert "<img" in html and "epsilon-gamma-box" in html and "sum R / logit" in html
    _, rows, _ = s20_explain.explain_batch(model, images[:4], evidence[:4])
    by = {r["method"]: r for r in rows}
    assert set(by) == set(s20_explain.METHODS)
    # gradient x input conserves the logit up to the biases' share; its ratio is a finite number
    assert "n/a" in by["gradient"]["sum R / logit"]
    assert 0.0 <= by["epsilon-plus-flat"]["positive relevance on evidence"] <= 1.0
    # missing artifacts: a note, not a crash
    assert s20_explain.run(DemoContext(tmp_path, torch.device("cpu")))[0].blocks
