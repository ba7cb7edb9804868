"""Output safety shared by every command: never overwrite an input, never write into someone else's
non-empty directory, distinct names for same-name inputs, atomic files with the user's umask, and no
debris left behind when a command fails.

A directory semlens creates holds a marker file (:data:`MARKER`); a later run may write into it again.
A non-empty directory without the marker is refused unless ``overwrite=True``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from semlens.errors import OutputError

__all__ = ["MARKER", "OutputDir", "atomic_write", "apply_umask", "distinct_stems", "file_mode", "save_json"]

MARKER = ".semlens-output"
_umask_lock = threading.Lock()


def file_mode() -> int:
    """Mode a new regular file gets under the process umask (e.g. ``0o644`` for umask ``022``)."""
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def apply_umask(path: str | os.PathLike) -> Path:
    """Give ``path`` the permissions a plainly created file would have (libraries that write 0600 files)."""
    os.chmod(path, file_mode())
    return Path(path)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` for a temporary name beside ``path``, then rename it over ``path``.

    Readers see the old file or the new one, never half of one; the temporary file is removed when
    ``write`` fails; the result has the user's umask permissions.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        apply_umask(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented JSON with sorted keys, atomically (:func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1, sort_keys=True)))


def distinct_stems(paths: Sequence[str | os.PathLike]) -> list[str]:
    """One output stem per input: the file stem, prefixed with parent folders while two inputs share it.

    ``["a/x.npy", "b/x.npy", "y.png"]`` -> ``["a_x", "b_x", "y"]``; the same file given twice keeps a
    numbered suffix (``x``, ``x-2``).
    """
    full = [Path(os.path.abspath(p)) for p in paths]
    stems = [p.stem for p in full]
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(stems):
        groups.setdefault(s, []).append(i)
    for stem, idx in groups.items():
        parents = [full[i].parent for i in idx]
        if len(idx) < 2 or len(set(parents)) == 1:
            continue  # one input, or one folder: numbered below
        for depth in range(1, max(len(p.parts) for p in parents) + 1):
            names = ["_".join([*(part for part in p.parts[-depth:] if part != os.sep), stem]) for p in parents]
            if len(set(names)) == len(set(parents)):
                break
        for i, name in zip(idx, names, strict=True):
            stems[i] = name
    seen: dict[str, int] = {}
    out = []
    for s in stems:
        seen[s] = seen.get(s, 0) + 1
        out.append(s if seen[s] == 1 else f"{s}-{seen[s]}")
    return out


class OutputDir:
    """A command's output directory (use as a context manager).

    On entry: refuses a path that is a file, and a non-empty directory that semlens did not create unless
    ``overwrite``; creates the directory and its marker. :meth:`path` hands out file names and refuses any
    that is one of ``inputs``. On an exception (unless ``cleanup=False``, e.g. to keep checkpoints to resume
    from): removes the files written through :meth:`write` (and the directory itself when this run created
    it), then lets the exception through.
    """

    def __init__(self, path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), overwrite: bool = False,
                 what: str = "output directory", cleanup: bool = True) -> None:
        self.root = Path(path)
        self.inputs = {_real(p) for p in inputs}
        self.overwrite = overwrite
        self.what = what
        self.cleanup = cleanup
        self.created = False
        self.written: list[Path] = []

    def __enter__(self) -> OutputDir:
        return self.open()

    def open(self) -> OutputDir:
        """Check and create the directory (what entering the context does); returns ``self``."""
        root = self.root
        if root.exists() and not root.is_dir():
            raise OutputError(f"{self.what} {root} is a file; pass a directory")
        if _real(root) in self.inputs:
            raise OutputError(f"{self.what} {root} is an input")
        if root.is_dir() and any(root.iterdir()) and not (root / MARKER).is_file() and not self.overwrite:
            raise OutputError(f"{self.what} {root} is not empty and was not written by semlens; choose a new "
                              "directory or pass --overwrite")
        self.created = not root.exists()
        root.mkdir(parents=True, exist_ok=True)
        marker = root / MARKER
        if not marker.exists():
            marker.write_text("written by semlens; a later run may replace the files here\n")
        return self

    def path(self, name: str) -> Path:
        """``root/name``, refused when it is one of the inputs."""
        p = self.root / name
        if _real(p) in self.inputs:
            raise OutputError(f"refusing to overwrite input {p} with an output; choose another --out")
        return p

    def write(self, name: str, write: Callable[[Path], Any]) -> Path:
        """Atomically write ``root/name`` with ``write(tmp_path)``; remembered for clean-up on failure."""
        p = self.path(name)
        atomic_write(p, write)
        self.written.append(p)
        return p

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None or not self.cleanup:
            return
        if self.created:
            shutil.rmtree(self.root, ignore_errors=True)
            return
        for p in self.written:
            with contextlib.suppress(OSError):
                p.unlink()


@contextlib.contextmanager
def output_dir(path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (),
               overwrite: bool = False) -> Iterator[OutputDir]:
    """Functional form of :class:`OutputDir`."""
    with OutputDir(path, inputs, overwrite) as out:
        yield out


def _real(p: str | os.PathLike) -> str:
    return os.path.realpath(os.fspath(p))
