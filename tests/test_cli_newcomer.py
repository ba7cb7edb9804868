"""The command line as a newcomer meets it: one model loader, the error policy, outputs that never clobber,
heatmaps people can use. Every test here failed on the command line before issue 14."""

from __future__ import annotations

import os
import stat
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from semlens.checkpoint import save_weights
from semlens.cli.main import app
from semlens.explain import attribute

MOD = "semlens_newcomer_mod"
SOURCE = textwrap.dedent(
    """
    import torch
    from torch import nn

    def make():  # a factory that takes no arguments at all
        return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 12))

    def fixed(image_size=8):  # reads exactly image_size x image_size inputs
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                             nn.Linear(4 * image_size * image_size, 3))

    def gelu():
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(4, 3))

    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x.mean((2, 3)), "not an argument")  # a bug in the user's model: TypeError

    def broken():
        return Broken()
    """
)


@pytest.fixture()
def user_dir(tmp_path, monkeypatch):
    (tmp_path / f"{MOD}.py").write_text(SOURCE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(MOD, None)
    import importlib

    mod = importlib.import_module(MOD)
    torch.manual_seed(0)
    save_weights(mod.make(), tmp_path / "make.safetensors", config={"model": f"{MOD}:make"})
    save_weights(mod.fixed(), tmp_path / "fixed.safetensors",
                 config={"model": f"{MOD}:fixed", "model_kwargs": {"image_size": 8}})
    yield tmp_path, mod
    sys.modules.pop(MOD, None)


def _run(*args: str):
    return CliRunner().invoke(app, list(args), env={"SEMLENS_PROGRESS": "0", "COLUMNS": "200"})


def test_no_argument_factory_through_train_and_evaluate(user_dir):
    tmp, _ = user_dir
    from semlens.world import write_concepts

    write_concepts(tmp / "data", n=24, size=16, seed=1, workers=1)
    res = _run("train", "--model", f"{MOD}:make", "--data", "data", "--out", "run", "--epochs", "2",
               "--batch-size", "8", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert "epoch 1/2: loss" in res.output and "epoch 2/2: loss" in res.output  # per-epoch lines
    res = _run("evaluate-explanations", "--model", f"{MOD}:make", "--weights", "run/model.safetensors",
               "--data", "data", "--methods", "gradient,random", "--n", "8", "--n-boot", "20", "--out", "ev",
               "--patch-size", "4", "--device", "cpu")
    assert res.exit_code == 0, res.output
    # --model omitted: the weights' config names the factory
    np.save(tmp / "x.npy", np.random.default_rng(0).random((3, 16, 16)).astype(np.float32))
    res = _run("explain", "--weights", "run/model.safetensors", "--input", "x.npy", "--out", "ex", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert (tmp / "ex" / "x.npy").is_file()


def test_loader_refusals_name_the_model(user_dir):
    tmp, mod = user_dir
    np.save(tmp / "x.npy", np.zeros((3, 8, 8), np.float32))
    res = _run("explain", "--model", f"{MOD}:make", "--input", "x.npy", "--out", "o1")
    assert res.exit_code == 2 and "no weights given" in res.output and "--random-init" in res.output
    assert not (tmp / "o1").exists()
    res = _run("explain", "--model", f"{MOD}:make", "--random-init", "--input", "x.npy", "--out", "o2",
               "--device", "cpu")
    assert res.exit_code == 0, res.output
    res = _run("explain", "--model", "alexnet-like", "--weights", "make.safetensors", "--input", "x.npy",
               "--out", "o3")
    assert res.exit_code == 2 and f"holds weights of model '{MOD}:make', not 'alexnet-like'" in res.output
    from semlens.models import load

    net = load(weights=tmp / "make.safetensors", device="cpu")
    ref = mod.make()
    assert not net.training and torch.equal(net[0].weight, load(f"{MOD}:make", tmp / "make.safetensors")[0].weight)
    assert ref[0].weight.shape == net[0].weight.shape


def test_unsupported_model_one_culprit_per_line(user_dir):
    tmp, mod = user_dir
    save_weights(mod.gelu(), tmp / "gelu.safetensors", config={"model": f"{MOD}:gelu"})
    np.save(tmp / "x.npy", np.zeros((3, 8, 8), np.float32))
    res = _run("explain", "--weights", "gelu.safetensors", "--input", "x.npy", "--out", "o", "--device", "cpu")
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert 3 <= len(lines) <= 6, res.output  # not one character per line
    assert lines[0].startswith("error: LRP cannot explain this model")
    assert any(line.strip().startswith("- 1") and "GELU" in line for line in lines), res.output
    assert not (tmp / "o").exists()  # the output directory it created is removed on failure


def test_bug_in_model_keeps_its_traceback(user_dir):
    tmp, mod = user_dir
    save_weights(mod.broken(), tmp / "broken.safetensors", config={"model": f"{MOD}:broken"})
    np.save(tmp / "x.npy", np.zeros((3, 8, 8), np.float32))
    res = _run("explain", "--weights", "broken.safetensors", "--input", "x.npy", "--method", "gradient",
               "--target", "0", "--out", "o", "--device", "cpu")
    assert res.exit_code == 1 and isinstance(res.exception, TypeError)


def test_outputs_never_clobber_inputs(user_dir):
    tmp, _ = user_dir
    x = np.random.default_rng(1).random((3, 16, 16)).astype(np.float32)
    np.save(tmp / "some.npy", x)
    before = (tmp / "some.npy").read_bytes()
    base = ("explain", "--weights", "make.safetensors", "--input", "some.npy", "--device", "cpu")
    res = _run(*base, "--out", ".")
    assert res.exit_code == 2 and "not empty" in res.output and "--overwrite" in res.output
    res = _run(*base, "--out", ".", "--overwrite")
    assert res.exit_code == 2 and "refusing to overwrite input" in res.output
    assert (tmp / "some.npy").read_bytes() == before
    # an existing non-empty directory that semlens did not write: refused, its files untouched
    (tmp / "mine").mkdir()
    (tmp / "mine" / "index.csv").write_text("precious\n")
    res = _run(*base, "--out", "mine")
    assert res.exit_code == 2 and "mine" in res.output and (tmp / "mine" / "index.csv").read_text() == "precious\n"
    res = _run("data", "concepts", "--out", "mine", "--n", "4", "--size", "16", "--workers", "1")
    assert res.exit_code == 2 and (tmp / "mine" / "index.csv").read_text() == "precious\n"
    # a directory semlens wrote may be written again
    assert _run(*base, "--out", "ours").exit_code == 0
    assert _run(*base, "--out", "ours").exit_code == 0
    # --out naming a file
    res = _run(*base, "--out", "make.safetensors")
    assert res.exit_code == 2 and "is a file" in res.output


def test_same_name_inputs_keep_distinct_outputs(user_dir):
    tmp, mod = user_dir
    rng = np.random.default_rng(2)
    for d in ("a", "b"):
        (tmp / d).mkdir()
        np.save(tmp / d / "x.npy", rng.random((3, 16, 16)).astype(np.float32))
    res = _run("explain", "--weights", "make.safetensors", "--input", "a/x.npy", "b/x.npy", "--target", "1",
               "--method", "gradient", "--out", "o", "--device", "cpu")
    assert res.exit_code == 0, res.output
    net = mod.make()
    from semlens.checkpoint import load_weights

    load_weights(net, tmp / "make.safetensors")
    for d in ("a", "b"):
        x = torch.from_numpy(np.load(tmp / d / "x.npy"))[None]
        np.testing.assert_allclose(np.load(tmp / "o" / f"{d}_x.npy"), attribute(net.eval(), x, 1, "gradient")[0],
                                   rtol=1e-5, atol=1e-7)
        assert (tmp / "o" / f"{d}_x.png").is_file()


def test_wrong_input_shape_names_file_and_expected_shape(user_dir):
    tmp, _ = user_dir
    np.save(tmp / "big.npy", np.zeros((3, 12, 12), np.float32))
    res = _run("explain", "--weights", "fixed.safetensors", "--input", "big.npy", "--out", "o", "--device", "cpu")
    assert res.exit_code == 2 and "big.npy" in res.output and "(3, 8, 8)" in res.output, res.output
    np.save(tmp / "four.npy", np.zeros((2, 4, 8, 8), np.float32))
    res = _run("explain", "--weights", "fixed.safetensors", "--input", "four.npy", "--out", "o", "--device", "cpu")
    assert res.exit_code == 2 and "four.npy: 4 channels (shape (2, 4, 8, 8))" in res.output, res.output
    assert "expects 3 channels" in res.output


def test_files_follow_the_umask(user_dir):
    tmp, mod = user_dir
    old = os.umask(0o027)
    try:
        path = save_weights(mod.make(), tmp / "w.safetensors")
        np.save(tmp / "x.npy", np.zeros((3, 8, 8), np.float32))
        res = _run("explain", "--weights", "make.safetensors", "--input", "x.npy", "--out", "o", "--device", "cpu")
        assert res.exit_code == 0, res.output
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    for name in ("x.npy", "x.png"):
        assert stat.S_IMODE((tmp / "o" / name).stat().st_mode) == 0o640


def test_uint8_arrays_scale_like_pngs_and_rule_params(user_dir):
    tmp, mod = user_dir
    img = (np.random.default_rng(3).random((16, 16, 3)) * 255).astype(np.uint8)
    Image.fromarray(img).save(tmp / "p.png")
    np.save(tmp / "u.npy", img.transpose(2, 0, 1).copy())
    res = _run("explain", "--weights", "make.safetensors", "--input", "p.png", "u.npy", "--target", "2",
               "--method", "lrp-epsilon", "--param", "epsilon=0.5", "--out", "o", "--colorbar", "--device", "cpu")
    assert res.exit_code == 0, res.output
    np.testing.assert_allclose(np.load(tmp / "o" / "u.npy"), np.load(tmp / "o" / "p.npy"), rtol=1e-6, atol=1e-8)
    from semlens.models import load

    net = load(weights=tmp / "make.safetensors", device="cpu")
    x = torch.from_numpy(img.astype(np.float32) / 255).permute(2, 0, 1)[None]
    expect = attribute(net, x, 2, "lrp-epsilon", epsilon=0.5)[0].numpy()
    np.testing.assert_allclose(np.load(tmp / "o" / "p.npy"), expect, rtol=1e-5, atol=1e-7)
    assert not np.allclose(expect, attribute(net, x, 2, "lrp-epsilon")[0].numpy(), atol=1e-6)
    with Image.open(tmp / "o" / "p.png") as png:  # 16 px * 14 = 224, plus a 64 px colour bar
        assert png.size == (224 + 64, 224)
    res = _run("explain", "--weights", "make.safetensors", "--input", "p.png", "--method", "epsilon-plus-flat",
               "--param", "gamma=0.5", "--out", "o2")
    assert res.exit_code == 2 and "has no gamma rule" in res.output
    res = _run("explain", "--weights", "make.safetensors", "--input", "p.png", "--method", "lrp-epsilon",
               "--param", "epsilon=-1", "--out", "o2")
    assert res.exit_code == 2 and ">= 0" in res.output


def test_mean_std_from_the_weights_config(user_dir):
    tmp, mod = user_dir
    torch.manual_seed(0)
    net = mod.make().eval()
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.5]
    save_weights(net, tmp / "norm.safetensors",
                 config={"model": f"{MOD}:make", "preprocess": {"mean": mean, "std": std}})
    img = (np.random.default_rng(4).random((16, 16, 3)) * 255).astype(np.uint8)
    Image.fromarray(img).save(tmp / "p.png")
    res = _run("explain", "--weights", "norm.safetensors", "--input", "p.png", "--target", "0", "--method",
               "gradient-x-input", "--out", "o", "--device", "cpu")
    assert res.exit_code == 0, res.output
    x = torch.from_numpy(img.astype(np.float32) / 255).permute(2, 0, 1)[None]
    xn = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    np.testing.assert_allclose(np.load(tmp / "o" / "p.npy"), attribute(net, xn, 0, "gradient-x-input")[0],
                               rtol=1e-5, atol=1e-7)
    res = _run("explain", "--weights", "norm.safetensors", "--input", "p.png", "--mean", "0.5,0.5",
               "--out", "o2", "--device", "cpu")
    assert res.exit_code == 2 and "--mean has 2 values but the input has 3 channels" in res.output
