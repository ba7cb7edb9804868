"""Dissection throughput vs forward-only, and peak memory for 1k vs 10k images.

    python benchmarks/bench_dissect.py [--quick] [--device cpu|cuda] [--batch-size 64] [--no-memory]

Same model (alexnet-like, 64x64 inputs), same conv layers, same procedurally generated Broden-like
data (images + 4 pixel-level categories + 1 whole-image category, masks at 64x64) in one run:
* forward-only: load each batch, run the full model (no_grad) with torch's intra-op threads -- the
  baseline;
* forward-only on workers: the same, but whole batches side by side on ``torch.get_num_threads()``
  threads with one intra-op thread each (the scheme dissection uses on a multi-core CPU) -- a second,
  stricter baseline, printed when there is more than one thread;
* dissection: both passes (thresholds, then tally), default settings (activations of pass 1 kept
  in memory when they fit in ``cache_bytes``; batches on workers) and pure streaming (``cache_bytes=0``,
  two forwards).
Repeats are interleaved (forward-only, dissection, streaming, forward-only, ...); ratio = median over
repeats of (forward-only time ÷ dissection time) = dissection images/s ÷ forward-only images/s, on wall
clock and on this process's CPU time (the latter is robust to other jobs on a shared machine; at one
thread it is the honest single-core figure). Peak memory is measured in a fresh subprocess per dataset
size (RSS on CPU, ``max_memory_allocated`` on CUDA).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import threading
import time

import torch
from torch import nn

from semlens.units.dissect import SegmentationBatch, dissect

LABELS = ([(i, f"color{i}", "color") for i in range(1, 12)] + [(i, f"object{i}", "object") for i in range(12, 30)]
          + [(i, f"part{i}", "part") for i in range(30, 40)] + [(i, f"texture{i}", "texture") for i in range(40, 50)]
          + [(i, f"scene{i}", "scene") for i in range(50, 60)])


class ProceduralDataset:
    """Deterministic random images and blocky label maps generated per batch (constant memory)."""

    categories = ["color", "object", "part", "texture", "scene"]
    labels = LABELS

    def __init__(self, n: int, size: int = 64, mask_size: int | None = None) -> None:
        self.n, self.size = n, size
        self.mask_size = mask_size or size
        self.seg_size = (self.mask_size, self.mask_size)

    def __len__(self) -> int:
        return self.n

    def load_batch(self, indices) -> SegmentationBatch:
        g = torch.Generator().manual_seed(int(indices[0]))
        b, s = len(indices), self.mask_size
        images = torch.rand(b, 3, self.size, self.size, generator=g)

        def blocks(lo: int, hi: int, k: int) -> torch.Tensor:
            coarse = torch.randint(lo, hi, (b, k, s // 8, s // 8), generator=g)
            coarse[torch.rand(coarse.shape, generator=g) < 0.5] = 0
            return coarse.repeat_interleave(8, 2).repeat_interleave(8, 3)

        pixel = {"color": blocks(1, 12, 2), "object": blocks(12, 30, 1), "part": blocks(30, 40, 1),
                 "texture": blocks(40, 50, 1)}
        scene = torch.randint(50, 60, (b, 1), generator=g)
        annotated = {c: torch.ones(b, dtype=torch.bool) for c in self.categories}
        return SegmentationBatch(images, pixel, {"scene": scene}, annotated)


def make_model(size: int = 64) -> tuple[nn.Module, list[str]]:
    try:
        from semlens.models import build_model

        model = build_model("alexnet-like", num_classes=10, image_size=size)
        return model.eval(), list(model.conv_layers)
    except Exception as err:  # noqa: BLE001 - reference models not available: an AlexNet-shaped stand-in
        print(f"note: alexnet-like unavailable ({type(err).__name__}: {err}); timing an AlexNet-shaped stand-in "
              "model instead", flush=True)
        torch.manual_seed(0)
        feats = nn.Sequential(nn.Conv2d(3, 64, 5, 2, 2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(64, 192, 3, padding=1),
                              nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(192, 256, 3, padding=1), nn.ReLU(),
                              nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.Conv2d(256, 256, 3, padding=1),
                              nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 10))
        return feats.eval(), ["0", "3", "6", "8", "10"]


def forward_only(model: nn.Module, ds: ProceduralDataset, batch_size: int,
                 device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of loading every batch and running the whole model on it."""
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for i in range(0, len(ds), batch_size):
            b = ds.load_batch(list(range(i, min(len(ds), i + batch_size))))
            model(b.images.to(device))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, time.process_time() - c0


def forward_on_workers(model: nn.Module, ds: ProceduralDataset, batch_size: int, workers: int
                       ) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of forward_only with whole batches on ``workers`` threads (one intra-op each)."""
    from semlens.streaming import run_batches

    lock = threading.Lock()

    def step(indices: list[int], _b: int) -> None:
        with lock:  # the loader is read by one worker at a time, as in dissect
            images = ds.load_batch(indices).images
        model(images)

    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        run_batches(len(ds), batch_size, step, workers=workers, show_progress=False)
    return time.perf_counter() - t0, time.process_time() - c0


def timed_dissect(model, ds, layers, batch_size, device, **kw) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one dissection."""
    t0, c0 = time.perf_counter(), time.process_time()
    dissect(model, ds, layers, batch_size=batch_size, device=device, show_progress=False, **kw)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, time.process_time() - c0


