"""Benchmark: region-perturbation curves vs the same number of plain forward passes.

Pixel-flipping a batch of N images for L steps needs N*(L+1) forward passes; semlens builds all perturbed
inputs from cumulative rank masks and runs them in batched forwards. This script times
``perturbation_curve`` (default: 64 images of 64x64, 100 steps of 4x4 patches, uniform-noise baseline)
and, in the same run, the bare cost of forwarding N*(L+1) inputs in batches of the same size. It prints
medians over repeats and the ratio (target <= 1.2), plus a per-image Python-loop reference for scale.

    python benchmarks/bench_metrics.py [--quick] [--device auto|cpu|cuda] [--model alexnet-like] [--full]

``--full`` also times the whole default metric set of ``compare_methods`` (mass and rank accuracy, pointing game,
sparseness, complexity, region-perturbation MoRF/LeRF curves with AOPC, selectivity, continuity, randomisation; the
Quantus-comparable scores) on the same images for gradient and epsilon-plus-flat, against the floor any
implementation (Quantus included) needs: the same number of forward passes, run at the fastest batch size
measured here. It prints the perturbation batch each setting uses and the ratio (metric set / forwards).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from _timing import median_time  # noqa: E402
from semlens.evaluate.explanations import perturbation_curve
from semlens.runtime import resolve_device


def stand_in_cnn(num_classes: int = 10) -> nn.Module:
    """An AlexNet-like CNN for 64x64 inputs (used when the reference models are not available)."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 5, stride=2, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 96, 3, padding=1), nn.ReLU(), nn.Conv2d(96, 64, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, num_classes),
    )


def build(name: str, device: torch.device) -> tuple[nn.Module, str]:
    if name != "stand-in":
        try:
            from semlens.models import build_model

            return build_model(name, num_classes=10, image_size=64).to(device).eval(), name
        except (ValueError, ImportError) as err:
            print(f"model {name!r} unavailable ({err}); using the stand-in CNN")
    return stand_in_cnn().to(device).eval(), "stand-in CNN"


def timed(fn, repeats: int, device: torch.device) -> float:
    return median_time(fn, repeats, device, warmup=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller batch and fewer steps/repeats")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--model", default="alexnet-like", help="built-in model name, or 'stand-in'")
    ap.add_argument("--batch-size", type=int, default=256, help="inputs per forward pass")
    ap.add_argument("--full", action="store_true", help="also time the full metric set against its forwards")
    args = ap.parse_args()
    device = resolve_device(args.device)
    n, steps, repeats = (16, 30, 3) if args.quick else (64, 100, 5)
    size, patch = 64, 4
    torch.manual_seed(0)
    model, label = build(args.model, device)
    x = torch.rand(n, 3, size, size, device=device)
    a = torch.randn(n, 3, size, size, device=device)
    t = torch.randint(0, 10, (n,), device=device)
    total, bs = n * (steps + 1), args.batch_size
    chunk = x.repeat((bs + n - 1) // n, 1, 1, 1)[:bs]

    def curves() -> None:
        perturbation_curve(model, x, t, a, patch_size=patch, steps=steps, baseline="uniform", batch_size=bs,
                           generator=torch.Generator().manual_seed(0), show_progress=False)

    def plain() -> None:
        with torch.no_grad():
            for start in range(0, total, bs):
                model(chunk[: min(bs, total - start)])

    def loop_reference() -> None:  # one image at a time, one step at a time (what we avoid), 4 images only
        with torch.no_grad():
            for i in range(4):
                xi = x[i:i + 1].clone()
                order = a[i].sum(0).unfold(0, patch, patch).unfold(1, patch, patch).sum((2, 3)).flatten().argsort(
                    descending=True)
                model(xi)
                for k in range(steps):
                    r, c = divmod(int(order[k]), size // patch)
                    xi[..., r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] = torch.rand(1, 3, patch, patch,
                                                                                                device=device)
                    model(xi)

    curves()  # warm-up
    plain()
    t_curve = timed(curves, repeats, device)
    t_plain = timed(plain, repeats, device)
    t_loop = timed(loop_reference, 1 if args.quick else 2, device) * n / 4
    print(f"device={device} model={label} images={n} size={size} steps={steps} patch={patch} "
          f"forwards={total} batch={bs} repeats={repeats}")
    print(f"perturbation curves      median {t_curve * 1e3:9.1f} ms")
    print(f"plain forward passes     median {t_plain * 1e3:9.1f} ms")
    print(f"ratio curves / forwards         {t_curve / t_plain:9.2f}   (target <= 1.2)")
    print(f"per-image loop (est.)    median {t_loop * 1e3:9.1f} ms   ({t_loop / t_curve:.1f}x slower than batched)")
    if args.full:
        full_metric_set(model, x, device, 1 if args.quick else 3)


def full_metric_set(model: nn.Module, x: torch.Tensor, device: torch.device, repeats: int) -> None:
    """The default metric set of compare_methods (automatic perturbation batch and 256) against the forwards
    it runs, replayed at the fastest batch size."""
    from semlens.evaluate.batching import fastest_batch_size
    from semlens.evaluate.compare import CompareConfig, compare_methods

    n, size = x.shape[0], x.shape[-1]
    y = torch.randint(0, 10, (n,), device=device)
    masks = torch.zeros(n, size, size, dtype=torch.bool, device=device)
    masks[:, size // 4: 3 * size // 4, size // 4: 3 * size // 4] = True
    methods = ["gradient", "epsilon-plus-flat"]
    counted = [0]
    hook = model.register_forward_pre_hook(lambda _m, inp: counted.__setitem__(0, counted[0] + inp[0].shape[0]))

    def run(batch: int | None):
        cfg = CompareConfig(patch_size=4, perturb_batch_size=batch, n_boot=200, randomization_samples=16)
        return compare_methods(model, x, y, methods, masks=masks, config=cfg, device=device, show_progress=False)

    res = run(None)  # warm-up, and the batch the measurement picks
    hook.remove()
    forwards, chosen = counted[0], res.config.perturb_batch_size
    best = fastest_batch_size(model, x[:1], needed=forwards)
    chunk = x[:1].expand(best, *x.shape[1:]).contiguous()

    def plain() -> None:
        with torch.no_grad():
            for start in range(0, forwards, best):
                model(chunk[: min(best, forwards - start)])

    t_auto = timed(lambda: run(None), repeats, device)
    t_256 = timed(lambda: run(256), repeats, device)
    t_plain = timed(plain, repeats, device)
    print(f"full metric set ({len(res.metrics)} scores, {len(methods)} methods, {n} images): {forwards} forwards")
    print(f"metric set, measured batch {chosen:4d}  median {t_auto * 1e3:9.1f} ms")
    print(f"metric set, batch 256            median {t_256 * 1e3:9.1f} ms")
    print(f"its forwards at batch {best:4d}       median {t_plain * 1e3:9.1f} ms")
    print(f"ratio metric set / forwards             {t_auto / t_plain:9.2f}   (256: {t_256 / t_plain:.2f})")


if __name__ == "__main__":
    main()
