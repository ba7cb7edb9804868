"""``semlens dissect``: Network Dissection of chosen layers over a Broden-format dataset."""

from __future__ import annotations

import shutil
from pathlib import Path

import typer

from semlens.cli._common import user_errors


def register(app: typer.Typer) -> None:
    @app.command()
    def dissect(
        model: str = typer.Option(None, help="Built-in model name or package.module:factory (default: the one "
                                             "the weights' config names)."),
        data: Path = typer.Option(..., help="Broden-format directory (index.csv, images/, label.csv, ...)."),
        layers: str = typer.Option(..., help="Comma-separated dotted layer names, or 'all-conv' for the "
                                             "model's conv_layers."),
        out: Path = typer.Option(..., help="Output directory: units.csv, layers.csv, dissection.json, "
                                 "unit_names.safetensors (for `semlens feedback init`), top_images.safetensors "
                                 "(for `semlens serve`'s unit cards), report.html."),
        weights: Path = typer.Option(None, help=".safetensors (config's model_kwargs are used) or .pt weights."),
        random_init: bool = typer.Option(False, help="Dissect an untrained model on purpose (no --weights)."),
        batch_size: int = typer.Option(32, help="Images per batch."),
        device: str = typer.Option("auto", help="'auto', 'cpu' or 'cuda'."),
        quantile: float = typer.Option(0.005, help="Top activation quantile defining each unit's threshold."),
        iou_threshold: float = typer.Option(0.04, help="A unit is a detector when its best IoU exceeds this."),
        categories: str = typer.Option(None, help="Comma-separated categories (default: all in the dataset)."),
        split: str = typer.Option(None, help="Only images of this split (index.csv 'split' column)."),
        resume: bool = typer.Option(False, help="Continue an interrupted run from OUT/.checkpoint."),
        cards: int = typer.Option(6, help="Unit cards in the report (0 = none)."),
        overwrite: bool = typer.Option(False, help="Write into a non-empty OUT that semlens did not create."),
        workers: int = typer.Option(None, help="CPU: batches processed side by side, one intra-op thread each "
                                               "(default: torch's thread count; 1 = one batch at a time)."),
    ) -> None:
        """Label every unit of LAYERS with its best-matching concept (IoU) and count unique detectors.

        Under "torchrun --nproc_per_node=N" each process dissects a shard; rank 0 writes the outputs.
        """
        from semlens import distributed
        from semlens.models import load
        from semlens.outputs import OutputDir
        from semlens.report import Report
        from semlens.runtime import resolve_device
        from semlens.units.dissect import dissect as run
        from semlens.units.dissect_report import dissection_sections
        from semlens.world import BrodenDataset

        with user_errors(), distributed.session():
            dev = resolve_device(device)
            net = load(model, weights, device=dev, random_init=random_init)
            names = layers
            if layers.strip() == "all-conv":
                names = getattr(net, "conv_layers", None)
                if not names:
                    raise ValueError(f"model {model!r} has no conv_layers attribute; list the layers explicitly")
            if distributed.rank() == 0:  # checks OUT; kept on failure: .checkpoint resumes the run
                OutputDir(out, inputs=[data] + ([weights] if weights else []), overwrite=overwrite,
                          cleanup=False).open()
            ds = BrodenDataset(data)
            indices = ds.split_indices(split) if split else None
            ckpt = out / ".checkpoint"
            if distributed.rank() == 0 and ckpt.exists() and not resume:
                shutil.rmtree(ckpt)
            distributed.barrier()
            cats = [c.strip() for c in categories.split(",")] if categories else None
            result = run(net, ds, names, quantile=quantile, iou_threshold=iou_threshold, batch_size=batch_size,
                         device=dev, categories=cats, checkpoint=ckpt, indices=indices, workers=workers)
            if distributed.rank() == 0:
                paths = result.save(out)
                report = Report(title=f"Network Dissection of {model or type(net).__name__}")
                for section in dissection_sections(result, net, ds, cards=cards):
                    report.add(section)
                report.write(out / "report.html")
                shutil.rmtree(ckpt, ignore_errors=True)
                for row in result.layer_rows():
                    typer.echo(f"{row['layer']}: {row['unique_detectors']} unique detectors, "
                               f"{row['detectors']}/{row['units']} detector units")
                typer.echo(f"wrote {paths['units']}, {paths['layers']}, {paths['names']}, {paths['top_images']}, "
                           f"{out / 'report.html'}")
