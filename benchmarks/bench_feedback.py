"""Wall time of ``semlens feedback add`` on classifier and captioner projects of two sizes (built-in data).

    python benchmarks/bench_feedback.py [--quick]

Each project is made with the CLI (``semlens dissect``-style ``units.csv`` / ``semlens caption train``, then
``semlens feedback init``); the timed call is ``semlens feedback add SAMPLE --missing TARGET`` run in-process
(typer's CliRunner: imports are warm, so the figure is the command's own work, not Python's start-up).
Medians over repeats. ``ratio`` = large project ÷ small project: about 1 when ``add`` does not scale with the
training split / corpus.

* classifier: alexnet-like (64×64, 12 classes, seeded random weights), Broden-format concept images
  (``n`` images, ~90 % train split), names for ``features.conv5`` (every fourth unit named after a concept);
* captioner: an attentive captioner (hidden 32) trained one epoch on built-in clips (16 frames, pooled-pixel
  frame features), K = 8 topics.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from typer.testing import CliRunner

from semlens.checkpoint import save_weights
from semlens.cli.main import app
from semlens.models import build_model
from semlens.world import BrodenDataset, generate_clips, pooled_frame_features, write_clip_corpus, write_concepts

ENV = {"SEMLENS_PROGRESS": "0", "COLUMNS": "200"}


def _cli(*args: str) -> str:
    res = CliRunner().invoke(app, list(args), env=ENV)
    if res.exit_code != 0:
        raise RuntimeError(f"semlens {' '.join(args)} failed:\n{res.output}")
    return res.output


def classifier_project(root: Path, n: int) -> tuple[Path, str, str]:
    data = write_concepts(root / "data", n=n, size=64, seed=0)
    torch.manual_seed(0)
    model = build_model("alexnet-like", num_classes=12, image_size=64)
    save_weights(model, root / "model.safetensors", config={"model_kwargs": {"num_classes": 12, "image_size": 64}})
    channels = model.get_submodule("features.conv5").out_channels
    ds = BrodenDataset(data)
    concepts = [name for num, name, _ in ds.labels if int(num) > 0]
    with open(root / "units.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layer", "unit", "concept", "category", "iou", "threshold"])
        for u in range(0, channels, 4):
            w.writerow(["features.conv5", u, concepts[u % len(concepts)], "x", 0.2, 0.1])
    proj = root / "proj"
    _cli("feedback", "init", "--model", "alexnet-like", "--weights", str(root / "model.safetensors"), "--data",
         str(data), "--names", str(root / "units.csv"), "--layer", "features.conv5", "--project", str(proj))
    from semlens.correct.project import CorrectionProject

    corr = CorrectionProject(proj).corrector()
    target = next(c for c in dict.fromkeys(corr.names.concepts) if _tries(corr, c))
    return proj, Path(ds.images[0]).stem, target


def _tries(corr: object, target: str) -> bool:
    try:
        corr.check(corr.sample_ids()[0], target)  # type: ignore[attr-defined]
    except (KeyError, ValueError):
        return False
    return True


def captioner_project(root: Path, n: int) -> tuple[Path, str, str]:
    clips = generate_clips(n=n, frames=16, size=64, seed=0)
    corpus = write_clip_corpus(clips, root / "corpus", features=pooled_frame_features(clips.frames, grid=4))
    run = root / "run"
    _cli("caption", "train", "--corpus", str(corpus), "--out", str(run), "--lam", "1", "--topics", "8", "--epochs",
         "1", "--hidden", "32", "--embed", "32", "--decoder-hidden", "32", "--attention", "16", "--device", "cpu")
    proj = root / "proj"
    _cli("feedback", "init", "--kind", "captioner", "--weights", str(run / "model.safetensors"), "--data",
         str(corpus), "--project", str(proj))
    from semlens.correct.project import CorrectionProject

    corr = CorrectionProject(proj).corrector()
    names = corr.engine.names
    target = next(t for k, t in enumerate(names.topic_names) if names.neurons_of(k))
    return proj, clips.video_ids[clips.splits["test"][0]], target


def time_add(proj: Path, sample: str, target: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _cli("feedback", "add", sample, "--missing", target, "--project", str(proj))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller projects, fewer repeats")
    args = ap.parse_args()
    repeats = 2 if args.quick else 5
    sizes = {"classifier": (250, 1000), "captioner": (60, 240)}
    if args.quick:
        sizes = {"classifier": (100, 400), "captioner": (40, 160)}
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, repeats {repeats}")
    _cli("--help")  # warm imports
    makers = {"classifier": classifier_project, "captioner": captioner_project}
    for kind, (small, large) in sizes.items():
        with tempfile.TemporaryDirectory() as tmp:
            t = {}
            for n in (small, large):
                proj, sample, target = makers[kind](Path(tmp) / f"{kind}{n}", n)
                t[n] = time_add(proj, sample, target, repeats)
            print(f"feedback add  {kind:10s}  n={small:5d}: {t[small]:7.3f} s   n={large:5d}: {t[large]:7.3f} s   "
                  f"ratio {t[large] / t[small]:5.2f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
