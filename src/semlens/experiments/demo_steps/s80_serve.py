"""Demo step: the demo classifier as a correction project, ready to browse and correct with ``semlens serve``."""

from __future__ import annotations

import shutil

from semlens.experiments.demo import DemoContext
from semlens.report import Section

#: the project's folder under the demo output
PROJECT = ("projects", "classifier")


def run(ctx: DemoContext) -> list[Section]:
    """Write ``projects/classifier`` (stored unit names of the last conv layer, concept references, the demo
    weights as version 1, the dissection recorded for the layer pages) and say how to serve it."""
    from semlens.correct.project import CorrectionProject, classifier_artefacts

    missing = [k for k in ("classifier_weights", "concepts_dir", "dissection_units", "classifier") if k not in
               ctx.artifacts]
    if missing:
        raise KeyError(f"the serve demo step needs the artifacts {missing} of the world and dissection steps")
    weights, data = ctx.artifacts["classifier_weights"], ctx.artifacts["concepts_dir"]
    dissection = ctx.artifacts["dissection_units"].parent
    layer = ctx.artifacts["classifier"].conv_layers[-1]
    project = ctx.path(*PROJECT)
    if project.exists():  # the demo's own output from an earlier run: made anew, like every other file here
        shutil.rmtree(project)
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
    return [sec]
