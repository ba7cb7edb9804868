"""A correction made through the web app, measured: a planted defect, remarks submitted over HTTP, apply, accuracy.

1. ``semlens reproduce correction --fast`` setup (reused when OUT already holds it): a classifier trained with the
   class ``red square`` made rare (4 % of its images kept), dissected on reference images.
2. A feedback project on the reference images, corrected through the deepest conv layer with a ``red`` detector.
3. ``semlens serve`` in its own process; remarks "misses red" posted through the app's form (forgery token and
   all) on the reference images of the rare class that the model gets wrong, then ``apply`` through the app,
   waiting on its progress endpoint, as the page does.
4. Accuracy per class on the held-out test images of the reproduction, before (version 1) and after (the new
   version): how much of the rare class's lost accuracy came back, and how much the other classes moved.

    python benchmarks/serve_correction.py --out runs/serve-correction [--remarks 16] [--steps 50] [--lr 1e-4]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import torch


def _post(url: str, fields: dict[str, str], cookie: str) -> int:
    req = urllib.request.Request(url, data=urllib.parse.urlencode(fields).encode(), headers={"Cookie": cookie},
                                 method="POST")
    with urllib.request.urlopen(req, timeout=600) as r:
        return r.status


def main() -> None:
    from semlens.correct.project import CorrectionProject, classifier_artefacts
    from semlens.experiments.correction import ImageCorrectionConfig, deepest_layer_with, run_image_correction
    from semlens.world import BrodenDataset, generate_concepts

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/serve-correction"))
    ap.add_argument("--remarks", type=int, default=16)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--mu", type=float, default=1e-2)
    args = ap.parse_args()
    cfg = ImageCorrectionConfig.fast(device="cpu")
    out = args.out
    if not (out / "results.json").is_file():
        run_image_correction(out, cfg)
    weights, data, diss = out / "rare-trained.safetensors", out / "reference", out / "dissection"
    layer = deepest_layer_with(diss / "units.csv", [f"features.conv{i}" for i in range(1, 6)], cfg.concept)
    proj = out / "project"
    if not (proj / ".semlens" / "project.json").exists():
        arts = classifier_artefacts("alexnet-like", weights, data, diss / "units.csv", layer, device="cpu")
        CorrectionProject.init(proj, kind="classifier", model="alexnet-like", weights=weights, artefacts=arts,
                               data=str(data), layer=layer)
    project = CorrectionProject(proj)
    base = project.store.current_version()
    corr = project.corrector("cpu", version=base.id)
    ref = BrodenDataset(data)
    rare = ref.class_names.index(cfg.rare_class)
    ids = [Path(n).stem for n in ref.images]
    labels = torch.as_tensor(ref.task_labels)
    pick = [i for i in torch.nonzero(labels == rare).flatten().tolist()]
    with torch.no_grad():
        pred = corr.model(corr._images([ids[i] for i in pick])).argmax(-1)
    wrong = [ids[i] for i, p in zip(pick, pred.tolist(), strict=True) if p != rare][: args.remarks]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "SEMLENS_PROGRESS": "0"}
    server = subprocess.Popen([sys.executable, "-m", "semlens", "serve", "-p", str(proj), "--dissection", str(diss),
                               "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.perf_counter()
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{url}/v/{base.id}/", timeout=5) as r:
                    cookie = r.headers.get("set-cookie", "").split(";")[0]
                    csrf = re.search(r'name="csrf" value="([^"]+)"', r.read().decode()).group(1)
                break
            except OSError:
                time.sleep(0.1)
        for sid in wrong:
            _post(f"{url}/remarks", {"csrf": csrf, "sample": sid, "missing": cfg.concept,
                                     "text": f"this {cfg.rare_class} misses {cfg.concept}"}, cookie)
        _post(f"{url}/apply", {"csrf": csrf, "steps": str(args.steps), "lr": str(args.lr), "mu": str(args.mu)},
              cookie)
        while True:
            with urllib.request.urlopen(f"{url}/apply/status.json", timeout=30) as r:
                status = json.loads(r.read())
            if status["state"] != "running":
                break
            time.sleep(0.5)
    finally:
        server.terminate()
        server.wait(10)
    if status["state"] != "done":
        raise SystemExit(f"apply failed: {status}")
    took = time.perf_counter() - t0
    test = generate_concepts(cfg.n_test, size=cfg.size, seed=cfg.seed + 2, masks=False)
    after = CorrectionProject(proj).corrector("cpu", version=status["version"]).model
    per_class = {}
    with torch.no_grad():
        p0, p1 = corr.model(test.images).argmax(-1), after(test.images).argmax(-1)
    for k, name in enumerate(test.class_names):
        m = test.labels == k
        per_class[name] = (float((p0[m] == k).float().mean()), float((p1[m] == k).float().mean()), int(m.sum()))
    acc0, acc1 = float((p0 == test.labels).float().mean()), float((p1 == test.labels).float().mean())
    others = [b - a for n, (a, b, _) in per_class.items() if n != cfg.rare_class]
    r0, r1, n_rare = per_class[cfg.rare_class]
    clean = json.loads((out / "results.json").read_text())
    result = {"layer": layer, "remarks": len(wrong), "version": status["version"], "apply_seconds": status["elapsed_s"],
              "through_app_seconds": took, "rare_class": cfg.rare_class, "rare_test_images": n_rare,
              "rare_accuracy_before": r0, "rare_accuracy_after": r1, "overall_before": acc0, "overall_after": acc1,
              "other_classes_mean_change": sum(others) / len(others), "other_classes_max_drop": -min(others),
              "per_class": per_class, "reproduction": {k: clean.get(k) for k in ("rare_class_accuracy",)}}
    (out / "serve_correction.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "per_class"}, indent=2))


if __name__ == "__main__":
    main()
