"""Explanation embeddings: a decision explained by a few faithful x-features (Qi, Khorram & Li's SRAE / XNN).

See docs/embed.md. ``collect_activations`` → :class:`ActivationStore`; ``SRAE(k, target).fit(store)``; baselines
``TopKSAE``, ``NMFEmbedding``, ``PCAEmbedding`` share the API of :class:`Embedding`.
"""

from semlens.embed.acceptance import accept
from semlens.embed.activations import ActivationStore, NonFiniteActivationError, collect_activations, pool_activation
from semlens.embed.base import Embedding, NotFittedError
from semlens.embed.losses import faithfulness_loss, log_penalty_reconstruction, pull_away
from semlens.embed.srae import SRAE

__all__ = [
    "ActivationStore", "collect_activations", "pool_activation", "NonFiniteActivationError", "Embedding",
    "NotFittedError", "SRAE", "accept", "faithfulness_loss", "log_penalty_reconstruction", "pull_away",
]
