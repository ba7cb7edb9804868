"""``semlens embed``: explanation embeddings (SRAE / XNN and baselines) from the shell; thin layer over
:mod:`semlens.embed.pipeline`."""

from __future__ import annotations

from pathlib import Path

import typer

from semlens.cli._common import user_errors

embed_app = typer.Typer(name="embed", help="Explain decisions by a few x-features (SRAE / XNN) with heatmaps.",
                        no_args_is_help=True)


@embed_app.command()
def fit(
    model: str = typer.Option(None, help="Built-in model name or package.module:factory (default: the one the "
                              "weights' config names)."),
    weights: Path = typer.Option(..., help=".safetensors (config's model_kwargs are used) or .pt weights."),
    layer: str = typer.Option(..., help="Dotted layer name (conv maps are average-pooled)."),
    data: Path = typer.Option(..., help="Concept-world Broden directory with task.csv ('semlens data concepts')."),
    out: Path = typer.Option(..., help="Output directory: embedding.safetensors/.json, metrics.json, xfeatures.csv."),
    target: str = typer.Option("all", help="Class index, comma-separated indices, or 'all'."),
    k: int = typer.Option(5, help="Number of x-features."),
    method: str = typer.Option("srae", help="srae, topk, nmf or pca."),
    mode: str = typer.Option("one-vs-all", help="SRAE setting: one-vs-all (one SRAE per class) or joint."),
    epochs: int = typer.Option(20, help="Fine-tuning epochs per acceptance round (SRAE) / epochs (TopK)."),
    init: str = typer.Option("pretrain", help="SRAE start: pretrain (the paper's layer-wise pretraining) or ica "
                             "(x-features start on the layer's independent components that carry the decision)."),
    seed: int = typer.Option(0, help="Random seed."),
    batch_size: int = typer.Option(128, help="Images per forward batch."),
    per_class: int = typer.Option(8, help="Held-out images per class for heatmap metrics."),
    device: str = typer.Option("auto", help="'auto', 'cpu' or 'cuda'."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a non-empty directory semlens did not "
                                                              "create."),
) -> None:
    """Fit an explanation embedding on DATA's training images and evaluate it on held-out images."""
    from semlens.embed.pipeline import fit_embedding_job
    from semlens.models import load, weights_config
    from semlens.outputs import OutputDir
    from semlens.runtime import resolve_device

    with user_errors(), OutputDir(out, inputs=[data, weights], overwrite=overwrite):
        dev = resolve_device(device)
        net = load(model, weights, device=dev)
        name = model or weights_config(weights).get("model", "")
        m = fit_embedding_job(net, name, layer, data, out, target=target, k=k, method=method, mode=mode,
                              epochs=epochs, seed=seed, batch_size=batch_size, per_class=per_class, device=str(dev),
                              init=init)
        typer.echo(f"wrote {out}: R2 {m['r2']:.3f}, FVE {m['fve']:.3f}, L0 {m['l0']:.2f}, "
                   f"concept recovery {m['recovery']:.2f}")


@embed_app.command()
def explain(
    embedding: Path = typer.Option(..., help="Directory written by 'semlens embed fit'."),
    model: str = typer.Option(None, help="Built-in model name or package.module:factory, as at fit time "
                              "(default: the one the weights' config names)."),
    weights: Path = typer.Option(..., help="Model weights."),
    input: list[Path] = typer.Option(..., "--input", help="Image file(s) (.png, ...) or .npy arrays."),  # noqa: A002
    out: Path = typer.Option(..., help="Output directory: <stem>.png and <stem>.json per input."),
    target: int = typer.Option(None, help="Class to explain (default: the model's prediction)."),
    rule: str = typer.Option("epsilon-gamma-box", help="Heatmap method (an LRP preset name; excitation-backprop as "
                             "in the paper: conservative, but the x-features' maps come out alike)."),
    device: str = typer.Option("auto", help="'auto', 'cpu' or 'cuda'."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a non-empty directory semlens did not "
                                                              "create."),
) -> None:
    """The decision on each input as a sum of x-feature contributions, each with its heatmap."""
    from semlens.embed.pipeline import explain_job
    from semlens.models import load, weights_config
    from semlens.outputs import OutputDir
    from semlens.runtime import resolve_device

    with user_errors(), OutputDir(out, inputs=[embedding, weights, *input], overwrite=overwrite):
        dev = resolve_device(device)
        net = load(model, weights, device=dev)
        name = model or weights_config(weights).get("model", "")
        res = explain_job(net, name, embedding, input, out, target=target, method=rule, device=str(dev))
        typer.echo(f"wrote {len(res)} explanation(s) to {out}")


def register(app: typer.Typer) -> None:
    app.add_typer(embed_app, name="embed")