def peak_rss_kb() -> float:
    """This process image's peak RSS in kB: VmHWM on Linux (``ru_maxrss`` carries the parent's peak over fork and
    exec, so a child started by a big benchmark process would report the parent's), else ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1])
    except OSError:
        pass
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def memory_child(n: int, device: str, batch_size: int, cache_bytes: int, size: int = 64,
                 mask_size: int | None = None) -> None:
    dev = torch.device(device)
    model, layers = make_model(size)
    model.to(dev)
    ds = ProceduralDataset(n, size, mask_size)
    dissect(model, ProceduralDataset(64, size, mask_size), layers, batch_size=batch_size, device=dev,
            show_progress=False)  # compile the kernels first: their compiler's memory is not the dissection's
    base = peak_rss_kb()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    dissect(model, ds, layers, batch_size=batch_size, device=dev, cache_bytes=cache_bytes, show_progress=False)
    peak = peak_rss_kb()
    gpu = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else 0.0
    print(json.dumps({"rss_peak_mb": peak / 1024, "rss_growth_mb": (peak - base) / 1024, "gpu_peak_mb": gpu}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer images and repeats")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--size", type=int, default=64, help="image size (alexnet-like is built for it; 224 = AlexNet's "
                    "layout with stride-4 conv1)")
    ap.add_argument("--mask-size", type=int, default=None, help="mask resolution (default: the image size; Broden "
                    "stores masks at half the image resolution)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 5; 2 with --quick): "
                    "one thread's ratio spreads by about +-0.1 from repeat to repeat on a shared 2-core machine")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    ap.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cache-bytes", type=int, default=1 << 28, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child is not None:
        memory_child(args.memory_child, args.device, args.batch_size, args.cache_bytes, args.size, args.mask_size)
        return
    dev = torch.device(args.device)
    n = args.images or (256 if args.quick else 1024)
    repeats = args.repeats or (2 if args.quick else 5)
    model, layers = make_model(args.size)
    model.to(dev)
    ds = ProceduralDataset(n, args.size, args.mask_size)
    print(f"device {dev}, threads {torch.get_num_threads()} (dissection workers: "
          f"{torch.get_num_threads() if dev.type == 'cpu' else 1}), {n} images {ds.size}x{ds.size}, masks "
          f"{ds.mask_size}x{ds.mask_size}, layers {layers}, "
          f"batch {args.batch_size}")
    workers = torch.get_num_threads() if dev.type == "cpu" else 1
    forward_only(model, ds, args.batch_size, dev)  # warm-up
    timed_dissect(model, ds, layers, args.batch_size, dev)
    # interleaved repeats: each ratio compares runs taken moments apart (robust to a shared, noisy machine)
    fwd, fwd_w, cached, stream = [], [], [], []
    for _ in range(repeats):
        fwd.append(forward_only(model, ds, args.batch_size, dev))
        if workers > 1:
            fwd_w.append(forward_on_workers(model, ds, args.batch_size, workers))
        cached.append(timed_dissect(model, ds, layers, args.batch_size, dev))
        stream.append(timed_dissect(model, ds, layers, args.batch_size, dev, cache_bytes=0))
    med = statistics.median

    def ratio(base: list, runs: list, i: int) -> float:
        return med(b[i] / r[i] for b, r in zip(base, runs, strict=True))

    print(f"forward-only            {n / med(f[0] for f in fwd):9.1f} images/s")
    if fwd_w:
        print(f"forward-only, {workers} workers {n / med(f[0] for f in fwd_w):9.1f} images/s   ratio "
              f"{ratio(fwd, fwd_w, 0):.2f}x wall (batches side by side, one intra-op thread each)")
    for label, runs, note in (("dissection (default)  ", cached, "(target >= 0.70)"),
                              ("dissection (streaming)", stream, "(two forward passes)")):
        print(f"{label}  {n / med(r[0] for r in runs):9.1f} images/s   ratio {ratio(fwd, runs, 0):.2f}x wall, "
              f"{ratio(fwd, runs, 1):.2f}x CPU time   {note}")
        if fwd_w:
            print(f"{'':26s}vs forward-only on {workers} workers: {ratio(fwd_w, runs, 0):.2f}x wall")
    print("ratios per repeat (default, wall): " + " ".join(f"{f[0] / c[0]:.2f}" for f, c in zip(fwd, cached,
                                                                                              strict=True)))
    if args.no_memory:
        return
    sizes = [500, 2000] if args.quick else [1000, 10000]
    for cache in (1 << 28, 0):
        for size in sizes:
            cmd = [sys.executable, __file__, "--memory-child", str(size), "--device", args.device,
                   "--batch-size", str(args.batch_size), "--cache-bytes", str(cache), "--size", str(args.size),
                   "--mask-size", str(ds.mask_size)]
            run = subprocess.run(cmd, capture_output=True, text=True, check=True)
            res = json.loads(run.stdout.strip().splitlines()[-1])
            label = "default cache" if cache else "streaming"
            print(f"peak memory {label:13s} {size:6d} images: RSS growth during dissect {res['rss_growth_mb']:7.1f} MB"
                  f" (peak RSS {res['rss_peak_mb']:.0f} MB, GPU peak {res['gpu_peak_mb']:.0f} MB)")


if __name__ == "__main__":
    main()
