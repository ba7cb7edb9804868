"""The demo's last step writes a correction project that `semlens serve` opens without further arguments."""

from __future__ import annotations

import json
import os

import torch

from semlens.experiments.demo import DemoContext
from semlens.experiments.demo_steps import s10_world, s80_serve


def test_serve_step_writes_a_project_the_web_app_opens(tmp_path, monkeypatch):
    from semlens.serve.project_view import ProjectView
    from semlens.units.dissect import dissect
    from semlens.world import BrodenDataset

    for name, value in (("N_BRODEN", 40), ("N_TRAIN", 128), ("N_TEST", 32), ("EPOCHS", 1), ("N_CLIPS", 8)):
        monkeypatch.setattr(s10_world, name, value)
    ctx = DemoContext(out=tmp_path / "demo", device=torch.device("cpu"), seed=0)
    s10_world.run(ctx)
    model = ctx.artifacts["classifier"]
    result = dissect(model, BrodenDataset(ctx.artifacts["concepts_dir"]), model.conv_layers, batch_size=20)
    ctx.artifacts["dissection_units"] = result.save(ctx.path("dissect", "classifier"))["units"]
    for _ in range(2):  # a second demo run into the same folder makes the project anew
        sections = s80_serve.run(ctx)
    project = tmp_path / "demo" / "projects" / "classifier"
    assert ctx.artifacts["serve_command"] == f"semlens serve -p {project}"
    assert "semlens serve" in "".join(sections[0].blocks)
    cfg = json.loads((project / ".semlens" / "project.json").read_text())
    assert cfg["dissection"] == os.path.join("..", "..", "dissect", "classifier")  # relative: the demo can move
    assert cfg["layer"] == model.conv_layers[-1]
    view = ProjectView(project)  # no --dissection: the recorded one is used
    assert [r.layer for r in view.layers()] == list(model.conv_layers)
    assert len(view.sample_ids()) == 40 and view.current_version().id == 1
    sample = view.sample_ids()[0]
    probs = model(view.corrector(1)._images([sample])).softmax(-1)[0]
    top = ctx.artifacts["concepts_test"].class_names[int(probs.argmax())]
    assert view.describe(1, sample).startswith(top)
    # the demo's dissection stores each unit's top images: its unit cards show them, outlined
    layer = model.conv_layers[-1]
    tops, note = view.media.top_images(layer, 0)
    assert note == "" and len(tops) == 8 and not any(t.missing for t in tops)
    assert view.top_image_png(1, layer, 0, 0)[:8] == b"\x89PNG\r\n\x1a\n"
