"""Concept images: vocabulary, determinism, masks consistent with pixels, evidence, Broden round-trips."""

from __future__ import annotations

import csv
import filecmp
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from semlens.world import (
    CLASSES,
    VOCABULARY,
    BrodenDataset,
    BrodenFormatError,
    generate_concepts,
    write_broden,
    write_concepts,
)
from semlens.world import concepts as C


@pytest.fixture(scope="module")
def ci():
    return generate_concepts(n=96, size=48, seed=5)


def test_vocabulary_sizes_and_palette_separation():
    cats = {c: len(VOCABULARY.numbers(c)) for c in ("color", "object", "part", "texture", "scene")}
    assert cats["color"] >= 10 and cats["texture"] >= 6 and cats["object"] >= 10 and cats["scene"] >= 6
    assert cats["part"] >= 6 and len(CLASSES) >= 10
    assert VOCABULARY.names[0] == "-" and len(set(VOCABULARY.names)) == len(VOCABULARY.names)
    pal = C._PALETTE.double()
    d = torch.cdist(pal, pal) + torch.eye(len(pal)) * 10
    # nearest-colour decoding of a jittered colour is unambiguous
    assert d.min().item() > 2 * math.sqrt(3) * C.COLOR_JITTER
    # every class pair differs, and every class object / colour occurs in >= 2 class or distractor pairs
    assert len(set(CLASSES)) == len(CLASSES)


def test_shapes_dtypes_and_determinism(ci):
    n, s = 96, 48
    assert ci.images.shape == (n, 3, s, s) and ci.images.dtype == torch.float32
    assert 0 <= ci.images.min() and ci.images.max() <= 1
    assert torch.equal(ci.images * 255, (ci.images * 255).round())  # exact multiples of 1/255
    assert ci.labels.shape == (n,) and ci.labels.dtype == torch.int64
    assert ci.evidence.shape == (n, s, s) and ci.evidence.dtype == torch.bool
    assert set(ci.pixel_labels) == {"color", "object", "part", "texture"}
    for v in ci.pixel_labels.values():
        assert v.shape == (n, s, s) and v.dtype == torch.int64
    again = generate_concepts(n=96, size=48, seed=5)
    assert torch.equal(again.images, ci.images) and torch.equal(again.evidence, ci.evidence)
    assert all(torch.equal(again.pixel_labels[k], ci.pixel_labels[k]) for k in ci.pixel_labels)
    other = generate_concepts(n=96, size=48, seed=6)
    assert not torch.equal(other.images, ci.images)


def test_image_depends_only_on_seed_and_index():
    long = generate_concepts(n=300, size=32, seed=1)
    short = generate_concepts(n=20, size=32, seed=1)
    assert torch.equal(long.images[:20], short.images)
    window = generate_concepts(n=10, size=32, seed=1, start=250)
    assert torch.equal(long.images[250:260], window.images)
    assert torch.equal(long.pixel_labels["part"][250:260], window.pixel_labels["part"])


def test_labels_are_consistent_with_clean_pixels(ci):
    clean = generate_concepts(n=96, size=48, seed=5, noise=0.0)
    # noise changes pixels, nothing else
    assert torch.equal(clean.labels, ci.labels) and torch.equal(clean.pixel_labels["color"], ci.pixel_labels["color"])
    assert (clean.images - ci.images).abs().max() > 0.05
    base = VOCABULARY.numbers("color")[0]
    pix = clean.images.permute(0, 2, 3, 1).double()  # (N, H, W, 3)
    colour = clean.pixel_labels["color"] - base
    assert colour.min() >= 0  # every pixel has a colour
    expected = C._PALETTE.double()[colour]
    # clean pixel = palette colour + jitter (+ clamping), up to the 1/255 quantisation
    assert (pix - expected).abs().max() <= C.COLOR_JITTER + 0.5 / 255 + 1e-9
    nearest = torch.cdist(pix.reshape(-1, 3), C._PALETTE.double()).argmin(1).reshape(colour.shape)
    assert torch.equal(nearest, colour)


