"""A local web app to browse what a model learned and to correct it (``semlens serve``).

Server-rendered pages (Starlette + Jinja2, served by uvicorn) over a correction project: layers and units
named by dissection, samples with their prediction and heatmaps, remarks, background ``apply`` with live
progress, undo, and before/after comparisons. Everything is read from stored artefacts and the feedback
store; nothing is fetched from outside the machine (styles and script are vendored in the package).

    from semlens.serve import create_app, serve
    serve("my-project", dissection="runs/dissect")     # http://127.0.0.1:8765/
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from semlens.serve.app import create_app
from semlens.serve.security import check_bind

__all__ = ["create_app", "serve"]


def serve(project_dir: str | Path, *, dissection: str | Path | None = None, host: str = "127.0.0.1",
          port: int = 8765, token: str | None = None, device: str = "cpu",
          announce: Callable[[str], None] | None = None) -> None:
    """Serve the project until interrupted; refuses a non-loopback ``host`` without ``token``.

    ``announce(url)`` is called once the project has been opened (a bad project raises before it)."""
    import uvicorn

    check_bind(host, token)
    app = create_app(project_dir, dissection=dissection, token=token, device=device)
    if announce is not None:
        announce(f"http://{host}:{port}/" + (f"?token={token}" if token else ""))
    uvicorn.run(app, host=host, port=port, log_level="warning")
