"""``semlens reproduce dong``: LSTM-B vs LSTM-I (Dong et al., CVPR 2017) on the built-in captioned clips.

Pipeline: clips -> frozen reference CNN (trained on concept images) -> per-frame features (an early and
the last conv layer, mean- and max-pooled over space, standardised on the training split) -> LDA topics
-> λ chosen on the validation split (sweep on seed 0) -> for each seed, LSTM-B (λ = 0) and LSTM-I (chosen
λ), both with early stopping on validation CIDEr -> coco-caption scores on test, PDM neuron names, topic
selectivity (AUC), action-recognition transfer (linear probe on frozen v̄) -> DIR/results.json (the λ
sweep, and mean and std over seeds per metric and model) and DIR/report.html.
"""

from __future__ import annotations

import json
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
    prepare,
    train_captioner,
)
from semlens.captioning.evaluation import paper_table, score_captions
from semlens.outputs import save_json
from semlens.report import Report, Section, format_mean_std
from semlens.runtime import resolve_device, seed_everything
from semlens.stats import auc, linear_probe, mean_std, paired_gap

__all__ = ["DongSettings", "compare_models", "paired_gap", "sweep_lambda", "choose_lambda", "sections", "run_dong",
           "frame_cnn", "prepare_clips"]

MODELS = ("LSTM-B", "LSTM-I")


@dataclass
class DongSettings:
    """Sizes of one comparison (``fast()`` for the demo / ``--fast``).

    ``lam`` is the LSTM-I weight used when no sweep runs; ``lam_grid`` (non-empty) makes :func:`run_dong`
    choose λ on the validation split (see :func:`choose_lambda`). ``select_every``/``patience``: early
    stopping on validation CIDEr. ``frame_layers``/``frame_pool``/``frame_grid``/``frame_grid_layers``: the
    frozen CNN's per-frame descriptor (see :func:`semlens.captioning.extract_frame_features`).
    ``topic_dropout``/``topic_weight_decay``: regularisation of LSTM-I's topic head f (no effect on LSTM-B).
    ``cnn_images``/``cnn_epochs``/``cnn_task``: the frame CNN's training on concept images (see :func:`frame_cnn`).
    """

    n_clips: int = 600
    frames: int = 16
    n_topics: int = 20  # Dong et al. use 20; with 20, most topics are one concept family (an action, a shape, a colour)
    lam: float = 10.0  # used when lam_grid is empty
    lam_grid: tuple[float, ...] = (1.0, 10.0)  # λ = 100 swamped the caption NLL and cost METEOR (earlier sweeps)
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
    cnn_images: int = 8000  # the frame CNN must encode shape (8000 × 10 epochs: 0.78 test accuracy on 12 classes)
    cnn_epochs: int = 10
    cnn_task: str = "class"  # "class": 12 (shape, colour) classes; "multilabel": presence of every concept
    frame_layers: tuple[str, ...] = ("features.conv2", "features.conv5")
    frame_pool: str = "meanmax"
    frame_grid: int = 2  # + conv5 average-pooled to 2 x 2: where the actor is (motion, size); see docs/captioning.md
    frame_grid_layers: tuple[str, ...] | None = ("features.conv5",)
    topic_dropout: float = 0.5  # dropout on v̄ before f and L2 on f: the interpretive loss generalises to
    topic_weight_decay: float = 0.01  # held-out videos instead of memorising the training videos' topics
    select_every: int = 1
    patience: int | None = 5
    meteor_tolerance: float = 0.01

    @classmethod
    def fast(cls) -> DongSettings:
        return cls(n_clips=240, frames=8, n_topics=8, epochs=10, batch_size=32, captions_per_video=4, lr=3e-3,
                   hidden=48, embed=32, decoder_hidden=48, attention=32, dropout=0.2, beam=2, cnn_images=4000,
                   cnn_epochs=6, lam_grid=(1.0, 10.0, 100.0), patience=4)  # 4000 x 6: 0.40 accuracy (1200 x 3: chance)

    def train_kwargs(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr, "hidden": self.hidden,
                "embed": self.embed, "decoder_hidden": self.decoder_hidden, "attention": self.attention,
                "dropout": self.dropout, "captions_per_video": self.captions_per_video,
                "select_every": self.select_every, "patience": self.patience, "topic_dropout": self.topic_dropout,
                "topic_weight_decay": self.topic_weight_decay}