def test_object_part_texture_maps_agree(ci):
    obj, part, tex = ci.pixel_labels["object"], ci.pixel_labels["part"], ci.pixel_labels["texture"]
    names = VOCABULARY.names
    composite_parts = {"house": {"wall", "roof", "door", "window"}, "face": {"head", "eye", "mouth"},
                       "tree": {"crown", "trunk"}, "car": {"body", "window", "wheel"}}
    pairs = torch.unique(torch.stack([obj[part > 0], part[part > 0]]), dim=1)
    assert pairs.shape[1] > 0
    for o, p in pairs.T.tolist():
        assert names[p] in composite_parts[names[o]]
    # composite objects are fully covered by their parts; simple shapes have none
    composite = torch.tensor([VOCABULARY.number("object", k) for k in composite_parts])
    is_comp = torch.isin(obj, composite)
    assert torch.equal(part > 0, is_comp)
    assert not ((tex > 0) & (obj == 0)).any()
    assert torch.unique(ci.scene).numel() > 3


def test_evidence_is_the_key_object(ci):
    obj, col = ci.pixel_labels["object"], ci.pixel_labels["color"]
    ev = ci.evidence
    assert (ev.flatten(1).sum(1) > 20).float().mean() > 0.95
    for k, (o, c) in enumerate(CLASSES):
        sel = ci.labels == k
        if not sel.any():
            continue
        assert (obj[sel][ev[sel]] == VOCABULARY.number("object", o)).all()
        # the class colour is the most frequent colour of the evidence of each image
        for i in sel.nonzero().flatten().tolist():
            counts = torch.bincount(col[i][ev[i]], minlength=len(VOCABULARY))
            assert counts.argmax().item() == VOCABULARY.number("color", c) or (counts[
                VOCABULARY.number("color", c)] > 0.25 * ev[i].sum())
    # no distractor shows the conjunction of a class: every visible object pixel outside the
    # evidence belongs to a non-class (object, main colour) pair -> checked via the generator table
    _, _, distract = C._class_tables()
    pairs = {(C.OBJECTS.index(o), C._COLOR_IDX[c]) for o, c in CLASSES}
    assert not any(tuple(p) in pairs for p in distract.tolist())


def test_generation_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n must be"):
        generate_concepts(n=0)
    with pytest.raises(ValueError, match="size"):
        generate_concepts(n=2, size=8)


def _read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_broden_round_trip_identical_masks(tmp_path, ci):
    sub = ci.subset(slice(0, 24))
    splits = ["train"] * 16 + ["val"] * 8
    write_broden(sub, tmp_path / "b", split=splits)
    ds = BrodenDataset(tmp_path / "b")
    assert len(ds) == 24 and ds.image_size == (48, 48) and ds.seg_size == (48, 48)
    assert set(ds.categories) == {"color", "object", "part", "texture", "scene"}
    assert [name for _, name, _ in ds.labels] == VOCABULARY.names
    assert [cat for _, _, cat in ds.labels][1:] == VOCABULARY.category[1:]
    assert ds.split_indices("val") == list(range(16, 24))
    b = ds.load_batch(list(range(24)))
    assert torch.equal(b.images, sub.images)
    for cat in ("color", "object", "part", "texture"):
        assert b.pixel[cat].shape == (24, 1, 48, 48)
        assert torch.equal(b.pixel[cat][:, 0], sub.pixel_labels[cat])
        assert b.image_level[cat].shape == (24, 0) and b.annotated[cat].all()
    assert torch.equal(b.image_level["scene"][:, 0], sub.scene) and b.pixel["scene"].shape[1] == 0
    assert torch.equal(ds.task_labels, sub.labels) and ds.class_names == sub.class_names
    assert torch.equal(ds.load_evidence(range(24)), sub.evidence)
    x, y = ds.load_task("train")
    assert torch.equal(x, sub.images[:16]) and torch.equal(y, sub.labels[:16])
    idx, batches = zip(*ds.iter_batches(10, indices=[3, 5, 7, 9, 11]), strict=True)
    assert [i.tolist() for i in idx] == [[3, 5, 7, 9, 11]]
    assert torch.equal(batches[0].pixel["object"][:, 0], sub.pixel_labels["object"][[3, 5, 7, 9, 11]])
    # tables: frequency = images containing the concept, coverage in whole-image units
    labels = {int(r["number"]): r for r in _read_rows(tmp_path / "b" / "label.csv")}
    red = VOCABULARY.number("color", "red")
    present = (sub.pixel_labels["color"] == red).flatten(1)
    assert int(labels[red]["frequency"]) == int(present.any(1).sum())
    assert float(labels[red]["coverage"]) == pytest.approx(present.sum().item() / 48**2, abs=1e-5)


