"""`semlens dissect` end to end on a Broden directory written by hand (independent of the generator)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from semlens.checkpoint import save_weights
from semlens.cli.main import app
from semlens.units import TensorSegmentationDataset, dissect

USERMOD = '''
import torch
from torch import nn

def factory(width=4):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(width, 5, 3, padding=1))
'''
LABELS = [(1, "red", "color"), (2, "green", "color"), (3, "blue", "color"), (300, "dog", "object"),
          (301, "cat", "object"), (400, "beach", "scene")]


def _write_broden(root, n=6, size=16, seg=8):
    """Broden format (NetDissect joinseg.py): index.csv, images/, masks as PNG with label = R + 256 G."""
    g = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    images = g.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    color = g.integers(0, 4, (n, 1, seg, seg))
    obj = np.array([0, 300, 301])[g.integers(0, 3, (n, 2, seg, seg))]
    scene = np.array([400, 0, 400, 400, 0, 400])[:n]
    rows = []
    for i in range(n):
        Image.fromarray(images[i]).save(root / "images" / f"im{i}.png")
        cells = {}
        for cat, maps in (("color", color), ("object", obj)):
            names = []
            for k in range(maps.shape[1]):
                enc = np.zeros((seg, seg, 3), dtype=np.uint8)
                enc[..., 0], enc[..., 1] = maps[i, k] % 256, maps[i, k] // 256
                Image.fromarray(enc).save(root / "images" / f"im{i}_{cat}{k}.png")
                names.append(f"im{i}_{cat}{k}.png")
            cells[cat] = ";".join(names)
        rows.append({"image": f"im{i}.png", "split": "val" if i % 2 else "train", "ih": size, "iw": size, "sh": seg,
                     "sw": seg, "color": cells["color"], "object": cells["object"], "material": "", "part": "",
                     "scene": str(scene[i]) if scene[i] else "", "texture": ""})

    def write(name, fields, data):
        with open(root / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(data)

    write("index.csv", list(rows[0]), rows)
    write("category.csv", ["name", "first", "last", "count", "frequency"],
          [{"name": c, "first": 1, "last": 400, "count": 1, "frequency": 1} for c in ("color", "object", "scene")])
    write("label.csv", ["number", "name", "category", "frequency", "coverage", "syns"],
          [{"number": num, "name": name, "category": f"{cat}(1)", "frequency": 1, "coverage": 1, "syns": ""}
           for num, name, cat in LABELS])
    for cat in ("color", "object", "scene"):
        write(f"c_{cat}.csv", ["code", "number", "name", "frequency", "coverage"],
              [{"code": k + 1, "number": num, "name": name, "frequency": 1, "coverage": 1.0}
               for k, (num, name, c) in enumerate(x for x in LABELS if x[2] == cat)])
    tensors = TensorSegmentationDataset(
        torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, LABELS,
        pixel={"color": torch.from_numpy(color), "object": torch.from_numpy(obj)},
        image_level={"scene": torch.from_numpy(scene).view(n, 1)})
    return tensors


def test_cli_dissect_on_hand_written_broden_matches_library(tmp_path, monkeypatch):
    pytest.importorskip("semlens.world")
    tensors = _write_broden(tmp_path / "broden")
    (tmp_path / "usermod.py").write_text(USERMOD)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import usermod

    net = usermod.factory(width=4)
    save_weights(net, tmp_path / "w.safetensors", config={"model_kwargs": {"width": 4}})
    out = tmp_path / "out"
    args = ["dissect", "--model", "usermod:factory", "--weights", str(tmp_path / "w.safetensors"),
            "--data", str(tmp_path / "broden"), "--layers", "0,2", "--out", str(out), "--quantile", "0.05",
            "--batch-size", "4", "--device", "cpu", "--workers", "2", "--cards", "2"]  # 2 workers = the library's 1
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    expected = dissect(net, tensors, ["0", "2"], quantile=0.05, device="cpu")
    with open(out / "units.csv") as f:
        units = list(csv.DictReader(f))
    assert [r["concept"] for r in units] == [r["concept"] for r in expected.unit_rows()]
    np.testing.assert_allclose([float(r["iou"]) for r in units], [r["iou"] for r in expected.unit_rows()], rtol=1e-5)
    with open(out / "layers.csv") as f:
        layers = list(csv.DictReader(f))
    assert [int(r["unique_detectors"]) for r in layers] == [r["unique_detectors"] for r in expected.layer_rows()]
    assert (out / "report.html").is_file() and not (out / ".checkpoint").exists()
    from semlens.units.top_images import load_top_images
    from semlens.world import BrodenDataset

    top = load_top_images(out / "top_images.safetensors")  # each unit's top images, by image file name
    files = BrodenDataset(tmp_path / "broden").images
    for layer in ("0", "2"):
        assert torch.equal(top.indices[layer], expected.layers[layer].top_images)
        assert torch.allclose(top.values[layer], expected.layers[layer].top_values.float())
    assert top.names == {i: files[i] for i in torch.cat(list(top.indices.values())).flatten().tolist() if i >= 0}
    bad = CliRunner().invoke(app, args[:-2] + ["--layers", "nope"])
    assert bad.exit_code == 2 and "nope" in bad.output

    # the same command under torchrun: rank 0 writes the same tables, and both processes exit cleanly
    # (the CLI destroys its process group; without that gloo can abort the process at exit)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SEMLENS_PROGRESS": "0",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "semlens.cli.main", *args[:9], "--out", str(two), *args[11:19], "--cards", "0"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "terminate called" not in proc.stderr
    for name in ("units.csv", "layers.csv"):
        assert (two / name).read_text() == (out / name).read_text(), name
    sharded = load_top_images(two / "top_images.safetensors")
    assert sharded.names == top.names and all(torch.equal(sharded.indices[k], top.indices[k]) for k in top.indices)
