"""Benchmark the built-in worlds: concept-image generation, Broden writing, clip generation, frame encoding.

Each measurement is the median over repeats; every line also prints the ratio to a baseline measured in
the same run (one image / one clip per batch, or one writer process instead of all cores).

    python benchmarks/bench_world.py [--quick] [--device cpu|cuda|auto] [--n 10000] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from semlens.runtime import resolve_device
from semlens.world import concepts as C
from semlens.world import generate_clips, write_concepts
from semlens.world.clips import CLIP_CHUNK, _chunk_clips


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cpu_seconds() -> float:
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, fewer repeats")
    ap.add_argument("--device", default="auto", help="device for the frame-encoding measurement")
    ap.add_argument("--n", type=int, default=None, help="images written in the Broden measurement")
    ap.add_argument("--out", default=None, help="directory for the written dataset (default: a temp dir)")
    args = ap.parse_args()
    repeats = 3 if args.quick else 5
    n_write = args.n or (1000 if args.quick else 10000)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")

    # 1. generation throughput: a batch of CHUNK images at once vs one image per call
    C._generate_chunk(0, 0, 64, 0.04)
    t_batch = median_time(lambda: C._generate_chunk(0, 1, 64, 0.04), repeats)
    k = 16 if args.quick else 32
    t_single = median_time(lambda: [C._generate_chunk(0, i, 64, 0.04, count=1) for i in range(k)], repeats) / k
    rate_b, rate_s = C.CHUNK / t_batch, 1 / t_single
    print(f"concept images 64x64, batched ({C.CHUNK}/call): {rate_b:,.0f} images/s; one per call: "
          f"{rate_s:,.0f} images/s; ratio {rate_b / rate_s:.1f}x")

    # 2. Broden writing: all cores vs one process
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="semlens-bench-"))
    try:
        walls = {}
        for workers in (None, 1):
            target = root / f"w{workers or 'all'}"
            shutil.rmtree(target, ignore_errors=True)
            c0, t0 = cpu_seconds(), time.perf_counter()
            write_concepts(target, n=n_write, size=64, seed=0, workers=workers)
            walls[workers] = time.perf_counter() - t0
            print(f"write_concepts n={n_write} workers={workers or os.cpu_count()}: {walls[workers]:.1f}s wall, "
                  f"{cpu_seconds() - c0:.1f}s CPU (incl. workers), {n_write / walls[workers]:,.0f} images/s")
            if args.quick or workers is None:
                shutil.rmtree(target, ignore_errors=True)
        print(f"write ratio one process / all cores: {walls[1] / walls[None]:.2f}x")
    finally:
        if not args.out:
            shutil.rmtree(root, ignore_errors=True)

    # 3. clip generation: CLIP_CHUNK clips x 16 frames per call vs one clip at a time
    t_clips = median_time(lambda: _chunk_clips(0, 0, 16, 64, 0.03), repeats)
    rate_c = CLIP_CHUNK / t_clips
    t_one = median_time(lambda: [_chunk_clips(0, i, 16, 64, 0.03, count=1) for i in range(4)], repeats) / 4
    print(f"clips 16x64x64 frames (no captions): {rate_c:,.1f} clips/s batched, {1 / t_one:,.1f} clips/s one at a "
          f"time; ratio {rate_c * t_one:.1f}x")
    n_cap = 64 if args.quick else 256
    t_full = median_time(lambda: generate_clips(n=n_cap, frames=16, size=64, seed=1), max(1, repeats // 2))
    print(f"generate_clips with 20 captions each: {n_cap / t_full:,.1f} clips/s")

    # 4. frame encoding with the reference CNN on the chosen device
    from semlens.captioning.features import encode_frames
    from semlens.models import build_model

    dev = resolve_device(args.device)
    model = build_model("alexnet-like", num_classes=12).to(dev)
    frames = generate_clips(n=32, frames=16, size=64, seed=2).frames
    encode_frames(model, frames[:2], device=dev)
    t_enc = median_time(lambda: encode_frames(model, frames, device=dev, batch_size=512), repeats)
    t_enc1 = median_time(lambda: encode_frames(model, frames[:4], device=dev, batch_size=1), repeats) / 4 * 32
    print(f"encode_frames alexnet-like on {dev}: {frames.shape[0] * 16 / t_enc:,.0f} frames/s (batch 512), "
          f"{frames.shape[0] * 16 / t_enc1:,.0f} frames/s (batch 1); ratio {t_enc1 / t_enc:.1f}x")


if __name__ == "__main__":
    main()
