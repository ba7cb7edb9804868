"""``semlens embed fit`` / ``semlens embed explain`` end to end on a tiny concept world, and their bad-input errors."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from semlens.checkpoint import save_weights
from semlens.cli.main import app
from semlens.models import build_model
from semlens.world import write_concepts

LAYER = "features.relu5"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed_cli")
    data = write_concepts(root / "data", n=90, size=32, seed=0, workers=1, show_progress=False)
    torch.manual_seed(0)
    kwargs = {"num_classes": 12, "image_size": 32, "width": 0.25}
    net = build_model("alexnet-like", **kwargs)
    weights = save_weights(net, root / "net.safetensors", config={"model_kwargs": kwargs})
    other = {"num_classes": 12, "image_size": 32}
    save_weights(build_model("vgg-small", **other), root / "vgg.safetensors", config={"model_kwargs": other})
    return root, data, weights


def _fit(world, out, *extra):
    root, data, weights = world
    return CliRunner().invoke(app, ["embed", "fit", "--model", "alexnet-like", "--weights", str(weights), "--layer",
                                    LAYER, "--data", str(data), "--out", str(out), "--k", "3", "--per-class", "1",
                                    *extra])


def test_embed_fit_and_explain_write_the_named_files(world):
    root, data, weights = world
    out = root / "srae"
    res = _fit(world, out, "--target", "0,5", "--epochs", "1")
    assert res.exit_code == 0, res.output
    for name in ("embedding.safetensors", "embedding.json", "metrics.json", "xfeatures.csv"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "embedding.json").read_text())
    assert meta["layer"] == LAYER and meta["model"] == "alexnet-like" and meta["classes"] == [0, 5]
    assert meta["history"] and "alpha_rec" in meta["history"][0]
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("r2", "agreement", "replaced_accuracy", "fve", "l0", "dead", "orthogonality", "compactness",
                "mass_accuracy", "recovery", "distinctness"):
        assert key in metrics, key
    rows = list(csv.DictReader(open(out / "xfeatures.csv")))
    assert list(rows[0]) == ["class", "xfeature", "mean_contribution", "concept", "mass_accuracy"]
    assert {r["class"] for r in rows} <= {"0", "5"} and all(0 <= float(r["mass_accuracy"]) <= 1 for r in rows)
    img = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    Image.fromarray(img).save(root / "x.png")
    res = CliRunner().invoke(app, ["embed", "explain", "--embedding", str(out), "--model", "alexnet-like",
                                   "--weights", str(weights), "--input", str(root / "x.png"), "--out",
                                   str(root / "expl"), "--target", "5"])
    assert res.exit_code == 0, res.output
    info = json.loads((root / "expl" / "x.json").read_text())
    assert info["class"] == 5 and len(info["contributions"]) == 3
    assert info["rebuilt_logit"] == pytest.approx(sum(info["contributions"]) + info["bias"], abs=1e-5)
    assert (root / "expl" / "x.png").stat().st_size > 0
    bad = CliRunner().invoke(app, ["embed", "explain", "--embedding", str(out), "--model", "vgg-small", "--weights",
                                   str(root / "vgg.safetensors"), "--input", str(root / "x.png"), "--out",
                                   str(root / "e2")])
    assert bad.exit_code == 2 and "fitted on model 'alexnet-like', not 'vgg-small'" in bad.output
    bad = CliRunner().invoke(app, ["embed", "explain", "--embedding", str(out), "--model", "alexnet-like",
                                   "--weights", str(weights), "--input", str(root / "x.png"), "--out",
                                   str(root / "e3"), "--target", "3"])
    assert bad.exit_code == 2 and "class 3 is not explained" in bad.output


@pytest.mark.parametrize("extra,message", [
    (["--layer", "features.nope"], "unknown layer 'features.nope'"),
    (["--target", "12"], "class index 12 out of range for a model with 12 outputs"),
    (["--k", "40"], "k=40 x-features is larger than the width 16"),
    (["--method", "ica"], "unknown method 'ica'"),
    (["--init", "random"], "unknown SRAE init 'random'"),
])
def test_embed_fit_bad_input(world, extra, message, tmp_path):
    res = _fit(world, tmp_path / "o", "--method", "pca", *extra)
    assert res.exit_code == 2 and message in res.output, res.output


def test_embed_fit_ica_start(world):
    """``--init ica``: the x-features start on the layer's independent components; the choice is stored."""
    root, _, _ = world
    out = root / "srae-ica"
    res = _fit(world, out, "--target", "2", "--epochs", "1", "--init", "ica")
    assert res.exit_code == 0, res.output
    meta = json.loads((out / "embedding.json").read_text())
    assert meta["params"]["init"] == "ica" and meta["classes"] == [2]
    assert 0 < json.loads((out / "metrics.json").read_text())["l0"] <= 3   # (an untrained CNN: R² means nothing)


def test_demo_step_decomposes_decisions(tmp_path, monkeypatch):
    from semlens.experiments.demo import DemoContext
    from semlens.experiments.demo_steps import s70_embed
    from semlens.world import generate_concepts

    monkeypatch.setattr(s70_embed, "N_FIT", 120)
    monkeypatch.setattr(s70_embed, "EPOCHS", 1)
    monkeypatch.setattr(s70_embed, "PER_CLASS", 1)
    torch.manual_seed(0)
    model = build_model("alexnet-like", num_classes=12, image_size=32, width=0.25).eval()
    test = generate_concepts(n=24, size=32, seed=3)
    ctx = DemoContext(out=tmp_path, device=torch.device("cpu"), artifacts={"classifier": model, "concepts_test": test})
    sec = s70_embed.run(ctx)[0]
    html = "".join(sec.blocks)
    assert "data:image/png" in html and "srae" in html and "pca" in html
    with pytest.raises(KeyError, match="s10_world"):
        s70_embed.run(DemoContext(out=tmp_path, device=torch.device("cpu")))
