"""The feedback store: lineage, undo, crash safety, concurrent writers, bad files."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from semlens.checkpoint import load_state_dict, save_weights
from semlens.correct.store import FeedbackStore, FeedbackStoreError


def _base(tmp_path: Path) -> tuple[FeedbackStore, Path]:
    torch.manual_seed(0)
    w = save_weights(nn.Linear(3, 2), tmp_path / "base.safetensors", config={"model": "lin"})
    store = FeedbackStore(tmp_path / "proj")
    store.register_base(w)
    return store, w


def _shift(parent: Path, remarks, out: Path) -> None:
    state = load_state_dict(parent)
    state = {k: v + 0.5 * len(remarks) for k, v in state.items()}
    save_weights(state, out)


def test_apply_creates_version_with_lineage_and_undo_is_bit_identical(tmp_path):
    store, base = _base(tmp_path)
    r1 = store.add_remark("clip7", "missing_topic", "dog", author="ana", text="no dog")
    r2 = store.add_remark("clip9", "missing_topic", "ball", author="ben")
    v0 = store.current_version()
    assert r1.model_version == v0.id and r1.status == "open"
    v1 = store.apply(_shift, params={"mu": 0.01})
    assert v1.parent == v0.id and v1.remark_ids == (r1.id, r2.id) and v1.params == {"mu": 0.01}
    assert [r.status for r in store.remarks()] == ["applied", "applied"]
    assert store.verify()
    w1 = load_state_dict(v1.weights)
    torch.testing.assert_close(w1["bias"], load_state_dict(base)["bias"] + 1.0)
    back = store.undo()
    assert back.id == v0.id and store.current_version().id == v0.id
    assert back.weights.read_bytes() == v0.weights.read_bytes()
    assert load_state_dict(back.weights)["weight"].equal(load_state_dict(base)["weight"])
    assert [r.status for r in store.remarks()] == ["open", "open"]
    assert store.version(v1.id).state == "undone"
    with pytest.raises(FeedbackStoreError, match="base version"):
        store.undo()


def test_add_is_idempotent_with_uid_and_validates(tmp_path):
    store, _ = _base(tmp_path)
    a = store.add_remark("s1", "missing_concept", "red", uid="abc")
    b = store.add_remark("s1", "missing_concept", "red", uid="abc")
    assert a.id == b.id and len(store.remarks()) == 1
    with pytest.raises(FeedbackStoreError, match="unknown remark kind"):
        store.add_remark("s1", "missing_colour", "red")
    with pytest.raises(FeedbackStoreError, match="unknown model version"):
        store.add_remark("s1", "missing_concept", "red", model_version=99)
    assert store.withdraw(a.id).status == "withdrawn"
    with pytest.raises(FeedbackStoreError, match="no open remarks"):
        store.apply(_shift)


_WRITER = textwrap.dedent(
    """
    import sys
    from semlens.correct.store import FeedbackStore
    store = FeedbackStore(sys.argv[1])
    for i in range(int(sys.argv[3])):
        store.add_remark(f"{sys.argv[2]}-{i}", "missing_topic", "dog", author=sys.argv[2])
    """
)


def test_two_concurrent_writers_lose_nothing(tmp_path):
    store, _ = _base(tmp_path)
    n = 40
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path / "proj"), who, str(n)])
             for who in ("w1", "w2")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    samples = [r.sample_id for r in store.remarks()]
    assert sorted(samples) == sorted([f"w{k}-{i}" for k in (1, 2) for i in range(n)])


_KILLED_APPLY = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from semlens.checkpoint import load_state_dict, save_weights
    from semlens.correct.store import FeedbackStore
    def slow(parent, remarks, out):
        Path(sys.argv[2]).write_text("started")
        time.sleep(60)
    FeedbackStore(sys.argv[1]).apply(slow, params={"mu": 1})
    """
)


def test_killed_apply_leaves_store_consistent_and_rerun_completes(tmp_path):
    store, _ = _base(tmp_path)
    store.add_remark("clip1", "missing_topic", "dog")
    flag = tmp_path / "started"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_APPLY, str(tmp_path / "proj"), str(flag)])
    deadline = time.time() + 60
    while not flag.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert flag.exists()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    v0 = store.current_version()
    assert v0.parent is None and [r.status for r in store.remarks()] == ["open"]
    pending = [v for v in store.versions() if v.state == "pending"]
    assert len(pending) == 1
    v1 = store.apply(_shift, params={"mu": 1})
    assert v1.id == pending[0].id and v1.state == "ready" and store.verify()
    assert [r.status for r in store.remarks()] == ["applied"]
    assert not list(store.versions_dir.glob("*.tmp*"))


def test_newer_schema_and_corrupt_files_are_refused_untouched(tmp_path):
    store, _ = _base(tmp_path)
    con = sqlite3.connect(store.db_path)
    con.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    con.commit()
    con.close()
    before = store.db_path.read_bytes()
    with pytest.raises(FeedbackStoreError, match="newer semlens"):
        FeedbackStore(db_path=store.db_path)
    assert store.db_path.read_bytes() == before
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(FeedbackStoreError, match="junk.sqlite"):
        FeedbackStore(db_path=junk)
    assert junk.read_bytes() == b"this is not sqlite" * 100


def test_versions_metadata_round_trip(tmp_path):
    store, _ = _base(tmp_path)
    store.add_remark("a", "missing_topic", "dog")
    v1 = store.apply(_shift, params={"mu": 0.1, "steps": 3}, note="fix dog")
    again = FeedbackStore(tmp_path / "proj").version(v1.id)
    assert again == v1 and json.loads(json.dumps(again.params)) == {"mu": 0.1, "steps": 3}
