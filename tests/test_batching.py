"""The measured perturbation batch: a candidate, never above the work, cached, and recorded in the results."""

from __future__ import annotations

import torch
from torch import nn

from semlens.evaluate.batching import fastest_batch_size
from semlens.evaluate.compare import CompareConfig, compare_methods


def test_fastest_batch_is_a_candidate_within_the_work_and_cached():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3)).eval()
    x = torch.rand(1, 3, 16, 16)
    b = fastest_batch_size(model, x, candidates=(8, 16, 32), needed=20)
    assert b in (8, 16)  # 32 exceeds the 20 inputs needed
    assert fastest_batch_size(model, x, candidates=(8, 16, 32), needed=20) == b
    assert fastest_batch_size(model, x, candidates=(8, 16, 32), needed=3) == 8  # never below the smallest


def test_compare_records_the_batch_it_used_and_scores_do_not_depend_on_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3)).eval()
    x, y = torch.rand(6, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2])
    kw = dict(metrics=("aopc_morf", "aopc_lerf"), rank_by=("aopc_morf",), patch_size=4, n_boot=10)
    auto = compare_methods(model, x, y, ["gradient"], config=CompareConfig(**kw))
    fixed = compare_methods(model, x, y, ["gradient"], config=CompareConfig(**kw, perturb_batch_size=7))
    assert auto.config.perturb_batch_size in (16, 32, 64, 128, 256)
    torch.testing.assert_close(auto.scores["gradient"]["aopc_morf"], fixed.scores["gradient"]["aopc_morf"],
                               rtol=1e-5, atol=1e-6)
