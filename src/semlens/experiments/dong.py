"""``semlens reproduce dong``: LSTM-B vs LSTM-I (Dong et al., CVPR 2017) on the built-in captioned clips.

Pipeline: clips -> frozen reference CNN (trained on concept images) -> per-frame features -> LDA topics
-> for each seed, LSTM-B (λ = 0) and LSTM-I (λ > 0) -> coco-caption scores on test, PDM neuron names,
topic selectivity (AUC), action-recognition transfer (linear probe on frozen v̄) -> DIR/results.json
(mean and std over seeds per metric and model) and DIR/report.html.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from semlens.captioning import (
    Prepared,
    analyze_neurons,
    extract_frame_features,
    generate,
    linear_probe,
    prepare,
    train_captioner,
)
from semlens.evaluate.captioning import paper_table, score_captions
from semlens.models.captioner import save_json
from semlens.report import Report, Section
from semlens.runtime import resolve_device, seed_everything

__all__ = ["DongSettings", "compare_models", "sections", "run_dong", "frame_cnn", "prepare_clips", "register_reproduce"]

MODELS = ("LSTM-B", "LSTM-I")


@dataclass
class DongSettings:
    """Sizes of one comparison (``fast()`` for the demo / ``--fast``)."""

    n_clips: int = 600
    frames: int = 16
    n_topics: int = 12
    lam: float = 10.0
    epochs: int = 20
    batch_size: int = 64
    captions_per_video: int | None = None
    lr: float = 2e-3
    hidden: int = 128
    embed: int = 64
    decoder_hidden: int = 128
    attention: int = 64
    dropout: float = 0.3
    beam: int = 3
    cnn_images: int = 3000
    cnn_epochs: int = 6

    @classmethod
    def fast(cls) -> DongSettings:
        return cls(n_clips=240, frames=8, n_topics=8, epochs=10, batch_size=32, captions_per_video=4, lr=3e-3,
                   hidden=48, embed=32, decoder_hidden=48, attention=32, dropout=0.2, beam=2, cnn_images=1200,
                   cnn_epochs=3)


def frame_cnn(settings: DongSettings, seed: int, device: torch.device, spec: str = "alexnet-like"
              ) -> torch.nn.Module:
    """Train a reference CNN on built-in concept images (the frozen frame encoder)."""
    from torch.utils.data import TensorDataset

    from semlens.models import build_model
    from semlens.train import TrainConfig, Trainer
    from semlens.world import generate_concepts

    ci = generate_concepts(n=settings.cnn_images, size=64, seed=seed + 101)
    n_val = max(1, len(ci.labels) // 10)
    x, y = torch.as_tensor(ci.images), torch.as_tensor(ci.labels)
    cnn = build_model(spec, num_classes=len(ci.class_names), image_size=64)
    cfg = TrainConfig(epochs=settings.cnn_epochs, batch_size=64, lr=1e-3, optimizer="adam", seed=seed,
                      device=str(device))
    Trainer(cnn, TensorDataset(x[n_val:], y[n_val:]), TensorDataset(x[:n_val], y[:n_val]), cfg).fit()
    return cnn.to(device).eval()


def _stats(values: Sequence[float]) -> dict[str, float]:
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if arr.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0, "n": int(arr.size)}


def compare_models(prep: Prepared, settings: DongSettings, seeds: Sequence[int], device: torch.device,
                   action_labels: Mapping[str, np.ndarray] | None = None,
                   log: Callable[[str], None] = print,
                   on_run: Callable[[dict[str, list[dict[str, Any]]]], None] | None = None) -> dict[str, Any]:
    """Train and evaluate LSTM-B and LSTM-I for every seed.

    action_labels: optional "train"/"test" -> (N,) labels aligned with ``prep.train``/``prep.test`` for
    the transfer probe. ``on_run(runs)`` is called after every trained model (e.g. to save partial
    results). Returns per-run metrics, mean/std per model and the last seed's analyses.
    """
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODELS}
    last: dict[str, Any] = {}
    for seed in seeds:
        for name, lam in zip(MODELS, (0.0, settings.lam), strict=True):
            t0 = time.perf_counter()
            model, hist = train_captioner(
                prep, lam=lam, epochs=settings.epochs, batch_size=settings.batch_size, lr=settings.lr,
                hidden=settings.hidden, embed=settings.embed, decoder_hidden=settings.decoder_hidden,
                attention=settings.attention, dropout=settings.dropout,
                captions_per_video=settings.captions_per_video, seed=seed, device=str(device))
            train_s = time.perf_counter() - t0
            caps = generate(model, prep.test, beam=settings.beam)
            scores = score_captions(dict(zip(prep.test.video_ids, prep.test.captions, strict=True)), caps)
            ana = analyze_neurons(model, prep)
            rec: dict[str, Any] = {"seed": seed, "lam": lam, **scores, "train_seconds": train_s,
                                   "clips_per_s": float(np.median([h["clips_per_s"] for h in hist])),
                                   "final_nll": hist[-1]["nll"], "final_topic_loss": hist[-1]["topic"],
                                   "topic_error_test": ana["topic_error_test"],
                                   "selectivity_auc": ana["selectivity"]["mean_auc"],
                                   "selectivity_index": ana["selectivity"]["selectivity_index"],
                                   "named_neurons": ana["selectivity"]["n_named"]}
            if action_labels is not None:
                rec["action_accuracy"] = linear_probe(ana["vbar_train"], action_labels["train"], ana["vbar_test"],
                                                      action_labels["test"], seed=seed)
            runs[name].append(rec)
            if on_run is not None:
                on_run(runs)
            last[name] = {"model": model, "analysis": ana, "history": hist, "captions": caps}
            log(f"seed {seed} {name}: BLEU-4 {scores['BLEU-4']:.3f} METEOR {scores['METEOR']:.3f} "
                f"CIDEr {scores['CIDEr']:.3f} selectivity AUC {rec['selectivity_auc']:.3f}"
                + (f" action acc {rec['action_accuracy']:.3f}" if "action_accuracy" in rec else "")
                + f" ({train_s:.0f}s); e.g. '{caps[prep.test.video_ids[0]]}'")
    keys = [k for k in runs[MODELS[0]][0] if k not in ("seed", "lam")]
    summary = {m: {k: _stats([r[k] for r in runs[m]]) for k in keys} for m in MODELS}
    return {"runs": runs, "summary": summary, "last": last}


def _figures(prep: Prepared, last: Mapping[str, Any], video_has: np.ndarray) -> list[tuple[Any, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = []
    names = prep.topics.topic_names()
    K = len(names)
    # (1) mean activation of each topic's neurons, videos with vs without the topic, LSTM-B | LSTM-I
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.2), sharey=True)
    for ax, m in zip(axes, MODELS, strict=True):
        prof = last[m]["analysis"]["profile"]
        x = np.arange(K)
        ax.bar(x - 0.2, prof["in"].numpy(), 0.4, label="videos with topic")
        ax.bar(x + 0.2, prof["out"].numpy(), 0.4, label="videos without")
        ax.set_xticks(x, names, rotation=60, ha="right", fontsize=7)
        ax.set_title(f"{m}: mean oriented v̄ of each topic's neurons", fontsize=9)
    axes[0].legend(fontsize=7)
    figs.append((fig, "Average activation of each topic's PDM-named neurons on test videos that contain the topic "
                      "vs those that do not (each neuron signed by its training-set orientation; topics without "
                      "neurons are blank)."))
    # (2) activation of the strongest LSTM-I topic neuron through time, relevant vs irrelevant clips
    ana = last["LSTM-I"]["analysis"]
    nt = ana["names"]
    j = int(nt.strength.argmax())
    t = int(nt.topic[j])
    seq, lengths = ana["v_test"][:, :, j].numpy(), prep.test.lengths.numpy()
    fig, ax = plt.subplots(figsize=(6, 3))
    for label, sel, color in (("relevant (R)", video_has[:, t], "C0"), ("irrelevant (I)", ~video_has[:, t], "C3")):
        idx = np.flatnonzero(sel)[:6]
        for n_drawn, k in enumerate(idx):
            ax.plot(np.arange(lengths[k]), seq[k, : lengths[k]], color=color, alpha=0.6,
                    label=label if n_drawn == 0 else None)
    ax.set_xlabel("frame")
    ax.set_ylabel(f"neuron {j}")
    ax.set_title(f"LSTM-I neuron {j} (topic '{names[t]}') through time")
    ax.legend(fontsize=7)
    figs.append((fig, f"Activation of LSTM-I neuron {j}, named '{names[t]}' by PDM, per frame on test clips whose "
                      "captions contain the topic (R) and clips that do not (I)."))
    # (3) selectivity AUC per topic
    fig, ax = plt.subplots(figsize=(6, 3))
    for off, m in zip((-0.2, 0.2), MODELS, strict=True):
        aucs = [np.nan if a is None else a for a in last[m]["analysis"]["selectivity"]["auc_per_topic"]]
        ax.bar(np.arange(K) + off, aucs, 0.4, label=m)
    ax.axhline(0.5, color="k", lw=0.8, ls="--")
    ax.set_xticks(np.arange(K), names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("AUC (test)")
    ax.legend(fontsize=7)
    figs.append((fig, "Topic selectivity: AUC with which each topic's named neurons separate test videos with and "
                      "without the topic (0.5 = chance)."))
    return figs


def sections(prep: Prepared, result: Mapping[str, Any], settings: DongSettings, seeds: Sequence[int],
             title: str = "Semantic interpretability for video captioning (Dong et al. 2017)") -> list[Section]:
    """Report sections: the table beside the paper's, topics, neuron names, selectivity, transfer, figures."""
    from semlens.units.pdm import contains_topic

    summ = result["summary"]
    main = Section(title)
    main.text(f"Built-in captioned clips ({prep.train.n_videos} train / {prep.test.n_videos} test videos), "
              f"{prep.topics.n_topics} LDA topics, λ = {settings.lam}, {settings.epochs} epochs, beam "
              f"{settings.beam}, seeds {list(seeds)}. Mean ± std over seeds; published rows are on "
              "YouTubeClips (MSVD) with GoogLeNet features and are not directly comparable to synthetic clips.")
    ours = {f"{m} (ours)": {k: summ[m][k] for k in ("BLEU-4", "METEOR", "CIDEr")} for m in MODELS}
    main.table(paper_table(ours), caption="Captioning on the test split (coco-caption), beside Dong et al. 2017.")
    rows = []
    for m in MODELS:
        row = {"model": m}
        for k in ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "selectivity_auc", "selectivity_index",
                  "topic_error_test", "action_accuracy", "named_neurons", "clips_per_s"):
            if k in summ[m]:
                row[k] = f"{summ[m][k]['mean']:.3f} ± {summ[m][k]['std']:.3f}"
        rows.append(row)
    main.table(rows, caption="All metrics (mean ± std over seeds). selectivity_auc: mean over topics of the AUC "
                             "of the topic's named neurons on test; action_accuracy: linear probe on frozen v̄.")
    last = result["last"]
    examples = []
    for vid, refs in list(zip(prep.test.video_ids, prep.test.captions, strict=True))[:6]:
        examples.append({"video": vid, "reference": refs[0], **{m: last[m]["captions"][vid] for m in MODELS}})
    main.table(examples, caption="Generated captions on test clips (last seed) beside one reference.")
    topics = Section("LDA topics of the clip captions")
    topics.table([{"topic": t, "name": n, "top words": " ".join(w)} for t, (n, w) in
                  enumerate(zip(prep.topics.topic_names(), prep.topics.top_words(8), strict=True))])
    neurons = Section("Neurons named by prediction-difference maximization (LSTM-I, last seed)")
    nt = last["LSTM-I"]["analysis"]["names"]
    neurons.table(nt.topic_table(), caption="Per topic: its neurons, strongest first.")
    neurons.table(nt.table(top=15), caption="Strongest neuron -> topic assignments (strength = max_t Δ[j, t]).")
    has = contains_topic(prep.test.topics).numpy()
    figs = Section("Seeing it: topic neurons in LSTM-B and LSTM-I")
    for fig, cap in _figures(prep, last, has):
        figs.figure(fig, cap)
    return [main, topics, neurons, figs]