def test_write_concepts_streams_identically_and_is_byte_reproducible(tmp_path):
    a = write_concepts(tmp_path / "a", n=300, size=32, seed=2, workers=1)
    b = write_concepts(tmp_path / "b", n=300, size=32, seed=2, workers=2)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 300 * 5 + 11
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    _, mismatch, errors = filecmp.cmpfiles(a, b, [str(f) for f in files], shallow=False)
    assert not mismatch and not errors
    ref = generate_concepts(n=300, size=32, seed=2)
    ds = BrodenDataset(a)
    pick = [0, 255, 256, 299]
    bt = ds.load_batch(pick)
    assert torch.equal(bt.images, ref.images[pick])
    assert torch.equal(bt.pixel["texture"][:, 0], ref.pixel_labels["texture"][pick])
    assert 0.15 < len(ds.split_indices("val")) / 300 < 0.45


def _png(path: Path, labels: np.ndarray) -> None:
    arr = np.zeros((*labels.shape, 3), dtype=np.uint8)
    arr[..., 0], arr[..., 1] = labels % 256, labels // 256
    Image.fromarray(arr).save(path)


def _real_broden(root: Path) -> None:
    """A hand-made directory in the real Broden layout (multiple entries, scalars, G channel, material)."""
    (root / "images" / "ade").mkdir(parents=True)
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(root / "images" / "ade" / "a.jpg")
    Image.fromarray(np.full((8, 8, 3), 10, np.uint8)).save(root / "images" / "ade" / "b.jpg")
    obj1 = np.zeros((4, 4), int)
    obj1[:2] = 300  # needs the green byte
    obj2 = np.zeros((4, 4), int)
    obj2[:, :1] = 5
    _png(root / "images" / "ade" / "a_obj1.png", obj1)
    _png(root / "images" / "ade" / "a_obj2.png", obj2)
    _png(root / "images" / "ade" / "b_col.png", np.full((4, 4), 2))
    with open(root / "index.csv", "w") as f:
        f.write("image,split,ih,iw,sh,sw,color,object,material,part,scene,texture\n")
        f.write("ade/a.jpg,train,8,8,4,4,,ade/a_obj1.png;ade/a_obj2.png,,,7,9;11\n")
        f.write("ade/b.jpg,val,8,8,4,4,ade/b_col.png,,,,8,\n")
    with open(root / "category.csv", "w") as f:
        f.write("name,first,last,count,frequency\ncolor,1,2,2,1\nobject,5,300,2,1\nmaterial,6,6,1,0\n"
                "part,6,6,1,0\nscene,7,8,2,2\ntexture,9,11,2,1\n")
    with open(root / "label.csv", "w") as f:
        f.write("number,name,category,frequency,coverage,syns\n")
        f.write('1,black,color(1),1,1.0,\n2,red,color(1),1,1.0,\n5,wall,object(1),1,0.25,\n'
                '6,fabric,material(36);part(3),39,4.2,cloth\n7,kitchen,scene(1),1,1.0,\n8,street,scene(1),1,1.0,\n'
                '9,striped,texture(1),1,1.0,\n11,dotted,texture(1),1,1.0,\n300,lamp,object(1),1,0.5,\n')


def test_reads_a_real_broden_layout(tmp_path):
    _real_broden(tmp_path)
    ds = BrodenDataset(tmp_path)
    assert ds.categories == ["color", "object", "material", "part", "scene", "texture"]
    assert ds.labels[6] == (6, "fabric", "material") and ds.labels[300] == (300, "lamp", "object")
    assert ds.labels[3] == (3, "-", "-") and ds.image_size == (8, 8) and ds.seg_size == (4, 4)
    assert ds.task_labels is None
    b = ds.load_batch([0, 1])
    assert b.images.shape == (2, 3, 8, 8) and b.images[0].min().item() == pytest.approx(200 / 255)
    assert b.pixel["object"].shape == (2, 2, 4, 4)
    assert b.pixel["object"][0, 0, 0, 0] == 300 and b.pixel["object"][0, 1, 0, 0] == 5
    assert (b.pixel["object"][1] == 0).all()
    assert b.annotated["object"].tolist() == [True, False] and b.annotated["color"].tolist() == [False, True]
    assert b.image_level["texture"].tolist() == [[9, 11], [0, 0]]
    assert b.image_level["scene"].tolist() == [[7], [8]]
    assert (b.pixel["color"][1, 0] == 2).all() and b.pixel["material"].shape == (2, 0, 4, 4)
    only = BrodenDataset(tmp_path, categories=["scene"])
    assert list(only.load_batch([1]).image_level) == ["scene"]
    with pytest.raises(KeyError, match="unknown Broden categories"):
        BrodenDataset(tmp_path, categories=["smell"])
    with pytest.raises(FileNotFoundError, match="no task.csv"):
        ds.load_evidence([0])


