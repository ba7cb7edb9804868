"""The report document model and its HTML writer."""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

__all__ = ["Report", "Section", "close_figure", "figure_to_data_uri", "subplots", "table_html", "format_mean_std"]


def subplots(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float] | None = None, **kwargs: Any
             ) -> tuple[Any, Any]:
    """A matplotlib ``(Figure, axes)`` like ``pyplot.subplots``, made without pyplot: no backend is chosen and
    no global figure registry is touched (PNG output renders with Agg when saved)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def figure_to_data_uri(fig: Any, dpi: int = 110) -> str:
    """Render a matplotlib figure to a ``data:image/png;base64,...`` URI (a pyplot figure is closed)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    close_figure(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def close_figure(fig: Any) -> None:
    """Release a figure made by pyplot (figures from :func:`subplots` need nothing); pyplot is not imported."""
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is not None:
        plt.close(fig)


def _fmt(value: Any, digits: int) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


_INTERVAL = re.compile(r"^(\S+) (\[[^\]]+\])$")


def _cell(value: Any, digits: int) -> str:
    """A table cell's HTML: ``"0.52 [0.48, 0.55]"`` shows the interval on a second, smaller line."""
    text = _fmt(value, digits)
    m = _INTERVAL.match(text)
    if m:
        return f"{html.escape(m.group(1))}<br><span class='ci'>{html.escape(m.group(2))}</span>"
    if len(text) <= 40 and not any(ch.isspace() for ch in text):  # a name: never broken at its hyphens
        return f"<span class='nw'>{html.escape(text)}</span>"
    return html.escape(text)


def _header(name: Any) -> str:
    """Readable column names: ``relevance_mass_accuracy`` -> ``relevance mass accuracy``."""
    return html.escape(str(name).replace("_", " "))


def table_html(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, digits: int = 3) -> str:
    """An HTML table from a list of dicts (column order from ``columns`` or the first row), in a box that
    scrolls sideways on its own when the table is wider than the page."""
    if not rows:
        return "<p><em>(no rows)</em></p>"
    cols = list(columns or rows[0].keys())
    head = "".join(f"<th>{_header(c)}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{_cell(r.get(c, ''), digits)}</td>" for c in cols) + "</tr>"
        for r in rows
    )
    return f"<div class='table-wrap'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def format_mean_std(mean: float, std: float, n: int, digits: int = 3) -> str:
    """``"0.512 ± 0.031"`` over ``n`` seeds; one seed has no spread: ``"0.512 (one seed)"``; none: ``"-"``."""
    if n < 1 or mean != mean:  # no runs, or NaN
        return "-"
    if n == 1:
        return f"{mean:.{digits}f} (one seed)"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


@dataclass
class Section:
    """One report section: a title and a list of HTML blocks (paragraphs, tables, figures)."""

    title: str
    blocks: list[str] = field(default_factory=list)

    def text(self, paragraph: str) -> Section:
        self.blocks.append(f"<p>{html.escape(paragraph)}</p>")
        return self

    def html(self, raw: str) -> Section:
        self.blocks.append(raw)
        return self

    def table(self, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
              caption: str | None = None, digits: int = 3) -> Section:
        cap = f"<p class='caption'>{html.escape(caption)}</p>" if caption else ""
        self.blocks.append(table_html(rows, columns, digits) + cap)
        return self

    def figure(self, fig: Any, caption: str | None = None, dpi: int = 110) -> Section:
        """Embed a matplotlib figure (it is closed afterwards)."""
        uri = figure_to_data_uri(fig, dpi=dpi)
        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        self.blocks.append(f"<figure><img src='{uri}' alt='{html.escape(caption or self.title)}'/>{cap}</figure>")
        return self


_TEMPLATE = jinja2.Environment(
    loader=jinja2.PackageLoader("semlens.report", "templates"), autoescape=False
).get_template("report.html")


@dataclass
class Report:
    """An ordered collection of sections written to a single HTML file."""

    title: str = "semlens report"
    sections: list[Section] = field(default_factory=list)

    def add(self, section: Section) -> Section:
        self.sections.append(section)
        return section

    def write(self, path: str | os.PathLike) -> Path:
        """Write the report atomically to ``path`` and return it."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        page = _TEMPLATE.render(
            title=self.title,
            sections=self.sections,
            anchors=[f"s{i}" for i in range(len(self.sections))],
            generated=_dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        )
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, path)
        return path
