"""End-to-end captioning pipeline on a tiny synthetic corpus (semlens.captioning)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from semlens.captioning import (
    analyze_neurons,
    extract_frame_features,
    generate,
    linear_probe,
    prepare,
    topic_activation_profile,
    train_captioner,
)
from semlens.layers import count_hooks

ANIMALS = ["dog", "cat", "bird"]
ACTIONS = ["runs", "jumps"]


def corpus(n: int = 48, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    feats, caps, action = {}, {}, {}
    for k in range(n):
        a, b = k % 3, (k // 3) % 2
        f = 0.2 * torch.randn(5, 8, generator=g)
        f[:, a] += 1.0
        f[:, 3 + b] += torch.linspace(0, 1.5, 5)
        vid = f"vid{k}"
        feats[vid] = f
        caps[vid] = [f"a {ANIMALS[a]} {ACTIONS[b]}", f"the {ANIMALS[a]} {ACTIONS[b]} quickly",
                     f"{ANIMALS[a]} {ACTIONS[b]} in a field"]
        action[vid] = b
    ids = list(feats)
    splits = {"train": ids[:36], "val": ids[36:40], "test": ids[40:]}
    return feats, caps, splits, action


def test_pipeline_topics_training_names_and_probe():
    feats, caps, splits, action = corpus()
    prep = prepare(feats, caps, splits, n_topics=3, max_len=8)
    assert prep.train.n_videos == 36 and prep.test.n_videos == 8 and prep.val is not None
    assert prep.train.topics.shape == (36, 3)
    model, hist = train_captioner(prep, lam=2.0, epochs=6, batch_size=16, lr=1e-2, hidden=8, embed=8,
                                  decoder_hidden=12, attention=6, dropout=0.0, seed=0, device="cpu")
    assert hist[-1]["nll"] < hist[0]["nll"] and "val_nll" in hist[-1]
    caps_out = generate(model, prep.test, beam=2)
    assert set(caps_out) == set(splits["test"]) and all(isinstance(c, str) for c in caps_out.values())
    ana = analyze_neurons(model, prep)
    assert ana["head_refit_loss"] is None  # LSTM-I keeps its jointly trained f
    names = ana["names"]
    assert names.differences.shape == (16, 3)
    assert all(0 <= a <= 1 for a in ana["selectivity"]["auc_per_topic"] if a is not None)
    prof = topic_activation_profile(names, ana["vbar_test"], prep.test.topics)
    assert prof["in"].shape == (3,)
    acc = linear_probe(ana["vbar_train"], [action[v] for v in splits["train"]], ana["vbar_test"],
                       [action[v] for v in splits["test"]])
    assert acc >= 0.75  # the action is plainly in the features; chance is 0.5
    assert ana["v_test"].shape[:2] == (8, 5)


def test_prepare_bad_input():
    feats, caps, splits, _ = corpus()
    bad = {**splits, "test": splits["test"] + ["ghost"]}
    with pytest.raises(KeyError, match="ghost"):
        prepare(feats, caps, bad, n_topics=2)
    feats2 = {**feats, "vid0": torch.zeros(5, 7)}
    with pytest.raises(ValueError, match="inconsistent feature dimensions"):
        prepare(feats2, caps, splits, n_topics=2)
    caps2 = {**caps, "vid1": ["a dog runs", ""]}
    with pytest.raises(ValueError, match="vid1"):
        prepare(feats, caps2, splits, n_topics=2)


class TinyCNN(nn.Module):
    conv_layers = ["conv"]

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.conv(x).mean((2, 3)))


def test_frame_features_match_manual_pooling_and_restore_state():
    torch.manual_seed(0)
    cnn = TinyCNN().train()
    frames = torch.randint(0, 256, (3, 4, 3, 9, 9), dtype=torch.uint8)
    got = extract_frame_features(cnn, frames, batch_size=5)
    with torch.no_grad():
        ref = cnn.conv(frames.reshape(12, 3, 9, 9).float() / 255).mean((2, 3)).reshape(3, 4, 4)
    torch.testing.assert_close(got, ref)
    assert cnn.training and all(p.requires_grad for p in cnn.parameters()) and count_hooks(cnn) == 0
    with pytest.raises(ValueError, match=r"\(N, T, 3, S, S\)"):
        extract_frame_features(cnn, frames[0])
