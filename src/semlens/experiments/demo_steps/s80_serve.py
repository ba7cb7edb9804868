"""Demo step: the demo classifier and captioner as correction projects to browse and correct with semlens serve."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from semlens.experiments.demo import DemoContext, console
from semlens.report import Section

#: the projects' folders under the demo output
PROJECT = ("projects", "classifier")
CAPTIONER_PROJECT = ("projects", "captioner")
#: the captioner project's corpus: the clips' captions with the per-frame features the demo captioner reads
CAPTIONER_CORPUS = ("projects", "captioner-corpus")
#: what the captioner project needs from the world and caption steps
CAPTION_ARTIFACTS = ("clips", "caption_models", "caption_prepared", "caption_neurons", "caption_weights")


def run(ctx: DemoContext) -> list[Section]:
    """Write ``projects/classifier`` and (when the caption step ran) ``projects/captioner``; print how to serve
    them."""
    sections = [_classifier_project(ctx)]
    if all(k in ctx.artifacts for k in CAPTION_ARTIFACTS):
        sections.append(_captioner_project(ctx))
    for key in ("serve_command", "serve_command_captioner"):
        if key in ctx.artifacts:
            console.print(f"[bold]serve[/] {ctx.artifacts[key]}")
    return sections


def _fresh(path: Path) -> Path:
    """``path`` emptied: the demo's own output from an earlier run is made anew, like every other file here."""
    if path.exists():
        shutil.rmtree(path)
    return path


def _classifier_project(ctx: DemoContext) -> Section:
    """``projects/classifier``: stored unit names of the last conv layer, concept references, the demo weights as
    version 1, the dissection recorded for the layer pages."""
    from semlens.correct.project import CorrectionProject, classifier_artefacts

    missing = [k for k in ("classifier_weights", "concepts_dir", "dissection_units", "classifier") if k not in
               ctx.artifacts]
    if missing:
        raise KeyError(f"the serve demo step needs the artifacts {missing} of the world and dissection steps")
    weights, data = ctx.artifacts["classifier_weights"], ctx.artifacts["concepts_dir"]
    dissection = ctx.artifacts["dissection_units"].parent
    layer = ctx.artifacts["classifier"].conv_layers[-1]
    project = _fresh(ctx.path(*PROJECT))
    artefacts = classifier_artefacts("", weights, data, dissection / "unit_names.safetensors", layer,
                                     device=ctx.device)
    prototypes = [str(p) for p in ctx.artifacts.get("prototypes_dirs", {}).values()]  # the maximize step's outputs
    CorrectionProject.init(project, kind="classifier", model="", weights=weights, artefacts=artefacts,
                           data=str(data), layer=layer, dissection=str(dissection), prototypes=prototypes)
    command = f"semlens serve -p {project}"
    ctx.artifacts["serve_command"] = command
    sec = Section("Browse and correct the demo classifier in the web app")
    sec.text(f"A correction project for the demo classifier (units of {layer} named by the dissection above) is in "
             f"`{project}`. `{command}` opens it at http://127.0.0.1:8765/: layers and units, samples with their "
             "heatmaps and most relevant named units, remarks, apply with live progress, compare and undo.")
    return sec


def clip_features(prepared) -> dict[str, torch.Tensor]:
    """``video id -> (T, F)`` per-frame features exactly as the demo captioner was trained and evaluated on them
    (the caption step's frame subsampling and per-channel standardisation applied), from every split of
    ``prepared`` (a :class:`semlens.captioning.Prepared`); padded frames dropped."""
    out: dict[str, torch.Tensor] = {}
    for data in (prepared.train, prepared.val, prepared.test):
        if data is None:
            continue
        for k, vid in enumerate(data.video_ids):
            out[vid] = data.feats[k, : int(data.lengths[k])]
    return out


def _captioner_project(ctx: DemoContext) -> Section:
    """``projects/captioner``: LSTM-I of the caption step as version 1, its neuron → topic table (PDM with its own
    topic head, as the caption step named them) and the topic references over the training clips, on a corpus of
    the clips' captions and the frame features the captioner reads."""
    from semlens.captioning import correction_artefacts
    from semlens.correct.project import CorrectionProject
    from semlens.world import write_clip_corpus

    model = ctx.artifacts["caption_models"]["LSTM-I"]
    prep = ctx.artifacts["caption_prepared"]
    weights = Path(ctx.artifacts["caption_weights"]["LSTM-I"])
    clips = ctx.artifacts["clips"]
    feats = clip_features(prep)
    missing = [v for v in clips.video_ids if v not in feats]
    if missing:
        raise KeyError(f"the caption step's splits leave out clips {missing[:5]}; every clip needs its features")
    corpus = write_clip_corpus(clips, _fresh(ctx.path(*CAPTIONER_CORPUS)), features=feats, write_frames=False)
    table = ctx.artifacts["caption_neurons"].save(weights.with_name(weights.stem + ".neurons.safetensors"),
                                                  topic_model=prep.topics, model=model)
    project = _fresh(ctx.path(*CAPTIONER_PROJECT))
    artefacts = correction_artefacts(weights, corpus, names=table, device=ctx.device)
    CorrectionProject.init(project, kind="captioner", model="", weights=weights, artefacts=artefacts,
                           data=str(corpus))
    command = f"semlens serve -p {project}"
    ctx.artifacts["serve_command_captioner"] = command
    carried = sum(1 for t in range(artefacts.names.n_topics) if artefacts.names.neurons_of(t))
    sec = Section("Browse and correct the demo captioner in the web app")
    sec.text(f"A correction project for the demo captioner (LSTM-I above; {carried} of its "
             f"{artefacts.names.n_topics} topics carried by named neurons of the encoder state v) is in "
             f"`{project}`, on the clips' captions and frame features in `{corpus}`. `{command}` opens it: each "
             "clip's caption, its reference captions and the topic neurons' activation through time; a remark "
             "\"misses topic T\", apply (the encoder is fine-tuned), compare captions between versions, undo.")
    return sec
