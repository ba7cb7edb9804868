"""Start-up time of the command line, this source tree against a baseline revision, in the same run.

    python benchmarks/bench_cli_start.py [--baseline-rev 7cb8b1d] [--repeats 5] [--quick]

Times (median wall seconds over ``--repeats`` fresh processes) of

* ``semlens --help``;
* ``semlens feedback list`` and ``semlens feedback add SAMPLE --missing CONCEPT`` on a classifier project
  (alexnet-like trained one epoch on built-in concept images, one dissected layer) and on a captioner project
  (LSTM-I on built-in clips encoded by that classifier) built once in a temporary directory;

for this tree's ``src`` and for ``git archive <baseline-rev> src`` (the code before the change), and prints the
ratio baseline / now. The projects are built with this tree's code; every timed command runs inside the project
directory with ``--project .`` so both trees read the same files.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _semlens(src: Path, args: list[str], cwd: Path, check: bool = True) -> float:
    """Wall seconds of one ``python -m semlens ARGS`` process with ``src`` first on the path. With
    ``check=False`` a refusal (exit 2, e.g. a topic no neuron carries) still counts: the answer is the time."""
    env = {**os.environ, "PYTHONPATH": str(src), "SEMLENS_PROGRESS": "0"}
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "semlens", *args], cwd=cwd, env=env, capture_output=True, text=True)
    took = time.perf_counter() - t0
    if res.returncode != 0 and (check or res.returncode != 2):
        raise SystemExit(f"semlens {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
    return took


def _median(src: Path, args: list[str], cwd: Path, repeats: int) -> float:
    _semlens(src, args, cwd, check=False)  # warm the file cache
    return statistics.median(_semlens(src, args, cwd, check=False) for _ in range(repeats))


def _baseline(rev: str, into: Path) -> Path:
    blob = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(blob)) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def _build_projects(work: Path, quick: bool) -> dict[str, tuple[Path, list[str]]]:
    """A classifier and a captioner correction project; returns name -> (project dir, `add` arguments)."""
    src, n = ROOT / "src", (300 if quick else 1200)
    run = [  # (arguments, cwd)
        ["data", "concepts", "--out", "concepts", "--n", str(n), "--size", "64", "--workers", "1"],
        ["train", "--data", "concepts", "--out", "cnn", "--epochs", "1", "--device", "cpu"],
        ["dissect", "--weights", "cnn/model.safetensors", "--data", "concepts", "--layers", "features.conv5",
         "--out", "dissect", "--device", "cpu", "--cards", "0", "--iou-threshold", "0.0"],
        ["data", "clips", "--out", "clips", "--n", "60", "--frames", "8", "--encoder", "cnn/model.safetensors",
         "--device", "cpu"],
        ["caption", "train", "--corpus", "clips", "--out", "cap", "--epochs", "1", "--topics", "6", "--hidden", "32",
         "--embed", "32", "--decoder-hidden", "32", "--attention", "16", "--device", "cpu"],
        ["feedback", "init", "--weights", "cnn/model.safetensors", "--data", "concepts", "--names",
         "dissect/units.csv", "--layer", "features.conv5", "--project", "proj-classifier"],
        ["feedback", "init", "--kind", "captioner", "--weights", "cap/model.safetensors", "--data", "clips",
         "--project", "proj-captioner"],
    ]
    for args in run:
        print(f"  building: semlens {' '.join(args[:2])} ...", flush=True)
        _semlens(src, args, work)
    import csv

    with open(work / "dissect" / "units.csv") as f:
        concept = next(r["concept"] for r in csv.DictReader(f))
    from semlens.captioning.topics import TopicModel

    topic = TopicModel.load(work / "cap" / "model.topics.json").topic_names()[0]
    clip = sorted(p.stem for p in (work / "clips" / "features").glob("*.npy"))[0]
    return {"classifier": (work / "proj-classifier", ["000000", "--missing", concept]),
            "captioner": (work / "proj-captioner", [clip, "--missing", topic])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline-rev", default="7cb8b1d", help="git revision of the code before the change")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="smaller projects, 3 repeats")
    ap.add_argument("--no-add", action="store_true", help="time --help and feedback list only")
    a = ap.parse_args()
    repeats = 3 if a.quick else a.repeats
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        trees = {"before": _baseline(a.baseline_rev, work / "baseline"), "now": ROOT / "src"}
        projects = _build_projects(work, a.quick)
        cases = [("semlens --help", ["--help"], work)]
        for kind, (proj, add) in projects.items():
            cases.append((f"feedback list ({kind})", ["feedback", "list", "--project", "."], proj))
            if not a.no_add:
                cases.append((f"feedback add ({kind})", ["feedback", "add", *add, "--project", "."], proj))
        print(f"\nmedian wall seconds over {repeats} runs (python {sys.version.split()[0]}, "
              f"{os.cpu_count()} cpus)")
        print(f"{'command':32s} {'before':>8s} {'now':>8s} {'before/now':>10s}")
        for label, args, cwd in cases:
            t = {name: _median(src, args, cwd, repeats) for name, src in trees.items()}
            print(f"{label:32s} {t['before']:8.2f} {t['now']:8.2f} {t['before'] / t['now']:10.2f}x", flush=True)


if __name__ == "__main__":
    main()
