"""Cost of human-in-the-loop correction on an image classifier, each against its baseline in the same run.

    python benchmarks/bench_correct.py [--quick] [--device cpu|cuda] [--batch-size 64]

On alexnet-like (64x64 inputs, 12 classes), correcting through ``features.conv5``:

* **enhance**: prediction with the named units of three concepts enhanced (``ClassifierCorrector.predict``)
  ÷ a plain forward of the same batch — the immediate fix should cost about one forward;
* **reference pass**: ``fit_references`` over a Broden-format dataset (per-concept mean activations of every unit, all
  concepts at once) ÷ reading the same batches and running the model forward only;
* **propagate step**: one correction-propagation step (forward up to the layer, squared distance to the enhanced
  map, backward, Adam, proximal anchor) ÷ one ordinary training step of the whole model (forward, cross-entropy,
  backward, Adam).

Medians over repeats; the unit names are synthetic (every fourth unit named after a concept), which does not change
the cost.

``--feedback`` (or the default ``--section all``) also times **``semlens feedback add``** on a classifier and a
captioner project of two sizes each (built-in data): each project is made with ``semlens feedback init``; the timed
call is ``semlens feedback add SAMPLE --missing TARGET`` run in-process (typer's CliRunner: imports are warm, so the
figure is the command's own work, not Python's start-up). ``ratio`` = large project ÷ small one: about 1 when
``add`` does not scale with the training split / corpus.

* classifier: alexnet-like (64×64, 12 classes, seeded random weights), Broden-format concept images (``n`` images,
  ~90 % train split), names for ``features.conv5`` (every fourth unit named after a concept);
* captioner: an attentive captioner (hidden 32) trained one epoch on built-in clips (16 frames, pooled-pixel frame
  features), K = 8 topics.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from semlens.checkpoint import save_weights
from semlens.cli.main import app
from semlens.correct.classifier import ClassifierCorrector, UnitNames
from semlens.correct.engine import propagate
from semlens.models import build_model
from semlens.runtime import resolve_device
from semlens.world import BrodenDataset, generate_clips, pooled_frame_features, write_clip_corpus, write_concepts

LAYER = "features.conv5"


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


def median_time(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def show(name: str, t: float, base: float, base_name: str) -> None:
    print(f"{name:22s} {t * 1e3:9.1f} ms   {base_name:28s} {base * 1e3:9.1f} ms   ratio {t / base:5.2f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer images and repeats (smoke test)")
    ap.add_argument("--device", default="auto", help="'auto', 'cpu' or 'cuda'")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--section", choices=("all", "costs", "feedback"), default="all")
    args = ap.parse_args()
    if args.section in ("all", "feedback"):
        feedback_add(args.quick)
    if args.section in ("all", "costs"):
        costs(args)


def feedback_add(quick: bool) -> None:
    """Median wall time of ``semlens feedback add`` on small and large projects of both kinds."""
    repeats = 2 if quick else 5
    sizes = {"classifier": (100, 400), "captioner": (40, 160)} if quick else {"classifier": (250, 1000),
                                                                              "captioner": (60, 240)}
    print(f"feedback add: torch {torch.__version__}, threads {torch.get_num_threads()}, repeats {repeats}")
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


def costs(args: argparse.Namespace) -> None:
    """Enhancement, reference pass and propagation step against their baselines."""
    device = resolve_device(args.device)
    repeats, n_images = (3, 128) if args.quick else (9, 512)
    print(f"device: {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, repeats {repeats}")

    torch.manual_seed(0)
    model = build_model("alexnet-like", num_classes=12, image_size=64).to(device).eval()
    with tempfile.TemporaryDirectory() as tmp:
        write_concepts(tmp, n=n_images, size=64, seed=0)
        data = BrodenDataset(tmp)
        names_all = [name for num, name, _ in data.labels if int(num) > 0]
        channels = _layer_output(model, torch.rand(1, 3, 64, 64, device=device)).shape[1]
        concepts = tuple(names_all[u % len(names_all)] for u in range(channels))
        named = torch.arange(0, channels, 4)
        names = UnitNames(LAYER, named, tuple(concepts[int(u)] for u in named), torch.full((len(named),), 0.2))
        corrector = ClassifierCorrector(model, LAYER, names, device=device)
        indices = list(range(len(data)))

        def forward_pass() -> None:
            with torch.no_grad():
                for _, batch in data.iter_batches(args.batch_size, indices):
                    model(batch.images.to(device))

        t_ref = median_time(lambda: corrector.fit_references(data, indices, args.batch_size), max(1, repeats // 3),
                            device)
        t_fwd = median_time(forward_pass, max(1, repeats // 3), device)
        show("reference pass", t_ref, t_fwd, "forward over the dataset")

        present = [c for c in dict.fromkeys(names.concepts) if int(corrector.references.count[
            corrector.references.names.index(c)]) > 0][:3]
        x = torch.rand(args.batch_size, 3, 64, 64, device=device)
        t_enh = median_time(lambda: corrector.predict(x, present), repeats, device)
        t_plain = median_time(lambda: corrector.predict(x), repeats, device)
        show("enhance (3 concepts)", t_enh, t_plain, "plain forward")

        targets = torch.randn_like(_layer_output(model, x))
        params = list(model.parameters())
        snapshot = [p.detach().clone() for p in params]
        steps = 3
        t_prop = median_time(lambda: propagate(model, x, targets, representation=LAYER, params=params, steps=steps,
                                               lr=1e-4), repeats, device) / steps
        with torch.no_grad():
            for p, s in zip(params, snapshot, strict=True):
                p.copy_(s)
        y = torch.randint(0, 12, (args.batch_size,), device=device)
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=1e-4)

        def train_step() -> None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

        t_train = median_time(train_step, repeats, device)
        show("propagate step", t_prop, t_train, "training step (whole model)")


def _layer_output(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    from semlens.layers import capture_activations

    with torch.no_grad(), capture_activations(model, LAYER) as acts:
        model(x)
    return acts[LAYER]


if __name__ == "__main__":
    main()
