"""The world demo step on tiny settings: artifacts per the contract and report sections."""

from __future__ import annotations

import torch

from semlens.checkpoint import read_config
from semlens.experiments.demo import DemoContext
from semlens.experiments.demo_steps import s10_world
from semlens.world import BrodenDataset, CaptionCorpus, ClipSet, ConceptImages


def test_world_step_fills_artifacts(tmp_path, monkeypatch):
    for name, value in (("N_BRODEN", 40), ("N_TRAIN", 256), ("N_TEST", 64), ("EPOCHS", 1), ("N_CLIPS", 24)):
        monkeypatch.setattr(s10_world, name, value)
    ctx = DemoContext(out=tmp_path, device=torch.device("cpu"), seed=0)
    sections = s10_world.run(ctx)
    a = ctx.artifacts
    assert {"concepts_dir", "concepts_test", "classifier", "classifier_weights", "classifier_spec", "clips",
            "clips_dir"} <= set(a)
    assert len(BrodenDataset(a["concepts_dir"])) == 40
    assert isinstance(a["concepts_test"], ConceptImages) and len(a["concepts_test"]) == 64
    assert a["concepts_test"].pixel_labels  # masks kept for explanation metrics
    assert not a["classifier"].training and a["classifier_spec"] == "alexnet-like"
    assert read_config(a["classifier_weights"])["model"] == "alexnet-like"
    assert isinstance(a["clips"], ClipSet) and len(CaptionCorpus(a["clips_dir"])) == 24
    html = "".join(b for s in sections for b in s.blocks)
    assert "test acc" in html and html.count("<figure>") == 2 and len(sections) == 1
