"""``semlens feedback`` as a newcomer meets it: init twice, where the new model is, export, withdraw,
relative project paths, and a damaged / locked / read-only store as one line (never a traceback)."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import sys
import textwrap

import pytest
import torch
from typer.testing import CliRunner

from semlens.checkpoint import load_state_dict, save_weights
from semlens.cli.main import app
from semlens.correct.store import FeedbackStore

USERMOD = textwrap.dedent(
    """
    import torch.nn as nn
    def make():
        return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 12))
    """
)


def _run(*args: str, env: dict | None = None):
    return CliRunner().invoke(app, ["feedback", *args], env={"SEMLENS_PROGRESS": "0", "COLUMNS": "200", **(env or {})})


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    from semlens.world import write_concepts

    d = tmp_path_factory.mktemp("fbn")
    (d / "fbn_model_semlens.py").write_text(USERMOD)
    sys.path.insert(0, str(d))
    import fbn_model_semlens

    torch.manual_seed(0)
    save_weights(fbn_model_semlens.make(), d / "model.safetensors", config={"model": "fbn_model_semlens:make"})
    write_concepts(d / "data", n=24, size=32, seed=1, workers=1)
    (d / "units.csv").write_text("layer,unit,concept,category,iou,threshold\n2,3,red,color,0.3,0.1\n")
    proj = d / "proj"
    res = _run("init", "--weights", str(d / "model.safetensors"), "--data", str(d / "data"), "--names",
               str(d / "units.csv"), "--layer", "2", "--project", str(proj))  # no --model: the config names it
    assert res.exit_code == 0, res.output
    yield d, proj
    sys.path.remove(str(d))


def test_init_twice_is_one_line(project):
    d, proj = project
    res = _run("init", "--weights", str(d / "model.safetensors"), "--data", str(d / "data"), "--names",
               str(d / "units.csv"), "--layer", "2", "--project", str(proj))
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1
    assert "is a correction project already" in res.output


def test_paths_are_relative_and_the_project_moves(project, tmp_path):
    d, proj = project
    cfg = json.loads((proj / ".semlens" / "project.json").read_text())
    assert cfg["data"] == os.path.join("..", "data") and "names" not in cfg  # names: a stored artefact inside
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.copytree(proj, moved / "proj")
    shutil.copytree(d / "data", moved / "data")  # the names file is not needed: the project stores them
    res = _run("add", "000001", "--missing", "red", "--device", "cpu", "--project", str(moved / "proj"))
    assert res.exit_code == 0, res.output


def test_apply_says_where_the_model_is_export_and_withdraw(project, tmp_path):
    d, proj = project
    assert _run("add", "000000", "--missing", "red", "--project", str(proj)).exit_code == 0
    assert _run("add", "000002", "--missing", "red", "--project", str(proj)).exit_code == 0
    res = _run("withdraw", "2", "--project", str(proj))
    assert res.exit_code == 0 and "remark 2 withdrawn" in res.output
    res = _run("withdraw", "2", "--project", str(proj))
    assert res.exit_code == 2 and "only open remarks" in res.output
    res = _run("apply", "--steps", "2", "--project", str(proj))
    assert res.exit_code == 0, res.output
    weights = proj / ".semlens" / "versions" / "v00002.safetensors"
    assert f"new model: {weights}" in res.output
    res = _run("export", "--out", str(tmp_path / "exp"), "--project", str(proj))
    assert res.exit_code == 0, res.output
    exported = tmp_path / "exp" / "model-v2.safetensors"
    state, ref = load_state_dict(exported), load_state_dict(weights)
    assert all(torch.equal(state[k], ref[k]) for k in ref)
    doc = json.loads((tmp_path / "exp" / "model-v2.lineage.json").read_text())
    assert [v["id"] for v in doc["lineage"]] == [1, 2] and doc["lineage"][1]["parent"] == 1
    assert [r["id"] for r in doc["lineage"][1]["remarks"]] == [1]  # remark 2 was withdrawn
    assert all(r["status"] == "applied" for r in doc["lineage"][1]["remarks"])


# -- damage is an error --------------------------------------------------------------------------------


@pytest.fixture()
def bare_store(tmp_path):
    """A real store with enough remarks to span many pages, checkpointed into the main file."""
    proj = tmp_path / "p"
    store = FeedbackStore(proj)
    (proj / ".semlens" / "project.json").write_text(json.dumps({"kind": "classifier"}))
    w = tmp_path / "w.safetensors"
    save_weights({"a": torch.zeros(3)}, w)
    store.register_base(w)
    store.add_remark("s0000", "missing_concept", "red", author="ana", text="x" * 200)
    con = sqlite3.connect(store.db_path)
    with con:  # 199 more in one transaction (the store's add_remark commits each one)
        con.executemany("INSERT INTO remarks (uid, sample_id, kind, target, text, author, created_at, model_version)"
                        " VALUES (?, ?, 'missing_concept', 'red', ?, 'ana', '2026-01-01', 1)",
                        [(f"u{i}", f"s{i:04d}", "x" * 200) for i in range(1, 200)])
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    return proj, store.db_path


def _one_line_error(res, *words):
    assert res.exit_code == 2, res.output
    assert len(res.output.strip().splitlines()) == 1, res.output
    assert "Traceback" not in res.output
    for w in words:
        assert w in res.output, res.output


def test_garbage_page_is_one_line_and_file_untouched(bare_store):
    proj, db = bare_store
    size = db.stat().st_size
    assert size >= 8 * 4096
    with open(db, "r+b") as f:  # a page of garbage in the middle of the remarks table
        f.seek(size - 3 * 4096)
        f.write(os.urandom(4096))
    before = db.read_bytes()
    for args in (["list"], ["list", "--status", "open"]):  # full scans of the remarks table
        _one_line_error(_run(*args, "--project", str(proj)), str(db), "PRAGMA integrity_check")
    assert _run("versions", "--project", str(proj)).exit_code == 0  # the intact versions table still reads
    assert db.read_bytes() == before


def test_truncated_file_is_one_line(bare_store):
    proj, db = bare_store
    with open(db, "r+b") as f:
        f.truncate(db.stat().st_size // 2)
    _one_line_error(_run("list", "--project", str(proj)), str(db), "restore it from a copy")


def test_read_only_store_is_one_line(bare_store, monkeypatch):
    proj, db = bare_store
    real = sqlite3.connect
    # read-only as SQLite sees it (root ignores chmod, so open the file read-only as a mount would)
    monkeypatch.setattr(sqlite3, "connect", lambda path, **kw: real(f"file:{path}?mode=ro", uri=True, **kw))
    _one_line_error(_run("withdraw", "5", "--project", str(proj)), str(db), "cannot be written")


def test_locked_store_is_one_line(bare_store):
    proj, db = bare_store
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        for args in (["withdraw", "5"], ["list"]):
            _one_line_error(_run(*args, "--project", str(proj), env={"SEMLENS_STORE_TIMEOUT": "0.2"}),
                            str(db), "locked by another process")
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert _run("withdraw", "5", "--project", str(proj)).exit_code == 0
