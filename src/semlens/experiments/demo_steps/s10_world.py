"""Demo step 10: the built-in worlds — concept images with masks, a trained classifier, captioned clips."""

from __future__ import annotations

import time

import numpy as np
import torch

from semlens.experiments.demo import DemoContext
from semlens.report import Section

# fast settings (about a minute of training on 2 CPU cores)
N_BRODEN = 1000
N_TRAIN = 12000
N_TEST = 600
EPOCHS = 3
N_CLIPS = 240


def concept_palette(vocabulary) -> np.ndarray:
    """``(n_concepts, 3)`` RGB in [0, 1] per global concept number: a colour concept in its own colour,
    every other concept a distinct tab20 colour, 0 ("nothing") light grey."""
    from matplotlib import colormaps

    from semlens.world.concepts import COLORS

    tab = colormaps["tab20"]
    pal = np.array([COLORS.get(name, tab(i % 20)[:3]) if cat == "color" else tab(i % 20)[:3]
                    for i, (name, cat) in enumerate(zip(vocabulary.names, vocabulary.category, strict=True))],
                   dtype=np.float64)
    pal[0] = (0.93, 0.93, 0.93)
    return pal


def _sample_figure(ci, k: int = 6):
    from matplotlib.patches import Patch

    from semlens.report import subplots

    cats = ["color", "object", "part", "texture"]
    pal = concept_palette(ci.vocabulary)
    fig, axes = subplots(k, len(cats) + 2, figsize=(1.8 * (len(cats) + 2), 2.3 * k))
    for r in range(k):
        axes[r, 0].imshow(ci.images[r].permute(1, 2, 0).numpy())
        axes[r, 0].set_title(ci.class_names[int(ci.labels[r])], fontsize=7)
        for c, cat in enumerate(cats, start=1):
            lab = ci.pixel_labels[cat][r].numpy()
            axes[r, c].imshow(pal[lab], interpolation="nearest")  # each concept in its legend colour
            present = [int(v) for v in np.unique(lab) if v]
            axes[r, c].set_title(cat, fontsize=7)
            axes[r, c].legend(handles=[Patch(facecolor=pal[v], edgecolor="0.5", label=ci.vocabulary.names[v])
                                       for v in present[:6]], fontsize=5, ncol=2, loc="upper center",
                              bbox_to_anchor=(0.5, 0.0), frameon=False, handlelength=1.0, borderaxespad=0.2)
        axes[r, -1].imshow(ci.evidence[r].numpy(), cmap="gray")
        axes[r, -1].set_title("evidence (white)", fontsize=7)
        axes[r, -1].text(0.5, -0.06, "scene: " + ci.vocabulary.names[int(ci.scene[r])], fontsize=6,
                         ha="center", va="top", transform=axes[r, -1].transAxes)
    for a in axes.flat:
        a.axis("off")
    fig.tight_layout()
    return fig


def _clip_figure(cs, k: int = 4, step: int = 3):
    from semlens.report import subplots

    t = cs.frames.shape[1]
    cols = list(range(0, t, step))
    fig, axes = subplots(k, len(cols), figsize=(1.3 * len(cols), 1.6 * k))
    for r in range(k):
        for j, f in enumerate(cols):
            axes[r, j].imshow(cs.frames[r, f].permute(1, 2, 0).numpy())
            axes[r, j].axis("off")
        axes[r, 0].set_title(f"{cs.video_ids[r]}: " + "; ".join(cs.captions[r][:2]), fontsize=7, loc="left")
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.95, wspace=0.05, hspace=0.35)
    return fig


