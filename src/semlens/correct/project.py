"""A correction project: a model, its stored artefacts, its data and its feedback store, in one directory.

``.semlens/project.json`` records what the model is and where its data is; the feedback store
(:mod:`semlens.correct.store`) beside it holds remarks and versions, and ``.semlens/artefacts/`` the unit
names and concept references the corrections go through, each file named by its content hash. Every model
version records the hashes of the artefacts it was made with (and is described by), so a command opens
exactly those files: nothing is recomputed over the training split or the corpus to answer a remark.

Model kinds plug in through :data:`CORRECTORS`: a class built as
``Kind(config, weights, names_path, references_path, device)``; the artefacts themselves are produced by
the naming jobs (:func:`semlens.correct.classifier.correction_artefacts` for a classifier,
:func:`semlens.captioning.correction_artefacts` for a captioner) and handed to :meth:`CorrectionProject.init`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from semlens.artefacts import ArtefactError, content_hash
from semlens.checkpoint import read_config, save_weights
from semlens.correct.quick import REMARK_KINDS, TARGETS_FILE, sample_file
from semlens.correct.references import ConceptReferences
from semlens.correct.store import FeedbackStore, FeedbackStoreError, Remark, suggest
from semlens.models import load, weights_config

__all__ = ["Corrector", "CorrectionProject", "CORRECTORS", "ClassifierProjectCorrector", "CaptionerProjectCorrector",
           "Artefacts", "classifier_artefacts"]


def _group_by_sample(remarks: Sequence[Remark]) -> tuple[list[str], list[list[str]]]:
    """The remarks' sample ids (sorted) and, per sample, its targets in the order they were made."""
    by_sample: dict[str, list[str]] = {}
    for r in remarks:
        by_sample.setdefault(r.sample_id, []).append(r.target)
    ids = sorted(by_sample)
    return ids, [by_sample[s] for s in ids]


@dataclass(frozen=True)
class Artefacts:
    """What a correction project is made from besides the weights: ``names`` (:class:`~semlens.units.names.UnitNames`
    or a :class:`~semlens.captioning.naming.NeuronTopics` table, written with ``save_names``) and ``references``."""

    names: Any
    references: ConceptReferences
    save_names: Callable[[Path], Path]
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)  # recorded in project.json


Progress = Callable[[int, int], None]  # progress(step, steps) after each fine-tuning step


def _stop_reporting(progress: Progress | None, steps: int) -> Callable[[torch.nn.Module], bool] | None:
    """A ``stop`` callback for :func:`semlens.correct.engine.propagate` that only reports progress."""
    if progress is None:
        return None
    done = [0]

    def stop(_model: torch.nn.Module) -> bool:
        done[0] += 1
        progress(done[0], steps)
        return False

    return stop


class Corrector(Protocol):
    """What the feedback commands need from a model kind."""

    remark_kind: str  # "missing_concept" or "missing_topic"
    model: torch.nn.Module

    def sample_ids(self) -> list[str]: ...

    def check(self, sample_id: str, target: str) -> None: ...

    def targets(self) -> list[str]:
        """The concepts (classifier) or topics (captioner) a remark can name: those some unit carries."""
        ...

    def describe(self, sample_id: str, enhanced: Sequence[str] = ()) -> str: ...

    def unit_names(self, target: str) -> list[str]: ...

    def correct(self, remarks: Sequence[Remark], params: dict[str, Any], progress: Progress | None = None
                ) -> dict[str, Any]: ...


