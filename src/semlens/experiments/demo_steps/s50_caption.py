"""Demo step: LSTM-B vs LSTM-I on the built-in clips (fast settings, one seed), topics, named neurons,
selectivity, transfer and the figures of Dong et al. 2017."""

from __future__ import annotations

import time

import numpy as np
import torch

from semlens.captioning import extract_frame_features
from semlens.experiments.demo import DemoContext, console
from semlens.experiments.dong import MODELS, DongSettings, compare_models, prepare_clips, sections
from semlens.report import Section

MAX_FRAMES = 8


def run(ctx: DemoContext) -> list[Section]:
    clips = ctx.artifacts["clips"]
    st = DongSettings.fast()
    t0 = time.perf_counter()
    stride = max(1, -(-clips.frames.shape[1] // MAX_FRAMES))
    cnn = ctx.artifacts["classifier"]
    layers = [n for n in st.frame_layers if n in dict(cnn.named_modules())]
    if len(layers) == len(st.frame_layers):
        # the demo classifier (frozen): an early and the last conv layer, mean+max pooled (as `reproduce dong`)
        feats = extract_frame_features(cnn, torch.as_tensor(clips.frames)[:, ::stride], layer=layers,
                                       pool=st.frame_pool, grid=st.frame_grid, grid_layers=st.frame_grid_layers,
                                       device=ctx.device)
        source = (f"the demo's alexnet-like classifier (frozen; {' + '.join(layers)}, mean+max pooled, "
                  f"{' + '.join(st.frame_grid_layers or layers)} also on a {st.frame_grid} x {st.frame_grid} grid)")
    else:
        # another classifier: the frame features the world step wrote
        from semlens.world.msvd import CaptionCorpus

        feats = CaptionCorpus(ctx.artifacts["clips_dir"]).stack_features(clips.video_ids)[:, ::stride]
        source = "the demo classifier's frame features written by the world step"
    prep = prepare_clips(clips, feats, st.n_topics, seed=ctx.seed, standardize=True)
    action = {s: np.asarray(clips.truth["action"])[list(clips.splits[s])] for s in ("train", "test")}
    res = compare_models(prep, st, [ctx.seed], ctx.device, action_labels=action,
                         log=lambda m: console.print(f"[dim]caption[/] {m}"))
    prep.topics.save(ctx.path("caption", "topics.json"))
    weights = {m: ctx.path("caption", f"{m.lower()}.safetensors") for m in MODELS}
    for m in MODELS:
        res["last"][m]["model"].save(weights[m])
    ctx.artifacts["caption_weights"] = weights
    ctx.artifacts["caption_models"] = {m: res["last"][m]["model"] for m in MODELS}
    ctx.artifacts["caption_prepared"] = prep
    # named as on every other path (analyze_neurons: topic map fitted on the frozen encoder, then PDM)
    ctx.artifacts["caption_neurons"] = res["last"]["LSTM-I"]["analysis"]["names"]
    out = sections(prep, res, st, [ctx.seed], title="Interpretable video captioning (Dong et al. 2017), fast demo")
    out[0].text(f"Fast demo: one seed, {feats.shape[1]} frames per clip, frame features from {source}, "
                f"{time.perf_counter() - t0:.0f} s in all. "
                "`semlens reproduce dong --seeds 3` gives the mean ± std over seeds.")
    return out
