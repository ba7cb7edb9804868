"""Attribution speed: LRP composites vs forward + input-gradient on a VGG-16-shaped and a ResNet-style network.

Prints the median time (over repeats) of a forward pass, of forward + input gradient (parameters frozen: the floor any
backward-based attribution pays), and of each method inside a prepared :class:`semlens.explain.Attributor` (steady
state, as when explaining many batches), with the ratio to forward + input-gradient. One-shot ``attribute()`` calls
add one single-sample probe forward (model check) and are listed separately.

``flops`` is the ratio of convolution/matmul FLOPs (``torch.utils.flop_counter``) of the method to those of the
baseline: the floor the time ratio could reach if elementwise work were free. It shows, per model, how many extra
weight evaluations a rule needs (e.g. Zennit's generalised γ needs both the ``w+γw⁺`` and ``w+γw⁻`` halves, forward
and backward, wherever relevance reaches negative outputs of a layer, as before a residual sum).

    python benchmarks/bench_explain.py [--quick] [--device cpu|cuda|auto] [--repeats N]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _nets import resnet_like, vgg16_like  # noqa: E402
from semlens.explain import Attributor, attribute  # noqa: E402
from semlens.layers import frozen  # noqa: E402
from semlens.runtime import resolve_device  # noqa: E402

TARGETS = {"lrp-0": 1.15, "lrp-epsilon": 1.15, "epsilon-plus-flat": 1.6, "epsilon-gamma-box": 1.6,
           "epsilon-plus": 1.6, "epsilon-alpha2-beta1": 2.2, "epsilon-alpha2-beta1-flat": 2.2}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCK = time.perf_counter


def median_time(fn, repeats: int, device: torch.device, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = CLOCK()
        fn()
        _sync(device)
        times.append(CLOCK() - t0)
    return statistics.median(times)


def paired(fn, base, repeats: int, device: torch.device) -> tuple[float, float, float]:
    """Median time of ``fn``, of ``base``, and median of the per-pair ratios (runs interleaved: robust to load)."""
    fn()
    base()
    tf, tb, ratios = [], [], []
    for _ in range(repeats):
        tb.append(median_time(base, 1, device, warmup=0))
        tf.append(median_time(fn, 1, device, warmup=0))
        ratios.append(tf[-1] / tb[-1])
    return statistics.median(tf), statistics.median(tb), statistics.median(ratios)


class _FlopCount(TorchDispatchMode):
    """Counts the FLOPs of convolutions and matrix products (PyTorch's flop formulas) under dispatch."""

    def __init__(self) -> None:
        super().__init__()
        from torch.utils.flop_counter import flop_registry

        self.registry = flop_registry
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = self.registry.get(func._overloadpacket)
        if count is not None:
            self.total += count(*args, **kwargs, out_val=out)
        return out


def flop_ratio(fn, base) -> float:
    """Convolution/matmul FLOPs of ``fn`` divided by those of ``base`` (one call each)."""
    counts = []
    for f in (fn, base):
        with _FlopCount() as counter:
            f()
        counts.append(counter.total)
    return counts[0] / counts[1]


def bench_model(label: str, model: torch.nn.Module, x: torch.Tensor, repeats: int, device: torch.device,
                methods: list[str]) -> list[str]:
    target = 0
    rows = []
    # the baseline runs on an untouched copy: inside an Attributor the model's BatchNorms are folded (cheaper)
    base_model = copy.deepcopy(model)

    def fwd():
        with torch.no_grad():
            model(x)

    def fwd_grad():
        xr = x.detach().requires_grad_(True)
        out = base_model(xr)
        w = torch.zeros_like(out)
        w[:, target] = 1
        torch.autograd.grad(out, xr, w)

    def show(name: str, t: float, tb: float, ratio: float, goal: float | None = None, flops: float | None = None
             ) -> None:
        verdict = "" if goal is None else f"  target <= {goal:.2f}  {'OK' if ratio <= goal else 'MISSED'}"
        floor = "" if flops is None else f"  flops {flops:4.2f}"
        rows.append(f"{label:8s} {name:30s} {t * 1e3:9.1f} ms  (baseline {tb * 1e3:8.1f} ms)  ratio {ratio:5.2f}"
                    f"{floor}{verdict}")
        print(rows[-1], flush=True)

    with frozen(model), frozen(base_model):
        t, tb, r = paired(fwd, fwd_grad, repeats, device)
        show("forward", t, tb, r)
    for method in methods:
        with Attributor(model, method) as attr, frozen(base_model):
            t, tb, r = paired(lambda attr=attr: attr(x, target), fwd_grad, repeats, device)
            flops = flop_ratio(lambda attr=attr: attr(x, target), fwd_grad)
        show(method, t, tb, r, TARGETS.get(method), flops)
    with frozen(base_model):
        t, tb, r = paired(lambda: attribute(model, x, target, "epsilon-plus-flat"), fwd_grad, repeats, device)
    show("one-shot attribute(epsilon-plus-flat)", t, tb, r)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small batches and few repeats (smoke test)")
    parser.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda'")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--methods", default=None, help="comma-separated subset of methods")
    parser.add_argument("--models", default="vgg16,resnet", help="comma-separated subset of vgg16,resnet")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall time, or process CPU time (robust on a shared CPU machine; CPU device only)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    global CLOCK
    if args.clock == "cpu":
        CLOCK = time.process_time
    methods = args.methods.split(",") if args.methods else ["gradient", "gradient-x-input", *TARGETS]
    device = resolve_device(args.device)
    repeats = args.repeats or (3 if args.quick else 7)
    print(f"device: {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, repeats {repeats}, "
          f"clock {args.clock}")
    gen = torch.Generator().manual_seed(0)
    if args.quick:
        configs = [("vgg16", vgg16_like(0, width=0.25), (2, 3, 112, 112)), ("resnet", resnet_like(0), (8, 3, 64, 64))]
    else:
        configs = [("vgg16", vgg16_like(0), (4, 3, 224, 224)), ("resnet", resnet_like(0), (32, 3, 64, 64))]
    for label, model, shape in configs:
        if label not in args.models.split(","):
            continue
        model = model.to(device)
        x = torch.rand(shape, generator=gen).to(device)
        print(f"--- {label}: input {shape}")
        bench_model(label, model, x, repeats, device, methods)


if __name__ == "__main__":
    main()
