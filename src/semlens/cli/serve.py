"""``semlens serve``: the local web app over a correction project."""

from __future__ import annotations

from pathlib import Path

import typer

from semlens.cli._common import user_errors


def register(app: typer.Typer) -> None:
    @app.command()
    def serve(
        project: Path = typer.Option(Path("."), "--project", "-p", help="Project directory (holds .semlens/)."),
        dissection: Path = typer.Option(None, help="A `semlens dissect` output directory: layer and unit pages."),
        host: str = typer.Option("127.0.0.1", help="Address to bind; anything but loopback needs --token."),
        port: int = typer.Option(8765, help="Port."),
        token: str = typer.Option(None, help="Access token (required off loopback; open ?token=... once)."),
        device: str = typer.Option("cpu", help="'cpu', 'cuda' or 'auto' for the model of each version."),
    ) -> None:
        """Browse layers, units and samples of PROJECT, add remarks, apply and undo corrections in a browser."""
        from semlens.serve import serve as run

        with user_errors():
            run(project, dissection=dissection, host=host, port=port, token=token, device=device,
                announce=lambda url: typer.echo(f"serving {project} at {url}  (Ctrl-C stops)"))
