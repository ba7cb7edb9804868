"""``semlens evaluate-explanations``: rank explanation methods on a labelled image set with ground truth."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from semlens.cli._common import user_errors

if TYPE_CHECKING:
    import torch


def load_eval_data(path: Path, n: int | None = None, split: str | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Images ``(N, 3, H, W)`` float in [0, 1], labels ``(N,)`` int64, evidence ``(N, H, W)`` bool or None.

    ``path``: a Broden-format directory written by ``semlens data concepts`` (class labels and evidence
    masks from its ``task.csv``), or an ``.npz`` with ``images`` ((N, 3, H, W) float in [0, 1] or uint8),
    ``labels`` and optionally ``evidence`` ((N, H, W)). ``n`` keeps the first ``n`` examples of ``split``.
    """
    import numpy as np
    import torch

    if path.is_file() and path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read {path}: {err}") from err
        missing = [k for k in ("images", "labels") if k not in arrays]
        if missing:
            raise KeyError(f"{path} lacks arrays {missing} (has {sorted(arrays)})")
        images = torch.from_numpy(arrays["images"])
        if images.dtype == torch.uint8:
            images = images.float() / 255
        images = images.float()
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"{path}: images must be (N, 3, H, W), got {tuple(images.shape)}")
        labels = torch.from_numpy(arrays["labels"]).long()
        evidence = torch.from_numpy(arrays["evidence"]).bool() if "evidence" in arrays else None
        keep = slice(0, n)
        return images[keep], labels[keep], None if evidence is None else evidence[keep]
    if not path.is_dir():
        raise FileNotFoundError(f"data not found: {path} (expected a Broden directory or an .npz file)")
    from semlens.world import BrodenDataset

    ds = BrodenDataset(path, categories=[])
    if getattr(ds, "task_labels", None) is None:
        raise FileNotFoundError(f"{path} has no task.csv: class labels and evidence masks are needed")
    idx = ds.split_indices(split) if split else list(range(len(ds)))
    idx = idx[:n] if n else idx
    images = ds.load_batch(idx, categories=[]).images
    evidence = ds.load_evidence(idx)
    if evidence.shape[-2:] != images.shape[-2:]:
        evidence = torch.nn.functional.interpolate(evidence[:, None].float(), size=images.shape[-2:],
                                                   mode="nearest")[:, 0].bool()
    return images, ds.task_labels[idx], evidence


def build_evaluated_model(spec: str | None, weights: Path, num_classes: int | None, image_size: int,
                          fallback_classes: int, device: str = "cpu") -> torch.nn.Module:
    """:func:`semlens.models.load` with the data's class count and image size as defaults (the weights'
    config wins over them; ``num_classes``, when given, wins over both)."""
    from semlens.models import load

    return load(spec, weights, device=device, defaults={"num_classes": fallback_classes, "image_size": image_size},
                num_classes=num_classes)


def register(app: typer.Typer) -> None:
    @app.command("evaluate-explanations")
    def evaluate_explanations(
        model: str = typer.Option(None, help="Built-in model name or package.module:factory (default: the one "
                                             "the weights' config names)."),
        weights: Path = typer.Option(..., help="Weights file (.safetensors, or .pt loaded with weights_only)."),
        data: Path = typer.Option(..., help="Broden directory from `semlens data concepts`, or .npz "
                                            "(images, labels, evidence)."),
        methods: str = typer.Option("gradient,gradient-x-input,epsilon-plus-flat,random",
                                    help="Comma-separated explanation methods ('random' = noise reference)."),
        out: Path = typer.Option(Path("evaluate-out"), help="Output directory (ranking.csv/json, curves, report)."),
        n: int = typer.Option(256, help="Evaluate the first N examples (0 = all)."),
        split: str = typer.Option(None, help="Only this split of a Broden directory (e.g. val)."),
        metrics: str = typer.Option("", help="Comma-separated metrics (default: all)."),
        num_classes: int = typer.Option(None, help="Model classes (default: weights config, else from labels)."),
        patch_size: int = typer.Option(8, help="Perturbation patch size in pixels."),
        baseline: str = typer.Option("uniform", help="Perturbation values: uniform, mean, blur or black."),
        steps: int = typer.Option(None, help="Perturbation steps (default min(100, patches / patches-per-step))."),
        patches_per_step: int = typer.Option(1, help="Patches replaced per perturbation step."),
        batch_size: int = typer.Option(32, help="Examples explained at once."),
        randomization_samples: int = typer.Option(64, help="Examples used by the randomisation check (0 = all)."),
        n_boot: int = typer.Option(1000, help="Bootstrap resamples for the confidence intervals."),
        only_correct: bool = typer.Option(False, help="Rank on correctly predicted examples only."),
        seed: int = typer.Option(0, help="Seed for noise baselines, random orders and the bootstrap."),
        device: str = typer.Option("auto", help="'auto', 'cpu' or 'cuda'."),
        overwrite: bool = typer.Option(False, help="Write into a non-empty OUT that semlens did not create."),
    ) -> None:
        """Evaluate explanation methods on every metric, rank them, write ranking.csv/json and curves."""
        from rich.console import Console
        from rich.table import Table

        from semlens.evaluate.compare import DEFAULT_METRICS, CompareConfig, compare_methods
        from semlens.outputs import OutputDir
        from semlens.report import Report
        from semlens.runtime import resolve_device, seed_everything

        with user_errors(), OutputDir(out, inputs=[weights, data], overwrite=overwrite):
            seed_everything(seed)
            dev = resolve_device(device)
            images, labels, evidence = load_eval_data(data, n or None, split)
            net = build_evaluated_model(model, weights, num_classes or None, images.shape[-1],
                                        int(labels.max()) + 1, device=dev)
            cfg = CompareConfig(
                metrics=tuple(m.strip() for m in metrics.split(",") if m.strip()) or DEFAULT_METRICS,
                patch_size=patch_size, baseline=baseline, steps=steps, patches_per_step=patches_per_step,
                batch_size=batch_size,
                randomization_samples=randomization_samples or None, n_boot=n_boot, seed=seed)
            result = compare_methods(net, images, labels, [m for m in methods.split(",") if m.strip()],
                                     masks=evidence, config=cfg, device=dev)
            paths = result.write(out, only_correct=only_correct)
            report = Report(title="semlens: explanation quality")
            for sec in result.sections():
                report.add(sec)
            paths["html"] = report.write(out / "report.html")
        rows = result.table(only_correct)
        table = Table(title=f"explanation methods ranked ({result.n} examples)")
        shown = [m for m in cfg.rank_by if m in result.metrics]
        for col in ["rank", "method", "mean rank", *shown]:
            table.add_column(col, no_wrap=col == "method")
        for r in rows:
            mean_rank = "-" if r["mean_rank"] is None else f"{r['mean_rank']:.2f}"
            table.add_row(str(r["rank"]), r["method"], mean_rank,
                          *[f"{r[m]:.3f} [{r[m + '_lo']:.3f}, {r[m + '_hi']:.3f}]" for m in shown])
        Console().print(table)
        for key, path in paths.items():
            typer.echo(f"wrote {key}: {path}")
