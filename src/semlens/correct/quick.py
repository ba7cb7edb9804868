"""Recording a remark without loading the model: what ``semlens feedback add`` does when it can.

A remark needs two checks: the sample exists in the project's data, and the concept (classifier) or topic
(captioner) is one a remark can name — one that some unit of the corrected layer carries. The second is a
property of the stored unit names only, so the project keeps its answer in ``.semlens/targets.json``
(written by :meth:`semlens.correct.project.CorrectionProject.write_targets` from the corrector itself, once);
the first is a file test. With both answered here, no torch import and no model load is needed: the command
answers in the time Python takes to start. Whenever one of them cannot be answered here (an older project
without ``targets.json``, a sample the file test does not find, an unknown concept), the caller falls back to
the corrector, which gives the full error message with suggestions. Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from semlens.correct.store import Remark

__all__ = ["TARGETS_FILE", "REMARK_KINDS", "sample_file", "read_targets", "quick_add"]

#: the remarkable targets of a project, relative to its directory
TARGETS_FILE = Path(".semlens") / "targets.json"

#: the remark kind each model kind records
REMARK_KINDS = {"classifier": "missing_concept", "captioner": "missing_topic"}


def sample_file(kind: str, config: dict[str, Any], sample_id: str) -> Path | None:
    """The file that holds ``sample_id`` in the project's data (``config["data"]`` a path from here), or
    ``None`` when the layout does not say (a classifier's data without a uniform image suffix)."""
    root = Path(config["data"])
    if kind == "captioner":
        return root / "features" / f"{sample_id}.npy"
    suffix = config.get("image_suffix")
    return None if suffix is None else root / "images" / f"{sample_id}{suffix}"


def read_targets(project_dir: str | os.PathLike) -> list[str] | None:
    """The stored remarkable targets, or ``None`` when the project has none stored (or the file is unreadable)."""
    path = Path(project_dir) / TARGETS_FILE
    try:
        targets = json.loads(path.read_text())["targets"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return [str(t) for t in targets] if isinstance(targets, list) else None


def quick_add(project_dir: str | os.PathLike, sample_id: str, target: str, author: str | None = None,
              text: str = "") -> Remark | None:
    """Store the remark "``sample_id`` misses ``target``" if both checks can be answered without the model and
    pass; return it, or ``None`` (nothing stored) when the caller must check through the corrector."""
    from semlens.correct.lineage import open_store

    project_dir = Path(project_dir)
    store = open_store(project_dir)
    if not sample_id or Path(sample_id).name != sample_id or sample_id in (".", ".."):
        return None  # not a plain id: the corrector explains
    try:
        raw = json.loads((project_dir / ".semlens" / "project.json").read_text())
    except (OSError, ValueError):
        return None
    kind = raw.get("kind")
    targets = read_targets(project_dir)
    if kind not in REMARK_KINDS or not raw.get("data") or targets is None or target not in targets:
        return None
    config = {**raw, "data": os.path.normpath(project_dir / raw["data"])}
    path = sample_file(kind, config, sample_id)
    if path is None or not path.is_file():
        return None
    return store.add_remark(sample_id, REMARK_KINDS[kind], target, author=author, text=text)
