"""``semlens maximize`` and ``semlens maximize fit-prior`` end to end on a tiny model and data."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from semlens.checkpoint import save_weights
from semlens.cli.main import app
from semlens.models import build_model

KW = {"num_classes": 4, "image_size": 32, "width": 0.25}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("max")
    torch.manual_seed(0)
    model = build_model("alexnet-like", **KW)
    weights = save_weights(model, root / "m.safetensors", {"model_kwargs": KW})
    g = torch.Generator().manual_seed(0)
    images = (0.5 * torch.rand(80, 3, 1, 1, generator=g) + 0.5 * torch.rand(80, 3, 32, 32, generator=g))
    np.save(root / "images.npy", images.numpy())
    (root / "units.csv").write_text("layer,unit,concept,category,iou,threshold\n"
                                    "features.conv2,0,red,color,0.2,1.0\nfeatures.conv2,2,circle,object,0.1,1.0\n")
    return root, weights


def _run(args: list[str]):
    return CliRunner().invoke(app, ["maximize", *args])


def test_fit_prior_then_maximize_each_variant(setup) -> None:
    root, weights = setup
    for kind in ("gaussian", "vae"):
        r = _run(["fit-prior", "--data", str(root / "images.npy"), "--kind", kind, "--out",
                  str(root / f"{kind}.safetensors"), "--epochs", "1"])
        assert r.exit_code == 0, r.output
    base = ["--model", "alexnet-like", "--weights", str(weights), "--layer", "features.conv2", "--units", "0-2",
            "--data", str(root / "images.npy"), "--steps", "6", "--views", "2", "--names", str(root / "units.csv")]
    runs = {"plain": [], "expert": ["--prior", str(root / "gaussian.safetensors"), "--param", "fourier"],
            "code": ["--prior", str(root / "vae.safetensors")]}
    for variant, extra in runs.items():
        out = root / f"out_{variant}"
        r = _run([*base, "--variant", variant, *extra, "--out", str(out)])
        assert r.exit_code == 0, r.output
        protos = np.load(out / "prototypes.npy")
        assert protos.shape == (3, 3, 32, 32) and protos.dtype == np.float32
        png = Image.open(out / f"unit_0001_{variant}.png")
        assert png.size == (192, 192)
        rows = list(csv.DictReader(open(out / "summary.csv")))
        assert [int(r["unit"]) for r in rows] == [0, 1, 2]
        assert list(rows[0]) == ["layer", "unit", "variant", "activation", "dataset_max", "ratio", "loglik_heldout",
                                 "path_similarity", "concept", "concept_hit", "concept_score"]
        for row in rows:
            assert float(row["ratio"]) == pytest.approx(float(row["activation"]) / float(row["dataset_max"]),
                                                        rel=1e-5)
            assert -1.0 <= float(row["path_similarity"]) <= 1.0
        assert rows[0]["concept"] == "red" and 0.0 <= float(rows[0]["concept_score"]) <= 1.0
        assert float(rows[0]["concept_hit"]) == float(float(rows[0]["concept_score"]) >= 0.05)
        assert rows[2]["concept"] == "circle" and rows[2]["concept_hit"] == rows[2]["concept_score"] == "nan"


def test_maximize_user_errors(setup) -> None:
    root, weights = setup
    base = ["--model", "alexnet-like", "--weights", str(weights), "--data", str(root / "images.npy"),
            "--steps", "1", "--out", str(root / "bad")]
    cases = [
        (["--layer", "features.conv9", "--units", "0"], "unknown layer 'features.conv9'"),
        (["--layer", "features.conv2", "--units", "0,99"], "unit index [99] out of range for layer 'features.conv2'"),
        (["--layer", "features.conv2", "--variant", "expert"], "variant 'expert' needs a density prior"),
        (["--layer", "features.conv2", "--variant", "code"], "variant 'code' needs a generator prior"),
        (["--layer", "features.conv2", "--units", "a-b"], "bad unit range 'a-b'"),
        (["--layer", "features.conv2", "--prior", str(root / "none.safetensors"), "--variant", "expert"],
         "weights file not found"),
    ]
    for extra, message in cases:
        r = _run([*base, *extra])
        assert r.exit_code == 2, (extra, r.output)
        assert message in " ".join(r.output.split()), (extra, r.output)
    r = _run(["--model", "alexnet-like"])
    assert r.exit_code == 2 and "missing option(s) --layer, --data, --out" in r.output
    np.save(root / "small.npy", np.random.default_rng(0).random((10, 3, 16, 16), dtype=np.float32))
    r = _run(["fit-prior", "--data", str(root / "small.npy"), "--kind", "gaussian", "--out",
              str(root / "small.safetensors")])
    assert r.exit_code == 0, r.output
    r = _run(["fit-prior", "--data", str(root / "missing"), "--kind", "gna", "--out", str(root / "x.safetensors")])
    assert r.exit_code == 2 and "unknown prior kind 'gna'" in r.output, r.output  # the kind before reading data
    before = (root / "small.safetensors").read_bytes()
    again = ["fit-prior", "--data", str(root / "images.npy"), "--kind", "gaussian", "--out",
             str(root / "small.safetensors")]
    r = _run(again)  # an existing prior is never replaced silently
    assert r.exit_code == 2 and "exists" in r.output and "--overwrite" in r.output, r.output
    assert (root / "small.safetensors").read_bytes() == before
    r = _run([*again, "--overwrite"])
    assert r.exit_code == 0, r.output
    assert (root / "small.safetensors").read_bytes() != before
    r = _run(["fit-prior", "--data", str(root / "small.npy"), "--kind", "gaussian", "--out",
              str(root / "small.safetensors"), "--overwrite"])
    assert r.exit_code == 0, r.output
    r = _run([*base, "--layer", "features.conv2", "--variant", "expert", "--prior", str(root / "small.safetensors")])
    assert r.exit_code == 2 and "fitted on inputs of 3 channels × 16×16" in r.output


def test_fit_judge_then_concept_hit_for_every_named_unit(setup, tmp_path) -> None:
    """A judge fitted briefly on a concept dataset scores the non-colour units; mismatches are refused."""
    from semlens.world import write_concepts

    root, weights = setup
    data = write_concepts(tmp_path / "ds", n=48, size=32, seed=3, workers=1)
    judge = tmp_path / "judge.safetensors"
    r = _run(["fit-judge", "--data", str(data), "--out", str(judge), "--epochs", "1", "--seed", "1"])
    assert r.exit_code == 0, r.output
    assert "judge of 57 concepts on 32×32 images" in r.output  # the concept world's vocabulary but "-"
    r = _run(["fit-judge", "--data", str(data), "--out", str(judge), "--epochs", "1"])
    assert r.exit_code == 2 and "exists; choose another --out or pass --overwrite" in " ".join(r.output.split())
    (tmp_path / "units.csv").write_text("layer,unit,concept,category,iou,threshold\nfeatures.conv2,0,red,color,0.2,1\n"
                                        "features.conv2,2,circle,object,0.1,1\nfeatures.conv2,3,dots,texture,0.1,1\n")
    base = ["--model", "alexnet-like", "--weights", str(weights), "--layer", "features.conv2", "--units", "0-3",
            "--data", str(data), "--steps", "4", "--views", "0", "--names", str(tmp_path / "units.csv")]
    out = tmp_path / "out"
    r = _run([*base, "--judge", str(judge), "--out", str(out)])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [row["concept"] for row in rows] == ["red", "", "circle", "dots"]
    assert rows[1]["concept_hit"] == rows[1]["concept_score"] == "nan"
    for row, rule in ((rows[0], 0.05), (rows[2], 0.5), (rows[3], 0.5)):
        score = float(row["concept_score"])
        assert 0.0 <= score <= 1.0 and float(row["concept_hit"]) == float(score >= rule), row

    small = tmp_path / "small.npy"
    np.save(small, np.random.default_rng(0).random((10, 3, 16, 16), dtype=np.float32))
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    (tmp_path / "unknown.csv").write_text("layer,unit,concept,category\nfeatures.conv2,0,spaceship,object\n")
    cases = [
        (["--data", str(small), "--judge", str(judge)], "judge.safetensors was fitted on inputs of 3 channels × "
                                                        "32×32, the images of"),
        (["--judge", str(tmp_path / "bad.safetensors")], "cannot read judge"),
        (["--judge", str(tmp_path / "none.safetensors")], "judge file not found"),
        (["--judge", str(judge), "--names", str(tmp_path / "unknown.csv")], "does not know concept 'spaceship' "
                                                                            "(object)"),
    ]
    for extra, message in cases:
        r = _run([*base, "--out", str(tmp_path / "bad"), *extra])
        assert r.exit_code == 2, (extra, r.output)
        assert message in " ".join(r.output.split()), (extra, r.output)
        assert not (tmp_path / "bad").exists()
    r = _run([*base[:-2], "--judge", str(judge), "--out", str(tmp_path / "bad")])
    assert r.exit_code == 2 and "--judge scores the units named in --names" in " ".join(r.output.split())
