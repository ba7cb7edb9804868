"""``semlens reproduce <experiment>``: re-run a published experiment on built-in data.

Each command parses its options and calls the experiment's ``run_*`` function in :mod:`semlens.experiments`
(imported when the command runs); to add an experiment, write its ``run_*`` function there and a command here.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from semlens.cli._common import user_errors

reproduce_app = typer.Typer(name="reproduce", help="Reproduce published experiments on built-in data.",
                            no_args_is_help=True)


@reproduce_app.command("blocknorm")
def blocknorm(
    out: Path = typer.Option(..., help="Output directory (results.json, report.html, runs/)."),
    seeds: int = typer.Option(3, help="Seeds per model and regularizer."),
    epochs: int = typer.Option(None, help="Training epochs (default 10; 2 with --fast)."),
    fast: bool = typer.Option(False, help="Tiny version: 1 seed, 800 training images, 2 epochs."),
    sweep: bool = typer.Option(None, "--sweep/--no-sweep", help="Sweep p, q, G and strength (default: only "
                               "when block norm does not beat weight decay with the defaults)."),
    n_train: int = typer.Option(None, help="Training images (default 8000; 800 with --fast)."),
    device: str = typer.Option("auto", help="'auto', 'cpu' or 'cuda'."),
) -> None:
    """Weight decay vs group block norm on AlexNet-like / AlexNet-B: unique detectors and accuracy."""
    from dataclasses import replace

    from semlens.experiments.blocknorm import BlockNormConfig, run_blocknorm

    with user_errors():
        cfg = BlockNormConfig.fast(device=device) if fast else BlockNormConfig(seeds=seeds, device=device)
        if fast and seeds != 3:
            cfg = replace(cfg, seeds=seeds)
        if epochs is not None:
            cfg = replace(cfg, epochs=epochs)
        if n_train is not None:
            cfg = replace(cfg, n_train=n_train)
        results = run_blocknorm(out, cfg, sweep=sweep)
    for row in results["table"]:
        unique = row["unique detectors (sum over conv layers)"]
        typer.echo(f"{row['model']:13s} {row['regularizer']:13s} unique {unique:>14s}"
                   f"  acc {row['test accuracy']}  paper {row['paper (Places365)']}")
    typer.echo(f"wrote {Path(out) / 'results.json'} and {Path(out) / 'report.html'}")


@reproduce_app.command("correction")
def correction(
    out: Path = typer.Option(Path("runs/correction"), help="Output directory."),
    fast: bool = typer.Option(False, help="Smaller data and fewer epochs."),
    rare_class: str = typer.Option("red square", help="Class made rare in training."),
    concept: str = typer.Option("red", help="The concept the remarks name."),
    device: str = typer.Option("auto"),
    seed: int = typer.Option(0),
) -> None:
    """Correct a classifier trained with a rare class through its dissection-named units."""
    from semlens.experiments.correction import ImageCorrectionConfig, correction_sections, run_image_correction
    from semlens.report import Report

    opts = {"rare_class": rare_class, "concept": concept, "device": device, "seed": seed}
    cfg = ImageCorrectionConfig.fast(**opts) if fast else ImageCorrectionConfig(**opts)
    with user_errors():
        res = run_image_correction(out, cfg)
    rep = Report(title="semlens: correction through named units")
    for s in correction_sections(res, f"Correcting a classifier trained with '{rare_class}' rare"):
        rep.add(s)
    rep.write(out / "report.html")
    typer.echo(json.dumps({k: v for k, v in res.items() if k != "config"}, indent=2))


@reproduce_app.command("dong")
def dong(
    out: Path = typer.Option(..., help="Output directory: results.json, report.html, models, topics."),
    seeds: int = typer.Option(3, help="Number of seeds (0..seeds-1) per model."),
    fast: bool = typer.Option(False, "--fast", help="Small clips set and model, few epochs (minutes on CPU)."),
    device: str = typer.Option("auto", help="'auto', 'cpu' or 'cuda'."),
) -> None:
    """Dong et al. 2017: LSTM-B vs LSTM-I on the built-in clips (captioning, selectivity, transfer)."""
    from semlens.experiments.dong import run_dong

    if seeds < 1:
        raise typer.BadParameter("--seeds must be >= 1")
    with user_errors():
        run_dong(out, seeds=seeds, fast=fast, device=device, log=typer.echo)
    typer.echo(f"wrote {Path(out) / 'results.json'} and {Path(out) / 'report.html'}")


@reproduce_app.command("xnn")
def xnn(
    out: Path = typer.Option(..., help="Output directory (results.json, table.md, runs/)."),
    seeds: int = typer.Option(3, help="Embedding seeds."),
    k: int = typer.Option(5, help="x-features per embedding."),
    fast: bool = typer.Option(False, help="Smoke run: 1 seed, small data, 2 epochs."),
    device: str = typer.Option("cpu", help="'cpu' or 'cuda'."),
    layers: str = typer.Option("", help="Comma-separated subset of the layers (default: features.relu5,"
                                        "classifier.relu7)."),
    methods: str = typer.Option("", help="Comma-separated subset of srae,srae-ica,srae-joint,topk,nmf,pca "
                                         "(default: all)."),
) -> None:
    """SRAE vs TopK SAE vs NMF vs PCA on the concept world (alexnet-like, last conv and penultimate layer)."""
    from dataclasses import replace

    from semlens.experiments.xnn import XNNConfig, markdown_table, run_xnn

    with user_errors():
        cfg = XNNConfig.fast(str(out)) if fast else XNNConfig(out=str(out), seeds=tuple(range(seeds)))
        cfg = replace(cfg, k=k, device=device)
        for name, value, allowed in (("layers", layers, cfg.layers), ("methods", methods, cfg.methods)):
            chosen = tuple(v.strip() for v in value.split(",") if v.strip())
            unknown = [v for v in chosen if v not in allowed]
            if unknown:
                raise ValueError(f"--{name}: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(allowed)}")
            if chosen:
                cfg = replace(cfg, **{name: chosen})
        result = run_xnn(cfg)
    typer.echo(markdown_table(result["summary"]))


@reproduce_app.command("maximize")
def maximize(
    out: Path = typer.Option(..., help="Output directory (results.json, tables.md, prototypes.npz, caches)."),
    fast: bool = typer.Option(False, help="Tiny smoke-test version (minutes less, numbers meaningless)."),
    steps: int = typer.Option(None, help="Optimisation steps per configuration (default 192)."),
) -> None:
    """Activation maximization on the concept world: variants × parameterisations, and slide (d)."""
    from dataclasses import replace

    from semlens.experiments.maximize_eval import MaxEvalConfig, markdown_tables, run_maximize_eval

    with user_errors():
        cfg = MaxEvalConfig.fast() if fast else MaxEvalConfig()
        if steps is not None:
            cfg = replace(cfg, steps=steps)
        results = run_maximize_eval(out, cfg)
    typer.echo(markdown_tables(results))


def register(app: typer.Typer) -> None:
    app.add_typer(reproduce_app, name="reproduce")
