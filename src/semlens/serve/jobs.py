"""Background ``apply`` for the web app: one at a time, with progress the page can poll.

The data side is the feedback store's crash-safe apply (a pending version becomes ready in one transaction;
a killed apply is resumed by the next one with the same remarks), so a server killed mid-apply loses nothing:
the remarks stay open and the pending version is picked up again.
"""

from __future__ import annotations

import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from semlens.serve.project_view import ProjectView

__all__ = ["ApplyJob", "ApplyRunner", "ApplyBusy"]


class ApplyBusy(RuntimeError):
    """An apply is already running; a second one is refused."""


@dataclass
class ApplyJob:
    """State of one apply: ``state`` is running, done or failed; ``step``/``steps`` count fine-tuning steps."""

    steps: int
    state: str = "running"
    step: int = 0
    started: float = field(default_factory=time.time)
    finished: float | None = None
    version: int | None = None
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.state, "step": self.step, "steps": self.steps, "version": self.version,
                "error": self.error, "elapsed_s": round((self.finished or time.time()) - self.started, 2)}


class ApplyRunner:
    """Runs ``CorrectionProject.apply`` in a daemon thread; :meth:`start` refuses while one runs."""

    def __init__(self, view: ProjectView) -> None:
        self.view = view
        self._lock = threading.Lock()
        self.job: ApplyJob | None = None

    @property
    def running(self) -> bool:
        return self.job is not None and self.job.state == "running"

    def start(self, params: dict[str, Any]) -> ApplyJob:
        """Start applying the open remarks with ``params`` (mu, steps, lr); raises :class:`ApplyBusy` if one runs."""
        with self._lock:
            if self.running:
                raise ApplyBusy("an apply is already running; wait for it to finish")
            job = ApplyJob(steps=int(params.get("steps") or 50))
            self.job = job
        threading.Thread(target=self._run, args=(job, params), daemon=True, name="semlens-apply").start()
        return job

    def _run(self, job: ApplyJob, params: dict[str, Any]) -> None:
        def on_step(step: int, total: int) -> None:
            job.step, job.steps = step, total

        try:
            version, _ = self.view.project.apply(self.view.device, progress=on_step, **params)
            job.version = version.id
            job.state = "done"
        except Exception as err:  # reported on the page; the store keeps the pending version for a retry
            job.error = f"{type(err).__name__}: {err}"
            job.state = "failed"
            traceback.print_exc()
        finally:
            job.finished = time.time()
