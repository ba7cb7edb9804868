"""Interpretable video captioning (Dong et al., CVPR 2017), one module per pipeline stage:

- :mod:`semlens.captioning.topics` — LDA topics over each training video's captions (``TopicModel``).
- :mod:`semlens.captioning.features` — per-frame descriptors from a frozen CNN (``extract_frame_features``,
  ``encode_frames``).
- :mod:`semlens.captioning.model` — ``Vocabulary``, ``CaptionerConfig``, ``AttentiveCaptioner`` (BiLSTM encoder,
  soft-attention decoder, topic head f).
- :mod:`semlens.captioning.training` — the captioner on the one :class:`semlens.train.Trainer`: its step
  (``CaptionStep``), data (``CaptionData``, ``CaptionBatches``), the interpretive loss as an extra term
  (``InterpretiveLoss``) and that configuration (``CaptionTrainer``); topic-head fitting, mean representations.
- :mod:`semlens.captioning.naming` — neuron names by prediction-difference maximization (``name_neurons``,
  ``NeuronTopics``) and their topic selectivity.
- :mod:`semlens.captioning.evaluation` — coco-caption scores (``score_captions``) and the paper's table.
- :mod:`semlens.captioning.pipeline` — the stages chained: ``prepare``, ``train_captioner``,
  ``evaluate_captioner``, ``analyze_neurons``, ``correction_artefacts``.

The package imports the generic core (layers, checkpoint, artefacts, stats, runtime), never the reverse.
Typical use::

    from semlens.captioning import prepare, train_captioner, evaluate_captioner, analyze_neurons

    prep = prepare(features, captions, splits, n_topics=20)        # dicts keyed by video id
    model, hist = train_captioner(prep, lam=1.0, epochs=20)          # LSTM-I (lam=0: LSTM-B)
    scores = evaluate_captioner(model, prep.test)                    # BLEU-1..4, METEOR, ROUGE-L, CIDEr
    analysis = analyze_neurons(model, prep)                          # PDM names, selectivity AUC

The names below are imported on first use, so that importing one stage (say the model, to load weights)
does not import scikit-learn or the trainer.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from semlens.captioning.evaluation import score_captions
    from semlens.captioning.features import encode_frames, extract_frame_features
    from semlens.captioning.model import AttentiveCaptioner, CaptionerConfig, Vocabulary, VocabularyMismatchError
    from semlens.captioning.naming import LinearTopicMap, NeuronTopics, name_neurons, topic_selectivity
    from semlens.captioning.pipeline import (
        Prepared,
        analyze_neurons,
        correction_artefacts,
        evaluate_captioner,
        generate,
        linear_probe,
        prepare,
        prepare_corpus,
        topic_activation_profile,
        train_captioner,
    )
    from semlens.captioning.topics import TopicModel
    from semlens.captioning.training import (
        CaptionBatches,
        CaptionData,
        CaptionStep,
        CaptionTrainConfig,
        CaptionTrainer,
        InterpretiveLoss,
    )

_EXPORTS = {
    "topics": ("TopicModel",),
    "features": ("extract_frame_features", "encode_frames"),
    "model": ("AttentiveCaptioner", "CaptionerConfig", "Vocabulary", "VocabularyMismatchError"),
    "training": ("CaptionData", "CaptionBatches", "CaptionStep", "CaptionTrainConfig", "CaptionTrainer",
                 "InterpretiveLoss"),
    "naming": ("LinearTopicMap", "NeuronTopics", "name_neurons", "topic_selectivity"),
    "evaluation": ("score_captions",),
    "pipeline": ("Prepared", "prepare", "prepare_corpus", "train_captioner", "generate", "evaluate_captioner",
                 "analyze_neurons", "linear_probe", "topic_activation_profile", "correction_artefacts"),
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = ["TopicModel", "extract_frame_features", "encode_frames", "AttentiveCaptioner", "CaptionerConfig",
           "Vocabulary", "VocabularyMismatchError", "CaptionData", "CaptionBatches", "CaptionStep",
           "CaptionTrainConfig", "CaptionTrainer", "InterpretiveLoss", "LinearTopicMap", "NeuronTopics",
           "name_neurons", "topic_selectivity", "score_captions", "Prepared", "prepare", "prepare_corpus",
           "train_captioner", "generate", "evaluate_captioner", "analyze_neurons", "linear_probe",
           "topic_activation_profile", "correction_artefacts"]


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
