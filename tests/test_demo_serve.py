"""The demo's last step writes a correction project that `semlens serve` opens without further arguments."""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.request

import torch

from semlens.experiments.demo import DemoContext
from semlens.experiments.demo_steps import s10_world, s80_serve


def test_serve_step_writes_a_project_the_web_app_opens(tmp_path, monkeypatch):
    from semlens.serve.project_view import ProjectView
    from semlens.units.dissect import dissect
    from semlens.world import BrodenDataset

    for name, value in (("N_BRODEN", 40), ("N_TRAIN", 128), ("N_TEST", 32), ("EPOCHS", 1), ("N_CLIPS", 8)):
        monkeypatch.setattr(s10_world, name, value)
    ctx = DemoContext(out=tmp_path / "demo", device=torch.device("cpu"), seed=0)
    s10_world.run(ctx)
    model = ctx.artifacts["classifier"]
    result = dissect(model, BrodenDataset(ctx.artifacts["concepts_dir"]), model.conv_layers, batch_size=20)
    ctx.artifacts["dissection_units"] = result.save(ctx.path("dissect", "classifier"))["units"]
    for _ in range(2):  # a second demo run into the same folder makes the project anew
        sections = s80_serve.run(ctx)
    project = tmp_path / "demo" / "projects" / "classifier"
    assert ctx.artifacts["serve_command"] == f"semlens serve -p {project}"
    assert "semlens serve" in "".join(sections[0].blocks)
    cfg = json.loads((project / ".semlens" / "project.json").read_text())
    assert cfg["dissection"] == os.path.join("..", "..", "dissect", "classifier")  # relative: the demo can move
    assert cfg["layer"] == model.conv_layers[-1]
    view = ProjectView(project)  # no --dissection: the recorded one is used
    assert [r.layer for r in view.layers()] == list(model.conv_layers)
    assert len(view.sample_ids()) == 40 and view.current_version().id == 1
    sample = view.sample_ids()[0]
    probs = model(view.corrector(1)._images([sample])).softmax(-1)[0]
    top = ctx.artifacts["concepts_test"].class_names[int(probs.argmax())]
    assert view.describe(1, sample).startswith(top)
    # the demo's dissection stores each unit's top images: its unit cards show them, outlined
    layer = model.conv_layers[-1]
    tops, note = view.media.top_images(layer, 0)
    assert note == "" and len(tops) == 8 and not any(t.missing for t in tops)
    assert view.top_image_png(1, layer, 0, 0)[:8] == b"\x89PNG\r\n\x1a\n"


def _tiny_caption_step(ctx: DemoContext) -> None:
    """What the caption step leaves for the serve step, from 30 tiny clips and a captioner trained 2 epochs."""
    from semlens.captioning import analyze_neurons, train_captioner
    from semlens.experiments.dong import prepare_clips
    from semlens.world import generate_clips, pooled_frame_features

    clips = generate_clips(n=30, frames=4, size=32, seed=0, captions_per_clip=4)
    prep = prepare_clips(clips, pooled_frame_features(clips.frames, grid=2), 3, seed=0, standardize=True)
    model, _ = train_captioner(prep, lam=1.0, epochs=2, batch_size=16, lr=1e-2, hidden=8, embed=8,
                               decoder_hidden=8, attention=4, dropout=0.0, device="cpu")
    weights = model.save(ctx.path("caption", "lstm-i.safetensors"))
    ctx.artifacts.update({"clips": clips, "caption_models": {"LSTM-I": model}, "caption_prepared": prep,
                          "caption_neurons": analyze_neurons(model, prep)["names"],
                          "caption_weights": {"LSTM-I": weights}})


def test_serve_step_writes_a_captioner_project_whose_sample_page_shows_its_caption(tmp_path, monkeypatch):
    import uvicorn

    from semlens.serve import create_app
    from semlens.serve.project_view import ProjectView
    from test_serve import _free_port

    ctx = DemoContext(out=tmp_path / "demo", device=torch.device("cpu"), seed=0)
    _tiny_caption_step(ctx)
    monkeypatch.setattr(s80_serve, "_classifier_project", lambda ctx: None)  # the classifier part is tested above
    for _ in range(2):  # a second demo run into the same folder makes the project anew
        sections = s80_serve.run(ctx)
    project = tmp_path / "demo" / "projects" / "captioner"
    assert ctx.artifacts["serve_command_captioner"] == f"semlens serve -p {project}"
    assert "semlens serve" in "".join(sections[1].blocks)
    cfg = json.loads((project / ".semlens" / "project.json").read_text())
    assert cfg["kind"] == "captioner" and cfg["data"] == os.path.join("..", "captioner-corpus")
    view = ProjectView(project)
    clips = ctx.artifacts["clips"]
    assert view.sample_ids() == sorted(clips.video_ids) and view.current_version().id == 1
    sample = clips.video_ids[0]
    model, prep = ctx.artifacts["caption_models"]["LSTM-I"], ctx.artifacts["caption_prepared"]
    data = next(d for d in (prep.train, prep.val, prep.test) if sample in d.video_ids)
    k = data.video_ids.index(sample)
    ids = model.decode_states(*model.encode(data.feats[k:k + 1], data.lengths[k:k + 1]), beam=1)
    caption = model.vocab.decode(ids[0].tolist())
    assert view.describe(1, sample) == caption  # the stored features are those the captioner was trained on
    assert view.reference_captions(sample) == list(clips.captions[0])
    table = ctx.artifacts["caption_neurons"]
    assert view.concepts() == [t for i, t in enumerate(table.topic_names) if table.neurons_of(i)]

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(project), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 30
        while not server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=60) as r:
            assert r.status == 200 and "Captioner project" in r.read().decode()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v/1/sample/{sample}", timeout=60) as r:
            page = r.read().decode()
        assert f'<b id="prediction">{caption}</b>' in page and 'id="neurons"' in page
    finally:
        server.should_exit = True
        thread.join(10)
