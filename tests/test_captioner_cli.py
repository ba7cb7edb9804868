"""`semlens caption topics|train|evaluate|neurons` on a tiny MSVD-style features corpus."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from semlens.cli.main import app

ANIMALS = ["dog", "cat", "bird"]
ACTIONS = ["runs", "jumps"]


def write_corpus(root, n: int = 36, bad_dim: bool = False):
    rng = np.random.default_rng(0)
    (root / "features").mkdir(parents=True)
    (root / "splits").mkdir()
    rows = ["video_id,caption"]
    ids = []
    for k in range(n):
        a, b = k % 3, (k // 3) % 2
        f = 0.2 * rng.standard_normal((4, 8)).astype(np.float32)
        f[:, a] += 1
        f[:, 3 + b] += 1
        if bad_dim and k == 5:
            f = f[:, :7]
        vid = f"v{k}"
        ids.append(vid)
        np.save(root / "features" / f"{vid}.npy", f)
        rows += [f"{vid},a {ANIMALS[a]} {ACTIONS[b]}", f"{vid},the {ANIMALS[a]} {ACTIONS[b]} fast"]
    (root / "captions.csv").write_text("\n".join(rows) + "\n")
    (root / "splits" / "train.txt").write_text("\n".join(ids[:28]) + "\n")
    (root / "splits" / "test.txt").write_text("\n".join(ids[28:]) + "\n")
    return root


def test_caption_cli_end_to_end(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    runner = CliRunner()
    r = runner.invoke(app, ["caption", "topics", "--corpus", str(corpus), "--topics", "3",
                            "--out", str(tmp_path / "t.json")])
    assert r.exit_code == 0, r.output
    assert r.output.count("topic ") == 3 and (tmp_path / "t.json").is_file()
    run = tmp_path / "run"
    args = ["caption", "train", "--corpus", str(corpus), "--out", str(run), "--lam", "2", "--topics", "3",
            "--epochs", "4", "--batch-size", "16", "--lr", "0.01", "--hidden", "8", "--embed", "8",
            "--decoder-hidden", "8", "--attention", "4", "--dropout", "0", "--device", "cpu",
            "--topic-dropout", "0.25", "--topic-weight-decay", "0.01"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert (run / "model.safetensors").is_file() and (run / "model.topics.json").is_file()
    from semlens.checkpoint import read_config

    assert json.dumps(read_config(run / "model.safetensors")).count('"topic_dropout": 0.25') == 1
    assert len(json.loads((run / "checkpoint" / "history.json").read_text())) == 4
    r = runner.invoke(app, ["caption", "evaluate", "--model", str(run / "model.safetensors"), "--corpus",
                            str(corpus), "--beam", "2", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "BLEU-4" in r.output and "LSTM-I (GoogLeNet)" in r.output and "0.446" in r.output
    r = runner.invoke(app, ["caption", "neurons", "--model", str(run / "model.safetensors"), "--corpus",
                            str(corpus), "--out", str(tmp_path / "names.json"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    names = json.loads((tmp_path / "names.json").read_text())
    assert len(names["topic"]) == 16 and "selectivity" in r.output
    sel = [str(tmp_path / "run-sel") if a == str(run) else a for a in args]
    sel[sel.index("--epochs") + 1] = "2"
    r = runner.invoke(app, [*sel, "--select-every", "1", "--patience", "3"])  # this corpus has no val split
    assert r.exit_code == 2 and "needs validation data" in r.output


def test_caption_cli_bad_corpus(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", bad_dim=True)
    r = CliRunner().invoke(app, ["caption", "train", "--corpus", str(corpus), "--out", str(tmp_path / "run")])
    assert r.exit_code == 2 and "inconsistent feature dimensions" in r.output
    (tmp_path / "c2").mkdir()
    r = CliRunner().invoke(app, ["caption", "topics", "--corpus", str(tmp_path / "c2")])
    assert r.exit_code == 2 and "captions.csv" in r.output
