"""The ``make demo`` pipeline: every capability runs a fast version on built-in data and adds its
sections to one HTML report.

Steps live in :mod:`semlens.experiments.demo_steps` as modules named ``sNN_topic.py`` exposing
``run(ctx: DemoContext) -> list[Section]``; they run in the order of ``NN``. A step can leave
artifacts (a trained model, a dataset directory) in ``ctx.artifacts`` for the steps after it.
"""

from __future__ import annotations

import importlib
import pkgutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from semlens.report import Report, Section
from semlens.runtime import resolve_device, seed_everything

__all__ = ["DemoContext", "discover_steps", "run_demo"]

console = Console(stderr=True)


@dataclass
class DemoContext:
    """What the demo steps share: output directory, device, seed and artifacts of earlier steps."""

    out: Path
    device: torch.device
    seed: int = 0
    artifacts: dict[str, Any] = field(default_factory=dict)

    def path(self, *parts: str) -> Path:
        """A path under the demo's output directory (parent folders created)."""
        p = self.out.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p


def discover_steps() -> list[tuple[str, Callable[[DemoContext], list[Section]]]]:
    """All ``demo_steps.sNN_*`` modules in order, as ``(name, run)`` pairs."""
    import semlens.experiments.demo_steps as pkg

    steps = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if not info.name.startswith("s"):
            continue
        module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        steps.append((info.name, module.run))
    return steps


def step_title(name: str) -> str:
    """A human name for a step module: its docstring's first line without the "Demo step NN:" prefix
    (``s10_world`` -> "the built-in worlds ..."), else the module name without its number."""
    import re

    module = importlib.import_module(f"semlens.experiments.demo_steps.{name}")
    first = (module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else ""
    title = re.sub(r"^demo step( \d+)?:\s*", "", first, flags=re.IGNORECASE).rstrip(".,")
    return title[:1].upper() + title[1:] if title else re.sub(r"^s\d+_", "", name).replace("_", " ")


def run_demo(out: str | Path, device: str = "auto", seed: int = 0, only: list[str] | None = None) -> Path:
    """Run every demo step, write ``out/report.html`` and return its path.

    ``only`` restricts the run to steps whose name contains one of the given words (for debugging);
    steps depend on earlier ones, so the default is all of them.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(seed)
    ctx = DemoContext(out=out, device=resolve_device(device), seed=seed)
    report = Report(title="semlens demo report")
    intro = Section("About this report")
    intro.text(
        "Every section below was produced by `make demo` on semlens' built-in synthetic data, which "
        "carries exact ground truth (concept masks, evidence masks, clip captions). The numbers are from "
        "fast, reduced runs; the full-size figures are in the documentation (docs/) and come from the "
        "`semlens reproduce` commands and the scripts in benchmarks/."
    )
    report.add(intro)
    timings = []
    for name, run in discover_steps():
        if only and not any(word in name for word in only):
            continue
        console.print(f"[bold]demo[/] {step_title(name)} ...")
        t0 = time.perf_counter()
        for section in run(ctx):
            report.add(section)
        elapsed = time.perf_counter() - t0
        timings.append({"step": step_title(name), "seconds": round(elapsed, 1)})
        console.print(f"[bold]demo[/] {step_title(name)}: done in {elapsed:.1f}s")
        report.write(out / "report.html")  # keep a readable report even if a later step fails
    report.add(Section("Run times").table(timings, caption=f"device: {ctx.device}"))
    return report.write(out / "report.html")
