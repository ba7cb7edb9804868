"""``semlens feedback ...``: remarks about a model, and corrected model versions made from them."""

from __future__ import annotations

from pathlib import Path

import typer

from semlens.cli._common import user_errors

feedback_app = typer.Typer(help="Correct a model through its named units: remarks, versions, undo.",
                           no_args_is_help=True)

_PROJECT = typer.Option(Path("."), "--project", "-p", help="Project directory (holds .semlens/).")


_DEVICE = typer.Option("auto", "--device", help="'auto', 'cpu' or 'cuda'.")
_DISSECTION = typer.Option(None, "--dissection", help="A `semlens dissect` output directory: the web app's layer "
                           "pages and unit cards (top images).")
_PROTOTYPES = typer.Option(None, "--prototypes", help="A `semlens maximize` output directory: prototypes on the web "
                           "app's unit cards (repeatable).")
_EMBEDDING = typer.Option(None, "--embedding", help="A `semlens embed` output directory: x-features on the web app's "
                          "unit cards (repeatable).")


def _project(path: Path):
    from semlens.correct.project import CorrectionProject

    return CorrectionProject(path)


def _store(path: Path):
    """The project's store without loading the model (no torch import: fast)."""
    from semlens.correct.lineage import open_store

    return open_store(path)


def _print(*objects) -> None:
    from rich.console import Console

    Console().print(*objects)


def _table(*columns: str):
    from rich.table import Table

    return Table(*columns)


@feedback_app.command("init")
def init(
    weights: Path = typer.Option(..., help="Weights of the model to correct (.safetensors or .pt)."),
    data: Path = typer.Option(..., help="Broden dataset (classifier) or MSVD-style features corpus (captioner)."),
    kind: str = typer.Option("classifier", help="Model kind: classifier or captioner."),
    model: str = typer.Option("", help="classifier: built-in model name or package.module:factory."),
    names: Path = typer.Option(None, help="classifier: unit_names.safetensors (or units.csv) written by `semlens "
                               "dissect`; captioner: a neuron table written by `semlens caption neurons --out "
                               "X.safetensors` (default: the neurons are named by PDM now)."),
    layer: str = typer.Option("", help="classifier: the dissected layer whose units are enhanced."),
    topics: Path = typer.Option(None, help="captioner: topic model JSON (default: the neuron table's, else "
                                "WEIGHTS' .topics.json)."),
    dissection: Path = _DISSECTION,
    prototypes: list[Path] = _PROTOTYPES,
    embedding: list[Path] = _EMBEDDING,
    project: Path = _PROJECT,
) -> None:
    """Create a correction project: store unit names and concept references, register WEIGHTS as the base version."""
    from semlens.correct.project import CorrectionProject, classifier_artefacts

    with user_errors():
        CorrectionProject.refuse_existing(project)
        if kind == "captioner":
            from semlens.captioning import correction_artefacts

            if topics is None and names is None:
                topics = weights.with_name(weights.stem + ".topics.json")
            artefacts = correction_artefacts(weights, data, topics=topics, names=names)
        elif kind == "classifier":
            if names is None or not layer:
                raise ValueError("a classifier project needs --names and --layer (and --model unless the weights' "
                                 "config names it)")
            artefacts = classifier_artefacts(model, weights, data, names, layer)
        else:
            raise ValueError(f"unknown model kind {kind!r}; known: classifier, captioner")
        settings = {"data": str(data), "layer": layer, "topics": str(topics) if topics else "",
                    "dissection": str(dissection) if dissection else "",
                    "prototypes": [str(d) for d in prototypes or []], "embeddings": [str(d) for d in embedding or []]}
        p = CorrectionProject.init(project, kind=kind, model=model, weights=weights, artefacts=artefacts,
                                   **{k: v for k, v in settings.items() if v})
        v = p.store.current_version()
    _print(f"project ready in {project}; base version {v.id}")


@feedback_app.command("attach")
def attach(
    dissection: Path = _DISSECTION,
    prototypes: list[Path] = _PROTOTYPES,
    embedding: list[Path] = _EMBEDDING,
    project: Path = _PROJECT,
) -> None:
    """Record output directories shown by `semlens serve`: a dissection, AM prototypes, embeddings (x-features)."""
    with user_errors():
        if dissection is None and not prototypes and not embedding:
            raise ValueError("name something to attach: --dissection, --prototypes or --embedding")
        recorded = _project(project).attach(dissection=dissection, prototypes=prototypes or [],
                                            embeddings=embedding or [])
    for key, value in recorded.items():
        if value:
            _print(f"{key}: {', '.join(value) if isinstance(value, list) else value}")