def run_dong(out: str | Path, seeds: int = 3, fast: bool = False, device: str = "auto",
             settings: DongSettings | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole comparison; writes ``out/results.json`` and ``out/report.html`` and returns the results."""
    try:
        from semlens.world import generate_clips
    except ImportError:  # not re-exported yet
        from semlens.world.clips import generate_clips

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    st = settings or (DongSettings.fast() if fast else DongSettings())
    dev = resolve_device(device)
    seed_everything(0)
    t0 = time.perf_counter()
    clips = generate_clips(n=st.n_clips, frames=st.frames, size=64, seed=0)
    log(f"generated {len(clips.video_ids)} clips; training the frame CNN ...")
    cnn = frame_cnn(st, seed=0, device=dev)
    feats = extract_frame_features(cnn, torch.as_tensor(clips.frames), device=dev)
    prep = prepare_clips(clips, feats, st.n_topics)
    action = {s: np.asarray(clips.truth["action"])[list(clips.splits[s])] for s in ("train", "test")}
    seed_list = list(range(seeds))
    res = compare_models(prep, st, seed_list, dev, action_labels=action, log=log,
                         on_run=lambda runs: save_json({"partial": True, "runs": runs}, out / "results.json"))
    results = {"paper": "Dong, Su, Zhu, Zhang, CVPR 2017", "data": "semlens built-in clips",
               "settings": asdict(st), "seeds": seed_list, "summary": res["summary"], "runs": res["runs"],
               "topics": prep.topics.top_words(8), "seconds": time.perf_counter() - t0}
    save_json(results, out / "results.json")
    prep.topics.save(out / "topics.json")
    for m in MODELS:
        res["last"][m]["model"].save(out / f"{m.lower()}.safetensors")
    report = Report(title="semlens reproduce dong")
    for sec in sections(prep, res, st, seed_list):
        report.add(sec)
    report.write(out / "report.html")
    log(json.dumps({m: {k: round(res["summary"][m][k]["mean"], 4) for k in ("BLEU-4", "METEOR", "CIDEr")}
                    for m in MODELS}))
    return results


def prepare_clips(clips: Any, feats: torch.Tensor, n_topics: int, seed: int = 0) -> Prepared:
    """:func:`prepare` for a :class:`semlens.world.ClipSet` and its (N, T, C) frame features."""
    ids = list(clips.video_ids)
    feat = {v: feats[k] for k, v in enumerate(ids)}
    caps = {v: list(clips.captions[k]) for k, v in enumerate(ids)}
    splits = {s: [ids[i] for i in clips.splits[s]] for s in ("train", "val", "test") if s in clips.splits}
    return prepare(feat, caps, splits, n_topics=n_topics, seed=seed)


def register_reproduce(app: Any) -> None:
    """Add ``semlens reproduce dong`` to the ``reproduce`` sub-app (discovered by semlens.cli.reproduce)."""
    import typer

    from semlens.cli._common import user_errors

    @app.command("dong")
    def dong(
        out: Path = typer.Option(..., help="Output directory: results.json, report.html, models, topics."),
        seeds: int = typer.Option(3, help="Number of seeds (0..seeds-1) per model."),
        fast: bool = typer.Option(False, "--fast", help="Small clips set and model, few epochs (minutes on CPU)."),
        device: str = typer.Option("auto", help="'auto', 'cpu' or 'cuda'."),
    ) -> None:
        """Dong et al. 2017: LSTM-B vs LSTM-I on the built-in clips (captioning, selectivity, transfer)."""
        if seeds < 1:
            raise typer.BadParameter("--seeds must be >= 1")
        with user_errors():
            run_dong(out, seeds=seeds, fast=fast, device=device, log=typer.echo)
        typer.echo(f"wrote {Path(out) / 'results.json'} and {Path(out) / 'report.html'}")
