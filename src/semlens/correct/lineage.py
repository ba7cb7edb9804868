"""Opening a project's feedback store without the model, and exporting a version with its lineage.

Nothing here imports torch: ``semlens feedback list/show/versions/undo/withdraw/export`` start fast.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from semlens.correct.store import FeedbackStore, FeedbackStoreError
from semlens.outputs import OutputDir

__all__ = ["open_store", "lineage", "export_version"]


def open_store(project_dir: str | os.PathLike = ".") -> FeedbackStore:
    """The feedback store of the correction project in ``project_dir`` (refused when there is none)."""
    config = Path(project_dir) / ".semlens" / "project.json"
    if not config.is_file():
        raise FileNotFoundError(f"no correction project in {project_dir} (missing {config}); create one with "
                                "`semlens feedback init`")
    return FeedbackStore(project_dir)


def lineage(store: FeedbackStore, version_id: int) -> list[dict[str, Any]]:
    """The chain of versions from the base model to ``version_id`` (oldest first), each with its remarks."""
    chain: list[dict[str, Any]] = []
    vid: int | None = version_id
    while vid is not None:
        v = store.version(vid)
        remarks = [asdict(store.remark(r)) for r in v.remark_ids]
        chain.append({"id": v.id, "parent": v.parent, "state": v.state, "sha256": v.sha256, "params": v.params,
                      "note": v.note, "created_at": v.created_at, "remarks": remarks})
        vid = v.parent
    return chain[::-1]


def export_version(store: FeedbackStore, out: str | os.PathLike, version_id: int | None = None,
                   overwrite: bool = False) -> tuple[Path, Path]:
    """Copy a version's weights (default: the current one) to ``out/model-vN<suffix>`` and write its lineage
    to ``out/model-vN.lineage.json``. Returns both paths."""
    v = store.version(version_id) if version_id is not None else store.current_version()
    if v is None or v.weights is None:
        raise FeedbackStoreError("the project has no model version to export")
    with OutputDir(out, inputs=[v.weights, store.db_path], overwrite=overwrite) as od:
        name = f"model-v{v.id}"
        weights = od.write(name + v.weights.suffix, lambda tmp: shutil.copyfile(v.weights, tmp))
        doc = {"version": v.id, "weights": weights.name, "lineage": lineage(store, v.id)}
        meta = od.write(name + ".lineage.json", lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=2)))
    return weights, meta
