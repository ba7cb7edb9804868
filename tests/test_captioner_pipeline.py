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
    assert ana["head_refit_loss"] is not None  # one procedure: f fitted on the frozen encoder, for LSTM-I too
    assert analyze_neurons(model, prep, refit_head=False)["head_refit_loss"] is None  # the paper's own-f variant
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


def test_frame_features_several_layers_mean_and_max_pooled():
    torch.manual_seed(1)
    cnn = TinyCNN()
    frames = torch.rand(2, 3, 3, 9, 9)
    got = extract_frame_features(cnn, frames, layer=["conv", "head"], pool="meanmax", batch_size=4)
    with torch.no_grad():
        a = cnn.conv(frames.reshape(6, 3, 9, 9))
        ref = torch.cat([a.mean((2, 3)), a.amax((2, 3)), cnn(frames.reshape(6, 3, 9, 9))], 1).reshape(2, 3, 10)
    torch.testing.assert_close(got, ref)
    with pytest.raises(ValueError, match="unknown pool"):
        extract_frame_features(cnn, frames, pool="median")


def test_frame_features_spatial_grid_equals_hand_pooled_cells():
    torch.manual_seed(2)
    cnn = TinyCNN().train()
    frames = torch.rand(2, 3, 3, 9, 9)  # conv maps are 7 x 7: 2 x 2 adaptive cells overlap on row/column 3
    got = extract_frame_features(cnn, frames, layer=["conv", "head"], pool="meanmax", grid=2, batch_size=4)
    with torch.no_grad():
        a = cnn.conv(frames.reshape(6, 3, 9, 9)).double()  # (6, 4, 7, 7)
        cells = [a[:, :, r0:r1, c0:c1].mean((2, 3)) for r0, r1 in ((0, 4), (3, 7)) for c0, c1 in ((0, 4), (3, 7))]
        grid = torch.stack(cells, 2).flatten(1)  # channel-major, cells row-major: (6, 4 * 4)
        ref = torch.cat([a.mean((2, 3)), a.amax((2, 3)), grid, cnn(frames.reshape(6, 3, 9, 9)).double()], 1)
    assert got.shape == (2, 3, 4 + 4 + 16 + 2)
    torch.testing.assert_close(got.double(), ref.reshape(2, 3, -1), rtol=1e-5, atol=1e-6)
    # a 1 x 1 grid is the spatial mean again
    one = extract_frame_features(cnn, frames, layer="conv", grid=1, grid_layers=["conv"])
    torch.testing.assert_close(one[..., 4:], one[..., :4])
    assert cnn.training and count_hooks(cnn) == 0
    with pytest.raises(ValueError, match="grid_layers"):
        extract_frame_features(cnn, frames, layer="conv", grid=2, grid_layers=["head"])
    with pytest.raises(ValueError, match="smaller than grid"):
        extract_frame_features(cnn, frames, layer="conv", grid=8)
    with pytest.raises(ValueError, match="grid must be"):
        extract_frame_features(cnn, frames, layer="conv", grid=-1)


def test_choose_lambda_prefers_selectivity_without_caption_cost():
    from semlens.experiments.dong import choose_lambda

    rows = [{"lam": 0.0, "METEOR": 0.240, "selectivity_auc": 0.60},
            {"lam": 1.0, "METEOR": 0.245, "selectivity_auc": 0.62},
            {"lam": 10.0, "METEOR": 0.232, "selectivity_auc": 0.70},  # within the 0.01 tolerance
            {"lam": 100.0, "METEOR": 0.200, "selectivity_auc": 0.80}]  # too costly for captions
    assert choose_lambda(rows) == 10.0
    assert choose_lambda(rows, meteor_tolerance=0.0) == 1.0
    worse = [rows[0], {"lam": 5.0, "METEOR": 0.1, "selectivity_auc": 0.9}, {"lam": 50.0, "METEOR": 0.2,
                                                                          "selectivity_auc": 0.7}]
    assert choose_lambda(worse) == 50.0  # none qualifies: best validation METEOR
    with pytest.raises(ValueError, match="λ = 0"):
        choose_lambda(rows[1:])


