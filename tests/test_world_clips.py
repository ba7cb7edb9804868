"""Captioned clips: truth consistent with motion, captions, MSVD-style corpus I/O and its errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from semlens.world import (
    ACTIONS,
    CaptionCorpus,
    CorpusFormatError,
    action_probe,
    generate_clips,
    pooled_frame_features,
    write_clip_corpus,
)
from semlens.world.captions_grammar import COLOR_WORDS, NOUNS, describe


@pytest.fixture(scope="module")
def cs():
    return generate_clips(n=96, frames=10, size=32, seed=3)


def test_shapes_determinism_and_splits(cs):
    assert cs.frames.shape == (96, 10, 3, 32, 32) and cs.frames.dtype == torch.uint8
    assert cs.actor_masks.shape == (96, 10, 32, 32)
    assert len(cs.video_ids) == len(set(cs.video_ids)) == 96
    assert set(cs.truth) == {"actor", "color", "action", "scene"}
    assert all(v.shape == (96,) and v.dtype == torch.int64 for v in cs.truth.values())
    assert len(ACTIONS) >= 8 and len(cs.truth_names["action"]) == len(ACTIONS)
    again = generate_clips(n=96, frames=10, size=32, seed=3)
    assert torch.equal(again.frames, cs.frames) and again.captions == cs.captions
    prefix = generate_clips(n=10, frames=10, size=32, seed=3)
    assert torch.equal(prefix.frames, cs.frames[:10]) and prefix.captions == cs.captions[:10]
    split_ids = sorted(i for s in cs.splits.values() for i in s)
    assert split_ids == list(range(96))
    f = cs.frames_float([0, 1])
    assert f.dtype == torch.float32 and f.max() <= 1 and torch.equal((f * 255).round().to(torch.uint8), cs.frames[:2])


def test_captions_are_many_varied_and_true(cs):
    for i in range(len(cs)):
        caps = cs.captions[i]
        assert len(caps) >= 15 and len(set(caps)) == len(caps)
        t = cs.describe_truth(i)
        nouns = NOUNS[t["actor"]]
        # every caption names the actor with one of its synonyms; most name its colour
        assert all(any(n in c for n in nouns) for c in caps)
        assert sum(any(w in c for w in COLOR_WORDS[t["color"]]) for c in caps) >= len(caps) // 2
    n_words = len({w for caps in cs.captions for c in caps for w in c.split()})
    assert n_words > 150
    with pytest.raises(KeyError, match="no words"):
        describe("dragon", "red", "grow", "sea", 3, np.random.default_rng(0))


def _centroids(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mask: (T, H, W) bool -> per-frame area, centroid x, centroid y."""
    t, h, w = mask.shape
    area = mask.flatten(1).sum(1).float()
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    cx = (mask * xs).flatten(1).sum(1) / area.clamp_min(1)
    cy = (mask * ys).flatten(1).sum(1) / area.clamp_min(1)
    return area, cx, cy


def test_actor_masks_follow_the_action():
    cs = generate_clips(n=160, frames=8, size=48, seed=0)
    checked = set()
    for i in range(len(cs)):
        action = cs.truth_names["action"][int(cs.truth["action"][i])]
        area, cx, cy = _centroids(cs.actor_masks[i])
        full = area[0] > 0 and area[-1] > 0
        if action == "move-left" and full:
            assert cx[-1] < cx[0] - 8
        elif action == "move-right" and full:
            assert cx[-1] > cx[0] + 8
        elif action == "move-up" and full:
            assert cy[-1] < cy[0] - 8
        elif action == "move-down" and full:
            assert cy[-1] > cy[0] + 8
        elif action == "grow":
            assert area[-1] > 2 * area[0]
        elif action == "shrink":
            assert area[0] > 2 * area[-1]
        elif action == "appear":
            assert area[0] == 0 and area[-1] > 0
        elif action == "disappear":
            assert area[0] > 0 and area[-1] == 0
        elif action == "bounce":
            assert cy.min() < cy[0] - 5 and abs(cy[-1] - cy[0]) < 3
        else:
            continue
        checked.add(action)
    assert len(checked) >= 8


