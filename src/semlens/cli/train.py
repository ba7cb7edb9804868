"""``semlens train``: train a reference CNN on a Broden-format concept-world dataset."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from semlens.cli._common import user_errors


def _echo_epoch(epochs: int):
    def echo(record: dict) -> None:
        val = f", val acc {record['val_acc']:.3f}" if "val_acc" in record else ""
        typer.echo(f"epoch {record['epoch']}/{epochs}: loss {record['loss']:.4f}, train acc "
                   f"{record['train_acc']:.3f}{val} ({record['seconds']:.1f}s)")

    return echo


def register(app: typer.Typer) -> None:
    @app.command()
    def train(
        model: str = typer.Option("alexnet-like", help="Built-in model name or package.module:factory."),
        data: Path = typer.Option(..., help="Broden-format directory written by 'semlens data concepts'."),
        out: Path = typer.Option(..., help="Output directory: model.safetensors, history.json, checkpoints/."),
        epochs: int = typer.Option(10, help="Training epochs."),
        batch_size: int = typer.Option(64, help="Batch size."),
        lr: float = typer.Option(2e-3, help="Learning rate."),
        optimizer: str = typer.Option("adam", help="'adam' or 'sgd'."),
        weight_decay: float = typer.Option(0.0, help="Weight decay."),
        schedule: str = typer.Option("cosine", help="Learning-rate schedule: 'constant' or 'cosine'."),
        width: float = typer.Option(1.0, help="Channel width multiplier of the built-in models."),
        seed: int = typer.Option(0, help="Random seed (weights and batch order)."),
        device: str = typer.Option("auto", help="'auto', 'cpu' or 'cuda'."),
        checkpoint_every: int = typer.Option(0, help="Also checkpoint every N steps (0 = per epoch only)."),
        overwrite: bool = typer.Option(False, help="Write into a non-empty OUT that semlens did not create."),
    ) -> None:
        """Train MODEL on the classification task of DATA (split 'train'; accuracy on split 'val').

        Interrupted runs resume from OUT/checkpoints when started again with the same arguments.
        Data parallel: "torchrun --nproc_per_node=N -m semlens.cli.main train ..." splits every batch
        over N processes (same batches, same result up to float rounding); rank 0 writes the outputs.
        """
        import torch
        from torch.utils.data import TensorDataset

        from semlens import distributed
        from semlens.models import build_model
        from semlens.models.registry import accepted_kwargs, resolve_factory
        from semlens.outputs import OutputDir
        from semlens.train import TrainConfig, Trainer
        from semlens.world import BrodenDataset

        with user_errors(), distributed.session():
            if distributed.rank() == 0:  # checks OUT; kept on failure: its checkpoints resume the run
                OutputDir(out, inputs=[data], overwrite=overwrite, cleanup=False).open()
            ds = BrodenDataset(data, categories=[])
            if ds.task_labels is None:
                raise ValueError(f"{data} has no task.csv: not a concept-world dataset with class labels")
            x_tr, y_tr = ds.load_task("train")
            val = TensorDataset(*ds.load_task("val")) if "val" in ds.splits else None
            kwargs = {"num_classes": len(ds.class_names), "image_size": ds.image_size[0]}
            if ":" not in model:
                kwargs["width"] = width
            torch.manual_seed(seed)
            kwargs = accepted_kwargs(resolve_factory(model), kwargs)  # what the weights' config records
            net = build_model(model, **kwargs)
            cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer,
                              weight_decay=weight_decay, lr_schedule=schedule, seed=seed, device=device,
                              checkpoint_every=checkpoint_every or None)
            config = {"model": model, "model_kwargs": kwargs, "class_names": ds.class_names, "data": str(data)}
            trainer = Trainer(net, TensorDataset(x_tr, y_tr), val, cfg, checkpoint_dir=out / "checkpoints",
                              model_config=config)
            trainer.on_epoch = _echo_epoch(epochs)
            history = trainer.fit()
            path = trainer.save(out / "model.safetensors")  # rank 0 only under torchrun
            if distributed.rank() == 0:
                (out / "history.json").write_text(json.dumps(history, indent=2))
                last = history[-1] if history else {}
                procs = f" ({distributed.world_size()} processes)" if distributed.is_distributed() else ""
                typer.echo(f"wrote {path}{procs}; train acc {last.get('train_acc', float('nan')):.3f}, "
                           f"val acc {last.get('val_acc', float('nan')):.3f}")
