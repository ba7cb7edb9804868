"""The concept judge (semlens.maximize.judge): fitting from a Broden directory, save / load, refusals, hits."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from semlens.maximize.judge import (
    Judge,
    JudgeError,
    broden_presence,
    concept_hits,
    concept_scores,
    fit_judge,
    fit_judge_broden,
    load_judge,
    save_judge,
)
from semlens.world import VOCABULARY, BrodenDataset, generate_concepts, write_concepts
from semlens.world.concepts import COLORS, concept_presence

WORLD_CONCEPTS = list(zip(VOCABULARY.names[1:], VOCABULARY.category[1:], strict=True))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("judge")
    write_concepts(root / "ds", n=48, size=32, seed=3, workers=1)
    return root, fit_judge_broden(root / "ds", epochs=1, seed=1, batch_size=16, read_batch=20)


def test_targets_from_disk_are_the_worlds_concept_presence(fitted) -> None:
    root, judge = fitted
    ds = BrodenDataset(root / "ds")
    targets = torch.cat([broden_presence(b, len(ds.labels) - 1)[:, 1:].float() for _, b in ds.iter_batches(20)])
    world = generate_concepts(48, 32, seed=3)
    assert torch.equal(targets, concept_presence(world))
    assert judge.concepts == WORLD_CONCEPTS and judge.shape == (3, 32, 32)
    # the same training from the in-memory world (float images) gives the same weights, bit for bit
    same = fit_judge(world.images, concept_presence(world), WORLD_CONCEPTS, seed=1, epochs=1, batch_size=16)
    for k, v in judge.module.state_dict().items():
        assert torch.equal(v, same.module.state_dict()[k]), k
    assert torch.allclose(judge.channel_mean, world.images.mean(dim=(0, 2, 3)), atol=1e-5)


def test_save_load_round_trip(fitted, tmp_path) -> None:
    _, judge = fitted
    path = save_judge(judge, tmp_path / "j.safetensors")
    back = load_judge(path)
    assert back.concepts == judge.concepts and back.shape == judge.shape and back.model == "resnet-small"
    assert torch.equal(back.channel_mean, judge.channel_mean) and torch.equal(back.channel_std, judge.channel_std)
    want = judge.module.state_dict()
    assert set(back.module.state_dict()) == set(want)
    for k, v in back.module.state_dict().items():
        assert torch.equal(v, want[k]), k
    assert not back.module.training
    x = generate_concepts(5, 32, seed=9, masks=False).images
    assert torch.equal(back.probabilities(x), judge.probabilities(x))


def test_refusals_name_the_file(fitted, tmp_path) -> None:
    _, judge = fitted
    path = save_judge(judge, tmp_path / "j.safetensors")
    back = load_judge(path)
    with pytest.raises(JudgeError, match=r"j.safetensors was fitted on inputs of 3 channels × 32×32, the data "
                                         r"have 3 channels × 16×16"):
        back.check_compatible((3, 16, 16), judge.channel_mean, judge.channel_std)
    with pytest.raises(JudgeError, match="fitted on images with channel means"):
        back.check_compatible((3, 32, 32), judge.channel_mean + 0.5, judge.channel_std)
    back.check_compatible((3, 32, 32), judge.channel_mean + 0.01, judge.channel_std)  # close enough
    with pytest.raises(JudgeError, match=r"j.safetensors does not know concept 'circel' \(object\).*circle"):
        back.index("circel", "object")
    assert back.index("circle") == back.index("circle", "object")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json and not tensors")
    with pytest.raises(JudgeError, match="cannot read judge .*bad.safetensors"):
        load_judge(bad)
    with pytest.raises(JudgeError, match="judge file not found: .*none.safetensors"):
        load_judge(tmp_path / "none.safetensors")
    from semlens.checkpoint import save_weights

    save_weights(nn.Linear(2, 2), tmp_path / "plain.safetensors", {"model": "x"})
    with pytest.raises(JudgeError, match="plain.safetensors is not a semlens judge"):
        load_judge(tmp_path / "plain.safetensors")
    with pytest.raises(JudgeError, match="must be a .safetensors file"):
        load_judge(tmp_path / "j.pt")
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:  # the same file with a NaN in one weight, its config kept
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    name = next(k for k, v in tensors.items() if k.startswith("module.") and v.is_floating_point())
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(tmp_path / "nan.safetensors"), metadata=meta)
    with pytest.raises(JudgeError, match=f"judge .*nan.safetensors holds NaN or infinite values in {name}"):
        load_judge(tmp_path / "nan.safetensors")


class _Stub(nn.Module):
    """Logits +5 for output 1 and -5 for the others, whatever the image."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.full((x.shape[0], self.k), -5.0)
        out[:, 1] = 5.0
        return out


def test_concept_hits_on_hand_made_images() -> None:
    green = torch.tensor(COLORS["green"])[:, None, None].expand(3, 8, 8)
    stub = Judge(_Stub(3), [("circle", "object"), ("door", "part"), ("dots", "texture")], (3, 8, 8),
                 torch.full((3,), 0.5), torch.full((3,), 0.2))
    images = torch.stack([green, green, green, green, green])
    concepts = [("green", "color"), ("red", "color"), ("circle", "object"), ("door", "part"), ("dots", "")]
    assert torch.equal(concept_hits(images, concepts, stub), torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0]))
    scores = concept_scores(images, concepts, stub)
    assert scores[0] == 1.0 and scores[1] == 0.0
    assert torch.allclose(scores[2:], torch.sigmoid(torch.tensor([-5.0, 5.0, -5.0])))
    # without a judge only colours are scored; a concept the judge does not know is refused
    no_judge = concept_hits(images, concepts, None)
    assert torch.equal(no_judge[:2], torch.tensor([1.0, 0.0])) and bool(torch.isnan(no_judge[2:]).all())
    with pytest.raises(JudgeError, match="does not know concept 'wheel' \\(part\\)"):
        concept_hits(images[:1], [("wheel", "part")], stub)


def test_colours_outside_the_palette_go_to_the_judge() -> None:
    """A real Broden units.csv names colours the concept world's palette lacks (``red-c``): they are scored by a
    judge that knows them (probability, hit at 0.5), NaN without one — never a KeyError after maximising."""
    green = torch.tensor(COLORS["green"])[:, None, None].expand(3, 8, 8)
    stub = Judge(_Stub(2), [("red-c", "color"), ("door", "part")], (3, 8, 8),
                 torch.full((3,), 0.5), torch.full((3,), 0.2))
    images = torch.stack([green, green])
    concepts = [("red-c", "color"), ("green", "color")]
    scores = concept_scores(images, concepts, stub)
    assert float(scores[0]) == pytest.approx(float(torch.sigmoid(torch.tensor(-5.0))))  # the judge's output 0
    assert float(scores[1]) == 1.0                                                       # the palette, as before
    assert torch.equal(concept_hits(images, concepts, stub), torch.tensor([0.0, 1.0]))
    without = concept_scores(images, concepts, None)
    assert bool(torch.isnan(without[0])) and float(without[1]) == 1.0
    with pytest.raises(JudgeError, match="does not know concept 'blue-c'"):
        concept_scores(images[:1], [("blue-c", "color")], stub)
