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


def test_captioner_feedback_round_trip(tmp_path, monkeypatch):
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
    # stored artefacts: a remark neither re-reads the corpus for topics nor re-names the neurons
    monkeypatch.setattr("semlens.captioning.pipeline.prepare", lambda *a, **k: 1 / 0)
    monkeypatch.setattr("semlens.captioning.pipeline.analyze_neurons", lambda *a, **k: 1 / 0)
    r = _run("feedback", "add", "v30", "--missing", topic, "--author", "ana", "--preview", *proj)
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


def test_captioner_project_from_a_stored_neuron_table(tmp_path):
    from semlens.captioning.topics import TopicModel
    from semlens.correct.project import CorrectionProject

    corpus = write_corpus(tmp_path / "corpus")
    run = tmp_path / "run"
    r = _run("caption", "train", "--corpus", str(corpus), "--out", str(run), "--lam", "2", "--topics", "3",
             "--epochs", "2", "--batch-size", "16", "--lr", "0.01", "--hidden", "8", "--embed", "8",
             "--decoder-hidden", "8", "--attention", "4", "--dropout", "0", "--device", "cpu")
    assert r.exit_code == 0, r.output
    table = tmp_path / "neurons.safetensors"
    r = _run("caption", "neurons", "--model", str(run / "model.safetensors"), "--corpus", str(corpus), "--out",
             str(table), "--device", "cpu")
    assert r.exit_code == 0, r.output
    r = _run("feedback", "init", "--kind", "captioner", "--weights", str(run / "model.safetensors"), "--data",
             str(corpus), "--names", str(table), "--project", str(tmp_path / "a"))
    assert r.exit_code == 0, r.output
    r = _run("feedback", "init", "--kind", "captioner", "--weights", str(run / "model.safetensors"), "--data",
             str(corpus), "--project", str(tmp_path / "b"))  # names made now, by the same procedure
    assert r.exit_code == 0, r.output
    a, b = (CorrectionProject(tmp_path / x) for x in "ab")
    assert a.store.current_version().artefacts == b.store.current_version().artefacts  # identical bytes
    # a topic model fitted on another vocabulary is refused in one line
    other = TopicModel(3, max_iter=5).fit({f"w{k}": [f"a {w} sleeps", f"the {w} eats"]
                                           for k, w in enumerate(["horse", "cow", "pig", "hen"])})
    other.save(tmp_path / "other.topics.json")
    bad = _run("feedback", "init", "--kind", "captioner", "--weights", str(run / "model.safetensors"), "--data",
               str(corpus), "--names", str(table), "--topics", str(tmp_path / "other.topics.json"), "--project",
               str(tmp_path / "c"))
    assert bad.exit_code == 2 and "named with another topic model" in bad.output
    assert not (tmp_path / "c" / ".semlens" / "project.json").exists()
