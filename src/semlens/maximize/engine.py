"""The optimisation loop: many (unit, variant, seed) rows maximised as one batch, without cross-talk.

Each step renders x = param.render(p) (B, C, H, W), makes V augmented views (optional), runs the
model once on the (V·B) batch with hooks on the objective's layers only, and ascends

    score_b = mean_v objective_b(view_v(x_b)) + regulariser_b(x_b, p_b)

with Adam (elementwise, so row b's trajectory depends on row b only). The model (and a generator)
is frozen and in eval mode during the run; hooks, train/eval flags and ``requires_grad`` are
restored on every exit path; parameters' ``.grad`` is never written.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from semlens.layers import HookHandles, frozen, resolve_layers
from semlens.maximize.objectives import Objective
from semlens.maximize.params import Parameterisation
from semlens.maximize.transforms import Augment
from semlens.runtime import progress

__all__ = ["MaxResult", "maximize", "l2_penalty", "expert_term", "code_penalty", "Regulariser"]

#: ``reg(x, p) -> (B,)`` added to the objective (a log-prior; penalties are negative)
Regulariser = Callable[[Tensor, Tensor], Tensor]


def l2_penalty(lam: float | Tensor, anchor: Tensor) -> Regulariser:
    """−λ‖x_b − anchor_b‖² (anchor (C, H, W) for all rows, or (B, C, H, W)); λ a float or (B,)."""
    def reg(x: Tensor, _p: Tensor) -> Tensor:
        d = (x - anchor.to(x)).reshape(x.shape[0], -1)
        return -torch.as_tensor(lam).to(x) * (d * d).sum(dim=1)
    return reg


def expert_term(lam: float | Tensor, log_prob: Callable[[Tensor], Tensor]) -> Regulariser:
    """+λ·log p(x_b) from a density expert."""
    def reg(x: Tensor, _p: Tensor) -> Tensor:
        return torch.as_tensor(lam).to(x) * log_prob(x)
    return reg


def code_penalty(lam: float | Tensor) -> Regulariser:
    """−λ‖z_b‖² (the log of a Gaussian code prior, up to a constant); needs a code parameterisation."""
    def reg(_x: Tensor, p: Tensor) -> Tensor:
        z = p.reshape(p.shape[0], -1)
        return -torch.as_tensor(lam).to(z) * (z * z).sum(dim=1)
    return reg


@dataclass
class MaxResult:
    """images (B, C, H, W) final prototypes; params (B, ...) final optimised tensors; activation (B,)
    objective on the un-augmented prototypes; score (B,) objective + regulariser; history: per
    logged step, the batch-mean score."""

    images: Tensor
    params: Tensor
    activation: Tensor
    score: Tensor
    history: list[float] = field(default_factory=list)


class _StopForward(Exception):
    """Raised by the last read layer's hook: the rest of the forward is not needed."""


@contextlib.contextmanager
def _read_layers(model: nn.Module, names: list[str], stop_early: bool):
    """Record the outputs of ``names`` (with their graph); with ``stop_early``, end the forward as soon
    as all of them were recorded (a forward then raises :class:`_StopForward`, caught by the caller).
    Hooks go on these layers only and are removed on exit."""
    layers = resolve_layers(model, names)
    store: dict[str, Tensor] = {}

    def make_hook(name: str):
        def hook(_m: nn.Module, _i: object, out: object) -> None:
            store[name] = out if isinstance(out, Tensor) else out[0]
            if stop_early and len(store) == len(layers):
                raise _StopForward
        return hook

    with HookHandles() as handles:
        for name, module in layers.items():
            handles.add(module.register_forward_hook(make_hook(name)))
        yield store


def _forward(model: nn.Module, x: Tensor) -> None:
    try:
        model(x)
    except _StopForward:
        pass


