"""Stored artefacts: results one job produces and other jobs read instead of recomputing them.

An artefact file is one ``.safetensors`` file: its tensors, plus a JSON header in the metadata with the
artefact ``kind`` (e.g. ``"unit-names"``), a format ``version`` and kind-specific fields. Files are written
atomically and read without pickle. :func:`content_hash` is what a model version's lineage records, and
:func:`model_signature` ties an artefact to the architecture it describes (parameter names and shapes, not
values: a corrected model keeps the signature of the model it was corrected from).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file
from torch import nn

__all__ = ["ArtefactError", "save_artefact", "load_artefact", "content_hash", "model_signature"]

_META_KEY = "semlens_artefact"


class ArtefactError(ValueError):
    """An artefact file that is missing, corrupt, of another kind or version, or made for another model."""


def save_artefact(path: str | os.PathLike, kind: str, version: int, tensors: dict[str, torch.Tensor],
                  meta: dict[str, Any]) -> Path:
    """Write ``tensors`` and the JSON header ``{"kind", "version", **meta}`` to ``path`` atomically."""
    path = Path(path)
    header = json.dumps({"kind": kind, "version": version, **meta}, sort_keys=True)
    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(data, str(tmp), metadata={_META_KEY: header})
    os.replace(tmp, path)
    return path


def load_artefact(path: str | os.PathLike, kind: str, version: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read an artefact of ``kind``; a missing file, another kind or another format version raises
    :class:`ArtefactError` naming the file. Returns ``(tensors, header)``."""
    path = Path(path)
    if not path.is_file():
        raise ArtefactError(f"{kind} file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = json.loads((f.metadata() or {}).get(_META_KEY, "{}"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (SafetensorError, OSError, json.JSONDecodeError) as err:
        raise ArtefactError(f"cannot read {kind} file {path}: {err}") from err
    if header.get("kind") != kind:
        raise ArtefactError(f"{path} is not a semlens {kind} file (it holds {header.get('kind') or 'no artefact'!r})")
    if header.get("version") != version:
        raise ArtefactError(f"{path} has {kind} format version {header.get('version')}; this semlens reads "
                            f"version {version}")
    return tensors, header


def content_hash(path: str | os.PathLike) -> str:
    """sha256 (hex) of the file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_signature(model: nn.Module) -> str:
    """16 hex digits identifying the architecture: parameter and buffer names, shapes and dtypes (not values)."""
    desc = ";".join(f"{k}:{tuple(v.shape)}:{v.dtype}" for k, v in model.state_dict().items())
    return hashlib.sha256(desc.encode()).hexdigest()[:16]
