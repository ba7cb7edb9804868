"""The block-norm experiment's bookkeeping: Table 1 analogue (mean ± std), report sections, run caching."""

from __future__ import annotations

import json

from semlens.experiments.blocknorm import PUBLISHED, _cached, blocknorm_sections, summarize


def _run(model, reg, seed, total, acc):
    return {"model": model, "regularizer": reg, "seed": seed, "test_acc": acc, "unique_total": total,
            "unique_per_layer": {"features.conv1": total - 1, "features.conv2": 1}}


def test_summary_mean_std_and_published_numbers():
    runs = [_run("alexnet-like", "weight_decay", 0, 10, 0.5), _run("alexnet-like", "weight_decay", 1, 14, 0.7),
            _run("alexnet-like", "block_norm", 0, 20, 0.6)]
    rows = summarize(runs, ("alexnet-like",))
    assert [r["regularizer"] for r in rows] == ["weight_decay", "block_norm"]
    assert rows[0]["unique_mean"] == 12 and abs(rows[0]["unique_std"] - 2 ** 1.5) < 1e-12
    assert rows[0]["unique detectors (sum over conv layers)"] == "12.0 ± 2.8"
    assert rows[1]["unique_std"] == 0 and rows[1]["paper (Places365)"] == "AlexNet: 187"
    # one seed has no spread to show: no "± 0.0"
    assert rows[1]["unique detectors (sum over conv layers)"] == "20.0 (one seed)"
    assert rows[1]["test accuracy"] == "0.600 (one seed)"
    assert PUBLISHED["alexnet-b"]["weight_decay"] == 148
    results = {"config": {"models": ["alexnet-like"], "n_train": 10, "epochs": 1, "seeds": 2, "weight_decay": 5e-4,
                          "p": 2.0, "q": 1.0, "groups": 5, "strength": 5e-3, "n_dissect": 5, "quantile": 0.005,
                          "iou_threshold": 0.04},
               "table": rows, "runs": runs, "sweep": [{"p": 1.0, "q": 1.0, "groups": 5, "strength": 0.01,
                                                       "unique_total": 3, "test_acc": 0.5}]}
    sections = blocknorm_sections(results)
    assert len(sections) == 2 and "data:image/png" in "".join(sections[0].blocks)


def test_cached_runs_are_reused_only_with_the_same_settings(tmp_path):
    calls = []

    def fn():
        calls.append(1)
        return {"x": len(calls)}

    path = tmp_path / "r.json"
    assert _cached(path, fn, "a")["x"] == 1
    assert _cached(path, fn, "a")["x"] == 1 and len(calls) == 1
    assert _cached(path, fn, "b")["x"] == 2
    assert json.loads(path.read_text())["settings"] == "b"


def test_seeds_stuck_at_chance_are_listed_not_averaged():
    runs = [_run("alexnet-like", "weight_decay", 0, 10, 0.8), _run("alexnet-like", "weight_decay", 1, 2, 0.09),
            _run("alexnet-like", "weight_decay", 2, 14, 0.7)]
    (row,) = summarize(runs, ("alexnet-like",))
    assert row["seeds"] == 2 and row["not trained (seeds)"] == "1"
    assert row["unique_mean"] == 12 and abs(row["acc_mean"] - 0.75) < 1e-12


def test_models_at_chance_are_shown_as_such_and_not_compared():
    runs = [_run("alexnet-like", "weight_decay", 0, 10, 0.8), _run("alexnet-like", "block_norm", 0, 3, 0.085)]
    rows = summarize(runs, ("alexnet-like",), min_acc=0.15)
    assert [r["seeds"] for r in rows] == [1, 0]
    assert rows[1]["test accuracy"] == "0.085 (at chance)" and rows[1]["not trained (seeds)"] == "0"
    assert rows[1]["unique_mean"] != rows[1]["unique_mean"]  # NaN: never ranked against weight decay
