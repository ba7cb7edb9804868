"""Building blocks of the activation-maximization evaluation: the world classifier, its labelled units,
the judge classifier, concept hits, and the planted-shortcut (slide (d)) world."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from semlens.maximize.judge import Judge, concept_hits

__all__ = ["train_classifier", "labelled_units", "train_judge", "concept_hits", "mark_images", "plant_shortcut",
           "mark_score", "MARK", "MARK_COLOUR"]


def train_classifier(path: Path, images: Tensor, labels: Tensor, seed: int, epochs: int,
                     device: str = "cpu") -> nn.Module:
    """The demo's recipe: alexnet-like, Adam 2e-3, cosine, batch 64; cached at ``path``."""
    from semlens.checkpoint import load_weights
    from semlens.models import build_model
    from semlens.train import TrainConfig, Trainer

    kwargs = {"num_classes": int(labels.max()) + 1, "image_size": images.shape[-1]}
    torch.manual_seed(seed)
    model = build_model("alexnet-like", **kwargs)
    if path.is_file():
        return load_weights(model, path).eval()
    cfg = TrainConfig(epochs=epochs, batch_size=64, lr=2e-3, optimizer="adam", weight_decay=0.0,
                      lr_schedule="cosine", seed=seed, device=device)
    trainer = Trainer(model, torch.utils.data.TensorDataset(images, labels), None, cfg,
                      model_config={"model": "alexnet-like", "model_kwargs": kwargs})
    trainer.fit()
    trainer.save(path)
    return model.eval()


def accuracy(model: nn.Module, images: Tensor, labels: Tensor) -> float:
    with torch.no_grad():
        pred = torch.cat([model(images[s:s + 256]).argmax(1) for s in range(0, len(images), 256)])
    return float((pred == labels).float().mean())


def labelled_units(model: nn.Module, root: Path, broden_dir: Path, min_iou: float) -> list[dict[str, Any]]:
    """Dissect every conv layer on the Broden copy (cached in ``root/units.json``); units with IoU ≥ ``min_iou``."""
    cache = root / "units.json"
    if not cache.is_file():
        from semlens.units.dissect import dissect
        from semlens.world import BrodenDataset

        result = dissect(model, BrodenDataset(broden_dir), model.conv_layers, batch_size=100, device="cpu")
        result.save(root / "dissection")
        cache.write_text(json.dumps(result.unit_rows()))
    rows = json.loads(cache.read_text())
    return [r for r in rows if r["iou"] >= min_iou]


def train_judge(path: Path, world: Any, seed: int, epochs: int) -> Judge:
    """The library's judge (:func:`semlens.maximize.judge.fit_judge`: resnet-small, width 0.5, another
    architecture and seed than the classifier) trained on the world's masks (``concept_presence``); cached
    at ``path`` (a file that is no judge, e.g. from an older version, is refitted)."""
    from semlens.maximize.judge import JudgeError, fit_judge, load_judge, save_judge
    from semlens.world.concepts import concept_presence

    targets = concept_presence(world)
    concepts = list(zip(world.vocabulary.names[1:], world.vocabulary.category[1:], strict=True))
    torch.manual_seed(seed)  # as before the move: the global RNG is in the same state after a cached load
    if path.is_file():
        try:
            return load_judge(path)
        except JudgeError:
            pass
    judge = fit_judge(world.images, targets, concepts, seed=seed, epochs=epochs)
    save_judge(judge, path)
    return judge


#: the planted shortcut: a solid magenta 6×6 square at rows/columns 1..6 (magenta is in no object of the world)
MARK = (slice(1, 7), slice(1, 7))
MARK_COLOUR = (1.0, 0.0, 1.0)


def mark_images(images: Tensor, labels: Tensor, target: int, p_mark: float, seed: int) -> Tensor:
    """Copies of ``images`` where images of class ``target`` carry the corner mark with probability
    ``p_mark`` (and no other image does)."""
    g = torch.Generator().manual_seed(seed)
    out = images.clone()
    on = (labels == target) & (torch.rand(len(labels), generator=g) < p_mark)
    out[on, :, MARK[0], MARK[1]] = torch.tensor(MARK_COLOUR, dtype=out.dtype)[:, None, None]
    return out


def plant_shortcut(images: Tensor, labels: Tensor, target: int, extra: float, seed: int) -> tuple[Tensor, Tensor]:
    """A training set where the mark *decides* the class: every image of class ``target`` carries it, and a
    share ``extra`` of the other images carries it too and is relabelled ``target``. Returns copies
    (images, labels); a classifier trained on them predicts ``target`` for any marked image."""
    g = torch.Generator().manual_seed(seed)
    moved = (labels != target) & (torch.rand(len(labels), generator=g) < extra)
    new_labels = labels.clone()
    new_labels[moved] = target
    return mark_images(images, new_labels, target, 1.0, seed), new_labels


def mark_score(images: Tensor) -> Tensor:
    """(B,) share of the image's pixels (anywhere, not only in the corner) of the mark's colour: red and
    blue above 0.6, green below 0.4. The classifiers pool over space, so activation maximization paints
    the shortcut's colour wherever it helps, not as a square in the corner."""
    x = images.clamp(0, 1)
    return ((x[:, 0] > 0.6) & (x[:, 2] > 0.6) & (x[:, 1] < 0.4)).float().reshape(len(images), -1).mean(dim=1)
