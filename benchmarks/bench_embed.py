"""Explanation embeddings: SRAE fitting throughput and the cost of x-feature heatmaps.

1. Fitting: one-vs-all SRAEs for 12 classes on ``d``-dimensional activations, trained side by side as one batched
   network, against the reference approach of one SRAE per class fitted in turn (baseline, same run). Printed:
   activation vectors per second (vectors × epochs × classes / seconds) and the speed-up.
2. Heatmaps: all ``k`` x-feature maps of a batch (one forward of the CNN + SRAE encoder, then ``k`` LRP backward
   passes through it, one per x-feature) ÷ one LRP pass of the CNN over the same batch (baseline, same run), for
   maps at the input pixels, maps stopped at a conv layer (``--heat-layer``), and maps at the explained layer itself
   (``xfeature_layer_maps``: one plain forward, LRP only through pool → encoder; the XNN paper stops Excitation
   Backprop at a conv layer). Also timed: the one-call ``xfeature_heatmaps`` (model probed per call) and the former
   implementation (batch replicated ``k`` times: ``k`` forwards too). The floor of the input-map ratio is
   ``(F + k·B) / (F + B)``: the forward is shared, but each map needs its own transposed convolutions (an LRP rule's
   forward evaluates each conv twice, its backward once, so in conv FLOPs ``(2 + k) / 3`` ≈ 2.3 for ``k = 5``).

    python benchmarks/bench_embed.py [--quick] [--device cpu|cuda|auto] [--repeats N] [--cpu-time]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import median_time  # noqa: E402
from semlens.embed import SRAE, ActivationStore  # noqa: E402
from semlens.embed.heatmaps import (  # noqa: E402
    XFeatureExplainer,
    xfeature_heatmaps,
    xfeature_layer_maps,
    xfeature_model,
)
from semlens.explain import Attributor, Epsilon, preset  # noqa: E402
from semlens.models import build_model  # noqa: E402
from semlens.runtime import resolve_device  # noqa: E402


def bench_fit(n: int, d: int, classes: int, k: int, epochs: int, device: str) -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.relu(torch.randn(n, d, generator=g))
    logits = z @ torch.randn(d, classes, generator=g) / d ** 0.5
    store = ActivationStore.from_arrays(z, logits)
    kw = dict(k=k, epochs=epochs, pretrain_epochs=1, max_rounds=1, device=device)
    SRAE(target=0, **{**kw, "epochs": 1}).fit(ActivationStore.from_arrays(z[:200], logits[:200]))  # warm-up
    t0 = time.perf_counter()
    SRAE(target="all", **kw).fit(store)
    batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    for c in range(classes):
        SRAE(target=c, **kw).fit(store)
    single = time.perf_counter() - t0
    work = n * epochs * classes
    print(f"fit  d={d} N={n} classes={classes} k={k} epochs={epochs} (+1 pretraining epoch per stage)")
    print(f"  batched one-vs-all : {batched:7.2f} s  {work / batched:10.0f} vectors/s")
    print(f"  one SRAE per class : {single:7.2f} s  {work / single:10.0f} vectors/s (baseline)")
    print(f"  speed-up           : {single / batched:.2f}x")


def bench_heatmaps(batch: int, k: int, repeats: int, device: torch.device, method: str, heat_layer: str,
                   cpu_time: bool = False) -> None:
    torch.manual_seed(0)
    net = build_model("alexnet-like", num_classes=12, image_size=64).to(device).eval()
    x = torch.rand(batch, 3, 64, 64, device=device)
    from semlens.embed import collect_activations

    store = collect_activations(net, "features.relu5", torch.rand(256, 3, 64, 64), batch_size=64, device=device)
    emb = SRAE(k=k, target=[3], epochs=1, pretrain_epochs=1, max_rounds=1).fit(store)

    def timed(fn) -> float:
        return median_time(fn, repeats, device, cpu_time=cpu_time)

    xnet, _ = xfeature_model(net, "features.relu5", emb, 3)
    composite = preset(method).with_rules({"weigh": Epsilon(0.0)})
    replicas = torch.eye(k, device=device).repeat_interleave(batch, 0)  # (k*N, k): replica i seeds x-feature i
    with Attributor(net, method) as attr, XFeatureExplainer(net, "features.relu5", emb, 3, method) as xf, \
            Attributor(xnet, composite=composite) as old:
        base = timed(lambda: attr(x, 3))
        warm = timed(lambda: xf(x))
        # the former implementation: the batch replicated k times, so the CNN also runs forward k times
        replicated = timed(lambda: old(x.repeat(k, 1, 1, 1), replicas))
        base_layer = timed(lambda: attr(x, 3, layer=heat_layer))
        stop = timed(lambda: xf(x, heat_layer=f"model.{heat_layer}"))
        base_own = timed(lambda: attr(x, 3, layer="features.relu5"))
    once = timed(lambda: xfeature_heatmaps(net, "features.relu5", emb, x, 3, method=method))
    own = timed(lambda: xfeature_layer_maps(net, "features.relu5", emb, x, 3, method=method))
    clock = "CPU time" if cpu_time and device.type == "cpu" else "wall time"
    print(f"heatmaps alexnet-like 64px, batch {batch}, k={k}, {method}, device {device} (median of {repeats}, "
          f"{clock})")
    print(f"  one LRP pass, input maps                     : {base * 1e3:8.1f} ms (baseline)")
    print(f"  k x-feature maps, input (XFeatureExplainer)  : {warm * 1e3:8.1f} ms  ratio {warm / base:.2f}")
    print(f"  k x-feature maps, input (xfeature_heatmaps)  : {once * 1e3:8.1f} ms  ratio {once / base:.2f} "
          "(one call: model probed each time)")
    print(f"  k x-feature maps, input (batch replicated k x): {replicated * 1e3:7.1f} ms  "
          f"ratio {replicated / base:.2f} (former implementation)")
    print(f"  one LRP pass, maps at {heat_layer:<16}      : {base_layer * 1e3:8.1f} ms (baseline)")
    print(f"  k x-feature maps at {heat_layer:<16}        : {stop * 1e3:8.1f} ms  ratio {stop / base_layer:.2f}")
    print(f"  one LRP pass, maps at relu5                  : {base_own * 1e3:8.1f} ms (baseline)")
    print(f"  k x-feature maps at relu5 (xfeature_layer_maps): {own * 1e3:6.1f} ms  ratio {own / base_own:.2f} "
          f"({own / base:.2f} of an input-map pass)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--heat-layer", default="features.conv3")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time heatmaps by this process's CPU time (robust to other jobs on a shared machine)")
    args = ap.parse_args()
    device = resolve_device(args.device)
    if args.quick:
        bench_fit(n=500, d=64, classes=4, k=5, epochs=1, device=str(device))
        bench_heatmaps(batch=4, k=5, repeats=2, device=device, method="excitation-backprop",
                       heat_layer=args.heat_layer, cpu_time=args.cpu_time)
        return
    bench_fit(n=4000, d=256, classes=12, k=5, epochs=3, device=str(device))
    for method in ("excitation-backprop", "epsilon-gamma-box", "epsilon-plus-flat"):  # the paper, the default, ...
        bench_heatmaps(batch=16, k=5, repeats=args.repeats, device=device, method=method, heat_layer=args.heat_layer,
                       cpu_time=args.cpu_time)


if __name__ == "__main__":
    main()
