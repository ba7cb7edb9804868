"""Durable feedback store: remarks about a model, and the model versions made from them.

One SQLite database (standard-library ``sqlite3``, WAL mode) per project directory, by default
``<project>/.semlens/feedback.sqlite``, with weight files beside it in ``versions/``.

* A **remark** says "sample S misses topic/concept T", made by an author against a model version.
* **Applying** open remarks creates a new version (safetensors weights + JSON metadata) whose lineage
  records its parent and the remarks it used. ``undo`` makes the parent current again; its weights
  file is untouched, so the restored weights are bit-identical.

Crash safety: a version row is first written as ``pending``; the weights file is written to a
temporary name and renamed; only then is one transaction marking the version ``ready``, linking the
remarks and moving the current pointer committed. A process killed anywhere leaves the store
consistent, and re-running ``apply`` resumes the pending version (its computation is deterministic).
Concurrent writers are serialised by SQLite's write lock (``BEGIN IMMEDIATE`` + busy timeout), so no
remark is lost.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
import sqlite3
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from semlens.errors import suggest
from semlens.outputs import file_mode

__all__ = [
    "FeedbackStore",
    "Remark",
    "ModelVersion",
    "FeedbackStoreError",
    "SCHEMA_VERSION",
    "REMARK_KINDS",
    "suggest",
]

SCHEMA_VERSION = 2  # 2: versions.artefacts (content hashes of the names and references a version used)
REMARK_KINDS = ("missing_topic", "missing_concept")
_STATUSES = ("open", "applied", "withdrawn")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS versions (
    id INTEGER PRIMARY KEY,
    parent INTEGER REFERENCES versions(id),
    state TEXT NOT NULL CHECK (state IN ('pending', 'ready', 'undone')),
    weights TEXT,
    sha256 TEXT,
    job TEXT UNIQUE,
    params TEXT NOT NULL DEFAULT '{}',
    note TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL,
    artefacts TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS remarks (
    id INTEGER PRIMARY KEY,
    uid TEXT NOT NULL UNIQUE,
    sample_id TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('missing_topic', 'missing_concept')),
    target TEXT NOT NULL,
    text TEXT NOT NULL DEFAULT '',
    author TEXT NOT NULL,
    created_at TEXT NOT NULL,
    model_version INTEGER REFERENCES versions(id),
    status TEXT NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'applied', 'withdrawn')),
    applied_in INTEGER REFERENCES versions(id)
);
CREATE TABLE IF NOT EXISTS version_remarks (
    version_id INTEGER NOT NULL REFERENCES versions(id),
    remark_id INTEGER NOT NULL REFERENCES remarks(id),
    PRIMARY KEY (version_id, remark_id)
);
"""


class FeedbackStoreError(ValueError):
    """A store that cannot be used as asked (corrupt, newer schema, unknown id, bad argument)."""


@dataclass(frozen=True)
class Remark:
    id: int
    uid: str
    sample_id: str
    kind: str
    target: str
    text: str
    author: str
    created_at: str
    model_version: int | None
    status: str
    applied_in: int | None


