"""``semlens data concepts|clips`` and ``semlens train`` end to end on tiny sizes."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from semlens.captioning.features import encode_frames, load_trained
from semlens.checkpoint import read_config
from semlens.cli.main import app
from semlens.world import BrodenDataset, CaptionCorpus, generate_concepts


def test_data_train_and_clips_commands(tmp_path):
    runner = CliRunner()
    data = tmp_path / "concepts"
    r = runner.invoke(app, ["data", "concepts", "--out", str(data), "--n", "60", "--size", "32", "--seed", "4",
                            "--workers", "1"])
    assert r.exit_code == 0, r.output
    ds = BrodenDataset(data)
    assert len(ds) == 60 and ds.image_size == (32, 32)
    ref = generate_concepts(n=60, size=32, seed=4)
    assert torch.equal(ds.load_batch([59]).images, ref.images[59:60])

    out = tmp_path / "run"
    args = ["train", "--model", "alexnet-like", "--data", str(data), "--out", str(out), "--epochs", "2",
            "--width", "0.125", "--batch-size", "16", "--device", "cpu"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    conf = read_config(out / "model.safetensors")
    assert conf["model"] == "alexnet-like" and conf["model_kwargs"] == {"num_classes": 12, "image_size": 32,
                                                                         "width": 0.125}
    assert conf["class_names"] == ref.class_names and len(json.loads((out / "history.json").read_text())) == 2
    model = load_trained(out / "model.safetensors")
    assert not model.training and model.features.conv1.out_channels == 4
    # running again resumes from the finished checkpoint: same weights
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert runner.invoke(app, args).exit_code == 0
    after = load_trained(out / "model.safetensors").state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)

    clips = tmp_path / "clips"
    r = runner.invoke(app, ["data", "clips", "--out", str(clips), "--n", "6", "--frames", "4", "--size", "32",
                            "--encoder", str(out / "model.safetensors"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    corpus = CaptionCorpus(clips)
    assert corpus.feature_dim == 32 and len(corpus) == 6 and len(corpus.captions["clip00000"]) == 20
    frames = corpus.frames("clip00002")
    direct = encode_frames(model, frames[None])[0]
    assert torch.allclose(corpus.features("clip00002"), direct, atol=1e-5)
    seen = []  # the same, read by hand: what the last Linear layer receives
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    handle = last.register_forward_pre_hook(lambda _m, inp: seen.append(inp[0]))
    with torch.no_grad():
        model(frames.float() / 255 if frames.dtype == torch.uint8 else frames)
    handle.remove()
    assert torch.allclose(direct, seen[0].flatten(1), atol=1e-6)

    # the descriptor of `reproduce dong` (its default settings) from the command line: the one frame encoder
    from semlens.captioning.features import extract_frame_features
    from semlens.experiments.dong import DongSettings

    st = DongSettings()
    dong = tmp_path / "clips-dong"
    r = runner.invoke(app, ["data", "clips", "--out", str(dong), "--n", "6", "--frames", "4", "--size", "32",
                            "--encoder", str(out / "model.safetensors"), "--device", "cpu", "--frame-layers",
                            ",".join(st.frame_layers), "--pool", st.frame_pool, "--grid", str(st.frame_grid),
                            "--grid-layers", ",".join(st.frame_grid_layers)])
    assert r.exit_code == 0, r.output
    expected = extract_frame_features(model, frames[None], layer=list(st.frame_layers), pool=st.frame_pool,
                                      grid=st.frame_grid, grid_layers=st.frame_grid_layers)[0]
    got = CaptionCorpus(dong).features("clip00002")
    assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-5)
    r = runner.invoke(app, ["data", "clips", "--out", str(tmp_path / "x"), "--n", "2", "--pool", "meanmax"])
    assert r.exit_code == 2 and "give --encoder too" in r.output

    r = runner.invoke(app, ["train", "--data", str(tmp_path / "missing"), "--out", str(out)])
    assert r.exit_code == 2 and "not found" in r.output