@dataclass
class ClassifierProjectCorrector:
    """Image classifier + Broden-format data + stored unit names and references (:mod:`semlens.correct.classifier`).

    Only the images of the samples named are read (``images/<id><image_suffix>``); the dataset's index is
    parsed only for data laid out otherwise, or to suggest a sample id after an unknown one."""

    config: dict[str, Any]
    weights: Path
    names_path: Path
    references_path: Path
    device: torch.device
    remark_kind: str = REMARK_KINDS["classifier"]

    def __post_init__(self) -> None:
        from semlens.correct.classifier import ClassifierCorrector
        from semlens.units.names import UnitNames

        cfg = self.config
        self.model = _classifier(cfg["model"], cfg.get("model_kwargs", {}), self.weights, self.device)
        self.names = UnitNames.load(self.names_path, cfg["layer"], model=self.model)
        refs = ConceptReferences.load(self.references_path, model=self.model, layer=cfg["layer"])
        self.engine = ClassifierCorrector(self.model, cfg["layer"], self.names, refs, min_iou=cfg.get("min_iou", 0.04),
                                          device=self.device)
        self._dataset: Any = None

    @property
    def dataset(self) -> Any:
        """The Broden-format dataset (its index parsed on first use)."""
        if self._dataset is None:
            from semlens.world import BrodenDataset

            self._dataset = BrodenDataset(self.config["data"])
        return self._dataset

    def sample_ids(self) -> list[str]:
        return [Path(name).stem for name in self.dataset.images]

    def _images(self, sample_ids: Sequence[str]) -> torch.Tensor:
        """(B, 3, H, W) images of the samples (an unknown id raises, naming the closest ids)."""
        from semlens.world import read_images

        suffix, root = self.config.get("image_suffix"), Path(self.config["data"])
        files = [sample_file("classifier", self.config, s) for s in sample_ids]
        if all(f is not None and f.is_file() for f in files):
            return read_images(root, [f"{s}{suffix}" for s in sample_ids], self.config.get("image_size"))
        ids = {Path(name).stem: i for i, name in enumerate(self.dataset.images)}
        for s in sample_ids:
            if s not in ids:
                raise KeyError(f"unknown sample id {s!r}.{suggest(s, list(ids))}")
        return self.dataset.load_batch([ids[s] for s in sample_ids]).images

    def check(self, sample_id: str, target: str) -> None:
        self._images([sample_id])
        self.engine.units(target)

    def targets(self) -> list[str]:
        thr = float(self.config.get("min_iou", 0.04))
        carried = sorted({c for c, i in zip(self.names.concepts, self.names.ious.tolist(), strict=True) if i > thr})
        return [c for c in carried if self._nameable(c)]

    def _nameable(self, concept: str) -> bool:
        """Whether a remark naming ``concept`` passes :meth:`check` (detectors and a reference activation)."""
        try:
            self.engine.units(concept)
        except (KeyError, ValueError):
            return False
        return True

    def _class_name(self, k: int) -> str:
        names = self.config["class_names"] if "class_names" in self.config else self.dataset.class_names
        return names[k] if names else str(k)

    def describe(self, sample_id: str, enhanced: Sequence[str] = ()) -> str:
        probs = self.engine.predict(self._images([sample_id]), enhanced).softmax(-1)[0]
        top = torch.topk(probs, k=min(3, probs.numel()))
        return ", ".join(f"{self._class_name(int(i))} {float(p):.2f}" for p, i in zip(top.values, top.indices,
                                                                                       strict=True))

    def unit_names(self, target: str) -> list[str]:
        return [f"{self.names.layer}:{int(u)}" for u in self.engine.units(target)]

    def correct(self, remarks: Sequence[Remark], params: dict[str, Any], progress: Progress | None = None
                ) -> dict[str, Any]:
        ids, targets = _group_by_sample(remarks)
        res = self.engine.propagate(self._images(ids), targets, mu=params["mu"],
                                    steps=params["steps"], lr=params["lr"],
                                    stop=_stop_reporting(progress, params["steps"]))
        return {"data_loss_first": res.data_loss[0], "data_loss_last": res.data_loss[-1], "steps": res.steps}


