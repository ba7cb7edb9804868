"""semlens.outputs: the output-safety rules every command shares."""

from __future__ import annotations

import os
import stat

import pytest

from semlens.errors import OutputError
from semlens.outputs import MARKER, OutputDir, atomic_write, distinct_stems


def test_distinct_stems():
    assert distinct_stems(["a/x.npy", "b/x.npy", "y.png"]) == ["a_x", "b_x", "y"]
    assert distinct_stems(["p/a/x.npy", "q/a/x.npy"]) == ["p_a_x", "q_a_x"]
    assert distinct_stems(["x.npy", "x.npy"]) == ["x", "x-2"]
    assert distinct_stems(["x.npy", "x.png"]) == ["x", "x-2"]


def test_output_dir_cleans_up_what_it_made(tmp_path):
    with pytest.raises(RuntimeError), OutputDir(tmp_path / "new") as out:
        out.write("a.txt", lambda p: p.write_text("a"))
        raise RuntimeError("boom")
    assert not (tmp_path / "new").exists()  # created by this run: removed
    ours = tmp_path / "ours"
    with OutputDir(ours) as out:
        out.write("keep.txt", lambda p: p.write_text("k"))
    with pytest.raises(RuntimeError), OutputDir(ours) as out:
        out.write("b.txt", lambda p: p.write_text("b"))
        raise RuntimeError("boom")
    assert sorted(p.name for p in ours.iterdir()) == sorted([MARKER, "keep.txt"])  # only what this run wrote goes


def test_output_dir_refusals(tmp_path):
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "f").write_text("x")
    with pytest.raises(OutputError, match="not empty"):
        OutputDir(tmp_path / "theirs").open()
    with OutputDir(tmp_path / "theirs", overwrite=True, inputs=[tmp_path / "theirs" / "f"]) as out:
        with pytest.raises(OutputError, match="refusing to overwrite input"):
            out.path("f")
    assert (tmp_path / "theirs" / "f").read_text() == "x"


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    p = tmp_path / "f.txt"
    p.write_text("old")

    def fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(p, fail)
    assert p.read_text() == "old" and [q.name for q in tmp_path.iterdir()] == ["f.txt"]
    old = os.umask(0o077)
    try:
        atomic_write(p, lambda t: t.write_text("new"))
    finally:
        os.umask(old)
    assert p.read_text() == "new" and stat.S_IMODE(p.stat().st_mode) == 0o600
