"""The demo's activation-maximization step: prototypes of the best-named units in two variants."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import torch

from semlens.experiments.demo import DemoContext
from semlens.experiments.demo_steps import s10_world, s45_maximize, s80_serve


def test_maximize_step_writes_prototypes_of_the_best_named_units(tmp_path, monkeypatch):
    from semlens.units.dissect import dissect
    from semlens.world import BrodenDataset

    for name, value in (("N_BRODEN", 40), ("N_TRAIN", 128), ("N_TEST", 32), ("EPOCHS", 1), ("N_CLIPS", 8)):
        monkeypatch.setattr(s10_world, name, value)
    monkeypatch.setattr(s45_maximize, "UNITS", 3)
    monkeypatch.setattr(s45_maximize, "STEPS", 4)
    monkeypatch.setattr(s45_maximize, "JUDGE_EPOCHS", 1)
    ctx = DemoContext(out=tmp_path / "demo", device=torch.device("cpu"), seed=0)
    s10_world.run(ctx)
    model = ctx.artifacts["classifier"]
    result = dissect(model, BrodenDataset(ctx.artifacts["concepts_dir"]), model.conv_layers, batch_size=20)
    ctx.artifacts["dissection_units"] = result.save(ctx.path("dissect", "classifier"))["units"]
    layer = model.conv_layers[-1]
    best = sorted(torch.argsort(result.layers[layer].best_iou, descending=True, stable=True)[:3].tolist())

    sections = s45_maximize.run(ctx)

    assert len(sections) == 1 and any("<img" in b for b in sections[0].blocks)
    assert set(ctx.artifacts["prototypes_dirs"]) == {"plain", "expert"}
    for folder, out in ctx.artifacts["prototypes_dirs"].items():
        protos = np.load(out / "prototypes.npy")
        assert protos.shape == (3, 3, 64, 64) and protos.dtype == np.float32 and np.isfinite(protos).all()
        with open(out / "summary.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert [int(r["unit"]) for r in rows] == best, folder  # the top-IoU units, in unit order
        assert all(r["layer"] == layer and r["variant"] == folder for r in rows)
        assert all(np.isfinite(float(r["ratio"])) for r in rows)
        assert all(r["concept_hit"] in ("0.0", "1.0") for r in rows)  # every unit judged: colour or the judge
        assert len(list(out.glob("unit_*_*.png"))) == 3

    # the serve step attaches them: the web app's unit card of a maximised unit shows both prototypes
    from semlens.serve.project_view import ProjectView

    s80_serve.run(ctx)
    project = tmp_path / "demo" / "projects" / "classifier"
    stored = json.loads((project / ".semlens" / "project.json").read_text())["prototypes"]
    assert stored == [os.path.join("..", "..", "maximize", f) for f in ("plain", "expert")]  # relative: movable
    view = ProjectView(project)
    protos = view.media.prototypes_of(layer, best[0])
    assert sorted(p.variant for p in protos) == ["expert", "plain"] and all(p.path.is_file() for p in protos)