def frame_cnn(settings: DongSettings, seed: int, device: torch.device, spec: str = "alexnet-like"
              ) -> torch.nn.Module:
    """Train a reference CNN on built-in concept images (the frozen frame encoder).

    ``settings.cnn_task``: ``"class"`` trains the 12-way (shape, colour) classifier of the concept world;
    ``"multilabel"`` trains one sigmoid output per concept (every colour, object, part, texture and scene,
    targets from the images' masks: :func:`semlens.world.concepts.concept_presence`), the analogue of
    ImageNet pre-training. Neither sees the clips or their captions.
    """
    from torch.utils.data import TensorDataset

    from semlens.models import build_model
    from semlens.train import TrainConfig, Trainer
    from semlens.world import generate_concepts

    if settings.cnn_task not in ("class", "multilabel"):
        raise ValueError(f"unknown cnn_task {settings.cnn_task!r}; use 'class' or 'multilabel'")
    multi = settings.cnn_task == "multilabel"
    ci = generate_concepts(n=settings.cnn_images, size=64, seed=seed + 101, masks=multi)
    n_val = max(1, len(ci.labels) // 10)
    x = torch.as_tensor(ci.images)
    if multi:
        from semlens.world.concepts import concept_presence

        y = concept_presence(ci)
        cnn = build_model(spec, num_classes=y.shape[1], image_size=64)
        _fit_multilabel(cnn, x[n_val:], y[n_val:], settings.cnn_epochs, seed, device)
        return cnn.to(device).eval()
    y = torch.as_tensor(ci.labels)
    cnn = build_model(spec, num_classes=len(ci.class_names), image_size=64)
    cfg = TrainConfig(epochs=settings.cnn_epochs, batch_size=64, lr=1e-3, optimizer="adam", seed=seed,
                      device=str(device))
    Trainer(cnn, TensorDataset(x[n_val:], y[n_val:]), TensorDataset(x[:n_val], y[:n_val]), cfg).fit()
    return cnn.to(device).eval()


def _fit_multilabel(cnn: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int,
                    device: torch.device, batch_size: int = 64, lr: float = 1e-3) -> list[float]:
    """Adam on the mean binary cross-entropy of ``cnn(x)`` (N, C) logits vs ``y`` (N, C) in {0, 1};
    x: (N, 3, S, S) in [0, 1]. Seeded shuffling (:func:`semlens.train.fit_module` over
    :func:`~semlens.train.shuffled_batches`); returns the mean training loss per epoch."""
    from semlens.train import fit_module, shuffled_batches

    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{x.shape[0]} images but {y.shape[0]} label rows")
    n = x.shape[0]
    torch.manual_seed(seed)  # dropout
    cnn.to(device).train()

    def bce(idx: torch.Tensor | None) -> torch.Tensor:
        return torch.nn.functional.binary_cross_entropy_with_logits(cnn(x[idx].to(device)), y[idx].to(device))

    losses = fit_module(cnn.parameters(), bce, shuffled_batches(n, batch_size, epochs, seed), lr=lr)
    cnn.eval()
    sizes = [min(batch_size, n - s) for s in range(0, n, batch_size)]
    k = len(sizes)
    return [sum(v * b for v, b in zip(losses[e * k: (e + 1) * k], sizes, strict=True)) / n for e in range(epochs)]


@torch.no_grad()
def frame_cnn_accuracy(cnn: torch.nn.Module, device: torch.device, n: int = 600, seed: int = 202,
                       multilabel: bool = False) -> float:
    """How well the frame CNN encodes the concept world, on held-out concept images: test accuracy on the
    12 classes, or (``multilabel``) the mean over concepts of the ROC AUC of its outputs for concept presence
    (concepts present in none or all of the images skipped)."""
    from semlens.world import generate_concepts
    from semlens.world.concepts import concept_presence

    ci = generate_concepts(n=n, size=64, seed=seed, masks=multilabel)
    x = torch.as_tensor(ci.images)
    out = torch.cat([cnn(x[i:i + 200].to(device)).cpu() for i in range(0, n, 200)])
    if multilabel:
        a = auc(out, concept_presence(ci).bool())
        return float(a[~torch.isnan(a)].mean())
    return float((out.argmax(1) == torch.as_tensor(ci.labels)).float().mean())


Trained = dict[tuple[float, int], tuple[Any, list[dict[str, Any]], float]]


def _train(prep: Prepared, settings: DongSettings, lam: float, seed: int, device: torch.device,
           trained: Trained | None) -> tuple[Any, list[dict[str, Any]], float]:
    """(model, history, training seconds) for (λ, seed); reused from ``trained`` when already there (training
    is deterministic in the seed, so a model of the λ sweep is the same model), stored into it otherwise."""
    if trained is not None and (lam, seed) in trained:
        return trained[(lam, seed)]
    t0 = time.perf_counter()
    model, hist = train_captioner(prep, lam=lam, seed=seed, device=str(device), **settings.train_kwargs())
    out = (model, hist, time.perf_counter() - t0)
    if trained is not None:
        trained[(lam, seed)] = out
    return out


def _train_eval(prep: Prepared, settings: DongSettings, lam: float, seed: int, device: torch.device,
                action_labels: Mapping[str, np.ndarray] | None, trained: Trained | None = None
                ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train one model (or take it from ``trained``), score its test captions, name its neurons; returns
    (metrics record, artefacts)."""
    model, hist, train_s = _train(prep, settings, lam, seed, device, trained)
    caps = generate(model, prep.test, beam=settings.beam)
    scores = score_captions(dict(zip(prep.test.video_ids, prep.test.captions, strict=True)), caps)
    # same naming procedure for every model: f fitted on the frozen encoder, PDM on train, AUC on test
    ana = analyze_neurons(model, prep, refit_head=True)
    sel_epoch = hist[-1].get("selected_epoch", hist[-1]["epoch"])
    at_sel = next(h for h in hist if h["epoch"] == sel_epoch)
    rec: dict[str, Any] = {"seed": seed, "lam": lam, **scores, "train_seconds": train_s,
                           "clips_per_s": float(np.median([h["clips_per_s"] for h in hist])),
                           "epochs_run": len(hist), "selected_epoch": sel_epoch,
                           "final_nll": at_sel["nll"], "final_topic_loss": at_sel["topic"],
                           "val_topic_loss": at_sel.get("val_topic", float("nan")),
                           "topic_error_test": ana["topic_error_test"],
                           "selectivity_auc": ana["selectivity"]["mean_auc"],
                           "selectivity_index": ana["selectivity"]["selectivity_index"],
                           "named_neurons": ana["selectivity"]["n_named"],
                           "topics_scored": ana["selectivity"]["n_topics_scored"]}
    own = None
    if lam > 0:  # LSTM-I's own jointly trained f, as in the paper (secondary)
        own = analyze_neurons(model, prep, refit_head=False)
        rec["selectivity_auc_own_f"] = own["selectivity"]["mean_auc"]
        rec["topic_error_test_own_f"] = own["topic_error_test"]
    if action_labels is not None:
        rec["action_accuracy"] = linear_probe(ana["vbar_train"], action_labels["train"], ana["vbar_test"],
                                              action_labels["test"], seed=seed)
    loss_curve = [{k: h[k] for k in ("epoch", "nll", "topic", "lam_topic", "val_nll", "val_topic", "val_CIDEr")
                   if k in h} for h in hist]
    rec["history"] = loss_curve
    return rec, {"model": model, "analysis": ana, "analysis_own_f": own or ana, "history": hist, "captions": caps}


def compare_models(prep: Prepared, settings: DongSettings, seeds: Sequence[int], device: torch.device,
                   action_labels: Mapping[str, np.ndarray] | None = None,
                   log: Callable[[str], None] = print,
                   on_run: Callable[[dict[str, list[dict[str, Any]]]], None] | None = None,
                   lam: float | None = None, trained: Trained | None = None) -> dict[str, Any]:
    """Train and evaluate LSTM-B (λ = 0) and LSTM-I (``lam``, default ``settings.lam``) for every seed.

    action_labels: optional "train"/"test" -> (N,) labels aligned with ``prep.train``/``prep.test`` for
    the transfer probe. ``on_run(runs)`` is called after every trained model (e.g. to save partial
    results). ``trained``: models already trained with these settings, (λ, seed) -> (model, history,
    seconds), e.g. by :func:`sweep_lambda`; they are reused instead of retrained. Returns per-run metrics,
    mean/std per model, ``paired`` (LSTM-I − LSTM-B per seed, :func:`paired_gap`, for the selectivity AUC and
    the caption and transfer scores) and the last seed's analyses.
    """
    lam_i = settings.lam if lam is None else lam
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODELS}
    last: dict[str, Any] = {}
    for seed in seeds:
        for name, lam_m in zip(MODELS, (0.0, lam_i), strict=True):
            rec, art = _train_eval(prep, settings, lam_m, seed, device, action_labels, trained)
            runs[name].append(rec)
            if on_run is not None:
                on_run(runs)
            last[name] = art
            log(f"seed {seed} {name} (λ={lam_m:g}): BLEU-4 {rec['BLEU-4']:.3f} METEOR {rec['METEOR']:.3f} "
                f"CIDEr {rec['CIDEr']:.3f} selectivity AUC {rec['selectivity_auc']:.3f}"
                + (f" action acc {rec['action_accuracy']:.3f}" if "action_accuracy" in rec else "")
                + f" (epoch {rec['selected_epoch'] + 1} of {rec['epochs_run']}, {rec['train_seconds']:.0f}s); "
                f"e.g. '{art['captions'][prep.test.video_ids[0]]}'")
    keys = [k for k in runs[MODELS[1]][0] if k not in ("seed", "lam", "history")]
    summary = {m: {k: mean_std([r[k] for r in runs[m] if k in r]) for k in keys if k in runs[m][0]} for m in MODELS}
    paired = {k: paired_gap([r[k] for r in runs[MODELS[0]]], [r[k] for r in runs[MODELS[1]]])
              for k in ("selectivity_auc", "BLEU-4", "METEOR", "CIDEr", "action_accuracy") if k in runs[MODELS[0]][0]}
    return {"runs": runs, "summary": summary, "paired": paired, "last": last, "lam": lam_i}


def sweep_lambda(prep: Prepared, settings: DongSettings, grid: Sequence[float], device: torch.device, seed: int = 0,
                 log: Callable[[str], None] = print, trained: Trained | None = None) -> list[dict[str, Any]]:
    """Train one model per λ in ``[0, *grid]`` (seed ``seed``) and score it on the **validation** split:
    BLEU-4, METEOR, CIDEr (coco-caption, beam ``settings.beam``), topic selectivity AUC (f fitted on the
    frozen encoder, PDM on train, AUC on validation), validation topic loss at the selected epoch.
    ``trained``: optional dict that receives (λ, seed) -> (model, history, seconds) for reuse."""
    if prep.val is None:
        raise ValueError("the λ sweep needs a validation split")
    rows = []
    for lam in [0.0, *[g for g in grid if g > 0]]:
        t0 = time.perf_counter()
        model, hist, _ = _train(prep, settings, lam, seed, device, trained)
        caps = generate(model, prep.val, beam=settings.beam)
        sc = score_captions(dict(zip(prep.val.video_ids, prep.val.captions, strict=True)), caps)
        ana = analyze_neurons(model, prep, refit_head=True, split="val")
        sel_epoch = hist[-1].get("selected_epoch", hist[-1]["epoch"])
        at_sel = next(h for h in hist if h["epoch"] == sel_epoch)
        row = {"lam": lam, "BLEU-4": sc["BLEU-4"], "METEOR": sc["METEOR"], "CIDEr": sc["CIDEr"],
               "selectivity_auc": ana["selectivity"]["mean_auc"], "val_topic_loss": at_sel.get("val_topic"),
               "train_topic_loss": at_sel["topic"], "train_nll": at_sel["nll"], "lam_topic": at_sel["lam_topic"],
               "selected_epoch": sel_epoch, "seconds": time.perf_counter() - t0}
        rows.append(row)
        log(f"λ sweep (validation, seed {seed}) λ={lam:g}: BLEU-4 {row['BLEU-4']:.3f} METEOR {row['METEOR']:.3f} "
            f"CIDEr {row['CIDEr']:.3f} selectivity AUC {row['selectivity_auc']:.3f} topic loss train "
            f"{row['train_topic_loss']:.3f} val {row['val_topic_loss']:.3f} (λ·topic {row['lam_topic']:.2f} vs "
            f"NLL {row['train_nll']:.2f}/caption)")
    return rows


def choose_lambda(rows: Sequence[Mapping[str, Any]], meteor_tolerance: float = 0.01) -> float:
    """λ > 0 with the highest validation selectivity AUC among those whose validation METEOR is at least
    λ = 0's minus ``meteor_tolerance`` (interpretability without a captioning cost); if none qualifies,
    the λ > 0 with the best validation METEOR. ``rows``: output of :func:`sweep_lambda`."""
    base = [r for r in rows if r["lam"] == 0]
    cand = [r for r in rows if r["lam"] > 0]
    if not base or not cand:
        raise ValueError("choose_lambda needs the λ = 0 row and at least one λ > 0")
    ok = [r for r in cand if r["METEOR"] >= base[0]["METEOR"] - meteor_tolerance]
    if ok:
        return float(max(ok, key=lambda r: r["selectivity_auc"])["lam"])
    return float(max(cand, key=lambda r: r["METEOR"])["lam"])


def _figures(prep: Prepared, last: Mapping[str, Any], video_has: np.ndarray) -> list[tuple[Any, str]]:
    from semlens.report import subplots

    figs = []
    names = prep.topics.topic_names()
    K = len(names)
    # (1) mean activation of each topic's neurons, videos with vs without the topic, LSTM-B | LSTM-I
    fig, axes = subplots(1, 2, figsize=(11, 3.2), sharey=True)
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
    fig, ax = subplots(figsize=(6, 3))
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
    fig, ax = subplots(figsize=(6, 3))
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


def _spread(seeds: Sequence[int]) -> str:
    return "Mean ± std over seeds" if len(list(seeds)) > 1 else "One seed"


def _cell(summary: Mapping[str, Any], key: str) -> str:
    if key not in summary:
        return "-"
    v = summary[key]
    return format_mean_std(v["mean"], v["std"], v.get("n", 2))


def sections(prep: Prepared, result: Mapping[str, Any], settings: DongSettings, seeds: Sequence[int],
             title: str = "Semantic interpretability for video captioning (Dong et al. 2017)",
             sweep: Sequence[Mapping[str, Any]] = ()) -> list[Section]:
    """Report sections: the table beside the paper's, topics, neuron names, selectivity, transfer, figures."""
    from semlens.captioning.naming import contains_topic

    summ = result["summary"]
    main = Section(title)
    main.text(f"Built-in captioned clips ({prep.train.n_videos} train / {prep.test.n_videos} test videos), "
              f"{prep.topics.n_topics} LDA topics, λ = {result.get('lam', settings.lam):g}, ≤ {settings.epochs} epochs "
              f"(early stopping on validation CIDEr), beam "
              f"{settings.beam}, seeds {list(seeds)}. {_spread(seeds)}; published rows are on "
              "YouTubeClips (MSVD) with GoogLeNet features and are not directly comparable to synthetic clips.")
    ours = {f"{m} (ours)": {k: summ[m][k] for k in ("BLEU-4", "METEOR", "CIDEr")} for m in MODELS}
    main.table(paper_table(ours), caption="Captioning on the test split (coco-caption), beside Dong et al. 2017.")
    rows = []  # one row per metric, one column per model: fits the page
    for k in ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "selectivity_auc", "selectivity_auc_own_f",
              "selectivity_index", "topic_error_test", "action_accuracy", "selected_epoch", "clips_per_s"):
        if any(k in summ[m] for m in MODELS):
            rows.append({"metric": k, **{m: _cell(summ[m], k) for m in MODELS}})
    main.table(rows, caption="All metrics (mean ± std over seeds; one seed: the value). selectivity_auc: mean "
                             "over topics of the AUC "
                             "of the topic's named neurons on test, neurons named by PDM with an f fitted on each "
                             "frozen encoder (same procedure for both models); selectivity_auc_own_f: LSTM-I named "
                             "with its jointly trained f; action_accuracy: linear probe on frozen v̄.")
    if result.get("paired") and result["paired"]["selectivity_auc"]["n"] > 1:  # one seed: nothing to pair
        main.table([{"metric": k, "LSTM-I − LSTM-B (mean ± std)": f"{v['mean_diff']:+.3f} ± {v['std_diff']:.3f}",
                     "seeds with LSTM-I higher": f"{v['wins']} of {v['n']}", "paired t": f"{v['t']:.2f}",
                     "p (two-sided)": f"{v['p_two_sided']:.3g}"} for k, v in result["paired"].items()],
                   caption="Paired comparison: both models trained with the same seeds; per-seed differences.")
    if sweep:
        main.table([{k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in r.items()
                     if k in ("lam", "BLEU-4", "METEOR", "CIDEr", "selectivity_auc", "val_topic_loss",
                              "train_topic_loss", "lam_topic", "train_nll", "selected_epoch")} for r in sweep],
                   caption="λ sweep on the validation split (seed 0). λ·topic and train NLL: the two loss terms "
                           "per caption at the selected epoch. Chosen: highest validation selectivity with "
                           f"METEOR ≥ λ=0's − {settings.meteor_tolerance}.")
    last = result["last"]
    examples = []
    for vid, refs in list(zip(prep.test.video_ids, prep.test.captions, strict=True))[:6]:
        examples.append({"video": vid, "reference": refs[0], **{m: last[m]["captions"][vid] for m in MODELS}})
    main.table(examples, caption="Generated captions on test clips (last seed) beside one reference.")
    topics = Section("LDA topics of the clip captions")
    topics.table([{"topic": t, "name": n, "top words": " ".join(w)} for t, (n, w) in
                  enumerate(zip(prep.topics.topic_names(), prep.topics.top_words(8), strict=True))])
    neurons = Section("Neurons named by prediction-difference maximization (LSTM-I, last seed; topic map fitted "
                      "on the frozen encoder)")
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
    """The whole comparison; writes ``out/results.json`` and ``out/report.html`` and returns the results.

    With a non-empty ``settings.lam_grid``, λ for LSTM-I is first chosen on the validation split
    (:func:`sweep_lambda` on seed 0, :func:`choose_lambda`); the sweep is saved under ``lambda_sweep``.
    """
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
    multi = st.cnn_task == "multilabel"
    cnn_acc = frame_cnn_accuracy(cnn, dev, multilabel=multi)
    quality = f"mean concept AUC {cnn_acc:.3f}" if multi else f"accuracy {cnn_acc:.3f} (12 classes)"
    log(f"frame CNN ({st.cnn_task}): {quality} on 600 held-out concept images")
    feats = extract_frame_features(cnn, torch.as_tensor(clips.frames), layer=list(st.frame_layers), device=dev,
                                   pool=st.frame_pool, grid=st.frame_grid, grid_layers=st.frame_grid_layers)
    prep = prepare_clips(clips, feats, st.n_topics, standardize=True)
    action = {s: np.asarray(clips.truth["action"])[list(clips.splits[s])] for s in ("train", "test")}
    seed_list = list(range(seeds))
    sweep: list[dict[str, Any]] = []
    lam = st.lam
    trained: Trained = {}  # the sweep's seed-0 models are seed 0's LSTM-B and LSTM-I (same settings, same seed)
    if st.lam_grid:
        sweep = sweep_lambda(prep, st, st.lam_grid, dev, seed=0, log=log, trained=trained)
        lam = choose_lambda(sweep, st.meteor_tolerance)
        log(f"chosen on validation: λ = {lam:g}")
        save_json({"partial": True, "lambda_sweep": sweep, "lam": lam}, out / "results.json")
    for key in [k for k in trained if k[0] not in (0.0, lam)]:
        del trained[key]  # free the λ values not chosen
    res = compare_models(prep, st, seed_list, dev, action_labels=action, log=log, lam=lam, trained=trained,
                         on_run=lambda runs: save_json({"partial": True, "lambda_sweep": sweep, "lam": lam,
                                                        "runs": runs}, out / "results.json"))
    results = {"paper": "Dong, Su, Zhu, Zhang, CVPR 2017", "data": "semlens built-in clips",
               "settings": asdict(st), "seeds": seed_list, "lam": lam, "lambda_sweep": sweep,
               "frame_cnn_test_accuracy": cnn_acc,
               "summary": res["summary"], "paired": res["paired"], "runs": res["runs"],
               "topics": prep.topics.top_words(8), "seconds": time.perf_counter() - t0}
    save_json(results, out / "results.json")
    prep.topics.save(out / "topics.json")
    for m in MODELS:
        res["last"][m]["model"].save(out / f"{m.lower()}.safetensors")
    report = Report(title="semlens reproduce dong")
    for sec in sections(prep, res, st, seed_list, sweep=sweep):
        report.add(sec)
    report.write(out / "report.html")
    log(json.dumps({m: {k: round(res["summary"][m][k]["mean"], 4) for k in ("BLEU-4", "METEOR", "CIDEr",
                                                                           "selectivity_auc")} for m in MODELS}))
    gap = res["paired"]["selectivity_auc"]
    log(f"selectivity AUC, LSTM-I − LSTM-B per seed: {gap['mean_diff']:+.3f} ± {gap['std_diff']:.3f}, higher in "
        f"{gap['wins']} of {gap['n']} seeds, paired t {gap['t']:.2f}, p {gap['p_two_sided']:.3g}")
    return results


def prepare_clips(clips: Any, feats: torch.Tensor, n_topics: int, seed: int = 0, standardize: bool = False
                  ) -> Prepared:
    """:func:`prepare` for a :class:`semlens.world.ClipSet` and its (N, T, C) frame features.

    ``standardize``: z-score every feature channel with the mean/std over the training split's frames.
    """
    ids = list(clips.video_ids)
    if standardize:
        tr = feats[list(clips.splits["train"])].reshape(-1, feats.shape[-1])
        feats = (feats - tr.mean(0)) / tr.std(0).clamp(min=1e-6)
    feat = {v: feats[k] for k, v in enumerate(ids)}
    caps = {v: list(clips.captions[k]) for k, v in enumerate(ids)}
    splits = {s: [ids[i] for i in clips.splits[s]] for s in ("train", "val", "test") if s in clips.splits}
    return prepare(feat, caps, splits, n_topics=n_topics, seed=seed)
