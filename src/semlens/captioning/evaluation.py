"""Captioning metrics with the standard coco-caption code (pycocoevalcap): BLEU-1..4, METEOR 1.5,
ROUGE-L and CIDEr(-D as shipped), on PTB-tokenized, lower-cased text with punctuation removed.

Java runs twice per call (the Stanford PTB tokenizer, then METEOR); SPICE is never used (it downloads
models). The paper's published table (Dong et al. 2017) is kept here to print our rows beside it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["score_captions", "ptb_tokenize", "PUBLISHED_DONG", "paper_table", "format_table", "METRICS"]

METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")

# Dong et al. 2017, YouTubeClips (MSVD) test set, as published (Dong et al. 2017).
PUBLISHED_DONG: list[dict[str, object]] = [
    {"model": "LSTM-B (GoogLeNet)", "BLEU-4": 0.416, "METEOR": 0.295},
    {"model": "LSTM-I (GoogLeNet)", "BLEU-4": 0.446, "METEOR": 0.297},
    {"model": "LSTM-YT (AlexNet)", "BLEU-4": 0.333, "METEOR": 0.291},
    {"model": "S2VT (RGB + flow)", "BLEU-4": None, "METEOR": 0.298},
    {"model": "SA (GoogLeNet)", "BLEU-4": 0.403, "METEOR": 0.290},
    {"model": "LSTM-E (VGG)", "BLEU-4": 0.402, "METEOR": 0.295},
    {"model": "h-RNN (VGG)", "BLEU-4": 0.443, "METEOR": 0.311},
    {"model": "SA (GoogLeNet + C3D)", "BLEU-4": 0.419, "METEOR": 0.296},
    {"model": "LSTM-E (VGG + C3D)", "BLEU-4": 0.453, "METEOR": 0.310},
    {"model": "h-RNN (VGG + C3D)", "BLEU-4": 0.499, "METEOR": 0.326},
]

_PUNCT = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"}


def _pkg_dir() -> Path:
    try:
        import pycocoevalcap
    except ImportError as err:  # pragma: no cover - dependency of semlens
        raise RuntimeError("pycocoevalcap is not installed; it is required for captioning metrics") from err
    return Path(list(pycocoevalcap.__path__)[0])  # a namespace package (no __init__.py)


def _java() -> str:
    java = shutil.which("java")
    if java is None:
        raise RuntimeError("captioning metrics need Java (PTB tokenizer and METEOR jars); 'java' is not on PATH")
    return java


def ptb_tokenize(sentences: Sequence[str]) -> list[str]:
    """Stanford PTB tokenization as in coco-caption (lower-cased, punctuation tokens removed).

    Runs the tokenizer jar shipped with pycocoevalcap once for all sentences (temporary file in the
    system temp dir, so the installed package may be read-only).
    """
    jar = _pkg_dir() / "tokenizer" / "stanford-corenlp-3.4.1.jar"
    if not jar.is_file():
        raise RuntimeError(f"PTB tokenizer jar not found at {jar}")
    text = "\n".join(s.replace("\n", " ").replace("\r", " ") for s in sentences)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as tmp:
        tmp.write(text)
    try:
        proc = subprocess.run([_java(), "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
                               "-lowerCase", tmp.name], capture_output=True, check=False)
    finally:
        os.unlink(tmp.name)
    if proc.returncode != 0:
        raise RuntimeError(f"PTB tokenizer failed: {proc.stderr.decode(errors='replace')[:500]}")
    lines = proc.stdout.decode("utf-8").split("\n")
    if len(lines) < len(sentences):
        raise RuntimeError(f"PTB tokenizer returned {len(lines)} lines for {len(sentences)} sentences")
    return [" ".join(w for w in line.rstrip().split(" ") if w and w not in _PUNCT) for line in lines[: len(sentences)]]


def score_captions(references: Mapping[str, Sequence[str]], candidates: Mapping[str, str],
                   meteor: bool = True) -> dict[str, float]:
    """Corpus-level coco-caption scores of one candidate caption per video against all its references.

    references: video id -> list of reference sentences (>= 1, non-empty); candidates: video id ->
    generated sentence, for exactly the same ids. Returns a dict over :data:`METRICS` (METEOR omitted
    with ``meteor=False``). Scores are fractions in [0, 1] (CIDEr in [0, 10]).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    ids = list(candidates)
    if not ids:
        raise ValueError("no candidate captions to score")
    unknown = [i for i in ids if i not in references]
    if unknown:
        raise KeyError(f"candidates for video ids without references: {unknown[:5]}")
    missing = [i for i in references if i not in candidates]
    if missing:
        raise KeyError(f"no candidate caption for video ids: {missing[:5]} ({len(missing)} in all)")
    for i in ids:
        refs = references[i]
        if isinstance(refs, str) or not refs or any(not str(r).strip() for r in refs):
            raise ValueError(f"video {i!r}: references must be a non-empty list of non-empty sentences")
        if not isinstance(candidates[i], str):
            raise TypeError(f"candidate of video {i!r} must be a string")
    flat = [candidates[i] for i in ids] + [r for i in ids for r in references[i]]
    tok = ptb_tokenize(flat)
    res = {i: [tok[k] or "<empty>"] for k, i in enumerate(ids)}  # METEOR cannot score an empty line
    pos = len(ids)
    gts = {}
    for i in ids:
        n = len(references[i])
        gts[i] = tok[pos: pos + n]
        pos += n
    out: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out.update({f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)})
    if meteor:
        _java()
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()
        try:
            out["METEOR"] = float(scorer.compute_score(gts, res)[0])
        finally:
            del scorer
    out["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return {k: out[k] for k in METRICS if k in out}


def paper_table(ours: Mapping[str, Mapping[str, object]], metrics: Sequence[str] = ("BLEU-4", "METEOR", "CIDEr")
                ) -> list[dict[str, object]]:
    """Rows in the paper's layout: our models first (value or {"mean", "std"} per metric), then the
    published YouTubeClips rows. Missing entries are shown as '–'."""

    def cell(v: object) -> str:
        if v is None:
            return "–"
        if isinstance(v, Mapping):
            from semlens.report import format_mean_std

            return format_mean_std(float(v["mean"]), float(v["std"]), int(v.get("n", 2)))
        return f"{float(v):.3f}"  # type: ignore[arg-type]

    rows = [{"model": name, "data": "ours", **{m: cell(vals.get(m)) for m in metrics}} for name, vals in ours.items()]
    rows += [{"model": r["model"], "data": "YouTubeClips (published)", **{m: cell(r.get(m)) for m in metrics}}
             for r in PUBLISHED_DONG]
    return rows


def format_table(rows: Sequence[Mapping[str, object]]) -> str:
    """Plain-text table (for the CLI)."""
    if not rows:
        return ""
    cols = list(rows[0])
    width = {c: max(len(str(c)), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    line = "  ".join(str(c).ljust(width[c]) for c in cols)
    sep = "  ".join("-" * width[c] for c in cols)
    body = ["  ".join(str(r.get(c, "")).ljust(width[c]) for c in cols) for r in rows]
    return "\n".join([line, sep, *body])
