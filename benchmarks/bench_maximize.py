"""Activation maximization: many units in one batch vs one unit at a time, and the cost of one step.

    python benchmarks/bench_maximize.py [--device cpu|cuda] [--steps 256] [--single-steps 16] [--repeats 3]

Model: alexnet-like (64×64 inputs, random seeded weights); objective: the 64 channels of
``features.conv5`` (mean over space), pixel parameterisation, plain variant, 4 augmented views per step.

* batched: the 64 channels as one batch (64 rows × 4 views = 256 images per forward), ``--steps`` steps;
* one at a time: 64 separate runs of one row each. To keep the run short they do ``--single-steps``
  steps each and their time is extrapolated per step to ``--steps`` (stated in the output); the
  per-step cost of a run is constant after its first step, so the extrapolation is linear;
* times are medians of this process's CPU seconds on CPU (the machine may be shared), of wall
  seconds on CUDA; ``--wall`` times wall seconds on CPU too (what a user waits for when the threads have the
  cores to themselves: a batch of 256 images keeps every core busy, a run of 4 images does not);
* one step ÷ one forward+backward: the median time of an optimisation step (render, 4 views, forward
  with hooks, objective, backward, Adam, projection) ÷ the median time of a bare forward of the same
  256-image batch plus the backward of the same objective to the input. On CPU the engine gives the model
  channels-last images (faster oneDNN kernels), so the ratio to a forward+backward in that layout is printed too.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

import _timing
from semlens.layers import capture_activations, frozen
from semlens.maximize import Augment, PixelParam, channel, l2_penalty, maximize
from semlens.models import build_model

LAYER = "features.conv5"


def _run(model, units, steps, device, views):  # noqa: ANN001, ANN202
    param = PixelParam((3, 64, 64), start=torch.full((3, 64, 64), 0.5), lo=torch.zeros(3), hi=torch.ones(3))
    return maximize(model, channel(LAYER, units), param, regulariser=l2_penalty(1e-3, torch.full((3, 64, 64), 0.5)),
                    steps=steps, augment=Augment(views=views), device=device, show_progress=False)


def _fwd_bwd(model, x, units, channels_last=False):  # noqa: ANN001, ANN202
    obj = channel(LAYER, units)
    with frozen(model), capture_activations(model, [LAYER], detach=False) as acts:
        xx = x.detach()
        if channels_last:
            xx = xx.contiguous(memory_format=torch.channels_last)
        xx.requires_grad_(True)
        model(xx)  # the whole model, as a user's forward+backward would run it
        obj(acts).sum().backward()
    return xx.grad


WALL = False  # --wall


def median_time(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median CPU seconds of ``fn()`` on CPU (robust to other jobs on a shared machine), wall seconds on CUDA or
    with ``--wall``."""
    return _timing.median_time(fn, repeats, device, cpu_time=not WALL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--single-steps", type=int, default=16)
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--wall", action="store_true", help="wall seconds on CPU too (default: process CPU seconds)")
    args = ap.parse_args()
    global WALL
    WALL = args.wall
    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model("alexnet-like", num_classes=12, image_size=64).to(dev).eval()
    units = list(range(64))
    clock = "wall" if dev.type == "cuda" or WALL else "process CPU"
    print(f"device={dev} threads={torch.get_num_threads()} units=64 views={args.views} steps={args.steps} "
          f"(medians of {clock} seconds)")

    t_batched = median_time(lambda: _run(model, units, args.steps, dev, args.views), args.repeats, dev)
    per_step_batched = t_batched / args.steps

    def singles() -> None:
        for u in units:
            _run(model, [u], args.single_steps, dev, args.views)

    t_single = median_time(singles, max(1, args.repeats - 1), dev)
    per_step_single = t_single / args.single_steps
    t_single_full = per_step_single * args.steps
    print(f"batched ({args.steps} steps, one batch of 64 rows x {args.views} views): {t_batched:.2f} s")
    print(f"one unit at a time: {t_single:.2f} s for 64 runs x {args.single_steps} steps, extrapolated per step "
          f"to {args.steps} steps: {t_single_full:.1f} s")
    print(f"ratio one-at-a-time / batched: {t_single_full / t_batched:.1f}x (target >= 10x)")

    x = torch.rand(64 * args.views, 3, 64, 64, device=dev)
    t_fb = median_time(lambda: _fwd_bwd(model, x, units * args.views), max(5, args.repeats * 3), dev)
    k = 8
    t_k = median_time(lambda: _run(model, units, k, dev, args.views), args.repeats, dev)
    t_step = t_k / k
    print(f"one forward+backward of the {64 * args.views}-image batch: {t_fb * 1e3:.1f} ms; one optimisation step "
          f"({k}-step runs, including the start): {t_step * 1e3:.1f} ms; in the {args.steps}-step run: "
          f"{per_step_batched * 1e3:.1f} ms")
    print(f"ratio step / (forward+backward): {per_step_batched / t_fb:.2f} (target <= 1.3)")
    if dev.type == "cpu":  # the engine feeds channels-last images on CPU: the same baseline in that layout
        t_cl = median_time(lambda: _fwd_bwd(model, x, units * args.views, True), max(5, args.repeats * 3), dev)
        print(f"one forward+backward with a channels-last input (the engine's layout on CPU): {t_cl * 1e3:.1f} ms; "
              f"ratio step / that: {per_step_batched / t_cl:.2f}")


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - t0:.0f} s")
