"""semlens.stats is the one home of the shared statistics; the jobs use these very functions."""

from __future__ import annotations

import math

import pytest

from semlens import stats


def test_jobs_use_the_shared_statistics():
    import semlens.captioning as captioning
    import semlens.captioning.naming as pdm
    import semlens.evaluate.compare as compare
    import semlens.evaluate.explanations as explanations
    import semlens.experiments.blocknorm as blocknorm
    import semlens.experiments.dong as dong

    assert pdm.auc is stats.auc and dong.auc is stats.auc
    assert explanations.spearman is stats.spearman
    assert compare.bootstrap_means is stats.bootstrap_means
    assert dong.paired_gap is stats.paired_gap and dong.mean_std is stats.mean_std
    assert blocknorm.mean_std is stats.mean_std
    assert captioning.linear_probe is stats.linear_probe and dong.linear_probe is stats.linear_probe


def test_mean_std_by_hand():
    got = stats.mean_std([1.0, None, 2.0, float("nan"), 6.0])
    assert got["n"] == 3 and got["mean"] == pytest.approx(3.0) and got["std"] == pytest.approx(math.sqrt(7.0))
    assert stats.mean_std([4.0]) == {"mean": 4.0, "std": 0.0, "n": 1}
    assert stats.mean_std([None])["n"] == 0 and math.isnan(stats.mean_std([])["mean"])


def test_block_norm_verdict_comes_from_the_paired_test_not_the_means():
    from semlens.experiments.blocknorm import paired_verdict

    def runs(wd, bn, acc=0.9):
        return [{"model": "m", "regularizer": reg, "seed": s, "unique_total": u, "test_acc": acc}
                for reg, us in (("weight_decay", wd), ("block_norm", bn)) for s, u in enumerate(us)]

    # a higher mean that the paired test does not support: no clear difference
    v = paired_verdict(runs([50, 55, 60], [49, 70, 56]), "m")
    assert v["verdict"] == "no clear difference" and v["mean_diff"] == pytest.approx(10 / 3) and v["wins"] == 1
    v = paired_verdict(runs([50, 55, 60], [53, 59, 62]), "m")  # +3, +4, +2: t = 5.2, p = 0.035
    assert v["verdict"] == "helps" and v["p_two_sided"] == pytest.approx(0.0351, abs=1e-3)
    assert paired_verdict(runs([50, 55, 60], [47, 51, 58]), "m")["verdict"] == "hurts"
    assert paired_verdict(runs([50], [70]), "m")["verdict"] == "no clear difference"  # one pair: no test
    assert paired_verdict(runs([50, 55], [60, 65], acc=0.1), "m") == {"verdict": "no clear difference", "n": 0}
