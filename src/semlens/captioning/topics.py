"""Semantic topics from human descriptions (Dong et al. 2017).

Each training video's reference captions are joined into one bag-of-words document; scikit-learn's
LatentDirichletAllocation (batch variational Bayes) is fitted on those documents; the topic target of a
video is its posterior document-topic proportion vector ``s`` (K,) on the simplex. Topics are shown by
their top words.

Text handling (saved with the model): captions are lower-cased and split into word tokens with
:func:`semlens.captioning.model.tokenize` (punctuation dropped); scikit-learn's English stop-word list
plus ``extra_stop_words`` is removed; words appearing in fewer than ``min_df`` documents are dropped.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import psi
from sklearn.decomposition import LatentDirichletAllocation
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS, CountVectorizer

from semlens.captioning.model import tokenize
from semlens.outputs import save_json

__all__ = ["TopicModel", "video_documents"]

Captions = Mapping[str, Sequence[str]] | Sequence[Sequence[str]]


def video_documents(captions: Captions) -> list[str]:
    """One document per video: its captions joined by spaces. Empty video / caption -> ValueError."""
    items = list(captions.items()) if isinstance(captions, Mapping) else list(enumerate(captions))
    docs = []
    for vid, caps in items:
        if isinstance(caps, str):
            raise TypeError(f"captions of video {vid!r} must be a list of strings, not one string")
        if not caps or any(not str(c).strip() for c in caps):
            raise ValueError(f"video {vid!r} has no captions or an empty caption")
        docs.append(" ".join(caps))
    if not docs:
        raise ValueError("no videos given")
    return docs


class TopicModel:
    """LDA topic model over per-video caption documents (scikit-learn style: ``fit`` returns self).

    n_topics: K. doc_topic_prior / topic_word_prior: symmetric Dirichlet α and β (``None`` = 1/K for α;
    β defaults to 0.01 a common choice for sparse topic-word distributions). max_iter: variational EM passes.
    """

    def __init__(self, n_topics: int = 20, *, doc_topic_prior: float | None = None, topic_word_prior: float = 0.01,
                 max_iter: int = 100, min_df: int = 1, extra_stop_words: Sequence[str] = (),
                 use_english_stop_words: bool = True, seed: int = 0):
        if n_topics < 2:
            raise ValueError(f"n_topics must be >= 2; got {n_topics}")
        self.n_topics = n_topics
        self.doc_topic_prior = doc_topic_prior
        self.topic_word_prior = topic_word_prior
        self.max_iter = max_iter
        self.min_df = min_df
        self.extra_stop_words = list(extra_stop_words)
        self.use_english_stop_words = use_english_stop_words
        self.seed = seed
        self.vocabulary_: list[str] | None = None
        self.lda_: LatentDirichletAllocation | None = None

    @property
    def stop_words(self) -> list[str]:
        base = set(ENGLISH_STOP_WORDS) if self.use_english_stop_words else set()
        return sorted(base | {w.lower() for w in self.extra_stop_words})

    def _counts(self, captions: Captions):
        docs = video_documents(captions)
        if self.vocabulary_ is None:
            vec = CountVectorizer(tokenizer=tokenize, lowercase=False, token_pattern=None,
                                  stop_words=self.stop_words or None, min_df=self.min_df)
            X = vec.fit_transform(docs)
            self.vocabulary_ = list(vec.get_feature_names_out())
            return X
        vec = CountVectorizer(tokenizer=tokenize, lowercase=False, token_pattern=None,
                              vocabulary={w: i for i, w in enumerate(self.vocabulary_)})
        return vec.transform(docs)

    def fit(self, captions: Captions) -> TopicModel:
        """Fit on training videos' captions (mapping id -> captions, or a list of caption lists)."""
        self.vocabulary_ = None
        X = self._counts(captions)
        if X.shape[1] < self.n_topics:
            raise ValueError(f"only {X.shape[1]} distinct non-stop words for {self.n_topics} topics")
        self.lda_ = LatentDirichletAllocation(
            n_components=self.n_topics, doc_topic_prior=self.doc_topic_prior, topic_word_prior=self.topic_word_prior,
            learning_method="batch", max_iter=self.max_iter, random_state=self.seed)
        self.lda_.fit(X)
        return self

    def _fitted(self) -> LatentDirichletAllocation:
        if self.lda_ is None or self.vocabulary_ is None:
            raise RuntimeError("TopicModel is not fitted; call fit() or TopicModel.load()")
        return self.lda_

    def transform(self, captions: Captions) -> np.ndarray:
        """Topic targets s: (N, K) float32, rows sum to 1 (fold-in for unseen videos)."""
        lda = self._fitted()
        X = self._counts(captions)
        theta = lda.transform(X)
        return theta.astype(np.float32)

    def fit_transform(self, captions: Captions) -> np.ndarray:
        return self.fit(captions).transform(captions)

    @property
    def topic_word(self) -> np.ndarray:
        """(K, W) topic-word distributions (rows sum to 1)."""
        comp = self._fitted().components_
        return comp / comp.sum(1, keepdims=True)

    def top_words(self, n: int = 8) -> list[list[str]]:
        """The ``n`` most probable words of each topic."""
        order = np.argsort(-self.topic_word, axis=1, kind="stable")[:, :n]
        return [[self.vocabulary_[i] for i in row] for row in order]  # type: ignore[index]

    def topic_names(self, n: int = 2) -> list[str]:
        """Short automatic names: the top ``n`` words joined by '/' (rename by hand as in the paper)."""
        return ["/".join(w) for w in self.top_words(n)]

    # ------------------------------------------------------------------ persistence
    def to_json(self) -> dict[str, Any]:
        lda = self._fitted()
        return {
            "format": "semlens-topics-1",
            "n_topics": self.n_topics,
            "doc_topic_prior": float(lda.doc_topic_prior_),
            "topic_word_prior": float(lda.topic_word_prior_),
            "max_iter": self.max_iter,
            "min_df": self.min_df,
            "use_english_stop_words": self.use_english_stop_words,
            "extra_stop_words": self.extra_stop_words,
            "seed": self.seed,
            "tokenizer": "lower-case [a-z0-9]+('[a-z]+)? tokens",
            "vocabulary": self.vocabulary_,
            "components": lda.components_.tolist(),
            "top_words": self.top_words(10),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model (vocabulary, stop-word settings, priors, topic-word counts) to JSON."""
        return save_json(self.to_json(), path)

    def fingerprint(self) -> str:
        """16 hex digits identifying the fitted model (vocabulary and topic-word counts)."""
        lda = self._fitted()
        h = hashlib.sha256("\n".join(self.vocabulary_ or []).encode())
        h.update(np.ascontiguousarray(lda.components_, dtype=np.float64).tobytes())
        return h.hexdigest()[:16]

    @classmethod
    def load(cls, path: str | os.PathLike) -> TopicModel:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"topic model file not found: {path}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not a semlens topic model: {err}") from err
        return cls.from_json(d, str(path))

    @classmethod
    def from_json(cls, d: Mapping[str, Any], source: str = "topic model") -> TopicModel:
        """The model of :meth:`to_json`'s dict ``d`` (``source`` names it in errors)."""
        try:
            comp = np.asarray(d["components"], dtype=np.float64)
            vocab = list(d["vocabulary"])
            K = int(d["n_topics"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{source} is not a semlens topic model: {err}") from err
        if comp.shape != (K, len(vocab)) or not np.isfinite(comp).all() or (comp <= 0).any():
            raise ValueError(f"{source}: components must be positive ({K}, {len(vocab)}); got {comp.shape}")
        m = cls(K, doc_topic_prior=d["doc_topic_prior"], topic_word_prior=d["topic_word_prior"],
                max_iter=d["max_iter"], min_df=d["min_df"], extra_stop_words=d["extra_stop_words"],
                use_english_stop_words=d["use_english_stop_words"], seed=d["seed"])
        lda = LatentDirichletAllocation(n_components=K, doc_topic_prior=d["doc_topic_prior"],
                                        topic_word_prior=d["topic_word_prior"], learning_method="batch",
                                        max_iter=d["max_iter"], random_state=d["seed"])
        lda.components_ = comp
        lda.exp_dirichlet_component_ = np.exp(psi(comp) - psi(comp.sum(1, keepdims=True)))
        lda.doc_topic_prior_ = float(d["doc_topic_prior"])
        lda.topic_word_prior_ = float(d["topic_word_prior"])
        lda.n_features_in_ = len(vocab)
        lda.n_batch_iter_ = 1
        lda.n_iter_ = d["max_iter"]
        lda.bound_ = float("nan")
        m.lda_, m.vocabulary_ = lda, vocab
        return m
