"""``semlens explain``: heatmaps for single predictions from the shell (thin layer over
:func:`semlens.explain.files.explain_files`)."""

from __future__ import annotations

from pathlib import Path

import typer

from semlens.cli._common import user_errors


def _floats(text: str | None, flag: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        from semlens.errors import UserInputError

        raise UserInputError(f"{flag} {text!r}: expected comma-separated numbers (e.g. 0.485,0.456,0.406)") from None


def register(app: typer.Typer) -> None:
    @app.command()
    def explain(
        inputs: list[Path] = typer.Argument(None, help="More input files (after --input)."),
        model: str = typer.Option(None, "--model", help="Built-in model name or package.module:factory "
                                                        "(default: the one the weights' config names)."),
        weights: Path = typer.Option(None, "--weights", help=".safetensors or .pt weights (loaded safely)."),
        random_init: bool = typer.Option(False, "--random-init", help="Explain an untrained model on purpose."),
        input_: list[Path] = typer.Option(None, "--input", help="Image file or .npy (C,H,W)/(N,C,H,W); repeatable."),
        method: str = typer.Option("epsilon-plus-flat", "--method", help="Attribution method (see --list-methods)."),
        param: list[str] = typer.Option(None, "--param", help="Rule parameter NAME=VALUE (epsilon, gamma); "
                                                              "repeatable."),
        target: str = typer.Option("pred", "--target", help="Class index to explain, or 'pred' (predicted class)."),
        out: Path = typer.Option(Path("explain-out"), "--out", help="Output directory for X.npy and X.png."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Write into a non-empty directory semlens "
                                                                  "did not create."),
        mean: str = typer.Option(None, "--mean", help="Per-channel input mean, e.g. 0.485,0.456,0.406 (default: "
                                                      "the weights' config)."),
        std: str = typer.Option(None, "--std", help="Per-channel input std (default: the weights' config)."),
        low: float = typer.Option(None, "--low", help="z^B lower input bound (default: the batch minimum)."),
        high: float = typer.Option(None, "--high", help="z^B upper input bound (default: the batch maximum)."),
        size: int = typer.Option(224, "--size", help="Heatmaps are upscaled (nearest neighbour) to at least this "
                                                     "many pixels on the long side."),
        colorbar: bool = typer.Option(False, "--colorbar", help="Add a colour bar to each heatmap."),
        overlay: bool = typer.Option(False, "--overlay", help="Blend the heatmap over the input image."),
        layer: str = typer.Option(None, "--layer", help="Read relevance at this layer's output instead."),
        device: str = typer.Option("auto", "--device", help="'auto', 'cpu' or 'cuda'."),
        list_methods_: bool = typer.Option(False, "--list-methods", help="List the attribution methods and exit."),
    ) -> None:
        """Explain a model's predictions: relevance X.npy (float32) and one heatmap PNG per sample of input X."""
        from semlens.explain import list_methods

        if list_methods_:
            for name, desc in list_methods().items():
                typer.echo(f"{name:28s} {desc}")
            return
        with user_errors():
            from semlens.errors import UserInputError
            from semlens.explain.files import ExplainOptions, explain_files, parse_params
            from semlens.models import load, stored_preprocessing, weights_config
            from semlens.outputs import OutputDir

            files = list(input_ or []) + list(inputs or [])
            if not files:
                raise UserInputError("no input given: pass --input PATH (image or .npy)")
            if method not in list_methods():
                raise UserInputError(f"unknown method {method!r}; run `semlens explain --list-methods`")
            if target != "pred" and not target.lstrip("-").isdigit():
                raise UserInputError(f"--target must be a class index or 'pred', got {target!r}")
            stored = stored_preprocessing(weights) or (None, None)
            opts = ExplainOptions(
                method=method, target=target if target == "pred" else int(target),
                params=parse_params(method, param or []), low=low, high=high, layer=layer,
                mean=_floats(mean, "--mean") or stored[0], std=_floats(std, "--std") or stored[1],
                image_size=weights_config(weights).get("model_kwargs", {}).get("image_size"),
                min_side=size, colorbar=colorbar, overlay=overlay)
            net = load(model, weights, device=device, random_init=random_init)
            with OutputDir(out, inputs=files + ([weights] if weights else []), overwrite=overwrite) as od:
                explain_files(net, files, od, opts, echo=typer.echo)
