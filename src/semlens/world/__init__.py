"""Built-in worlds with exact ground truth (concept images, captioned clips) and Broden / MSVD-style I/O."""

from semlens.world.broden import (
    BrodenBatch,
    BrodenDataset,
    BrodenFormatError,
    read_images,
    write_broden,
    write_concepts,
)
from semlens.world.clips import ACTIONS, ACTORS, ClipSet, action_probe, generate_clips, pooled_frame_features
from semlens.world.concepts import CLASSES, VOCABULARY, ConceptImages, ConceptVocabulary, generate_concepts
from semlens.world.msvd import CaptionCorpus, CorpusFormatError, read_features, write_clip_corpus

__all__ = [
    "ACTIONS",
    "ACTORS",
    "BrodenBatch",
    "BrodenDataset",
    "BrodenFormatError",
    "CLASSES",
    "CaptionCorpus",
    "ClipSet",
    "ConceptImages",
    "ConceptVocabulary",
    "CorpusFormatError",
    "VOCABULARY",
    "action_probe",
    "generate_clips",
    "generate_concepts",
    "pooled_frame_features",
    "read_features",
    "read_images",
    "write_broden",
    "write_clip_corpus",
    "write_concepts",
]