@dataclass
class CaptionerProjectCorrector:
    """Attentive captioner + MSVD-style features corpus + the stored neuron → topic table (PDM) and topic
    references (see :mod:`semlens.correct.captioner`). Topics are named as in the topic model (e.g. ``"dog/runs"``).
    The corpus is read only to look up the features of a clip."""

    config: dict[str, Any]
    weights: Path
    names_path: Path
    references_path: Path
    device: torch.device
    remark_kind: str = REMARK_KINDS["captioner"]

    def __post_init__(self) -> None:
        from semlens.captioning.naming import NeuronTopics
        from semlens.correct.captioner import CaptionCorrector

        self.model = load("captioner", self.weights, device=self.device)
        names = NeuronTopics.load(self.names_path, model=self.model)
        refs = ConceptReferences.load(self.references_path, model=self.model, names=names.topic_names)
        self.engine = CaptionCorrector(self.model, names, refs, max_neurons=self.config.get("max_neurons"))

    def sample_ids(self) -> list[str]:
        from semlens.world import CaptionCorpus

        return list(CaptionCorpus(self.config["data"]).video_ids)

    def _feats(self, sample_ids: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded features (B, T, F) and lengths (B,) of the clips ``features/<id>.npy`` (an unknown id raises,
        naming the closest ids)."""
        from semlens.captioning.model import pad_features
        from semlens.world import read_features

        root = Path(self.config["data"])
        for s in sample_ids:
            if not sample_file("captioner", self.config, s).is_file():
                known = self.sample_ids()
                raise KeyError(f"unknown sample id {s!r}.{suggest(s, known)}")
        return pad_features([read_features(root, s, self.model.config.feature_dim) for s in sample_ids])

    def check(self, sample_id: str, target: str) -> None:
        self._feats([sample_id])
        self.engine.neurons(target)

    def targets(self) -> list[str]:
        names = self.engine.names
        return [t for i, t in enumerate(names.topic_names) if names.neurons_of(i)]

    def describe(self, sample_id: str, enhanced: Sequence[str] = ()) -> str:
        feats, lengths = self._feats([sample_id])
        return self.engine.captions(feats, lengths, [list(enhanced)] if enhanced else None)[0]

    def unit_names(self, target: str) -> list[str]:
        return [f"v:{j}" for j in self.engine.neurons(target)]

    def correct(self, remarks: Sequence[Remark], params: dict[str, Any], progress: Progress | None = None
                ) -> dict[str, Any]:
        ids, targets = _group_by_sample(remarks)
        feats, lengths = self._feats(ids)
        res = self.engine.propagate(feats, lengths, targets, mu=params["mu"],
                                    steps=params["steps"], lr=params["lr"],
                                    stop=_stop_reporting(progress, params["steps"]))
        return {"data_loss_first": res.data_loss[0], "data_loss_last": res.data_loss[-1], "steps": res.steps}


CORRECTORS: dict[str, Callable[[dict[str, Any], Path, Path, Path, torch.device], Corrector]] = {
    "classifier": ClassifierProjectCorrector,
    "captioner": CaptionerProjectCorrector,
}

DEFAULT_PARAMS = {"mu": 1e-2, "steps": 50, "lr": 1e-4}  # Dong et al. 2017 (correction propagation)
_PATH_KEYS = ("data", "topics", "dissection")  # stored relative to the project directory
#: lists of output directories shown on the web app's unit cards (``semlens maximize`` / ``semlens embed``), each
#: stored relative to the project directory
_PATH_LIST_KEYS = ("prototypes", "embeddings")


def _check_outputs(dirs: dict[str, Any]) -> None:
    """Refuse a directory given as prototypes / embeddings that is not a maximize / embed output."""
    expected = {"prototypes": ("summary.csv", "maximize"), "embeddings": ("embedding.json", "embed")}
    for key, (name, command) in expected.items():
        bad = [d for d in dirs.get(key) or [] if Path(d).is_dir() and not (Path(d) / name).is_file()]
        if bad:
            raise FileNotFoundError(f"{bad[0]} has no {name}: not a `semlens {command}` output")


def _relative(path: str | os.PathLike, project_dir: str | os.PathLike, key: str) -> str:
    """``path`` relative to the project directory (it must exist)."""
    if not Path(path).exists():
        raise FileNotFoundError(f"--{key} {path} not found")
    return os.path.relpath(Path(path).resolve(), Path(project_dir).resolve())


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
        self.config = self._absolute(self.config)
        self.store = FeedbackStore(self.dir)

    def _absolute(self, raw: dict[str, Any]) -> dict[str, Any]:
        """``project.json``'s settings with its paths (stored relative to the project directory, so a project can
        be moved) made paths from here."""
        cfg = dict(raw)
        for key in _PATH_KEYS:
            if cfg.get(key):
                cfg[key] = os.path.normpath(self.dir / cfg[key])
        for key in _PATH_LIST_KEYS:
            cfg[key] = [os.path.normpath(self.dir / p) for p in cfg.get(key) or []]
        return cfg

    @staticmethod
    def refuse_existing(project_dir: str | os.PathLike) -> Path:
        """The path of ``project.json`` for a new project in ``project_dir``; an error when it exists already."""
        path = Path(project_dir) / ".semlens" / "project.json"
        if path.exists():
            raise FileExistsError(f"{project_dir} is a correction project already ({path} exists); use "
                                  "`semlens feedback add` there, or choose another --project")
        return path

    @classmethod
    def init(cls, project_dir: str | os.PathLike, *, kind: str, model: str, weights: str | os.PathLike,
             artefacts: Artefacts, **settings: Any) -> CorrectionProject:
        """Create the project: store ``artefacts``, write ``project.json`` and register ``weights`` as the base
        version (its lineage records the artefacts' content hashes)."""
        if kind not in CORRECTORS:
            raise ValueError(f"unknown model kind {kind!r}; known: {', '.join(CORRECTORS)}")
        path = cls.refuse_existing(project_dir)
        cfg = {"kind": kind, "model": model, **artefacts.settings, **settings}
        if "model_kwargs" not in cfg:
            cfg["model_kwargs"] = read_config(weights).get("model_kwargs", {}) if str(weights).endswith(
                ".safetensors") else {}
        if kind == "classifier" and not model:
            cfg["model"] = weights_config(weights).get("model", "")  # the one the weights' config names
        required = {"classifier": ("model", "data", "layer"), "captioner": ("data",)}[kind]
        missing = [k for k in required if not cfg.get(k)]
        if missing:
            raise ValueError(f"a {kind} project needs {', '.join('--' + k for k in missing)}")
        _check_outputs(cfg)
        for key in _PATH_KEYS:
            if cfg.get(key):
                cfg[key] = _relative(cfg[key], project_dir, key)
        for key in _PATH_LIST_KEYS:
            if cfg.get(key):
                cfg[key] = [_relative(p, project_dir, key) for p in cfg[key]]
        store_dir = path.parent / "artefacts"
        hashes = {"names": _store(store_dir, artefacts.save_names),
                  "references": _store(store_dir, artefacts.references.save)}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cfg, indent=2, sort_keys=True))
        os.replace(tmp, path)
        project = cls(project_dir)
        project.store.register_base(weights, params={"source": str(Path(weights).resolve())}, artefacts=hashes)
        project.corrector()  # stores targets.json: `feedback add` then checks remarks without the model
        return project

    def attach(self, *, dissection: str | os.PathLike | None = None,
               prototypes: Sequence[str | os.PathLike] = (), embeddings: Sequence[str | os.PathLike] = ()
               ) -> dict[str, Any]:
        """Record output directories the web app shows: a ``semlens dissect`` output (replaces the recorded one),
        ``semlens maximize`` outputs (prototypes) and ``semlens embed`` outputs (x-features), added to those
        recorded (a directory recorded already is kept once). Each must exist and is stored relative to the
        project directory. ``project.json`` is replaced atomically; returns the recorded paths (absolute)."""
        from semlens.outputs import atomic_write

        _check_outputs({"prototypes": prototypes, "embeddings": embeddings})
        if dissection is not None and not (Path(dissection) / "units.csv").is_file():
            raise FileNotFoundError(f"--dissection {dissection} is not a dissection output (no units.csv)")
        raw = json.loads(self.config_path.read_text())
        if dissection is not None:
            raw["dissection"] = _relative(dissection, self.dir, "dissection")
        for key, dirs in (("prototypes", prototypes), ("embeddings", embeddings)):
            recorded = list(raw.get(key) or [])
            for d in dirs:
                rel = _relative(d, self.dir, key)
                if rel not in recorded:
                    recorded.append(rel)
            if recorded:
                raw[key] = recorded
        atomic_write(self.config_path, lambda tmp: tmp.write_text(json.dumps(raw, indent=2, sort_keys=True)))
        self.config = self._absolute(raw)
        return {k: self.config.get(k) for k in ("dissection", *_PATH_LIST_KEYS)}

    def artefact_paths(self, version: Any) -> tuple[Path, Path]:
        """The names and references files recorded for ``version`` (their content checked against the hashes)."""
        if not version.artefacts:
            raise FeedbackStoreError(f"model version {version.id} records no unit names or references (a project "
                                     "made by an older semlens); make a new project with `semlens feedback init`")
        paths = []
        for key in ("names", "references"):
            digest = version.artefacts[key]
            p = self.dir / ".semlens" / "artefacts" / f"{digest}.safetensors"
            if not p.is_file() or content_hash(p) != digest:
                raise ArtefactError(f"the {key} file of model version {version.id} ({p}) is missing or was changed")
            paths.append(p)
        return paths[0], paths[1]

    def corrector(self, device: str | torch.device = "cpu", version: int | None = None) -> Corrector:
        """The corrector of the current (or given) version: its weights and its stored artefacts."""
        v = self.store.version(version) if version is not None else self.store.current_version()
        if v is None or v.weights is None:
            raise FeedbackStoreError("the project has no model version")
        corr = CORRECTORS[self.config["kind"]](self.config, v.weights, *self.artefact_paths(v), torch.device(device))
        if not (self.dir / TARGETS_FILE).is_file():  # a project made before targets.json existed
            try:
                self.write_targets(corr)
            except OSError:  # a read-only project still works; `feedback add` then checks through the corrector
                pass
        return corr

    def write_targets(self, corrector: Corrector) -> Path:
        """Store what a remark can name (``corrector.targets()``; fixed by the project's unit names) in
        ``.semlens/targets.json``, so ``feedback add`` checks a remark without loading the model."""
        from semlens.outputs import atomic_write

        path = self.dir / TARGETS_FILE
        text = json.dumps({"kind": REMARK_KINDS[self.config["kind"]], "targets": corrector.targets()}, indent=1)
        atomic_write(path, lambda tmp: tmp.write_text(text))
        return path

    def apply(self, device: str | torch.device = "cpu", progress: Progress | None = None, **params: Any) -> Any:
        """Apply all open remarks: correction propagation from the current version -> new version, made through
        (and recording) the current version's artefacts. ``progress(step, steps)`` is called after each step."""
        full = {**DEFAULT_PARAMS, **self.config.get("defaults", {}), **{k: v for k, v in params.items()
                                                                         if v is not None}}
        stats: dict[str, Any] = {}
        current = self.store.current_version()
        if current is None:
            raise FeedbackStoreError("the project has no model version")
        names_path, refs_path = self.artefact_paths(current)

        def compute(parent: Path, remarks: list[Remark], out: Path) -> None:
            torch.manual_seed(0)
            corr = CORRECTORS[self.config["kind"]](self.config, parent, names_path, refs_path, torch.device(device))
            stats.update(corr.correct(remarks, full, progress))
            save_weights(corr.model, out, config=read_config(parent) if parent.suffix == ".safetensors" else {})

        version = self.store.apply(compute, params=full, artefacts=current.artefacts)
        return version, stats


