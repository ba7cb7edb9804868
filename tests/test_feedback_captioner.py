"""`semlens feedback` with a captioner: remarks on missing topics, encoder-only correction, undo."""

from __future__ import annotations

import torch
from typer.testing import CliRunner

from semlens.checkpoint import load_state_dict
from semlens.cli.main import app
from test_captioner_cli import write_corpus


def _run(*args):
    res = CliRunner().invoke(app, list(args), env={"SEMLENS_PROGRESS": "0", "COLUMNS": "200"})
    if res.exception and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res


def test_captioner_feedback_round_trip(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    run = tmp_path / "run"
    r = _run("caption", "train", "--corpus", str(corpus), "--out", str(run), "--lam", "2", "--topics", "3",
             "--epochs", "3", "--batch-size", "16", "--lr", "0.01", "--hidden", "8", "--embed", "8",
             "--decoder-hidden", "8", "--attention", "4", "--dropout", "0", "--device", "cpu")
    assert r.exit_code == 0, r.output
    proj = ["--project", str(tmp_path / "proj")]
    r = _run("feedback", "init", "--kind", "captioner", "--weights", str(run / "model.safetensors"),
             "--data", str(corpus), *proj)
    assert r.exit_code == 0, r.output
    from semlens.correct.project import CorrectionProject

    corr = CorrectionProject(tmp_path / "proj").corrector()
    carried = [t for t in corr.engine.names.topic_names if corr.engine.names.neurons_of(
        corr.engine.names.topic_names.index(t))]
    assert carried, "PDM named no neuron on the tiny model"
    topic = carried[0]
    r = _run("feedback", "add", "v30", "--missing", topic, "--author", "ana", *proj)
    assert r.exit_code == 0, r.output
    assert "prediction now" in r.output and f"units named {topic!r}: v:" in r.output
    bad = _run("feedback", "add", "v999", "--missing", topic, *proj)
    assert bad.exit_code == 2 and "unknown sample id" in bad.output
    bad = _run("feedback", "add", "v30", "--missing", topic + "x", *proj)
    assert bad.exit_code == 2 and "Did you mean" in bad.output
    r = _run("feedback", "apply", "--steps", "5", "--lr", "0.01", *proj)
    assert r.exit_code == 0, r.output
    versions = tmp_path / "proj" / ".semlens" / "versions"
    v1, v2 = (load_state_dict(versions / f"v0000{i}.safetensors") for i in (1, 2))
    changed = {k for k in v1 if not torch.equal(v1[k], v2[k])}
    assert changed and all(k.startswith("encoder.") for k in changed)
    r = _run("feedback", "undo", *proj)
    assert r.exit_code == 0 and "current version is now 1" in r.output
