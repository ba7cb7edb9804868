"""Unit cards of the web app, below the HTTP layer: the stored top images, their outlined PNGs, attached
prototypes and x-features. A hand-made 8×8 Broden directory and a one-conv model make every expected pixel
computable by hand (the HTTP and browser checks over a trained model are in ``test_serve.py``)."""

from __future__ import annotations

import csv
import io
import json
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import binary_erosion
from torch import nn

from semlens.serve.unit_media import CONCEPT_RGB, REGION_RGB, UnitMedia, encoder_loadings, outlined_png
from semlens.units.dissect import dissect
from semlens.units.top_images import TopImages, TopImagesError, load_top_images, save_top_images
from semlens.world import BrodenDataset

GREY, RED, BLUE = (128, 128, 128), (230, 20, 20), (20, 20, 230)
SIDE = 8

# per image: (name, [(concept, colour, (top, left, bottom, right))]) — masks are rectangles of colour
SCENES = [
    ("a.png", [("red", RED, (1, 1, 5, 4))]),
    ("b.png", [("blue", BLUE, (2, 3, 7, 7))]),
    ("c.png", [("red", RED, (0, 4, 3, 8)), ("blue", BLUE, (5, 0, 8, 3))]),
    ("d.png", [("red", RED, (3, 2, 8, 8))]),
    ("e.png", []),
]
NUMBERS = {"red": 1, "blue": 2}


def _masks(objects) -> dict[str, np.ndarray]:
    out = {c: np.zeros((SIDE, SIDE), bool) for c in NUMBERS}
    for concept, _, (t, lft, b, r) in objects:
        out[concept][t:b, lft:r] = True
    return out


def write_tiny_broden(root: Path, order: list[int] | None = None) -> Path:
    """Five 8×8 images (grey, with red / blue rectangles) and their colour masks in Broden format; ``order``
    lists the scenes' order in index.csv."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in order or range(len(SCENES)):
        name, objects = SCENES[i]
        img = np.full((SIDE, SIDE, 3), GREY, np.uint8)
        labels = np.zeros((SIDE, SIDE, 3), np.uint8)
        for concept, colour, (t, lft, b, r) in objects:
            img[t:b, lft:r] = colour
            labels[t:b, lft:r, 0] = NUMBERS[concept]
        Image.fromarray(img).save(root / "images" / name)
        Image.fromarray(labels).save(root / "images" / name.replace(".png", "_color.png"))
        rows.append([name, "train", SIDE, SIDE, SIDE, SIDE, name.replace(".png", "_color.png")])
    with open(root / "index.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", "split", "ih", "iw", "sh", "sw", "color"], *rows])
    with open(root / "category.csv", "w", newline="") as f:
        csv.writer(f).writerows([["name", "first", "last", "count", "frequency"], ["color", 1, 2, 2, 4]])
    with open(root / "label.csv", "w", newline="") as f:
        csv.writer(f).writerows([["number", "name", "category", "frequency", "coverage", "syns"],
                                 [1, "red", "color(3)", 3, 0.2, ""], [2, "blue", "color(2)", 2, 0.2, ""]])
    return root


def colour_net() -> nn.Module:
    """One 1×1 conv: unit 0 = R − (G + B)/2 (red detector), unit 1 = B − (R + G)/2 (blue detector)."""
    conv = nn.Conv2d(3, 2, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, -0.5, -0.5], [-0.5, -0.5, 1.0]]).view(2, 3, 1, 1))
        conv.bias.zero_()
    return nn.Sequential(OrderedDict(conv=conv)).eval()


@pytest.fixture(scope="module")
def dissected(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    data = write_tiny_broden(root / "data")
    result = dissect(colour_net(), BrodenDataset(data), "conv", quantile=0.2, iou_threshold=0.01, batch_size=2,
                     device="cpu", top_n=3, workers=1, show_progress=False)
    paths = result.save(root / "diss")
    return {"data": data, "diss": root / "diss", "paths": paths, "result": result, "root": root}


def _rgb(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _edge(mask: np.ndarray) -> np.ndarray:
    """Mask pixels with a 4-neighbour outside the mask, outside the image counting as outside (scipy's erosion
    with a zero border: an implementation independent of the app's)."""
    return mask & ~binary_erosion(mask, structure=np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], bool), border_value=0)