def _classifier(spec: str, kwargs: dict[str, Any], weights: str | os.PathLike, device: torch.device
                ) -> torch.nn.Module:
    """The classifier through the one model loader (``spec`` empty: the model the weights' config names)."""
    return load(spec or None, weights, device=device, **kwargs)


def classifier_artefacts(model: str, weights: str | os.PathLike, data: str | os.PathLike, names: str | os.PathLike,
                         layer: str, *, split: str = "train", batch_size: int = 64,
                         device: str | torch.device = "cpu") -> Artefacts:
    """Unit names of ``layer`` (a names file or dissection's ``units.csv``, checked against the model) and
    the concept references over the ``split`` images of the Broden-format ``data``: one pass, done once."""
    from semlens.artefacts import model_signature
    from semlens.correct.classifier import fit_references
    from semlens.units.names import UnitNames
    from semlens.world import BrodenDataset

    kwargs = read_config(weights).get("model_kwargs", {}) if str(weights).endswith(".safetensors") else {}
    net = _classifier(model, kwargs, weights, torch.device(device))
    unit_names = dataclasses.replace(UnitNames.load(names, layer, model=net), model=model_signature(net))
    ds = BrodenDataset(data)
    refs = fit_references(net, layer, ds, ds.split_indices(split), batch_size, device)
    settings: dict[str, Any] = {"image_size": list(ds.image_size), "class_names": ds.class_names}
    suffixes = {Path(name).suffix for name in ds.images}
    if len(suffixes) == 1 and all("/" not in name for name in ds.images):  # images/<sample id><suffix>
        settings["image_suffix"] = suffixes.pop()
    return Artefacts(unit_names, refs, unit_names.save, settings)


def _store(directory: Path, save: Callable[[Path], object]) -> str:
    """Save an artefact into ``directory`` under its content hash; returns the hash."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f"incoming-{os.getpid()}.safetensors"
    save(tmp)
    digest = content_hash(tmp)
    os.replace(tmp, directory / f"{digest}.safetensors")
    return digest
