"""The xnn experiment's summary: mean ± std over seeds and concept stability, on hand-made runs."""

from __future__ import annotations

import pytest

from semlens.experiments.xnn import concept_stability, markdown_table, summarise


def _run(seed: int, r2: float, concepts: dict[int, list[tuple[int, float]]]) -> dict:
    rows = [{"class": c, "xfeature": i, "concept": con, "mass_accuracy": mass, "mean_contribution": 1.0}
            for c, lst in concepts.items() for i, (con, mass) in enumerate(lst)]
    return {"layer": "L", "method": "srae", "seed": seed, "r2": r2, "rows": rows, "accepted": 1.0}


def test_summary_and_stability_hand_computed():
    runs = [_run(0, 0.9, {0: [(5, 0.7), (6, 0.8)], 1: [(7, 0.9)]}),
            _run(1, 0.8, {0: [(5, 0.7), (8, 0.2)], 1: [(7, 0.9)]})]
    # class 0: {5, 6} vs {5} -> 1/2 ; class 1: {7} vs {7} -> 1 ; mean 0.75
    assert concept_stability(runs) == pytest.approx(0.75)
    s = summarise(runs)["L"]["srae"]
    assert s["r2"][0] == pytest.approx(0.85) and s["r2"][1] == pytest.approx(0.0707107, rel=1e-5) and s["r2"][2] == 2
    assert s["stability"][0] == pytest.approx(0.75)
    table = markdown_table(summarise(runs))
    assert "| srae | 0.850 ± 0.071 |" in table and "0.750" in table


def test_reproduce_xnn_refuses_unknown_layers_and_methods(tmp_path):
    from typer.testing import CliRunner

    from semlens.cli.main import app

    for option, value, culprit in (("--layers", "classifier.relu7,fc9", "'fc9'"), ("--methods", "srae,ica", "'ica'")):
        res = CliRunner().invoke(app, ["reproduce", "xnn", "--out", str(tmp_path), option, value])
        assert res.exit_code == 2, res.output
        assert f"{option}: unknown {culprit}" in res.output
    assert not (tmp_path / "classifier.safetensors").exists()  # refused before any work
