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
