"""A correction project: a model, its unit names, its data and its feedback store, in one directory.

``.semlens/project.json`` records what the model is and where its data and unit names are; the
feedback store (:mod:`semlens.correct.store`) beside it holds remarks and versions. Model kinds plug
in through :data:`CORRECTORS`: a factory ``(config, model_weights_path, device) -> Corrector``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from semlens.checkpoint import read_config, save_weights
from semlens.correct.store import FeedbackStore, FeedbackStoreError, Remark, suggest
from semlens.models import load, weights_config

__all__ = ["Corrector", "CorrectionProject", "CORRECTORS", "ClassifierProjectCorrector", "CaptionerProjectCorrector"]


class Corrector(Protocol):
    """What the feedback commands need from a model kind."""

    remark_kind: str  # "missing_concept" or "missing_topic"
    model: torch.nn.Module

    def sample_ids(self) -> list[str]: ...

    def check(self, sample_id: str, target: str) -> None: ...

    def describe(self, sample_id: str, enhanced: Sequence[str] = ()) -> str: ...

    def unit_names(self, target: str) -> list[str]: ...

    def correct(self, remarks: Sequence[Remark], params: dict[str, Any]) -> dict[str, Any]: ...


@dataclass
class ClassifierProjectCorrector:
    """Image classifier + Broden-format data + dissection ``units.csv`` (see :mod:`semlens.correct.classifier`)."""

    config: dict[str, Any]
    weights: Path
    device: torch.device
    remark_kind: str = "missing_concept"

    def __post_init__(self) -> None:
        from semlens.correct.classifier import ClassifierCorrector, UnitNames
        from semlens.world import BrodenDataset

        cfg = self.config
        self.model = load(cfg["model"] or None, self.weights, device=self.device, **cfg.get("model_kwargs", {}))
        self.dataset = BrodenDataset(cfg["data"])
        self.names = UnitNames.from_csv(cfg["names"], cfg["layer"])
        self.engine = ClassifierCorrector(self.model, cfg["layer"], self.names, min_iou=cfg.get("min_iou", 0.04),
                                          device=self.device)
        self.engine.fit_references(self.dataset, self.dataset.split_indices(cfg.get("reference_split", "train")))
        self._ids = {Path(name).stem: i for i, name in enumerate(self.dataset.images)}

    def sample_ids(self) -> list[str]:
        return list(self._ids)

    def _index(self, sample_id: str) -> int:
        if sample_id not in self._ids:
            raise KeyError(f"unknown sample id {sample_id!r}.{suggest(sample_id, list(self._ids))}")
        return self._ids[sample_id]

    def check(self, sample_id: str, target: str) -> None:
        self._index(sample_id)
        self.engine.units(target)

    def _class_name(self, k: int) -> str:
        names = self.dataset.class_names
        return names[k] if names else str(k)

    def describe(self, sample_id: str, enhanced: Sequence[str] = ()) -> str:
        x = self.dataset.load_batch([self._index(sample_id)]).images
        probs = self.engine.predict(x, enhanced).softmax(-1)[0]
        top = torch.topk(probs, k=min(3, probs.numel()))
        return ", ".join(f"{self._class_name(int(i))} {float(p):.2f}" for p, i in zip(top.values, top.indices,
                                                                                       strict=True))

    def unit_names(self, target: str) -> list[str]:
        return [f"{self.names.layer}:{int(u)}" for u in self.engine.units(target)]

    def correct(self, remarks: Sequence[Remark], params: dict[str, Any]) -> dict[str, Any]:
        by_sample: dict[str, list[str]] = {}
        for r in remarks:
            by_sample.setdefault(r.sample_id, []).append(r.target)
        ids = sorted(by_sample)
        x = self.dataset.load_batch([self._index(s) for s in ids]).images
        res = self.engine.propagate(x, [by_sample[s] for s in ids], mu=params["mu"], steps=params["steps"],
                                    lr=params["lr"])
        return {"data_loss_first": res.data_loss[0], "data_loss_last": res.data_loss[-1], "steps": res.steps}


@dataclass
class CaptionerProjectCorrector:
    """Attentive captioner + MSVD-style features corpus; neurons named by PDM on the training split
    (see :mod:`semlens.correct.captioner`). Topics are named as in the topic model (e.g. ``"dog/runs"``)."""

    config: dict[str, Any]
    weights: Path
    device: torch.device
    remark_kind: str = "missing_topic"

    def __post_init__(self) -> None:
        from semlens.captioning import analyze_neurons, prepare
        from semlens.correct.captioner import CaptionCorrector
        from semlens.units.topics import TopicModel
        from semlens.world import CaptionCorpus

        cfg = self.config
        self.model = load("captioner", self.weights, device=self.device)
        self.corpus = CaptionCorpus(cfg["data"])
        topics = TopicModel.load(cfg["topics"])
        splits = {s: list(self.corpus.split(s)) for s in ("train", "test")}
        ids = splits["train"] + splits["test"]
        prep = prepare({v: self.corpus.features(v) for v in ids}, {v: self.corpus.captions[v] for v in ids}, splits,
                       vocab=self.model.vocab, topic_model=topics, max_len=self.model.config.max_len)
        names = analyze_neurons(self.model, prep)["names"]
        self.engine = CaptionCorrector.fit(self.model, names, prep.train.feats, prep.train.lengths,
                                           prep.train.topics, max_neurons=cfg.get("max_neurons"))

    def sample_ids(self) -> list[str]:
        return list(self.corpus.video_ids)

    def _feats(self, sample_ids: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        from semlens.models.captioner import pad_features

        known = set(self.corpus.video_ids)
        for s in sample_ids:
            if s not in known:
                raise KeyError(f"unknown sample id {s!r}.{suggest(s, list(known))}")
        return pad_features([torch.as_tensor(self.corpus.features(s), dtype=torch.float32) for s in sample_ids])

    def check(self, sample_id: str, target: str) -> None:
        self._feats([sample_id])
        self.engine.neurons(target)

    def describe(self, sample_id: str, enhanced: Sequence[str] = ()) -> str:
        feats, lengths = self._feats([sample_id])
        return self.engine.captions(feats, lengths, [list(enhanced)] if enhanced else None)[0]

    def unit_names(self, target: str) -> list[str]:
        return [f"v:{j}" for j in self.engine.neurons(target)]

    def correct(self, remarks: Sequence[Remark], params: dict[str, Any]) -> dict[str, Any]:
        by_sample: dict[str, list[str]] = {}
        for r in remarks:
            by_sample.setdefault(r.sample_id, []).append(r.target)
        ids = sorted(by_sample)
        feats, lengths = self._feats(ids)
        res = self.engine.propagate(feats, lengths, [by_sample[s] for s in ids], mu=params["mu"],
                                    steps=params["steps"], lr=params["lr"])
        return {"data_loss_first": res.data_loss[0], "data_loss_last": res.data_loss[-1], "steps": res.steps}


CORRECTORS: dict[str, Callable[[dict[str, Any], Path, torch.device], Corrector]] = {
    "classifier": ClassifierProjectCorrector,
    "captioner": CaptionerProjectCorrector,
}

DEFAULT_PARAMS = {"mu": 1e-2, "steps": 50, "lr": 1e-4}  # METHODS.md §1.6
_PATH_KEYS = ("data", "names", "topics")


class CorrectionProject:
    """``project_dir/.semlens/project.json`` + the feedback store in the same folder."""

    def __init__(self, project_dir: str | os.PathLike = ".") -> None:
        self.dir = Path(project_dir)
        self.config_path = self.dir / ".semlens" / "project.json"
        if not self.config_path.is_file():
            raise FileNotFoundError(f"no correction project in {self.dir} (missing {self.config_path}); "
                                    "create one with `semlens feedback init`")
        try:
            self.config = json.loads(self.config_path.read_text())
        except json.JSONDecodeError as err:
            raise FeedbackStoreError(f"corrupt project file {self.config_path}: {err}") from err
        if self.config.get("kind") not in CORRECTORS:
            raise FeedbackStoreError(f"{self.config_path}: unknown model kind {self.config.get('kind')!r}; "
                                     f"known: {', '.join(CORRECTORS)}")
        for key in _PATH_KEYS:  # stored relative to the project directory, so a project can be moved
            if self.config.get(key):
                self.config[key] = str(self.dir / self.config[key])
        self.store = FeedbackStore(self.dir)

    @classmethod
    def init(cls, project_dir: str | os.PathLike, *, kind: str, model: str, weights: str | os.PathLike,
             **settings: Any) -> CorrectionProject:
        """Create the project: write ``project.json`` and register ``weights`` as the base version."""
        if kind not in CORRECTORS:
            raise ValueError(f"unknown model kind {kind!r}; known: {', '.join(CORRECTORS)}")
        path = Path(project_dir) / ".semlens" / "project.json"
        if path.exists():
            raise FileExistsError(f"{project_dir} is a correction project already ({path} exists); use "
                                  "`semlens feedback add` there, or choose another --project")
        cfg = {"kind": kind, "model": model, **settings}
        if "model_kwargs" not in cfg:
            cfg["model_kwargs"] = read_config(weights).get("model_kwargs", {}) if str(weights).endswith(
                ".safetensors") else {}
        if kind == "classifier" and not model:
            cfg["model"] = weights_config(weights).get("model", "")  # the one the weights' config names
        required = {"classifier": ("model", "data", "names", "layer"), "captioner": ("data", "topics")}[kind]
        missing = [k for k in required if not cfg.get(k)]
        if missing:
            raise ValueError(f"a {kind} project needs {', '.join('--' + k for k in missing)}")
        for key in _PATH_KEYS:
            if cfg.get(key):
                if not Path(cfg[key]).exists():
                    raise FileNotFoundError(f"--{key} {cfg[key]} not found")
                cfg[key] = os.path.relpath(Path(cfg[key]).resolve(), Path(project_dir).resolve())
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cfg, indent=2, sort_keys=True))
        os.replace(tmp, path)
        project = cls(project_dir)
        project.store.register_base(weights, params={"source": str(Path(weights).resolve())})
        return project

    def corrector(self, device: str | torch.device = "cpu", version: int | None = None) -> Corrector:
        """The corrector of the current (or given) version's weights."""
        v = self.store.version(version) if version is not None else self.store.current_version()
        if v is None or v.weights is None:
            raise FeedbackStoreError("the project has no model version")
        return CORRECTORS[self.config["kind"]](self.config, v.weights, torch.device(device))

    def apply(self, device: str | torch.device = "cpu", **params: Any) -> Any:
        """Apply all open remarks: correction propagation from the current version -> new version."""
        full = {**DEFAULT_PARAMS, **self.config.get("defaults", {}), **{k: v for k, v in params.items()
                                                                         if v is not None}}
        stats: dict[str, Any] = {}

        def compute(parent: Path, remarks: list[Remark], out: Path) -> None:
            torch.manual_seed(0)
            corr = CORRECTORS[self.config["kind"]](self.config, parent, torch.device(device))
            stats.update(corr.correct(remarks, full))
            save_weights(corr.model, out, config=read_config(parent) if parent.suffix == ".safetensors" else {})

        version = self.store.apply(compute, params=full)
        return version, stats