def test_analyze_neurons_same_procedure_for_both_heads_and_model_untouched():
    feats, caps, splits, _ = corpus()
    prep = prepare(feats, caps, splits, n_topics=3, max_len=8)
    model, _ = train_captioner(prep, lam=2.0, epochs=2, batch_size=16, lr=1e-2, hidden=8, embed=8,
                               decoder_hidden=12, attention=6, dropout=0.0, seed=0, device="cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    own = analyze_neurons(model, prep, refit_head=False, split="val")
    refit = analyze_neurons(model, prep, refit_head=True, method="masking")
    refit_closed = analyze_neurons(model, prep, refit_head=True)
    assert own["head_refit_loss"] is None and refit["head_refit_loss"] is not None
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # f refitted on a copy
    torch.testing.assert_close(refit["names"].differences, refit_closed["names"].differences, atol=1e-6, rtol=0)
    assert own["vbar_test"].shape == (prep.val.n_videos, 16)
    with pytest.raises(ValueError, match="split"):
        analyze_neurons(model, prep, split="train")


def test_run_dong_sweeps_lambda_on_validation_and_writes_results(tmp_path, monkeypatch):
    import json

    import semlens.experiments.dong as dong
    from semlens.captioning.evaluation import score_captions
    from semlens.experiments.dong import DongSettings, choose_lambda, run_dong

    # METEOR starts a 2 GB JVM per call (tested in test_caption_eval); here a Java-free stand-in keeps it fast
    def no_java(refs, cands):
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider

        gts, res = {k: list(refs[k]) for k in cands}, {k: [cands[k] or "<empty>"] for k in cands}
        b4 = Bleu(4).compute_score(gts, res, verbose=0)[0][3]
        return {"BLEU-1": 0.0, "BLEU-4": b4, "METEOR": b4, "ROUGE-L": 0.0, "CIDEr": Cider().compute_score(gts, res)[0]}

    assert score_captions is dong.score_captions
    monkeypatch.setattr(dong, "score_captions", no_java)
    calls = []

    def counted(prep, lam=0.0, **kw):
        calls.append((lam, kw["seed"]))
        return train_captioner(prep, lam=lam, **kw)

    monkeypatch.setattr(dong, "train_captioner", counted)

    st = DongSettings(n_clips=40, frames=4, n_topics=3, lam_grid=(3.0,), epochs=2, batch_size=32, captions_per_video=2,
                      hidden=8, embed=8, decoder_hidden=8, attention=4, dropout=0.0, beam=1, cnn_images=120,
                      cnn_epochs=1, patience=1)
    res = run_dong(tmp_path, seeds=2, settings=st, device="cpu", log=lambda _m: None)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["lam"] for r in saved["lambda_sweep"]] == [0.0, 3.0]
    # seed 0's LSTM-B / LSTM-I are the sweep's models (same settings and seed): trained once, not twice
    assert calls == [(0.0, 0), (3.0, 0), (0.0, 1), (3.0, 1)]
    assert saved["runs"]["LSTM-I"][0]["selected_epoch"] == saved["lambda_sweep"][1]["selected_epoch"]
    assert saved["lam"] == choose_lambda(saved["lambda_sweep"]) == res["lam"]
    assert [r["lam"] for r in saved["runs"]["LSTM-I"]] == [saved["lam"]] * 2
    assert {"BLEU-4", "METEOR", "CIDEr", "selectivity_auc", "action_accuracy"} <= set(saved["summary"]["LSTM-B"])
    assert "selectivity_auc_own_f" in saved["summary"]["LSTM-I"]
    d = [i["selectivity_auc"] - b["selectivity_auc"] for b, i in zip(*saved["runs"].values(), strict=True)]
    assert saved["paired"]["selectivity_auc"]["mean_diff"] == pytest.approx(sum(d) / 2)
    hist = saved["runs"]["LSTM-I"][0]["history"]
    assert all({"nll", "topic", "lam_topic", "val_CIDEr"} <= set(h) for h in hist)
    assert hist[0]["lam_topic"] == pytest.approx(3.0 * hist[0]["topic"])
    assert (tmp_path / "report.html").is_file()


