"""A correction made through the web app, measured: a planted defect, remarks submitted over HTTP, apply, accuracy.

The defect is a *named unit suppressed*: a classifier trained on the built-in concept world is dissected, and the
units of the deepest conv layer that dissection names ``--concept`` (default "red") are switched off (their filter
weights and bias set to 0). The classes whose key colour is that concept ("red circle", "red square") lose most of
their accuracy, a few others some. The correction project stores the unit names and concept references of the
healthy model (made when it was dissected, before the defect) and the defective weights as version 1.

Not the defect of ``semlens reproduce correction`` (a class made rare in training): there the model calls red
squares red circles, so the remark "misses red" names what it already sees and no unit detects "square"; in its
``--fast`` run enhancement fixed none of the remarked images and the rare class stayed at 0 accuracy (0 -> 0).

1. set-up (cached in OUT): ``--train`` concept images (seed 1), ``alexnet-like`` trained ``--epochs``; reference
   images in Broden format (seed 3) dissected; the defective weights; a fresh correction project on the
   reference images;
2. ``semlens serve`` in its own process; for each reference image of an affected class that the defective model
   assigns to a class without the concept (at most ``--remarks``), its sample page is opened and the remark
   "misses <concept>" is posted through the page's form (the forgery cookie and token the page set, as a
   browser sends them); then ``apply`` is posted with ``--steps/--lr/--mu`` and its progress endpoint polled;
3. accuracy per class on ``--test`` held-out images (seed 2) of the clean model, the defective model (version 1)
   and the version the app made: how much of the affected classes' lost accuracy came back, and how much the
   other classes moved (mean and max |Δ accuracy| against the defective model).

    python benchmarks/serve_correction.py --out runs/serve-correction [--remarks 16] [--steps 50] [--lr 1e-3]

Training the clean model (8,000 images of 64 px, 8 epochs) takes minutes on a 2-core CPU and is done once per OUT;
the rest (project, remarks, apply, evaluation) takes seconds.

Writes ``OUT/serve_correction.json``. Seeded: the same arguments give the same numbers on the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import torch

MODEL = "alexnet-like"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _no_redirect() -> urllib.request.OpenerDirector:
    class Keep(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    return urllib.request.build_opener(Keep)


class Browser:
    """The HTTP a browser sends to the app: a cookie jar holding the forgery cookie, forms posted with the token
    read from the page they are on. Redirects after a POST are not followed (their status is checked)."""

    def __init__(self, url: str) -> None:
        self.url, self.cookie, self.opener = url, "", _no_redirect()

    def get(self, path: str) -> str:
        req = urllib.request.Request(self.url + path, headers={"Cookie": self.cookie} if self.cookie else {})
        with urllib.request.urlopen(req, timeout=120) as r:
            new = r.headers.get("set-cookie")
            if new:
                self.cookie = new.split(";")[0]
            return r.read().decode()

    def submit(self, page: str, action: str, fields: dict[str, str]) -> int:
        """POST ``fields`` to ``action`` with the forgery token of the form on ``page``; the answer's status."""
        token = re.search(r'name="csrf" value="([^"]+)"', page)
        if token is None:
            raise RuntimeError(f"no form with a forgery token on the page before POST {action}")
        body = urllib.parse.urlencode({"csrf": token.group(1), **fields}).encode()
        req = urllib.request.Request(self.url + action, data=body, method="POST",
                                     headers={"Cookie": self.cookie, "Origin": self.url,
                                              "Content-Type": "application/x-www-form-urlencoded"})
        try:
            with self.opener.open(req, timeout=120) as r:
                return r.status
        except urllib.error.HTTPError as err:  # 303 (not followed) and refusals
            if err.code == 303:
                return 303
            raise RuntimeError(f"POST {action}: {err.code} {err.read().decode()[-300:]}") from None