@feedback_app.command("add")
def add(
    sample: str = typer.Argument(..., help="Sample id (image file name without extension)."),
    missing: str = typer.Option(..., "--missing", help="The concept (classifier) or topic (captioner) missed."),
    text: str = typer.Option("", help="Free text kept with the remark."),
    author: str = typer.Option(None, help="Author (default: $USER)."),
    preview: bool = typer.Option(False, "--preview", help="Also show the current prediction, the units named "
                                 "after the concept and the prediction with them enhanced (loads the model)."),
    device: str = _DEVICE,
    project: Path = _PROJECT,
) -> None:
    """Record a remark (checked against the project's data and unit names without loading the model)."""
    with user_errors():
        if not preview:
            from semlens.correct.quick import quick_add

            remark = quick_add(project, sample, missing, author=author, text=text)
            if remark is not None:
                _print(f"remark {remark.id} stored (against version {remark.model_version})")
                return
        p = _project(project)  # an older project, or a check only the corrector can explain
        from semlens.runtime import resolve_device

        corr = p.corrector(resolve_device(device))
        corr.check(sample, missing)
        remark = p.store.add_remark(sample, corr.remark_kind, missing, author=author, text=text)
        _print(f"remark {remark.id} stored (against version {remark.model_version})")
        if preview:
            _print(f"  prediction now:        {corr.describe(sample)}")
            _print(f"  units named {missing!r}: {', '.join(corr.unit_names(missing))}")
            _print(f"  with enhancement:      {corr.describe(sample, [missing])}")


@feedback_app.command("list")
def list_remarks(
    status: str = typer.Option(None, help="open, applied or withdrawn."), project: Path = _PROJECT
) -> None:
    """List remarks."""
    with user_errors():
        remarks = _store(project).remarks(status)
    table = _table("id", "sample", "kind", "target", "author", "version", "status", "applied in")
    for r in remarks:
        table.add_row(str(r.id), r.sample_id, r.kind, r.target, r.author, str(r.model_version), r.status,
                      str(r.applied_in or ""))
    _print(table)


@feedback_app.command("show")
def show(remark_id: int, project: Path = _PROJECT) -> None:
    """Show one remark in full."""
    with user_errors():
        r = _store(project).remark(remark_id)
    for key, value in r.__dict__.items():
        _print(f"{key:>14}: {value}")


@feedback_app.command("apply")
def apply(
    mu: float = typer.Option(None, help="Weight of ||theta' - theta||^2 (default 1e-2)."),
    steps: int = typer.Option(None, help="Fine-tuning steps (default 50)."),
    lr: float = typer.Option(None, help="Adam learning rate (default 1e-4)."),
    device: str = _DEVICE,
    project: Path = _PROJECT,
) -> None:
    """Apply all open remarks by correction propagation; creates a new current version."""
    with user_errors():
        from semlens.runtime import resolve_device

        version, stats = _project(project).apply(device=resolve_device(device), mu=mu, steps=steps, lr=lr)
    _print(f"version {version.id} (parent {version.parent}) made from remarks {list(version.remark_ids)}; "
           f"distance to enhanced maps {stats.get('data_loss_first', float('nan')):.4g} -> "
           f"{stats.get('data_loss_last', float('nan')):.4g}")
    typer.echo(f"new model: {version.weights}")


@feedback_app.command("undo")
def undo(project: Path = _PROJECT) -> None:
    """Return to the parent of the current version (its remarks become open again)."""
    with user_errors():
        v = _store(project).undo()
    _print(f"current version is now {v.id}")


@feedback_app.command("versions")
def versions(project: Path = _PROJECT) -> None:
    """List model versions with their lineage."""
    with user_errors():
        store = _store(project)
        cur = store.current_version()
        rows = store.versions()
    table = _table("id", "parent", "state", "remarks", "params", "artefacts", "created", "current")
    for v in rows:
        table.add_row(str(v.id), str(v.parent or ""), v.state, ",".join(map(str, v.remark_ids)), str(v.params),
                      " ".join(f"{k}:{h[:8]}" for k, h in sorted(v.artefacts.items())), v.created_at[:19],
                      "*" if cur and v.id == cur.id else "")
    _print(table)


@feedback_app.command("withdraw")
def withdraw(remark_id: int, project: Path = _PROJECT) -> None:
    """Withdraw an open remark (it is kept, marked withdrawn, and no longer applied)."""
    with user_errors():
        r = _store(project).withdraw(remark_id)
    typer.echo(f"remark {r.id} withdrawn")


@feedback_app.command("export")
def export(
    version: int = typer.Argument(None, help="Version id (default: the current version)."),
    out: Path = typer.Option(..., "--out", help="Directory for model-vN.safetensors and model-vN.lineage.json."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a non-empty directory semlens did not "
                                                              "create."),
    project: Path = _PROJECT,
) -> None:
    """Export a version's weights with its lineage (parents, remarks, parameters) as JSON."""
    with user_errors():
        from semlens.correct.lineage import export_version

        weights, meta = export_version(_store(project), out, version, overwrite=overwrite)
    typer.echo(f"wrote {weights} and {meta}")


def register(app: typer.Typer) -> None:
    app.add_typer(feedback_app, name="feedback")
