"""Pieces of the concept-world evaluation of activation maximization (the full run: `semlens reproduce maximize`)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from semlens.experiments._maximize_parts import MARK, MARK_COLOUR, concept_hits, mark_images, mark_score, plant_shortcut
from semlens.maximize.data import colour_share
from semlens.world.concepts import COLORS


def test_mark_is_planted_only_on_the_target_class() -> None:
    images = torch.full((6, 3, 16, 16), 0.2)
    labels = torch.tensor([0, 1, 0, 2, 0, 1])
    marked = mark_images(images, labels, target=0, p_mark=1.0, seed=0)
    share = 36 / 256  # a 6×6 square of a 16×16 image
    assert torch.allclose(mark_score(marked), torch.tensor([share, 0, share, 0, share, 0]))
    assert torch.equal(marked[1], images[1]) and torch.equal(images, torch.full((6, 3, 16, 16), 0.2))
    assert torch.equal(marked[0, :, MARK[0], MARK[1]], torch.tensor(MARK_COLOUR)[:, None, None].expand(3, 6, 6))


def test_planted_shortcut_decides_the_class() -> None:
    images = torch.full((400, 3, 16, 16), 0.2)
    labels = torch.arange(400) % 4
    marked, new = plant_shortcut(images, labels, target=0, extra=0.25, seed=0)
    has_mark = mark_score(marked) > 0
    assert torch.equal(has_mark, new == 0)  # marked exactly when the (new) label is the target
    assert bool((new[labels == 0] == 0).all())  # the target class keeps its images
    moved = int(((labels != 0) & (new == 0)).sum())
    assert 45 <= moved <= 105  # about 25 % of the 300 other images
    assert torch.equal(labels, torch.arange(400) % 4)  # inputs untouched


def test_colour_share_and_concept_hits() -> None:
    red, blue = torch.tensor(COLORS["red"]), torch.tensor(COLORS["blue"])
    img = blue[:, None, None].repeat(1, 10, 10)
    img[:, :2, :] = red[:, None, None]  # 20 % red
    assert float(colour_share(img[None], "red")[0]) == pytest.approx(0.2)
    assert float(colour_share(img[None], "blue")[0]) == pytest.approx(0.8)

    class Judge(nn.Module):  # says "object #1 present" for every image
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            from semlens.world import VOCABULARY

            out = torch.full((x.shape[0], len(VOCABULARY) - 1), -5.0)
            out[:, VOCABULARY.numbers("object")[0] - 1] = 5.0
            return out

    from semlens.world import VOCABULARY

    first_object = VOCABULARY.names[VOCABULARY.numbers("object")[0]]
    hits = concept_hits(torch.stack([img, img, img]), [("red", "color"), ("green", "color"),
                                                      (first_object, "object")], Judge())
    assert torch.equal(hits, torch.tensor([1.0, 0.0, 1.0]))
    hits = concept_hits(img[None], [("red", "color")], Judge(), colour_min=0.25)
    assert torch.equal(hits, torch.tensor([0.0]))


def test_unit_objectives_ascend_also_for_units_whose_natural_maximum_is_negative() -> None:
    """A pre-ReLU unit can be negative on every natural image: dividing its objective by that maximum made
    ``reproduce maximize`` *minimise* it. The scale is now max − mean (> 0); the ratio is left out (NaN) there."""
    from semlens.experiments.maximize_eval import _natural_range, _objective, _ratio

    scores = torch.tensor([[-3.0, 1.0], [-1.0, 3.0], [-2.0, 2.0]])  # (N=3, U=2): unit 0 is negative everywhere
    dmax, scale = _natural_range(scores)
    assert torch.equal(dmax, torch.tensor([-1.0, 3.0])) and torch.equal(scale, torch.tensor([1.0, 1.0]))
    ratio = _ratio(torch.tensor([0.5, 1.5]), dmax)
    assert torch.isnan(ratio[0]) and float(ratio[1]) == 0.5

    obj = _objective([{"layer": "conv", "unit": 0}, {"layer": "conv", "unit": 0}], torch.tensor([0.5, 2.0]))
    acts = {"conv": torch.full((2, 1, 4, 4), -2.0)}  # channel mean -2 for both rows
    assert torch.allclose(obj(acts), torch.tensor([-4.0, -1.0]))  # divided by the positive scales: same direction


def test_report_from_stored_results_has_the_tables_cards_and_expert_strengths(tmp_path) -> None:
    """`write_report` reads only results.json and prototypes.npz: every table row reaches the page, the unit cards
    show the four card configurations, and a missing configuration leaves its card empty instead of failing."""
    import json

    import numpy as np

    from semlens.experiments.maximize_eval import markdown_tables
    from semlens.maximize.report import CARD_CONFIGS, write_report

    units = [{"layer": "features.conv2", "unit": u, "concept": "green", "category": "color", "iou": 0.2}
             for u in range(2)]
    per = {"ratio": [1.5, float("nan")], "hit": [1.0, 0.0], "loglik": [-0.1, -0.2], "path": [0.9, 0.8]}
    row = {"configuration": "plain/pixel", "median activation ratio": 1.5, "median held-out loglik / dim": -0.1,
           "concept hit rate": 0.5, "median path similarity": 0.85, "seconds": 1.0}
    sweep = [{**row, "configuration": "expert-gmm/pixel", "λ·D": s, "concept hit rate": h}
             for s, h in ((1.0, 0.123), (0.01, 0.789))]
    shortcut = {"reliance": {"clean recall": 0.0}, "rows": [{"variant": "plain", "mark colour share": 0.15}],
                "mark colour share natural": 0.002, "visible threshold": 0.0064, "mark hidden from": "λ·D = 30"}
    results = {"config": {"min_iou": 0.1}, "test accuracy": 0.7, "units": units, "table": [row],
               "expert strengths": sweep, "per_unit": dict.fromkeys(CARD_CONFIGS[:-1], per), "shortcut": shortcut}
    (tmp_path / "results.json").write_text(json.dumps(results))
    rng = np.random.default_rng(0)
    arrays = {k.replace("/", "_"): rng.random((2, 3, 8, 8), dtype=np.float32) for k in CARD_CONFIGS[:-1]}
    np.savez(tmp_path / "prototypes.npz", top9=rng.random((2, 9, 3, 8, 8), dtype=np.float32),
             shortcut=rng.random((1, 3, 8, 8), dtype=np.float32), **arrays)
    html = write_report(tmp_path).read_text()
    assert "Expert strength" in html and "0.789" in html and "0.123" in html
    assert "Unit cards" in html and "GAN-code" in html and html.count("<img") >= 2
    md = markdown_tables({**results, "units": [{**u, "category": "color"} for u in units]})
    strengths = md.split("Expert strength")[1].split("Slide (d)")[0]
    assert strengths.count("| expert-gmm/pixel |") == 2 and "0.789" in strengths and "0.123" in strengths
