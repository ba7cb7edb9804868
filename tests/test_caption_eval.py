"""coco-caption evaluation wrapper (semlens.captioning.evaluation); one scoring call here (tokenizer + METEOR
JVMs), one more in the CLI test."""

from __future__ import annotations

import math

import pytest

from semlens.captioning.evaluation import METRICS, PUBLISHED_DONG, format_table, paper_table, score_captions


def test_scores_hand_computed_bleu():
    refs = {"v1": ["A dog runs fast.", "a dog is running"], "v2": ["a cat sleeps", "The cat is asleep!"]}
    cands = {"v1": "A DOG, runs", "v2": "the cat"}
    got = score_captions(refs, cands)
    assert list(got) == list(METRICS)
    # PTB tokenization: "a dog runs" (3 words) and "the cat" (2). Clipped unigram matches 3 + 2 = 5 of 5;
    # bigrams: "a dog", "dog runs", "the cat" all matched -> 3/3. Closest reference lengths: 4 (tie 4/4)
    # and 3 (the cat is asleep = 4, a cat sleeps = 3; |3-2| < |4-2|), r = 7, c = 5 -> BP = exp(1 - 7/5).
    bp = math.exp(1 - 7 / 5)
    assert got["BLEU-1"] == pytest.approx(bp, rel=1e-6)
    assert got["BLEU-2"] == pytest.approx(bp, rel=1e-6)
    assert 0 < got["METEOR"] < 1 and 0 < got["ROUGE-L"] < 1 and got["CIDEr"] > 0



def test_bad_input_is_rejected_before_java():
    refs = {"v1": ["a dog"], "v2": ["a cat"]}
    with pytest.raises(KeyError, match="without references"):
        score_captions(refs, {"v1": "a dog", "v2": "a cat", "v9": "x"})
    with pytest.raises(KeyError, match="no candidate"):
        score_captions(refs, {"v1": "a dog"})
    with pytest.raises(ValueError, match="'v2'"):
        score_captions({"v1": ["a dog"], "v2": [""]}, {"v1": "a", "v2": "b"})


def test_paper_table_layout():
    rows = paper_table({"LSTM-I (ours)": {"BLEU-4": {"mean": 0.5, "std": 0.01}, "METEOR": 0.3}})
    assert rows[0]["BLEU-4"] == "0.500 ± 0.010" and rows[0]["CIDEr"] == "–"
    assert len(rows) == 1 + len(PUBLISHED_DONG)
    assert rows[2]["BLEU-4"] == "0.446" and rows[2]["METEOR"] == "0.297"  # LSTM-I as published
    assert "LSTM-B (GoogLeNet)" in format_table(rows)