def test_missing_and_corrupt_files_are_named(tmp_path):
    _real_broden(tmp_path)
    (tmp_path / "images" / "ade" / "a_obj2.png").unlink()
    ds = BrodenDataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="a_obj2.png"):
        ds.load_batch([0])
    (tmp_path / "images" / "ade" / "b_col.png").write_bytes(b"not a png at all")
    with pytest.raises(BrodenFormatError, match="b_col.png"):
        ds.load_batch([1])
    with pytest.raises(IndexError, match="out of range"):
        ds.load_batch([2])
    (tmp_path / "label.csv").unlink()
    with pytest.raises(FileNotFoundError, match="label.csv"):
        BrodenDataset(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        BrodenDataset(tmp_path / "nowhere")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "index.csv").write_text("image,split\nx.png,train\n")
    with pytest.raises(BrodenFormatError, match="lacks column"):
        BrodenDataset(bad)


def test_masks_stay_consistent_at_other_sizes():
    for size in (32, 96):
        ci = generate_concepts(n=8, size=size, seed=0, noise=0.0)
        assert ci.images.shape[-1] == size
        assert (ci.evidence.flatten(1).sum(1) > 0).all()
        fractions = [ci.evidence[i].float().mean().item() for i in range(8)]
        assert all(0.01 < f < 0.5 for f in fractions)
    # all classes and scenes are drawn
    big = generate_concepts(n=600, size=16, seed=0, masks=False)
    assert big.pixel_labels == {}
    assert torch.bincount(big.labels, minlength=len(CLASSES)).min() > 20
    assert set(itertools.chain(big.scene.tolist())) == set(VOCABULARY.numbers("scene"))


def test_concept_presence_matches_hand_built_masks():
    n, s = 2, 4
    z = torch.zeros(n, s, s, dtype=torch.int64)
    red, blue = VOCABULARY.number("color", "red"), VOCABULARY.number("color", "blue")
    star, wheel = VOCABULARY.number("object", "star"), VOCABULARY.number("part", "wheel")
    dots = VOCABULARY.number("texture", "dots")
    sea, night = VOCABULARY.number("scene", "sea"), VOCABULARY.number("scene", "night")
    color, obj, part, tex = z.clone(), z.clone(), z.clone(), z.clone()
    color[0] = blue  # image 0: blue background, a 2-pixel red star with dots
    color[0, 0, :2] = red
    obj[0, 0, :2] = star
    tex[0, 0, 0] = dots
    part[1, 3, 3] = wheel  # image 1: one wheel pixel, no colour map entries
    ci = C.ConceptImages(images=torch.zeros(n, 3, s, s), labels=torch.zeros(n, dtype=torch.int64),
                         evidence=torch.zeros(n, s, s, dtype=torch.bool),
                         pixel_labels={"color": color, "object": obj, "part": part, "texture": tex},
                         scene=torch.tensor([sea, night]))
    want = torch.zeros(n, len(VOCABULARY) - 1)
    for i, c in ((0, red), (0, blue), (0, star), (0, dots), (0, sea), (1, wheel), (1, night)):
        want[i, c - 1] = 1
    assert torch.equal(C.concept_presence(ci), want)
    want2 = want.clone()
    want2[0, dots - 1] = 0  # 1 dot pixel < 2; the scene stays present without pixels
    want2[1, wheel - 1] = 0
    assert torch.equal(C.concept_presence(ci, min_pixels=2), want2)
    with pytest.raises(ValueError, match="masks"):
        C.concept_presence(generate_concepts(n=4, size=32, seed=0, masks=False))
    with pytest.raises(ValueError, match="min_pixels"):
        C.concept_presence(ci, min_pixels=0)


def test_concept_presence_on_generated_images(ci):
    y = C.concept_presence(ci)
    assert y.shape == (len(ci), len(VOCABULARY) - 1) and set(y.unique().tolist()) <= {0.0, 1.0}
    key_obj = torch.tensor([C.OBJECTS.index(o) for o, _ in CLASSES])[ci.labels] + VOCABULARY.numbers("object")[0]
    visible = ci.evidence.flatten(1).any(1)
    assert (y[visible, key_obj[visible] - 1] == 1).all()  # the key object is present wherever it is visible
    assert (y[torch.arange(len(ci)), ci.scene - 1] == 1).all()
