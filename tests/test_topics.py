"""LDA topics over per-video caption documents (semlens.captioning.topics)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from semlens.captioning.topics import TopicModel, video_documents

FAMILIES = {
    "animal": ["dog", "puppy", "cat", "kitten", "horse", "pony"],
    "cooking": ["chef", "onion", "kitchen", "knife", "pan", "soup"],
    "music": ["guitar", "piano", "drum", "song", "violin", "singer"],
    "sport": ["soccer", "ball", "goal", "tennis", "racket", "player"],
}


def toy_corpus(n_per_family: int = 30, seed: int = 0) -> tuple[dict[str, list[str]], list[str]]:
    rng = np.random.default_rng(seed)
    captions, family_of = {}, []
    for fam, words in FAMILIES.items():
        for k in range(n_per_family):
            caps = [f"the {' and '.join(rng.choice(words, size=3))} is here" for _ in range(15)]
            captions[f"{fam}{k}"] = caps
            family_of.append(fam)
    return captions, family_of


def test_topics_recover_concept_families(tmp_path):
    caps, family_of = toy_corpus()
    tm = TopicModel(n_topics=4, max_iter=50, seed=0).fit(caps)
    word_family = {w: f for f, ws in FAMILIES.items() for w in ws}
    assert set(tm.vocabulary_) == set(word_family)  # stop words ("the", "and", "is", "here") removed
    top = tm.top_words(6)
    fams = []
    for words in top:
        counts = {f: sum(word_family[w] == f for w in words) for f in FAMILIES}
        best = max(counts, key=counts.get)
        assert counts[best] >= 5, f"topic {words} not dominated by one family"
        fams.append(best)
    assert sorted(fams) == sorted(FAMILIES)  # every family gets its own topic
    s = tm.transform(caps)
    assert s.shape == (len(caps), 4) and np.allclose(s.sum(1), 1, atol=1e-5) and (s >= 0).all()
    # each video's dominant topic is its family's topic
    dom = [fams[t] for t in s.argmax(1)]
    assert np.mean([d == f for d, f in zip(dom, family_of, strict=True)]) > 0.95

    path = tm.save(tmp_path / "topics.json")
    saved = json.loads(path.read_text())
    assert saved["vocabulary"] == tm.vocabulary_ and saved["n_topics"] == 4
    back = TopicModel.load(path)
    np.testing.assert_allclose(back.transform(caps), s, atol=1e-6)
    assert back.top_words(6) == top


def test_topics_bad_input(tmp_path):
    with pytest.raises(ValueError, match="empty caption"):
        video_documents({"v1": ["a dog"], "v2": ["  "]})
    with pytest.raises(ValueError, match="no captions"):
        video_documents({"v1": []})
    with pytest.raises(RuntimeError, match="not fitted"):
        TopicModel(3).transform({"v": ["dog"]})
    with pytest.raises(FileNotFoundError):
        TopicModel.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a semlens topic model"):
        TopicModel.load(tmp_path / "bad.json")