def _where(arr: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray:
    return (arr == np.array(rgb, np.uint8)).all(-1)


# ---- the stored file ---------------------------------------------------------------------------------------
def test_dissection_saves_top_images_that_load_back(dissected):
    result, path = dissected["result"], dissected["paths"]["top_images"]
    assert path == dissected["diss"] / "top_images.safetensors"
    top = load_top_images(path)
    d = result.layers["conv"]
    assert torch.equal(top.indices["conv"], d.top_images) and top.indices["conv"].dtype == torch.int64
    assert torch.equal(top.values["conv"], d.top_values.float())
    assert top.indices["conv"].shape == (2, 3)
    names = [s[0] for s in SCENES]
    assert top.names == {i: names[i] for i in d.top_images.flatten().tolist() if i >= 0}
    assert top.data == str(dissected["data"])
    # the red detector's best images are those with the most saturated red (every red image ties at the top)
    assert {top.names[i] for i in d.top_images[0].tolist()} <= {"a.png", "c.png", "d.png"}
    assert top.of("conv", 1)[0][2] in {"b.png", "c.png"}


def test_top_images_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(TopImagesError, match="nope.safetensors"):
        load_top_images(missing)
    bad = tmp_path / "top_images.safetensors"
    bad.write_bytes(b"\x00not safetensors")
    with pytest.raises(TopImagesError, match=str(bad)):
        load_top_images(bad)
    with pytest.raises(ValueError, match="must both be"):
        save_top_images(bad, TopImages({"x": torch.zeros(2, 3, dtype=torch.long)}, {"x": torch.zeros(2, 2)}))
    save_top_images(bad, TopImages({"x": torch.tensor([[0, -1]])}, {"x": torch.tensor([[1.5, float("-inf")]])},
                                   {0: "z.png"}))
    assert load_top_images(bad).of("x", 0) == [(0, 1.5, "z.png")]
    assert not list(tmp_path.glob(".*tmp"))  # written through a temporary file, renamed


# ---- rendering ---------------------------------------------------------------------------------------------
def _thresholds(diss: Path) -> dict[int, float]:
    return {int(r["unit"]): float(r["threshold"]) for r in csv.DictReader(open(diss / "units.csv"))}


def test_outlines_lie_exactly_on_the_mask_and_region_boundaries(dissected):
    net, lock = colour_net(), threading.Lock()
    media = UnitMedia(dissected["diss"], dissected["data"], [], [])
    thr = _thresholds(dissected["diss"])
    by_name = dict(SCENES)
    drawn = []
    for unit, concept in ((0, "red"), (1, "blue")):
        tops, note = media.top_images("conv", unit)
        assert note == "" and len(tops) == 3 and [t.rank for t in tops] == [0, 1, 2]
        for t in tops:
            arr = _rgb(media.top_png(("v1",), "conv", unit, t.rank, concept, thr[unit], lambda: (net, lock)))
            scale = 192 // SIDE
            assert arr.shape == (192, 192, 3)
            up = np.ones((scale, scale), bool)
            mask = np.kron(_masks(by_name[t.name])[concept], up).astype(bool)
            image = np.array(Image.open(dissected["data"] / "images" / t.name))
            with torch.no_grad():
                act = net(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255)[0, unit]
            region = np.kron((act > thr[unit]).numpy(), up).astype(bool)
            drawn.append((mask.any(), region.any()))
            concept_edge = _edge(mask)
            assert np.array_equal(_where(arr, CONCEPT_RGB), concept_edge), t.name
            assert np.array_equal(_where(arr, REGION_RGB), _edge(region) & ~concept_edge), t.name
            plain = ~(_edge(region) | concept_edge)  # every other pixel is the image, nearest-upscaled
            image = np.kron(image, np.ones((scale, scale, 1))).astype(np.uint8)
            assert np.array_equal(arr[plain], image[plain])
    assert sum(m for m, _ in drawn) >= 4 and sum(r for _, r in drawn) >= 4  # most top images show both outlines
    # a model without the dissected layer (a dissection of another model): the concept outline alone
    other = nn.Sequential(nn.Conv2d(3, 1, 1))
    arr = _rgb(media.top_png(("other",), "conv", 0, 0, "red", thr[0], lambda: (other, lock)))
    assert not _where(arr, REGION_RGB).any() and _where(arr, CONCEPT_RGB).any()
    # cached: the second call returns the same bytes without rendering
    first = media.top_png(("v1",), "conv", 0, 0, "red", thr[0], lambda: (net, lock))
    assert media.top_png(("v1",), "conv", 0, 0, "red", thr[0], None) is first


def test_images_are_found_by_name_in_a_reordered_index(dissected, tmp_path):
    """The project's copy of the data lists the images in another order: the card shows the same images."""
    data = write_tiny_broden(tmp_path / "data", order=[4, 3, 2, 1, 0])
    thr = _thresholds(dissected["diss"])
    original = UnitMedia(dissected["diss"], dissected["data"], [], [])
    moved = UnitMedia(dissected["diss"], data, [], [])
    for rank in range(3):
        assert moved.top_png(("v",), "conv", 0, rank, "red", thr[0], None) == \
            original.top_png(("v",), "conv", 0, rank, "red", thr[0], None)
    (data / "images" / "a.png").unlink()
    lines = (data / "index.csv").read_text().splitlines()
    (data / "index.csv").write_text("\n".join(ln for ln in lines if not ln.startswith("a.png")) + "\n")
    gone = UnitMedia(dissected["diss"], data, [], [])
    tops, note = gone.top_images("conv", 0)
    assert "not in the project's data" in note
    assert [t.missing != "" for t in tops] == [t.name == "a.png" for t in tops]


def test_a_dissection_without_the_file_gives_a_note(dissected, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    for name in ("units.csv", "layers.csv", "dissection.json"):
        (old / name).write_bytes((dissected["diss"] / name).read_bytes())
    tops, note = UnitMedia(old, dissected["data"], [], []).top_images("conv", 0)
    assert tops == [] and "top_images.safetensors" in note and str(old) in note
    (old / "top_images.safetensors").write_text("garbage")
    tops, note = UnitMedia(old, dissected["data"], [], []).top_images("conv", 0)
    assert tops == [] and str(old / "top_images.safetensors") in note


def test_outlined_png_upscales_by_an_integer_factor():
    img = torch.rand(3, 5, 7)
    arr = _rgb(outlined_png(img, torch.zeros(5, 7, dtype=torch.bool), None, side=20))
    assert arr.shape == (15, 21, 3)  # factor ceil(20 / 7) = 3
    assert np.array_equal(arr[::3, ::3], (img * 255).round().byte().permute(1, 2, 0).numpy())


# ---- prototypes and x-features -----------------------------------------------------------------------------
def test_prototypes_and_xfeatures_are_indexed_from_attached_outputs(tmp_path):
    from semlens.embed.activations import ActivationStore
    from semlens.embed.baselines import PCAEmbedding
    from semlens.embed.io import save_embedding

    protos = tmp_path / "am"
    protos.mkdir()
    with open(protos / "summary.csv", "w", newline="") as f:
        csv.writer(f).writerows([["layer", "unit", "variant", "activation"], ["conv", 0, "plain", 2.5],
                                 ["conv", 1, "plain", 1.0]])
    Image.new("RGB", (4, 4)).save(protos / "unit_0000_plain.png")  # unit 1's image is missing: not listed
    z = torch.randn(64, 6) * torch.tensor([5.0, 1, 1, 1, 1, 1])
    emb = PCAEmbedding(k=3, target="all").fit(ActivationStore.from_arrays(z, torch.randn(64, 2)))
    emb.layer_ = "conv"
    save_embedding(emb, tmp_path / "emb", model="m")
    with open(tmp_path / "emb" / "xfeatures.csv", "w", newline="") as f:
        csv.writer(f).writerows([["class", "xfeature", "mean_contribution", "concept", "mass_accuracy"],
                                 [0, 0, 1.0, "red", 0.5], [1, 0, 1.0, "blue", 0.5], [0, 1, 0.1, "red", 0.2]])
    media = UnitMedia(None, None, [protos], [tmp_path / "emb"], ["cat", "dog"])
    assert [(p.path.name, p.variant, p.activation) for p in media.prototypes_of("conv", 0)] == [
        ("unit_0000_plain.png", "plain", 2.5)]
    assert media.prototypes_of("conv", 1) == [] and media.prototypes_of("other", 0) == []
    load = encoder_loadings(emb)
    assert torch.allclose(load[0], emb.components_ / emb.scale_)  # PCA: the encoder weight itself
    rows = media.xfeatures_of("conv", 0, k=2)
    want = load[0, :, 0].abs().argsort(descending=True)[:2].tolist()
    assert [x.index for x in rows] == want
    assert rows[0].classes == ("cat", "dog") and rows[0].method == "pca"
    named = {x.index: x.concepts for x in media.xfeatures_of("conv", 0, k=3)}
    assert named[0] == ("red", "blue") and named[1] == ("red",) and named[2] == ()
    assert media.xfeatures_of("fc", 0) == []
    assert media.top_images("conv", 0) == ([], "no dissection is recorded for this project")
    # unreadable attachments are left out with a note naming the file; the card still works
    (tmp_path / "emb" / "embedding.safetensors").write_bytes(b"garbage")
    broken = UnitMedia(None, None, [tmp_path, protos], [tmp_path / "emb"], [])
    assert broken.prototypes_of("conv", 0) and broken.xfeatures_of("conv", 0) == []
    notes = broken.notes_for("conv")
    assert len(notes) == 2 and "summary.csv" in notes[0] and str(tmp_path / "emb") in notes[1]
    assert broken.notes_for("fc") == notes[:1]
    (tmp_path / "emb" / "embedding.json").write_text(json.dumps({"layer": "conv"})[:-3])
    notes = UnitMedia(None, None, [], [tmp_path / "emb"], []).notes_for("conv")
    assert len(notes) == 1 and "embedding.json" in notes[0]