def setup(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Clean model, reference images, dissection, defective weights (each made once and kept in ``out``)."""
    from semlens.checkpoint import read_config, save_weights
    from semlens.experiments.correction import deepest_layer_with
    from semlens.models import build_model, load
    from semlens.train import TrainConfig, Trainer
    from semlens.units.dissect import dissect
    from semlens.units.names import UnitNames
    from semlens.world import BrodenDataset, generate_concepts, write_concepts

    out.mkdir(parents=True, exist_ok=True)
    clean, data, diss = out / "clean.safetensors", out / "reference", out / "dissection"
    kwargs = {"num_classes": 12, "image_size": args.size}
    made_with = {k: getattr(args, k) for k in ("train", "epochs", "size", "reference", "seed")}
    record = out / "setup.json"
    if record.is_file() and json.loads(record.read_text()) != made_with:
        raise SystemExit(f"{out} holds a clean model made with {record.read_text().strip()}, not "
                         f"{json.dumps(made_with)}; choose another --out")
    if not clean.is_file():
        t0 = time.perf_counter()
        train = generate_concepts(args.train, size=args.size, seed=args.seed + 1, masks=False)
        torch.manual_seed(args.seed)
        model = build_model(MODEL, **kwargs)
        cfg = TrainConfig(epochs=args.epochs, batch_size=64, lr=2e-3, optimizer="adam", weight_decay=0.0,
                          lr_schedule="cosine", seed=args.seed, device="cpu")
        trainer = Trainer(model, train.dataset(), None, cfg,
                          model_config={"model": MODEL, "model_kwargs": kwargs, "class_names": train.class_names})
        trainer.fit()
        trainer.save(clean)
        record.write_text(json.dumps(made_with))
        print(f"trained the clean model on {args.train} images, {args.epochs} epochs: "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    model = load(MODEL, clean, device="cpu", **kwargs).eval()
    if not (diss / "units.csv").is_file():
        t0 = time.perf_counter()
        if data.exists():
            shutil.rmtree(data)
        write_concepts(data, n=args.reference, size=args.size, seed=args.seed + 3, workers=1)
        dissect(model, BrodenDataset(data), model.conv_layers, batch_size=100, device="cpu").save(diss)
        print(f"dissected {len(model.conv_layers)} conv layers on {args.reference} reference images: "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    layer = deepest_layer_with(diss / "units.csv", model.conv_layers, args.concept)
    if layer is None:
        raise SystemExit(f"no conv unit of the clean model detects {args.concept!r}; nothing to suppress")
    units = UnitNames.from_csv(diss / "units.csv", layer).units_for(args.concept, 0.04)
    defective = out / f"defective-{args.concept}.safetensors"
    broken = load(MODEL, clean, device="cpu", **kwargs).eval()
    conv = broken.get_submodule(layer)
    with torch.no_grad():
        conv.weight[units] = 0.0
        if conv.bias is not None:
            conv.bias[units] = 0.0
    save_weights(broken, defective, config=read_config(clean))
    return {"clean": clean, "defective": defective, "data": data, "dissection": diss, "layer": layer,
            "units": units.tolist(), "model": model, "broken": broken}


def make_project(out: Path, s: dict[str, Any]) -> Path:
    """A fresh correction project: defective weights as version 1, names and references of the clean model."""
    from semlens.correct.project import CorrectionProject, classifier_artefacts

    proj = out / "project"
    if proj.exists():
        shutil.rmtree(proj)
    arts = classifier_artefacts(MODEL, s["clean"], s["data"], s["dissection"] / "units.csv", s["layer"])
    CorrectionProject.init(proj, kind="classifier", model=MODEL, weights=s["defective"], artefacts=arts,
                           data=str(s["data"]), layer=s["layer"], dissection=str(s["dissection"]))
    return proj


def remark_samples(s: dict[str, Any], concept: str, n: int) -> list[str]:
    """Reference images of the classes named with ``concept`` that the defective model assigns to a class without
    it (the misses a user would see), at most ``n``, in id order."""
    from semlens.world import BrodenDataset, read_images

    ref = BrodenDataset(s["data"])
    has = torch.tensor([concept in c.split(" ") for c in ref.class_names])
    labels = torch.as_tensor(ref.task_labels)
    pick = torch.nonzero(has[labels]).flatten().tolist()
    images = read_images(s["data"], [ref.images[i] for i in pick], ref.image_size)
    with torch.no_grad():
        pred = s["broken"](images).argmax(-1)
    return [Path(ref.images[i]).stem for i, p in zip(pick, pred.tolist(), strict=True) if not has[p]][:n]


def correct_through_app(proj: Path, samples: list[str], concept: str, args: argparse.Namespace) -> dict[str, Any]:
    """Serve ``proj``, post one remark per sample from its page, apply, wait; the apply job's final status."""
    port = _free_port()
    env = {**os.environ, "SEMLENS_PROGRESS": "0", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    log = proj.parent / "serve.log"
    with open(log, "wb") as sink:
        server = subprocess.Popen([sys.executable, "-m", "semlens", "serve", "-p", str(proj), "--port", str(port)],
                                  env=env, stdout=sink, stderr=subprocess.STDOUT)
    b = Browser(f"http://127.0.0.1:{port}")
    try:
        deadline = time.time() + 60
        while True:
            try:
                overview = b.get("/v/1/")
                break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise SystemExit(f"the server did not start; its log ({log}):\n"
                                     f"{log.read_text()[-2000:]}") from None
                time.sleep(0.1)
        for sid in samples:
            page = b.get(f"/v/1/sample/{sid}")
            status = b.submit(page, "/remarks", {"sample": sid, "missing": concept,
                                                 "text": f"this is {concept}; the model misses it"})
            if status != 303:
                raise RuntimeError(f"remark on {sid}: status {status}")
        overview = b.get("/v/1/")
        listed = len(re.findall(r'<tr class="remark open">', overview))
        if listed != len(samples):
            raise RuntimeError(f"{len(samples)} remarks posted but {listed} open remarks listed")
        b.submit(overview, "/apply", {"steps": str(args.steps), "lr": str(args.lr), "mu": str(args.mu)})
        while (job := json.loads(b.get("/apply/status.json")))["state"] == "running":
            time.sleep(0.5)
    finally:
        server.terminate()
        server.wait(10)
    if job["state"] != "done":
        raise SystemExit(f"apply failed: {job}")
    return job


def per_class_accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, n_classes: int
                       ) -> torch.Tensor:
    """(n_classes,) accuracy of ``model`` on the images of each class (images (N, 3, S, S), labels (N,))."""
    with torch.no_grad():
        pred = torch.cat([model(images[a:a + 256]).argmax(-1) for a in range(0, len(images), 256)])
    return torch.stack([(pred[labels == k] == k).float().mean() for k in range(n_classes)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/serve-correction"))
    ap.add_argument("--concept", default="red", help="colour whose named units are suppressed (and remarks name)")
    ap.add_argument("--train", type=int, default=8000, help="training images of the clean model")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--reference", type=int, default=600, help="reference images (dissection, references, remarks)")
    ap.add_argument("--test", type=int, default=1500, help="held-out test images")
    ap.add_argument("--remarks", type=int, default=16)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--mu", type=float, default=1e-2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from semlens.correct.project import CorrectionProject
    from semlens.world import generate_concepts

    t0 = time.perf_counter()
    s = setup(args.out, args)
    proj = make_project(args.out, s)
    samples = remark_samples(s, args.concept, args.remarks)
    if not samples:
        raise SystemExit(f"the defective model misses no reference image of a {args.concept!r} class")
    t_app = time.perf_counter()
    job = correct_through_app(proj, samples, args.concept, args)
    t_app = time.perf_counter() - t_app
    after = CorrectionProject(proj).corrector("cpu", version=job["version"]).model.eval()
    test = generate_concepts(args.test, size=args.size, seed=args.seed + 2, masks=False)
    k = len(test.class_names)
    acc = {name: per_class_accuracy(m, test.images, test.labels, k)
           for name, m in (("clean", s["model"]), ("defective", s["broken"]), ("corrected", after))}
    hit = torch.tensor([args.concept in c.split(" ") for c in test.class_names])
    weight = torch.stack([(test.labels == j).sum() for j in range(k)]).float()

    def mean(a: torch.Tensor, m: torch.Tensor) -> float:
        return float((a[m] * weight[m]).sum() / weight[m].sum())

    aff = {name: mean(a, hit) for name, a in acc.items()}
    lost = aff["clean"] - aff["defective"]
    moved = (acc["corrected"] - acc["defective"])[~hit].abs()
    others = [c for c, h in zip(test.class_names, hit.tolist(), strict=True) if not h]
    from_clean = {name: float((acc[name] - acc["clean"])[~hit].abs().mean()) for name in ("defective", "corrected")}
    result = {
        "concept": args.concept, "layer": s["layer"], "suppressed_units": s["units"], "remarks": len(samples),
        "apply": {"steps": args.steps, "lr": args.lr, "mu": args.mu, "seconds": job["elapsed_s"]},
        "affected_classes": [c for c, h in zip(test.class_names, hit.tolist(), strict=True) if h],
        "affected_accuracy": aff, "recovered_fraction": (aff["corrected"] - aff["defective"]) / lost if lost > 0
        else float("nan"),
        "other_classes_mean_abs_change": float(moved.mean()), "other_classes_max_abs_change": float(moved.max()),
        "other_class_moved_most": others[int(moved.argmax())],
        "other_classes_mean_abs_difference_from_clean": from_clean,
        "other_classes_mean_accuracy": {name: mean(a, ~hit) for name, a in acc.items()},
        "per_class": {c: {name: round(float(a[j]), 4) for name, a in acc.items()} | {"images": int(weight[j])}
                      for j, c in enumerate(test.class_names)},
        "remarks_apply_seconds_through_app": t_app, "total_seconds": time.perf_counter() - t0,
    }
    (args.out / "serve_correction.json").write_text(json.dumps(result, indent=2))
    print(f"defect: {len(s['units'])} units of {s['layer']} named {args.concept!r} suppressed "
          f"({', '.join(map(str, s['units']))}); {len(samples)} remarks 'misses {args.concept}' posted through "
          f"the app, applied ({args.steps} steps, lr {args.lr:g}, mu {args.mu:g}; {job['elapsed_s']:.1f} s)")
    print(f"{'test accuracy (' + str(args.test) + ' held-out images)':44s} {'clean':>8s} {'defective':>10s} "
          f"{'corrected':>10s}")
    print(f"{'affected: ' + ', '.join(result['affected_classes']):44s} {aff['clean']:8.3f} {aff['defective']:10.3f} "
          f"{aff['corrected']:10.3f}")
    for c in result["affected_classes"]:
        row = result["per_class"][c]
        lost_c, gain = row["clean"] - row["defective"], row["corrected"] - row["defective"]
        back = f"  ({100 * gain / lost_c:.0f} % of its loss back)" if lost_c > 0 else ""
        print(f"{'  ' + c:44s} {row['clean']:8.3f} {row['defective']:10.3f} {row['corrected']:10.3f}{back}")
    oth = result["other_classes_mean_accuracy"]
    print(f"{'other classes (mean)':44s} {oth['clean']:8.3f} {oth['defective']:10.3f} {oth['corrected']:10.3f}")
    print(f"lost accuracy recovered on the affected classes: {100 * result['recovered_fraction']:.0f} %")
    print("other classes moved by the correction: mean |Δ accuracy| "
          f"{100 * result['other_classes_mean_abs_change']:.1f} points (max "
          f"{100 * result['other_classes_max_abs_change']:.1f}, {result['other_class_moved_most']}); "
          f"mean |accuracy - clean| {100 * from_clean['defective']:.1f} points defective -> "
          f"{100 * from_clean['corrected']:.1f} corrected")
    print(f"{result['total_seconds']:.0f} s in all ({t_app:.0f} s for the remarks and the apply through the app)")


if __name__ == "__main__":
    main()
