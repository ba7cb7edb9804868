"""Correcting an image classifier through dissection unit names."""

from __future__ import annotations

import csv

import pytest
import torch
from torch import nn

from semlens.correct.classifier import ClassifierCorrector, UnitNames, parameters_up_to
from semlens.layers import count_hooks
from semlens.world import BrodenDataset, write_concepts


@pytest.fixture(scope="module")
def broden(tmp_path_factory):
    root = tmp_path_factory.mktemp("broden")
    write_concepts(root, n=40, size=32, seed=3, workers=1)
    return BrodenDataset(root)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5),
    )


def _names(tmp_path, rows):
    path = tmp_path / "units.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["layer", "unit", "concept", "category", "iou", "threshold"])
        w.writeheader()
        for r in rows:
            w.writerow({"category": "color", "threshold": 0.1, **r})
    return path


def test_references_match_a_loop_over_images(broden, tmp_path):
    model = _model()
    names = UnitNames.from_csv(_names(tmp_path, [{"layer": "3", "unit": 0, "concept": "red", "iou": 0.2}]), "3")
    corr = ClassifierCorrector(model, "3", names)
    idx = list(range(len(broden)))
    refs = corr.fit_references(broden, idx, batch_size=7)
    # oracle: per image, the set of concepts present, and the spatial mean of layer "3"
    b = broden.load_batch(idx)
    with torch.no_grad():
        feat = model[:4](b.images).mean(dim=(2, 3)).double()
    for concept in ("red", "circle", "meadow", "stripes" if "stripes" in refs.names else "checker"):
        num = refs.names.index(concept)
        has = []
        for n in range(len(idx)):
            present = any(bool((b.pixel[c][n] == num).any()) or bool((b.image_level[c][n] == num).any())
                          for c in b.pixel)
            has.append(present)
        has = torch.tensor(has)
        assert int(refs.count[num]) == int(has.sum())
        if has.any():
            torch.testing.assert_close(refs.mean[num].double(), feat[has].mean(0), rtol=1e-5, atol=1e-6)
    assert count_hooks(model) == 0


def test_unknown_and_uncarried_concepts_are_explained(broden, tmp_path):
    names = UnitNames.from_csv(_names(tmp_path, [{"layer": "3", "unit": 2, "concept": "red", "iou": 0.2},
                                                 {"layer": "3", "unit": 1, "concept": "blue", "iou": 0.01}]), "3")
    corr = ClassifierCorrector(_model(), "3", names)
    corr.fit_references(broden, range(len(broden)))
    assert corr.units("red").tolist() == [2]
    with pytest.raises(KeyError, match="Did you mean: red"):
        corr.units("rde")
    with pytest.raises(KeyError, match="no unit of layer '3' is a detector"):
        corr.units("blue")
    with pytest.raises(KeyError, match="names no unit of layer"):
        UnitNames.from_csv(tmp_path / "units.csv", "0")


def test_enhanced_prediction_equals_manual_patch_and_propagation_fixes_layer(broden, tmp_path):
    model = _model()
    names = UnitNames.from_csv(_names(tmp_path, [{"layer": "2", "unit": 4, "concept": "red", "iou": 0.3}]), "2")
    corr = ClassifierCorrector(model, "2", names)
    refs = corr.fit_references(broden, range(len(broden)))
    x = broden.load_batch([0, 1, 2]).images
    with torch.no_grad():
        h = model[:3](x)
        h[:, 4] += refs.reference("red")[4]
        manual = model[3:](h)
    torch.testing.assert_close(corr.predict(x, ["red"]), manual)
    head_before = [p.detach().clone() for p in model[6].parameters()]
    params = parameters_up_to(model, "2", x[:1])
    assert {id(p) for p in params} == {id(p) for p in list(model[0].parameters()) + list(model[2].parameters())}
    res = corr.propagate(x, [["red"]] * 3, mu=0.0, steps=60, lr=1e-3)
    assert res.data_loss[-1] < 0.5 * res.data_loss[0], res.data_loss[::10]
    assert all(torch.equal(a, b) for a, b in zip(head_before, model[6].parameters(), strict=True))
    assert count_hooks(model) == 0


def test_evaluate_correction_selects_missed_concepts_and_huge_mu_changes_nothing(broden, tmp_path):
    from semlens.experiments.correction import evaluate_correction

    names = UnitNames.from_csv(_names(tmp_path, [{"layer": "2", "unit": 1, "concept": "red", "iou": 0.3}]), "2")
    model = nn.Sequential(*list(_model())[:-1], nn.Linear(8, len(broden.class_names)))
    has = torch.tensor(["red" in n.split(" ") for n in broden.class_names])
    with torch.no_grad():  # a model that always answers a class without red: every red image is "missed"
        model[-1].bias[int(torch.nonzero(~has)[0])] = 100.0
    corr = ClassifierCorrector(model, "2", names)
    corr.fit_references(broden, range(len(broden)))
    b = broden.load_batch(range(len(broden)))
    labels = broden.task_labels
    pred = corr.predict(b.images).argmax(-1)
    missed = int((has[labels] & ~has[pred]).sum())
    res = evaluate_correction(corr, b.images, labels, broden.class_names, "red", n_remarks=4, mu=1e12, steps=3)
    assert missed == int(has[labels].sum()) > 4 and res["remarks"] == 4 and res["heldout_images"] == missed - 4
    assert res["before"]["remarked_recall"] == 0.0 and res["propagation_distance"] is not None
    for key in ("test_accuracy", "concept_heldout_recall", "other_classes_accuracy"):
        assert res["after"][key] == pytest.approx(res["before"][key], abs=1e-6)
    with pytest.raises(ValueError, match="no class name contains"):
        evaluate_correction(corr, b.images, labels, broden.class_names, "plaid")
