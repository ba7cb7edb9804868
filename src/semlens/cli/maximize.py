"""``semlens maximize``: activation maximization (prototypes of units); ``maximize fit-prior`` and
``maximize fit-judge``."""

from __future__ import annotations

from pathlib import Path

import typer

from semlens.cli._common import err_console, user_errors


def register(app: typer.Typer) -> None:
    group = typer.Typer(help="Prototypes of units by activation maximization (plain, expert, code).",
                        add_completion=False)

    @group.callback(invoke_without_command=True)
    def maximize(
        ctx: typer.Context,
        model: str = typer.Option(None, help="Built-in model name or package.module:factory."),
        weights: Path = typer.Option(None, help=".safetensors (config's model_kwargs are used) or .pt weights."),
        layer: str = typer.Option(None, help="Dotted layer name ('' or 'output' for the logits)."),
        units: str = typer.Option("0-7", help="Unit indices, e.g. 0-63 or 1,4,9."),
        data: Path = typer.Option(None, help="Images: Broden-format directory or (N,C,H,W) .npy (statistics, "
                                             "data mean, dataset maxima, self-checks)."),
        variant: str = typer.Option("plain", help="plain | expert | code."),
        prior: Path = typer.Option(None, help="Prior from `semlens maximize fit-prior` (expert and code variants)."),
        param: str = typer.Option("pixel", help="pixel | fourier | maco (image variants)."),
        objective: str = typer.Option("channel", help="channel (mean over space) | neuron (centre) | class."),
        lam: float = typer.Option(None, help="λ of the penalty / expert / code prior (default: plain 0.1/D, "
                                  "expert 0.1/D with D = C·H·W, code 1e-4)."),
        steps: int = typer.Option(256, help="Optimisation steps."),
        lr: float = typer.Option(0.05, help="Adam learning rate (cosine-decayed)."),
        seeds: int = typer.Option(1, help="Seeds per unit (the best one is kept)."),
        views: int = typer.Option(4, help="Augmented views per step (0 = none)."),
        names: Path = typer.Option(None, help="Dissection units.csv: adds concept, concept_hit (1/0) and concept_score "
                                              "columns (colour units; every named unit with --judge)."),
        judge: Path = typer.Option(None, help="Judge from `semlens maximize fit-judge`: scores the non-colour units "
                                              "named in --names."),
        limit: int = typer.Option(2000, help="At most this many images of DATA."),
        out: Path = typer.Option(None, help="Output directory: prototypes.npy, unit PNGs, summary.csv."),
        device: str = typer.Option("auto", help="'auto', 'cpu' or 'cuda'."),
        random_init: bool = typer.Option(False, "--random-init", help="Allow a model without --weights (untrained)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Write into a non-empty directory semlens did not "
                                                                  "create."),
    ) -> None:
        """Maximise UNITS of LAYER: writes OUT/prototypes.npy (U,C,H,W), one PNG per unit, OUT/summary.csv."""
        if ctx.invoked_subcommand is not None:
            return
        missing = [n for n, v in (("--layer", layer), ("--data", data), ("--out", out)) if v is None]
        if missing:
            err_console().print(f"[bold red]error:[/] missing option(s) {', '.join(missing)} "
                              "(see `semlens maximize --help`)", highlight=False)
            raise typer.Exit(code=2)
        from semlens.maximize.pipeline import maximize_job
        from semlens.maximize.run import MaximizeConfig, parse_units
        from semlens.models import load
        from semlens.outputs import OutputDir
        from semlens.runtime import resolve_device

        inputs = [p for p in (data, weights, prior, names, judge) if p is not None]
        with user_errors(), OutputDir(out, inputs=inputs, overwrite=overwrite):
            cfg = MaximizeConfig(variant=variant, param=param, kind=objective, lam=lam, steps=steps, lr=lr,
                                 seeds=seeds, views=views, augment=views > 0)
            dev = resolve_device(device)
            net = load(model, weights, device=dev, random_init=random_init)
            name = "" if layer == "output" else layer
            paths = maximize_job(net, name, parse_units(units), data, out, cfg, prior, names, limit, dev,
                                 judge_path=judge)
            typer.echo(f"wrote {paths['prototypes']} and {paths['summary']}")

    @group.command("fit-prior")
    def fit_prior(
        data: Path = typer.Option(..., help="Images: Broden-format directory or (N,C,H,W) .npy."),
        kind: str = typer.Option(..., help="gaussian | gmm | rbm | vae | gan."),
        out: Path = typer.Option(..., help="Output .safetensors file (with its JSON config)."),
        limit: int = typer.Option(None, help="At most this many images."),
        epochs: int = typer.Option(None, help="Training epochs (rbm: default 20; vae, gan: default as many as make "
                                   "4,000 optimiser steps)."),
        seed: int = typer.Option(0, help="Random seed."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT file."),
    ) -> None:
        """Fit a density expert or a generator on DATA, for `semlens maximize --variant expert|code`."""
        from semlens.maximize.pipeline import fit_prior_job

        with user_errors():
            opts = {"epochs": epochs} if epochs is not None and kind in ("rbm", "vae", "gan") else {}
            path = fit_prior_job(data, kind, out, limit, seed, overwrite, **opts)
            typer.echo(f"wrote {path}")

    @group.command("fit-judge")
    def fit_judge(
        data: Path = typer.Option(..., help="Broden-format directory with pixel masks (e.g. `semlens data concepts`)."),
        out: Path = typer.Option(..., help="Output .safetensors file (weights, concept vocabulary, input shape, "
                                           "channel statistics)."),
        epochs: int = typer.Option(3, help="Training epochs."),
        limit: int = typer.Option(None, help="At most this many images (the first ones)."),
        seed: int = typer.Option(0, help="Random seed (initialisation and batch order)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT file."),
    ) -> None:
        """Fit a concept judge on DATA's masks (resnet-small, width 0.5), for `semlens maximize --names ... --judge`."""
        from semlens.maximize.pipeline import fit_judge_job

        with user_errors():
            judge = fit_judge_job(data, out, epochs=epochs, limit=limit, seed=seed, overwrite=overwrite)
            loss = f"{judge.losses[-1]:.4f}" if judge.losses else "n/a"
            typer.echo(f"wrote {out}: judge of {len(judge.concepts)} concepts on {judge.shape[1]}×{judge.shape[2]} "
                       f"images (last training loss {loss})")

    app.add_typer(group, name="maximize")
