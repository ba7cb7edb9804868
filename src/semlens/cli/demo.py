"""``semlens demo``: run the whole pipeline on built-in data and write an HTML report."""

from __future__ import annotations

from pathlib import Path

import typer

from semlens.cli._common import user_errors


def register(app: typer.Typer) -> None:
    @app.command()
    def demo(
        out: Path = typer.Option(Path("demo-out"), help="Output directory for report.html and artifacts."),
        device: str = typer.Option("auto", help="'auto', 'cpu' or 'cuda'."),
        seed: int = typer.Option(0, help="Random seed for data generation and training."),
        only: list[str] = typer.Option(None, help="Run only steps whose name contains this word (repeatable)."),
    ) -> None:
        """Run every capability on built-in data (fast settings) and write OUT/report.html."""
        from semlens.experiments.demo import run_demo

        with user_errors():
            path = run_demo(out, device=device, seed=seed, only=only or None)
        typer.echo(f"wrote {path}")