class _Layout:
    """The memory format the model input is given in. ``"auto"``: channels-last for 4-D images on CPU, where oneDNN's
    convolutions and max-pooling run faster on it (alexnet-like, 256 images of 64×64, forward + backward to the input:
    263 vs 345 ms on one thread), kept only if the model's first forward accepts it (a ``view`` of a channels-last
    activation raises; the run then continues contiguous). ``"contiguous"``: the input as rendered. The values are
    the same either way; only the order of floating-point sums inside the kernels differs."""

    def __init__(self, mode: str, device: torch.device) -> None:
        if mode not in ("auto", "channels_last", "contiguous"):
            raise ValueError(f"memory_format must be 'auto', 'channels_last' or 'contiguous', got {mode!r}")
        self.channels_last = mode == "channels_last" or (mode == "auto" and device.type == "cpu")
        self.checked = mode != "auto"

    def forward(self, model: nn.Module, x: Tensor, acts: dict[str, Tensor]) -> None:
        if not self.channels_last or x.dim() != 4:
            _forward(model, x)
            return
        if self.checked:
            _forward(model, x.contiguous(memory_format=torch.channels_last))
            return
        try:
            _forward(model, x.contiguous(memory_format=torch.channels_last))
        except RuntimeError:  # the model cannot run channels-last (or fails anyway: then it fails again below)
            self.channels_last = False
            acts.clear()
            _forward(model, x.contiguous())  # (the views may have been rendered channels-last)
        self.checked = True


def _modules_of(param: Parameterisation) -> list[nn.Module]:
    gen = getattr(param, "generator", None)
    return [gen] if isinstance(gen, nn.Module) else []


def _score(model: nn.Module, objective: Objective, acts: dict[str, Tensor], x: Tensor,
           augment: Augment | None, step: int, view_objective: Objective | None, layout: _Layout) -> Tensor:
    if augment is None:
        layout.forward(model, x, acts)
        return objective(acts)
    layout.forward(model, augment(x, step, channels_last=layout.channels_last and x.dim() == 4), acts)
    return view_objective(acts).reshape(augment.views, x.shape[0]).mean(dim=0)


def maximize(model: nn.Module, objective: Objective, param: Parameterisation, *,
             regulariser: Regulariser | None = None, seeds: Sequence[int] | Tensor | None = None, steps: int = 256,
             lr: float = 0.05, lr_floor: float = 0.01, augment: Augment | None = None,
             device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32, log_every: int = 16, stop_early: bool = True,
             memory_format: str = "auto", show_progress: bool | None = None) -> MaxResult:
    """Maximise ``objective`` (B rows) over ``param`` for ``steps`` Adam steps.

    The learning rate (``lr · param.lr_scale``) follows a cosine down to ``lr_floor`` times itself (so
    the iterates settle instead of oscillating at Adam's step size).
    ``seeds`` (B,) seed each row's start (default 0..B-1). With ``stop_early`` the forward ends once
    every layer the objective reads has produced its output (a model that calls a read layer twice
    should pass ``stop_early=False``). ``memory_format``: ``"auto"`` (channels-last images on CPU when the model
    accepts them: faster), ``"channels_last"`` or ``"contiguous"``. Returns a :class:`MaxResult`.
    """
    b = objective.batch
    seeds = torch.arange(b) if seeds is None else torch.as_tensor(seeds).reshape(-1)
    if seeds.shape[0] != b:
        raise ValueError(f"{seeds.shape[0]} seeds for an objective of {b} rows")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    view_obj = objective.for_views(augment.views) if augment is not None else None
    layout = _Layout(memory_format, torch.device(device))
    p = param.init(seeds, dtype).to(device).detach().requires_grad_(True)
    lr = lr * param.lr_scale
    opt = torch.optim.Adam([p], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1), eta_min=lr * lr_floor)
    history: list[float] = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(frozen(model))
        for m in _modules_of(param):
            stack.enter_context(frozen(m))
        acts = stack.enter_context(_read_layers(model, objective.layers, stop_early))
        for step in progress(range(steps), total=steps, desc="maximize", enabled=show_progress):
            x = param.render(p)
            total = _score(model, objective, acts, x, augment, step, view_obj, layout)
            if regulariser is not None:
                total = total + regulariser(x, p)
            opt.zero_grad(set_to_none=True)
            (-total.sum()).backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                param.project(p)
            if step % log_every == 0 or step == steps - 1:
                history.append(float(total.detach().mean()))
            acts.clear()
        with torch.no_grad():
            x = param.render(p)
            layout.forward(model, x, acts)
            act = objective(acts)
            score = act + (regulariser(x, p) if regulariser is not None else 0)
            acts.clear()
    return MaxResult(x.detach(), p.detach(), act.detach(), score.detach(), history)
