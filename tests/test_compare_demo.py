"""The evaluate demo step on a tiny classifier and a few concept images."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from semlens.experiments.demo import DemoContext
from semlens.experiments.demo_steps import s30_evaluate
from semlens.world import generate_concepts


def test_demo_step_ranks_methods(tmp_path):
    torch.manual_seed(0)
    test = generate_concepts(n=12, size=32, seed=5)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, len(test.class_names)))
    ctx = DemoContext(out=tmp_path, device=torch.device("cpu"), artifacts={"classifier": model,
                                                                           "concepts_test": test})
    sections = s30_evaluate.run(ctx)
    html = "".join(sections[0].blocks)
    assert "Winner:" in html and "epsilon-plus-flat" in html and "data:image/png" in html
    saved = json.loads((tmp_path / "evaluate" / "ranking.json").read_text())
    assert saved["n_examples"] == 12 and len(saved["table"]) == len(s30_evaluate.DEMO_METHODS)
    assert ctx.artifacts["explanation_ranking"][0]["rank"] == 1
    with pytest.raises(KeyError, match="s10_world"):
        s30_evaluate.run(DemoContext(out=tmp_path, device=torch.device("cpu")))
