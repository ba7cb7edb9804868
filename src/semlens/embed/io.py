"""Saving and loading embeddings: ``embedding.safetensors`` (tensors) + ``embedding.json`` (configuration, origin,
acceptance-loop history). Loading checks that the embedding belongs to the expected model and layer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from semlens.embed.base import Embedding

__all__ = ["save_embedding", "load_embedding", "EmbeddingMismatchError", "METHODS"]

FORMAT = "semlens-embedding/1"


class EmbeddingMismatchError(ValueError):
    """An embedding file that belongs to another model or layer, or is not an embedding at all."""


def _methods() -> dict[str, type[Embedding]]:
    from semlens.embed.baselines import NMFEmbedding, PCAEmbedding, TopKSAE
    from semlens.embed.srae import SRAE

    return {"srae": SRAE, "topk": TopKSAE, "nmf": NMFEmbedding, "pca": PCAEmbedding}


METHODS = ("srae", "topk", "nmf", "pca")


def save_embedding(emb: Embedding, out: str | Path, model: str | None = None, extra: dict[str, Any] | None = None
                   ) -> Path:
    """Write ``out/embedding.safetensors`` and ``out/embedding.json``; returns ``out``."""
    emb._check_fitted()
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    state = {"mean": emb.mean_, "scale": emb.scale_, **emb._state()}
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(root / "embedding.safetensors"))
    meta = {
        "format": FORMAT, "method": emb.method, "params": emb.get_params(), "model": model or emb.model_name_,
        "layer": emb.layer_, "classes": emb.classes_, "n_classes": emb.n_classes_,
        "n_features_in": emb.n_features_in_, **emb._meta(), **(extra or {}),
    }
    (root / "embedding.json").write_text(json.dumps(meta, indent=1, default=str))
    return root


def load_embedding(path: str | Path, model: str | None = None, layer: str | None = None) -> Embedding:
    """Load an embedding from a directory (or its ``embedding.json``); refuse one of another model/layer."""
    root = Path(path)
    if root.is_file():
        root = root.parent
    meta_path, tensor_path = root / "embedding.json", root / "embedding.safetensors"
    if not meta_path.is_file() or not tensor_path.is_file():
        raise FileNotFoundError(f"no embedding in {root} (expected embedding.json and embedding.safetensors)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise EmbeddingMismatchError(f"{meta_path} is not valid JSON: {err}") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise EmbeddingMismatchError(f"{meta_path} is not a semlens embedding (format {FORMAT!r} expected)")
    if model is not None and meta.get("model") and meta["model"] != model:
        raise EmbeddingMismatchError(f"embedding {root} was fitted on model {meta['model']!r}, not {model!r}")
    if layer is not None and meta.get("layer") != layer:
        raise EmbeddingMismatchError(f"embedding {root} was fitted on layer {meta.get('layer')!r}, not {layer!r}")
    methods = _methods()
    if meta.get("method") not in methods:
        raise EmbeddingMismatchError(f"{meta_path}: unknown embedding method {meta.get('method')!r}")
    emb = methods[meta["method"]](**meta["params"])
    state = load_file(str(tensor_path))
    emb.mean_, emb.scale_ = state["mean"], state["scale"]
    emb.classes_, emb.n_classes_ = list(meta["classes"]), int(meta["n_classes"])
    emb.n_features_in_, emb.layer_, emb.model_name_ = int(meta["n_features_in"]), meta["layer"], meta.get("model", "")
    emb._load_state(state, meta)
    return emb


def check_compatible(emb: Embedding, width: int) -> None:
    """Raise when the layer width differs from the embedding's input width."""
    if width != emb.n_features_in_:
        raise EmbeddingMismatchError(f"embedding expects layer {emb.layer_!r} of width {emb.n_features_in_}, "
                                     f"the model's layer has width {width}")