def run(ctx: DemoContext) -> list[Section]:
    from torch.utils.data import TensorDataset

    from semlens.captioning.features import encode_frames
    from semlens.models import build_model
    from semlens.train import TrainConfig, Trainer
    from semlens.world import (
        action_probe,
        generate_clips,
        generate_concepts,
        pooled_frame_features,
        write_clip_corpus,
        write_concepts,
    )

    seed = ctx.seed
    t0 = time.perf_counter()
    concepts_dir = write_concepts(ctx.path("world", "concepts"), n=N_BRODEN, size=64, seed=seed)
    t_write = time.perf_counter() - t0

    t0 = time.perf_counter()
    train = generate_concepts(n=N_TRAIN, size=64, seed=seed + 1, masks=False)
    test = generate_concepts(n=N_TEST, size=64, seed=seed + 2)
    t_gen = time.perf_counter() - t0
    torch.manual_seed(seed)
    kwargs = {"num_classes": len(train.class_names), "image_size": 64}
    model = build_model("alexnet-like", **kwargs)
    cfg = TrainConfig(epochs=EPOCHS, batch_size=64, lr=2e-3, optimizer="adam", weight_decay=0.0,
                      lr_schedule="cosine", seed=seed, device=str(ctx.device))
    trainer = Trainer(model, train.dataset(), None, cfg,
                      model_config={"model": "alexnet-like", "model_kwargs": kwargs, "class_names": train.class_names})
    t0 = time.perf_counter()
    history = trainer.fit()
    t_train = time.perf_counter() - t0
    acc = trainer.evaluate(TensorDataset(test.images, test.labels))
    weights = trainer.save(ctx.path("world", "classifier.safetensors"), {"test_acc": acc})
    model.eval()

    t0 = time.perf_counter()
    clips = generate_clips(n=N_CLIPS, frames=16, size=64, seed=seed)
    feats = encode_frames(model, clips.frames, device=ctx.device)
    clips_dir = write_clip_corpus(clips, ctx.path("world", "clips"), features=feats, write_frames=True)
    t_clips = time.perf_counter() - t0
    actions = clips.truth["action"]
    probe_cnn = action_probe(feats, actions, clips.splits["train"] + clips.splits["val"], clips.splits["test"])
    probe_pix = action_probe(pooled_frame_features(clips.frames), actions,
                             clips.splits["train"] + clips.splits["val"], clips.splits["test"])

    ctx.artifacts.update({
        "concepts_dir": concepts_dir, "concepts_test": test, "classifier": model.to(ctx.device).eval(),
        "classifier_weights": weights, "classifier_spec": "alexnet-like", "clips": clips, "clips_dir": clips_dir,
    })

    data = Section("Built-in worlds: concept images and captioned clips")
    data.text(
        f"Concept images: {len(train.class_names)} classes defined by the (shape, colour) of a key object among "
        "distractors that never show a class's conjunction, over 7 scene layouts, with colour, object, part and "
        "texture masks and the evidence mask (the key object's visible pixels). A Broden-format copy of "
        f"{N_BRODEN} images was written in {t_write:.1f}s to `{concepts_dir}`."
    )
    data.figure(_sample_figure(test), "Test images (titled with their class), their concept masks (colour, "
                                      "object, part, texture; each concept in the colour of the legend below "
                                      "the panel, colour concepts in their own colour) and evidence masks "
                                      "(the key object's visible pixels in white) with the scene.")
    data.figure(_clip_figure(clips), "Clips as frame strips (every third frame) with two of their 20 captions.")
    rows = [{"model": "alexnet-like", "train images": N_TRAIN, "epochs": EPOCHS,
             "train acc (last epoch)": history[-1]["train_acc"], "test acc": acc,
             "train seconds": t_train, "device": str(ctx.device)}]
    data.table(rows, caption=f"Classifier on held-out concept images (chance {1 / len(train.class_names):.3f}); "
                             f"image generation took {t_gen:.1f}s.")
    data.table([
        {"frame features": "alexnet-like penultimate (256-d)", **{k: round(v, 3) for k, v in probe_cnn.items()}},
        {"frame features": "8x8 average-pooled pixels", **{k: round(v, 3) for k, v in probe_pix.items()}},
    ], caption=f"Telling the clips' {int(actions.max()) + 1} actions apart on the test clips: a temporal model "
               "(means of 4 time segments, then an MLP) versus the same MLP on the middle frame only. "
               "Direction, appear/disappear and grow/shrink need more than one frame. "
               f"{N_CLIPS} clips generated and encoded in {t_clips:.1f}s; MSVD-style corpus at `{clips_dir}`.")
    data.text("Example captions of clip 0 (" + ", ".join(f"{k}={v}" for k, v in clips.describe_truth(0).items())
              + "): " + "; ".join(f"“{c}”" for c in clips.captions[0][:8]) + ".")
    return [data]
