"""The ASGI app behind ``semlens serve``: server-rendered pages over a correction project.

Every page has a stable deep link under ``/v/<version>/``; pages read stored artefacts (dissection tables,
the feedback store, the version's weights) and at most run the model on the one sample shown.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import jinja2
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from semlens.correct.store import FeedbackStoreError
from semlens.serve.jobs import ApplyBusy, ApplyRunner
from semlens.serve.project_view import NotFound, ProjectView
from semlens.serve.security import CSRF_COOKIE, Forbidden, TokenAndSizeMiddleware, check_csrf, csrf_token
from semlens.serve.unit_media import CONCEPT_RGB, REGION_RGB

__all__ = ["create_app"]

HERE = Path(__file__).resolve().parent
HEATMAP_SIDE = 224  # px: heatmaps are upscaled (nearest neighbour) to at least this long side


def media_colour(rgb: tuple[int, int, int]) -> str:
    """CSS hex of an outline colour."""
    return "#" + "".join(f"{c:02x}" for c in rgb)


def _int(value: str, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise NotFound(f"{what} must be a number, got {value!r}") from None


def _float(value: Any, what: str, default: float) -> float:
    if value in (None, ""):
        return default
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number, got {value!r}") from None


class Pages:
    """Route handlers; ``view`` holds the project, ``runner`` the background apply."""

    def __init__(self, view: ProjectView) -> None:
        self.view = view
        self.runner = ApplyRunner(view)
        env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(HERE / "templates")), autoescape=True)
        self.templates = Jinja2Templates(env=env)  # autoescape: every user string is shown as text

    # ---- helpers ------------------------------------------------------------------------------------------
    def render(self, request: Request, name: str, status: int = 200, **context: Any) -> Response:
        version = context.get("version")
        context.update(view=self.view, request=request, csrf=csrf_token(request), runner=self.runner,
                       current=self.view.current_version(), v=version.id if version is not None else None)
        response = self.templates.TemplateResponse(request, name, context, status_code=status)
        new = request.state.__dict__.get("new_csrf")
        if new:
            response.set_cookie(CSRF_COOKIE, new, httponly=True, samesite="strict")
        return response

    def version_of(self, request: Request) -> Any:
        return self.view.version(_int(request.path_params["version"], "version"))

    async def form(self, request: Request) -> dict[str, str]:
        try:
            form = await request.form()
        except Exception as err:  # malformed body
            raise ValueError(f"malformed form: {err}") from err
        data = {k: v for k, v in form.items() if isinstance(v, str)}
        check_csrf(request, data.get("csrf"))
        return data

    # ---- pages --------------------------------------------------------------------------------------------
    async def index(self, request: Request) -> Response:
        return RedirectResponse(f"/v/{self.view.current_version().id}/", status_code=303)

    async def overview(self, request: Request) -> Response:
        version = self.version_of(request)
        return self.render(request, "overview.html", version=version, layers=self.view.layers(),
                           versions=self.view.versions(), remarks=self.view.remarks(),
                           samples=self.view.sample_ids(limit=48))

    async def layer(self, request: Request) -> Response:
        version = self.version_of(request)
        name = request.path_params["layer"]
        q = request.query_params
        min_iou = _float(q.get("min_iou"), "min_iou", 0.0)
        units = self.view.units(name, q.get("concept", ""), q.get("category", ""), min_iou)
        layer = self.view.layer(name)
        return self.render(request, "layer.html", version=version, layer=layer, units=units,
                           concept=q.get("concept", ""), category=q.get("category", ""), min_iou=min_iou,
                           thumbs=self.view.media.top is not None)

    async def unit(self, request: Request) -> Response:
        version = self.version_of(request)
        name = request.path_params["layer"]
        unit = self.view.unit(name, _int(request.path_params["unit"], "unit"))
        sample = request.query_params.get("sample", "")
        if sample:
            self.view.check_sample(sample)
        media = self.view.media
        tops, top_note = media.top_images(name, unit.unit)
        return self.render(request, "unit.html", version=version, unit=unit, layer=self.view.layer(name),
                           threshold=self.view.iou_threshold, sample=sample, tops=tops, top_note=top_note,
                           prototypes=media.prototypes_of(name, unit.unit),
                           xfeatures=media.xfeatures_of(name, unit.unit), media_notes=media.notes_for(name),
                           colours={"concept": media_colour(CONCEPT_RGB), "region": media_colour(REGION_RGB)})

    async def top_image(self, request: Request) -> Response:
        p = request.path_params
        args = (_int(p["version"], "version"), p["layer"], _int(p["unit"], "unit"), _int(p["rank"], "rank"))
        png = self.view.media.cached(args)
        if png is None:  # rendered (a forward pass) off the event loop
            png = await run_in_threadpool(self.view.top_image_png, *args)
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    async def prototype(self, request: Request) -> Response:
        p = request.path_params
        path = self.view.prototype_path(p["layer"], _int(p["unit"], "unit"), _int(p["index"], "prototype"))
        return FileResponse(path, media_type="image/png")

    async def sample(self, request: Request) -> Response:
        version = self.version_of(request)
        sample_id = request.path_params["sample"]
        self.view.check_sample(sample_id)
        from semlens.explain import DEFAULT_METHOD, list_methods

        methods = list(list_methods())
        method = request.query_params.get("method", DEFAULT_METHOD)
        if method not in methods:
            raise ValueError(f"unknown method {method!r}; methods: {', '.join(methods)}")
        others = [w for w in self.view.versions() if w.id != version.id and w.state in ("ready", "undone")]
        compare = request.query_params.get("compare")
        compared = None
        if compare:
            cv = self.view.version(_int(compare, "compare"))
            compared = (cv, self.view.describe(cv.id, sample_id))
        relevant = self.view.relevant_units(version.id, sample_id, method)
        neurons = self.view.topic_neurons(version.id, sample_id)
        references = self.view.reference_captions(sample_id)
        return self.render(request, "sample.html", version=version, sample=sample_id, relevant=relevant,
                           neurons=neurons, references=references,
                           prediction=self.view.describe(version.id, sample_id), methods=methods, method=method,
                           remarks=self.view.remarks(sample_id), concepts=self.view.concepts(), others=others,
                           compared=compared)

    async def sample_image(self, request: Request) -> Response:
        return FileResponse(self.view.image_path(request.path_params["sample"]), media_type="image/png")

    async def heatmap(self, request: Request) -> Response:
        from PIL import Image

        from semlens.explain.heatmap import heatmap_rgb

        version = self.version_of(request)
        method = request.query_params.get("method", "")
        from semlens.explain import DEFAULT_METHOD, list_methods

        method = method or DEFAULT_METHOD
        if method not in list_methods():
            raise NotFound(f"unknown method {method!r}")
        unit = None
        if request.query_params.get("layer"):
            name = request.query_params["layer"]
            unit = (name, self.view.unit(name, _int(request.query_params.get("unit", ""), "unit")).unit)
        rel, _, _ = self.view.relevance(version.id, request.path_params["sample"], method, unit)
        rgb = heatmap_rgb(rel)
        scale = max(1, -(-HEATMAP_SIDE // max(rgb.shape[:2])))
        img = Image.fromarray(rgb).resize((rgb.shape[1] * scale, rgb.shape[0] * scale), Image.NEAREST)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return Response(buf.getvalue(), media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    async def add_remark(self, request: Request) -> Response:
        data = await self.form(request)
        sample_id, missing = data.get("sample", "").strip(), data.get("missing", "").strip()
        if not missing:
            raise ValueError("say which concept or topic the model misses")
        self.view.check_sample(sample_id)
        kind = "missing_concept" if self.view.kind == "classifier" else "missing_topic"
        if missing not in self.view.concepts():
            raise ValueError(f"no named unit carries {missing!r}; choose one of: {', '.join(self.view.concepts())}")
        self.view.project.store.add_remark(sample_id, kind, missing, author=data.get("author") or "web",
                                           text=data.get("text", "")[:2000])
        v = self.view.current_version().id
        return RedirectResponse(f"/v/{v}/sample/{sample_id}", status_code=303)

    async def withdraw(self, request: Request) -> Response:
        await self.form(request)
        rid = _int(request.path_params["remark"], "remark")
        self.view.project.store.withdraw(rid)
        return RedirectResponse(request.headers.get("referer") or "/", status_code=303)

    async def apply(self, request: Request) -> Response:
        data = await self.form(request)
        params = {"mu": _float(data.get("mu"), "mu", 1e-2), "lr": _float(data.get("lr"), "lr", 1e-3),
                  "steps": int(_float(data.get("steps"), "steps", 50))}
        if not self.view.remarks() or not any(r.status == "open" for r in self.view.remarks()):
            raise ValueError("no open remarks to apply")
        try:
            self.runner.start(params)
        except ApplyBusy as err:
            return self.render(request, "message.html", status=409, version=self.view.current_version(),
                               title="Apply refused", message=str(err))
        return RedirectResponse("/apply", status_code=303)

    async def apply_page(self, request: Request) -> Response:
        return self.render(request, "apply.html", version=self.view.current_version(), job=self.runner.job)

    async def apply_status(self, request: Request) -> Response:
        job = self.runner.job
        return JSONResponse(job.as_dict() if job else {"state": "idle"})

    async def undo(self, request: Request) -> Response:
        await self.form(request)
        if self.runner.running:
            raise ValueError("an apply is running; undo when it has finished")
        version = self.view.project.store.undo()
        return RedirectResponse(f"/v/{version.id}/", status_code=303)

    # ---- errors -------------------------------------------------------------------------------------------
    async def error(self, request: Request, exc: Exception) -> Response:
        status, title = 400, "Bad request"
        if isinstance(exc, HTTPException):
            status, title = exc.status_code, "Not found" if exc.status_code == 404 else "Error"
        elif isinstance(exc, NotFound | KeyError):
            status, title = 404, "Not found"
        elif isinstance(exc, Forbidden):
            status, title = 403, "Forbidden"
        elif isinstance(exc, FileNotFoundError):
            status, title = 404, "Missing file"
        elif not isinstance(exc, ValueError | FeedbackStoreError):  # a bug: its traceback goes to the server log
            import traceback

            traceback.print_exception(exc)
            status, title = 500, "Server error"
        if isinstance(exc, HTTPException):
            message = f"no page at {request.url.path}" if exc.status_code == 404 else str(exc.detail)
        else:
            message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
        try:
            version = self.view.current_version()
        except NotFound:
            version = None
        if "text/html" not in request.headers.get("accept", "text/html"):
            return JSONResponse({"error": message}, status_code=status)
        return self.render(request, "message.html", status=status, version=version, title=title, message=message)


def create_app(project_dir: str | Path, *, dissection: str | Path | None = None, token: str | None = None,
               device: str = "cpu") -> Any:
    """The ASGI app serving the project in ``project_dir`` (see :mod:`semlens.serve`)."""
    pages = Pages(ProjectView(project_dir, dissection, device))
    v = "/v/{version}"
    routes = [
        Route("/", pages.index),
        Route(f"{v}/", pages.overview),
        Route(f"{v}/layer/{{layer}}/", pages.layer),
        Route(f"{v}/layer/{{layer}}/unit/{{unit}}", pages.unit),
        Route(f"{v}/layer/{{layer}}/unit/{{unit}}/top/{{rank}}.png", pages.top_image),
        Route(f"{v}/layer/{{layer}}/unit/{{unit}}/prototype/{{index}}.png", pages.prototype),
        Route(f"{v}/sample/{{sample}}", pages.sample),
        Route(f"{v}/sample/{{sample}}/heatmap.png", pages.heatmap),
        Route("/img/sample/{sample}.png", pages.sample_image),
        Route("/remarks", pages.add_remark, methods=["POST"]),
        Route("/remarks/{remark}/withdraw", pages.withdraw, methods=["POST"]),
        Route("/apply", pages.apply, methods=["POST"]),
        Route("/apply", pages.apply_page, methods=["GET"]),
        Route("/apply/status.json", pages.apply_status),
        Route("/undo", pages.undo, methods=["POST"]),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    handlers = {exc: pages.error for exc in (NotFound, KeyError, ValueError, Forbidden, FeedbackStoreError,
                                             HTTPException, FileNotFoundError, Exception)}
    app = Starlette(routes=routes, exception_handlers=handlers)  # type: ignore[arg-type]
    app.state.pages = pages
    return TokenAndSizeMiddleware(app, token=token)