def test_frame_cnn_multilabel_learns_concept_presence():
    from semlens.experiments.dong import DongSettings, _fit_multilabel, frame_cnn, frame_cnn_accuracy
    from semlens.models import build_model
    from semlens.world import VOCABULARY

    dev = torch.device("cpu")
    st = DongSettings(cnn_images=64, cnn_epochs=1, cnn_task="multilabel")
    cnn = frame_cnn(st, seed=0, device=dev)
    out = cnn(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, len(VOCABULARY) - 1)  # one output per concept, "-" excluded
    assert 0.0 <= frame_cnn_accuracy(cnn, dev, n=40, multilabel=True) <= 1.0
    # the multi-label loss goes down on a tiny fixed problem
    torch.manual_seed(0)
    x, y = torch.rand(32, 3, 64, 64), (torch.rand(32, 5) < 0.3).float()
    losses = _fit_multilabel(build_model("alexnet-like", num_classes=5, image_size=64), x, y, epochs=4, seed=0,
                             device=dev, batch_size=16, lr=3e-3)
    assert losses[-1] < losses[0]
    with pytest.raises(ValueError, match="label rows"):
        _fit_multilabel(cnn, x, y[:3], epochs=1, seed=0, device=dev)
    with pytest.raises(ValueError, match="cnn_task"):
        frame_cnn(DongSettings(cnn_task="regression"), seed=0, device=dev)


def test_paired_gap_matches_hand_computed_t_test():
    import math

    from semlens.experiments.dong import paired_gap

    b, i = [0.70, 0.68, 0.70], [0.73, 0.72, 0.70]  # differences 0.03, 0.04, 0.00
    g = paired_gap(b, i)
    sd = math.sqrt(((0.03 - 0.07 / 3) ** 2 + (0.04 - 0.07 / 3) ** 2 + (0.07 / 3) ** 2) / 2)
    assert g["mean_diff"] == pytest.approx(0.07 / 3) and g["std_diff"] == pytest.approx(sd)
    assert g["t"] == pytest.approx((0.07 / 3) / (sd / math.sqrt(3))) and g["wins"] == 2 and g["n"] == 3
    assert g["p_two_sided"] == pytest.approx(0.1917, abs=1e-3)  # t = 1.941 with 2 degrees of freedom
    assert math.isnan(paired_gap([0.5], [0.6])["t"]) and paired_gap([0.5], [0.6])["wins"] == 1
    with pytest.raises(ValueError, match="equally many"):
        paired_gap([0.5, 0.6], [0.6])


def test_frame_features_of_layer_inputs_remove_their_hooks_on_errors() -> None:
    """capture="input" reads what a layer receives; its hooks and the CNN's mode are restored after a forward that
    raises, as after one that succeeds."""
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 3, padding=1)
            self.head = nn.Linear(2, 3)

        def forward(self, x):
            h = self.conv(x).mean((2, 3))
            if x.shape[0] > 4:
                raise RuntimeError("boom")
            return self.head(h)

    torch.manual_seed(0)
    cnn = Broken().train()
    frames = torch.rand(1, 4, 3, 8, 8)
    got = extract_frame_features(cnn, frames, layer="head", capture="input", batch_size=4)
    with torch.no_grad():
        expected = cnn.conv(frames[0]).mean((2, 3))
    assert torch.allclose(got[0], expected, atol=1e-6)
    with pytest.raises(RuntimeError, match="boom"):
        extract_frame_features(cnn, torch.rand(2, 4, 3, 8, 8), layer="head", capture="input", batch_size=8)
    assert count_hooks(cnn) == 0 and cnn.training and all(p.requires_grad for p in cnn.parameters())
    with pytest.raises(ValueError, match="unknown capture 'inputs'"):
        extract_frame_features(cnn, frames, layer="head", capture="inputs")