@dataclass(frozen=True)
class ModelVersion:
    id: int
    parent: int | None
    state: str
    weights: Path | None
    sha256: str | None
    params: dict[str, Any]
    note: str
    created_at: str
    remark_ids: tuple[int, ...]
    artefacts: dict[str, str] = field(default_factory=dict)  # artefact name -> sha256 of the file used


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class FeedbackStore:
    """Remarks and model versions of one project, kept in SQLite.

    ``FeedbackStore(project_dir)`` opens (or creates) ``project_dir/.semlens/feedback.sqlite``;
    ``FeedbackStore(db_path=...)`` opens a database at an explicit path. Each method runs in its own
    transaction, so the object may be shared by sequential calls and several processes may use the
    same database at once.
    """

    def __init__(self, project_dir: str | os.PathLike | None = None, *, db_path: str | os.PathLike | None = None,
                 timeout_s: float | None = None) -> None:
        if db_path is None:
            db_path = Path(project_dir or ".") / ".semlens" / "feedback.sqlite"
        self.db_path = Path(db_path)
        self.root = self.db_path.parent
        self.versions_dir = self.root / "versions"
        self.root.mkdir(parents=True, exist_ok=True)
        self.versions_dir.mkdir(exist_ok=True)
        # how long to wait for another writer's lock (default 30 s, or $SEMLENS_STORE_TIMEOUT)
        self._timeout = float(os.environ.get("SEMLENS_STORE_TIMEOUT", 30.0)) if timeout_s is None else timeout_s
        with self._connect() as con:  # SQLite errors: one line naming the file (see _connect)
            self._init_schema(con)

    # -- connection and schema -------------------------------------------------------------------
    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A connection; SQLite's damage, locking and permission errors become one-line
        :class:`FeedbackStoreError` naming the file and what to do (the file is never written then)."""
        try:
            con = sqlite3.connect(self.db_path, timeout=self._timeout, isolation_level=None)
        except sqlite3.Error as err:
            raise self._sqlite_error(err) from err
        try:
            con.row_factory = sqlite3.Row
            con.execute(f"PRAGMA busy_timeout = {int(self._timeout * 1000)}")
            con.execute("PRAGMA foreign_keys = ON")
            yield con
        except sqlite3.DatabaseError as err:
            raise self._sqlite_error(err) from err
        finally:
            con.close()

    def _sqlite_error(self, err: sqlite3.Error) -> FeedbackStoreError:
        """The message for an SQLite error: locked, not writable, or damaged."""
        text = str(err)
        db = self.db_path
        if "locked" in text or "busy" in text:
            return FeedbackStoreError(f"{db} is locked by another process (waited {self._timeout:g} s); retry when "
                                      "the other semlens command has finished")
        if "readonly" in text or "unable to open" in text or "read-only" in text:
            return FeedbackStoreError(f"{db} cannot be written ({text}): check the permissions of {self.root} "
                                      "and of the files in it")
        return FeedbackStoreError(f"{db} is damaged ({text}); it was left untouched: restore it from a copy, "
                                  f"or check it with: sqlite3 {db} 'PRAGMA integrity_check'")

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction taken with ``BEGIN IMMEDIATE`` (committed on success, rolled back otherwise)."""
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    def _init_schema(self, con: sqlite3.Connection) -> None:
        mode = con.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise FeedbackStoreError(f"{self.db_path}: cannot switch to WAL journal mode (got {mode})")
        con.execute("BEGIN IMMEDIATE")
        try:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if "meta" in tables:
                row = con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
                found = int(row[0]) if row else 0
                if found > SCHEMA_VERSION:
                    raise FeedbackStoreError(
                        f"{self.db_path} was written by a newer semlens (schema {found}, this version reads "
                        f"{SCHEMA_VERSION}); upgrade semlens to use it. Nothing was changed."
                    )
                if found < 1:
                    raise FeedbackStoreError(f"{self.db_path} has no semlens schema version; not a feedback store")
                if found == 1:  # schema 1 -> 2: versions gain the artefact hashes they were made with
                    con.execute("ALTER TABLE versions ADD COLUMN artefacts TEXT NOT NULL DEFAULT '{}'")
                    con.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION),))
            elif tables:
                raise FeedbackStoreError(f"{self.db_path} holds other tables ({', '.join(sorted(tables))}); "
                                         "not a semlens feedback store")
            for statement in filter(str.strip, _SCHEMA.split(";")):
                con.execute(statement)
            con.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise

    # -- remarks ---------------------------------------------------------------------------------
    def add_remark(self, sample_id: str, kind: str, target: str, *, author: str | None = None, text: str = "",
                   model_version: int | None = None, uid: str | None = None) -> Remark:
        """Record a remark and return it. ``uid`` makes the call idempotent (a retried add is stored once).

        ``model_version`` defaults to the current version.
        """
        if kind not in REMARK_KINDS:
            raise FeedbackStoreError(f"unknown remark kind {kind!r}; expected one of {', '.join(REMARK_KINDS)}")
        if not str(sample_id).strip() or not str(target).strip():
            raise FeedbackStoreError("a remark needs a non-empty sample id and target")
        author = author or os.environ.get("USER") or "unknown"
        uid = uid or uuid.uuid4().hex
        with self._write() as con:
            if model_version is None:
                model_version = self._current(con)
            elif con.execute("SELECT 1 FROM versions WHERE id=?", (model_version,)).fetchone() is None:
                raise FeedbackStoreError(f"unknown model version {model_version}")
            con.execute(
                "INSERT OR IGNORE INTO remarks (uid, sample_id, kind, target, text, author, created_at, model_version)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (uid, str(sample_id), kind, str(target), text, author, _now(), model_version),
            )
            row = con.execute("SELECT * FROM remarks WHERE uid=?", (uid,)).fetchone()
        return Remark(**dict(row))

    def remarks(self, status: str | None = None) -> list[Remark]:
        """All remarks (optionally only those with ``status``), oldest first."""
        if status is not None and status not in _STATUSES:
            raise FeedbackStoreError(f"unknown status {status!r}; expected one of {', '.join(_STATUSES)}")
        with self._connect() as con:
            q = "SELECT * FROM remarks" + (" WHERE status=?" if status else "") + " ORDER BY id"
            rows = con.execute(q, (status,) if status else ()).fetchall()
        return [Remark(**dict(r)) for r in rows]

    def remark(self, remark_id: int) -> Remark:
        with self._connect() as con:
            row = con.execute("SELECT * FROM remarks WHERE id=?", (remark_id,)).fetchone()
        if row is None:
            raise FeedbackStoreError(f"unknown remark id {remark_id}")
        return Remark(**dict(row))

    def withdraw(self, remark_id: int) -> Remark:
        """Mark an open remark as withdrawn (it is kept, never deleted)."""
        with self._write() as con:
            row = con.execute("SELECT status FROM remarks WHERE id=?", (remark_id,)).fetchone()
            if row is None:
                raise FeedbackStoreError(f"unknown remark id {remark_id}")
            if row[0] != "open":
                raise FeedbackStoreError(f"remark {remark_id} is {row[0]}, only open remarks can be withdrawn")
            con.execute("UPDATE remarks SET status='withdrawn' WHERE id=?", (remark_id,))
        return self.remark(remark_id)

    # -- versions --------------------------------------------------------------------------------
    @staticmethod
    def _current(con: sqlite3.Connection) -> int | None:
        row = con.execute("SELECT value FROM meta WHERE key='current_version'").fetchone()
        return int(row[0]) if row else None

    def current_version(self) -> ModelVersion | None:
        with self._connect() as con:
            cur = self._current(con)
        return None if cur is None else self.version(cur)

    def version(self, version_id: int) -> ModelVersion:
        with self._connect() as con:
            row = con.execute("SELECT * FROM versions WHERE id=?", (version_id,)).fetchone()
            if row is None:
                raise FeedbackStoreError(f"unknown model version {version_id}")
            rids = tuple(r[0] for r in con.execute(
                "SELECT remark_id FROM version_remarks WHERE version_id=? ORDER BY remark_id", (version_id,)))
        return self._to_version(row, rids)

    def versions(self) -> list[ModelVersion]:
        with self._connect() as con:
            ids = [r[0] for r in con.execute("SELECT id FROM versions ORDER BY id")]
        return [self.version(i) for i in ids]

    def _to_version(self, row: sqlite3.Row, rids: tuple[int, ...]) -> ModelVersion:
        return ModelVersion(
            id=row["id"], parent=row["parent"], state=row["state"],
            weights=(self.root / row["weights"]) if row["weights"] else None, sha256=row["sha256"],
            params=json.loads(row["params"]), note=row["note"], created_at=row["created_at"], remark_ids=rids,
            artefacts=json.loads(row["artefacts"]),
        )

    def register_base(self, weights: str | os.PathLike, note: str = "base model",
                      params: dict[str, Any] | None = None, artefacts: dict[str, str] | None = None) -> ModelVersion:
        """Copy ``weights`` into the store as a root version and make it current. ``artefacts``: name -> content
        hash of the stored artefacts (unit names, references) that describe this version."""
        src = Path(weights)
        if not src.is_file():
            raise FeedbackStoreError(f"weights file not found: {src}")
        with self._write() as con:
            cur = con.execute(
                "INSERT INTO versions (parent, state, params, note, created_at, artefacts)"
                " VALUES (NULL, 'pending', ?, ?, ?, ?)",
                (json.dumps(params or {}, sort_keys=True), note, _now(), json.dumps(artefacts or {}, sort_keys=True)),
            )
            vid = int(cur.lastrowid)
        rel = self._install_weights(vid, lambda tmp: shutil.copyfile(src, tmp), src.suffix)
        with self._write() as con:
            con.execute("UPDATE versions SET state='ready', weights=?, sha256=? WHERE id=?",
                        (rel, _sha256(self.root / rel), vid))
            con.execute("INSERT OR REPLACE INTO meta VALUES ('current_version', ?)", (str(vid),))
        return self.version(vid)

    def _install_weights(self, vid: int, write: Callable[[Path], object], suffix: str = ".safetensors") -> str:
        rel = f"versions/v{vid:05d}{suffix}"
        final = self.root / rel
        for stale in final.parent.glob(final.name + ".tmp*"):  # left by a killed apply
            stale.unlink()
        tmp = final.with_name(final.name + f".tmp{os.getpid()}")
        write(tmp)
        os.chmod(tmp, file_mode())  # the user's umask, whatever wrote the file
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        return rel

    def apply(self, compute: Callable[[Path, list[Remark], Path], None], *, params: dict[str, Any] | None = None,
              note: str = "", remark_ids: Sequence[int] | None = None, artefacts: dict[str, str] | None = None
              ) -> ModelVersion:
        """Apply open remarks: ``compute(parent_weights, remarks, out_path)`` must write new weights to
        ``out_path`` deterministically. Returns the new (current) version. ``artefacts``: name -> content hash
        of the artefacts the correction used (recorded in the new version's lineage).

        ``remark_ids`` restricts the remarks used (default: all open remarks). A pending version left by
        a killed ``apply`` with the same parent, remarks and params is resumed instead of duplicated.
        """
        params = dict(params or {})
        with self._write() as con:
            parent = self._current(con)
            if parent is None:
                raise FeedbackStoreError("the store has no model version yet; register a base model first")
            rows = con.execute("SELECT * FROM remarks WHERE status='open' ORDER BY id").fetchall()
            remarks = [Remark(**dict(r)) for r in rows]
            if remark_ids is not None:
                wanted = set(int(i) for i in remark_ids)
                unknown = wanted - {r.id for r in remarks}
                if unknown:
                    raise FeedbackStoreError(f"remarks {sorted(unknown)} are not open (or do not exist)")
                remarks = [r for r in remarks if r.id in wanted]
            if not remarks:
                raise FeedbackStoreError("no open remarks to apply")
            spec: dict[str, Any] = {"parent": parent, "remarks": [r.uid for r in remarks], "params": params}
            if artefacts:
                spec["artefacts"] = artefacts
            job = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
            row = con.execute("SELECT id, state FROM versions WHERE job=?", (job,)).fetchone()
            if row is not None and row["state"] == "ready":
                raise FeedbackStoreError(f"these remarks were already applied as version {row['id']}")
            if row is None:
                cur = con.execute(
                    "INSERT INTO versions (parent, state, job, params, note, created_at, artefacts)"
                    " VALUES (?, 'pending', ?, ?, ?, ?, ?)",
                    (parent, job, json.dumps(params, sort_keys=True), note, _now(),
                     json.dumps(artefacts or {}, sort_keys=True)),
                )
                vid = int(cur.lastrowid)
            else:
                vid = int(row["id"])
            parent_weights = self.root / con.execute("SELECT weights FROM versions WHERE id=?", (parent,)).fetchone()[0]
        rel = self._install_weights(vid, lambda tmp: compute(parent_weights, remarks, tmp))
        with self._write() as con:
            if self._current(con) != parent:
                raise FeedbackStoreError(
                    f"the current version changed from {parent} while applying; version {vid} stays pending"
                )
            con.execute("UPDATE versions SET state='ready', weights=?, sha256=? WHERE id=?",
                        (rel, _sha256(self.root / rel), vid))
            con.executemany("INSERT OR IGNORE INTO version_remarks VALUES (?, ?)", [(vid, r.id) for r in remarks])
            con.executemany("UPDATE remarks SET status='applied', applied_in=? WHERE id=?",
                            [(vid, r.id) for r in remarks])
            con.execute("INSERT OR REPLACE INTO meta VALUES ('current_version', ?)", (str(vid),))
        return self.version(vid)

    def undo(self) -> ModelVersion:
        """Make the parent of the current version current again; its remarks become open again.

        The undone version stays in the store (state ``undone``) for the record.
        """
        with self._write() as con:
            cur = self._current(con)
            if cur is None:
                raise FeedbackStoreError("the store has no model version")
            parent = con.execute("SELECT parent FROM versions WHERE id=?", (cur,)).fetchone()[0]
            if parent is None:
                raise FeedbackStoreError(f"version {cur} is a base version; there is nothing to undo")
            con.execute("UPDATE versions SET state='undone' WHERE id=?", (cur,))
            con.execute("UPDATE remarks SET status='open', applied_in=NULL WHERE applied_in=?", (cur,))
            con.execute("INSERT OR REPLACE INTO meta VALUES ('current_version', ?)", (str(parent),))
        return self.version(parent)

    def verify(self, version_id: int | None = None) -> bool:
        """True when the weights file of the version (default: current) matches its recorded checksum."""
        v = self.version(version_id) if version_id is not None else self.current_version()
        if v is None or v.weights is None or not v.weights.is_file():
            return False
        return _sha256(v.weights) == v.sha256