def test_actions_need_time():
    cs = generate_clips(n=600, frames=8, size=32, seed=0)
    feats = pooled_frame_features(cs.frames, grid=8)
    assert feats.shape == (600, 8, 192)
    res = action_probe(feats, cs.truth["action"], cs.splits["train"] + cs.splits["val"], cs.splits["test"])
    assert res["temporal"] > 0.45 and res["temporal"] > res["single_frame"] + 0.2, res


def test_corpus_round_trip_with_features_and_frames(tmp_path, cs):
    feats = torch.randn(96, 10, 5)
    root = write_clip_corpus(cs, tmp_path / "c", features=feats, write_frames=True)
    corpus = CaptionCorpus(root)
    assert corpus.video_ids == cs.video_ids and corpus.feature_dim == 5
    assert all(corpus.captions[v] == cs.captions[i] for i, v in enumerate(cs.video_ids))
    assert corpus.split("test") == [cs.video_ids[i] for i in cs.splits["test"]]
    assert torch.equal(corpus.features("clip00007"), feats[7])
    assert torch.equal(corpus.frames("clip00007"), cs.frames[7])
    assert torch.equal(corpus.stack_features(["clip00001", "clip00002"]), feats[1:3])
    assert corpus.truth["clip00003"]["action"] == cs.describe_truth(3)["action"]
    with pytest.raises(KeyError, match="clip99999"):
        corpus.features("clip99999")
    with pytest.raises(KeyError, match="split 'dev'"):
        corpus.split("dev")


def test_corpus_errors_name_the_culprit(tmp_path, cs):
    root = write_clip_corpus(cs.__class__(cs.frames[:4], cs.actor_masks[:4], cs.captions[:4], cs.video_ids[:4],
                                          {k: v[:4] for k, v in cs.truth.items()}, cs.truth_names,
                                          {"train": [0, 1], "val": [2], "test": [3]}),
                             tmp_path / "c", features=torch.randn(4, 10, 6))
    np.save(root / "features" / "clip00002.npy", np.zeros((10, 7), np.float32))
    with pytest.raises(CorpusFormatError, match="inconsistent feature dimensions"):
        CaptionCorpus(root)
    (root / "features" / "clip00002.npy").write_bytes(b"garbage")
    with pytest.raises(CorpusFormatError, match="clip00002.npy"):
        CaptionCorpus(root)
    (root / "features" / "clip00002.npy").unlink()
    with pytest.raises(FileNotFoundError, match="clip00002.npy"):
        CaptionCorpus(root)
    np.save(root / "features" / "clip00002.npy", np.zeros((10, 6), np.float32))
    CaptionCorpus(root)
    text = (root / "captions.csv").read_text().splitlines()
    (root / "captions.csv").write_text("\n".join([*text[:3], "clip00001,   ", *text[3:]]) + "\n")
    with pytest.raises(CorpusFormatError, match="line 4: empty caption"):
        CaptionCorpus(root)
    (root / "captions.csv").write_text("\n".join(text) + "\n")
    (root / "splits" / "val.txt").write_text("clip00002\nghost\n")
    with pytest.raises(CorpusFormatError, match="ghost"):
        CaptionCorpus(root)
    with pytest.raises(FileNotFoundError, match="not found"):
        CaptionCorpus(tmp_path / "nowhere")


def test_reads_the_original_msvd_annotation_table(tmp_path):
    (tmp_path / "captions.csv").write_text(
        "VideoID,Start,End,WorkerID,Source,AnnotationTime,Language,Description\n"
        "abc,1,5,7,clean,10,English,A man is playing a guitar.\n"
        "abc,1,5,8,clean,10,German,Ein Mann spielt Gitarre.\n"
        "abc,1,5,9,clean,10,English,someone plays guitar\n"
        "xyz,3,9,9,clean,10,English,a cat sleeps\n")
    corpus = CaptionCorpus(tmp_path)
    assert corpus.video_ids == ["abc_1_5", "xyz_3_9"]
    assert corpus.captions["abc_1_5"] == ["A man is playing a guitar.", "someone plays guitar"]
    assert corpus.feature_dim is None
    with pytest.raises(FileNotFoundError, match="features"):
        corpus.features("abc_1_5")
