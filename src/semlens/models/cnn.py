"""Reference CNNs for the concept world: AlexNet-like, AlexNet-B (BatchNorm), a small ResNet, a small VGG.

All take images ``(N, 3, S, S)`` float in [0, 1] (no normalisation) and return logits ``(N, num_classes)``.
They use only standard layers (Conv2d, Linear, ReLU, MaxPool2d, AdaptiveAvgPool2d, BatchNorm2d,
Dropout, Flatten); every ReLU is its own module (never reused) and residual sums are written as
``out = out + identity`` in ``forward``, so LRP rules and hooks can be attached per layer.
Each model exposes ``conv_layers``: the dotted names of its conv modules in forward order.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from semlens.models.registry import register_model

__all__ = ["AlexNetLike", "ResNetSmall", "VGGSmall", "alexnet_like", "alexnet_b", "resnet_small", "vgg_small"]


def _check(num_classes: int, image_size: int, width: float) -> None:
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width}")


def _flat_size(features: nn.Module, image_size: int) -> int:
    with torch.no_grad():
        training = features.training
        features.eval()
        out = features(torch.zeros(1, 3, image_size, image_size))
        features.train(training)
    return out.numel()


def _conv_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


class AlexNetLike(nn.Module):
    """AlexNet's layout (5 conv + 3 linear) sized for ``image_size``.

    ``features``: conv1..conv5 (+ bn1..bn5 when ``batch_norm``), relu1..relu5, pool1, pool2, pool5;
    ``classifier``: fc6, relu6, drop6, fc7, relu7, drop7, fc8. Conv1 has stride 4 for images of at
    least 160 pixels (as AlexNet at 224) and stride 2 below. ``width`` scales every channel count.
    """

    def __init__(self, num_classes: int = 12, image_size: int = 64, batch_norm: bool = False, width: float = 1.0,
                 dropout: float = 0.5) -> None:
        super().__init__()
        _check(num_classes, image_size, width)
        c = [max(4, round(k * width)) for k in (32, 64, 96, 96, 64)]
        hidden = max(16, round(256 * width))
        big = image_size >= 160
        layers: list[tuple[str, nn.Module]] = []
        specs = [
            (3, c[0], 11 if big else 5, 4 if big else 2, 2, True),
            (c[0], c[1], 5 if big else 3, 1, 2 if big else 1, True),
            (c[1], c[2], 3, 1, 1, False),
            (c[2], c[3], 3, 1, 1, False),
            (c[3], c[4], 3, 1, 1, True),
        ]
        for i, (cin, cout, k, s, p, pool) in enumerate(specs, start=1):
            layers.append((f"conv{i}", nn.Conv2d(cin, cout, k, stride=s, padding=p)))
            if batch_norm:
                layers.append((f"bn{i}", nn.BatchNorm2d(cout)))
            layers.append((f"relu{i}", nn.ReLU()))
            if pool:
                layers.append((f"pool{i}", nn.MaxPool2d(3 if big else 2, stride=2)))
        self.features = nn.Sequential(OrderedDict(layers))
        flat = _flat_size(self.features, image_size)
        self.classifier = nn.Sequential(OrderedDict([
            ("flatten", nn.Flatten()),
            ("fc6", nn.Linear(flat, hidden)), ("relu6", nn.ReLU()), ("drop6", nn.Dropout(dropout)),
            ("fc7", nn.Linear(hidden, hidden)), ("relu7", nn.ReLU()), ("drop7", nn.Dropout(dropout)),
            ("fc8", nn.Linear(hidden, num_classes)),
        ]))
        self.conv_layers = _conv_names(self)
        self.num_classes, self.image_size = num_classes, image_size

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN, a shortcut (1x1 conv + BN when the shape changes) and ``out = out + identity``."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout else None
        )
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        identity = self.downsample(x) if self.downsample is not None else x
        out = out + identity
        return self.relu2(out)


class ResNetSmall(nn.Module):
    """A small ResNet: stem conv, three stages of ``blocks`` BasicBlocks (strides 1, 2, 2), global pool, fc."""

    def __init__(self, num_classes: int = 12, image_size: int = 64, width: float = 1.0, blocks: int = 1) -> None:
        super().__init__()
        _check(num_classes, image_size, width)
        c = [max(4, round(k * width)) for k in (32, 64, 128)]
        self.stem = nn.Sequential(OrderedDict([
            ("conv", nn.Conv2d(3, c[0], 3, stride=2 if image_size >= 128 else 1, padding=1, bias=False)),
            ("bn", nn.BatchNorm2d(c[0])), ("relu", nn.ReLU()), ("pool", nn.MaxPool2d(2)),
        ]))
        stages, cin = [], c[0]
        for i, cout in enumerate(c):
            stage = [BasicBlock(cin if j == 0 else cout, cout, (1 if i == 0 else 2) if j == 0 else 1)
                     for j in range(blocks)]
            stages.append((f"layer{i + 1}", nn.Sequential(*stage)))
            cin = cout
        self.layers = nn.Sequential(OrderedDict(stages))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(cin, num_classes)
        self.conv_layers = _conv_names(self)
        self.num_classes, self.image_size = num_classes, image_size

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.flatten(self.pool(self.layers(self.stem(x)))))


class VGGSmall(nn.Module):
    """A small VGG: 3 blocks of two 3x3 conv + ReLU and a max-pool, then fc + ReLU + dropout + fc."""

    def __init__(self, num_classes: int = 12, image_size: int = 64, width: float = 1.0, dropout: float = 0.5) -> None:
        super().__init__()
        _check(num_classes, image_size, width)
        c = [max(4, round(k * width)) for k in (32, 64, 128)]
        layers: list[tuple[str, nn.Module]] = []
        cin = 3
        for b, cout in enumerate(c, start=1):
            for j in (1, 2):
                layers += [(f"conv{b}_{j}", nn.Conv2d(cin, cout, 3, padding=1)), (f"relu{b}_{j}", nn.ReLU())]
                cin = cout
            layers.append((f"pool{b}", nn.MaxPool2d(2)))
        if image_size >= 128:
            layers.append(("pool4", nn.MaxPool2d(2)))
        self.features = nn.Sequential(OrderedDict(layers))
        hidden = max(16, round(256 * width))
        self.classifier = nn.Sequential(OrderedDict([
            ("flatten", nn.Flatten()), ("fc1", nn.Linear(_flat_size(self.features, image_size), hidden)),
            ("relu", nn.ReLU()), ("drop", nn.Dropout(dropout)), ("fc2", nn.Linear(hidden, num_classes)),
        ]))
        self.conv_layers = _conv_names(self)
        self.num_classes, self.image_size = num_classes, image_size

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


@register_model("alexnet-like")
def alexnet_like(num_classes: int = 12, image_size: int = 64, width: float = 1.0, dropout: float = 0.5) -> AlexNetLike:
    """AlexNet-like CNN (5 conv + 3 linear) for ``image_size`` inputs."""
    return AlexNetLike(num_classes, image_size, batch_norm=False, width=width, dropout=dropout)


@register_model("alexnet-b")
def alexnet_b(num_classes: int = 12, image_size: int = 64, width: float = 1.0, dropout: float = 0.5) -> AlexNetLike:
    """AlexNet-like CNN with BatchNorm after every conv."""
    return AlexNetLike(num_classes, image_size, batch_norm=True, width=width, dropout=dropout)


@register_model("resnet-small")
def resnet_small(num_classes: int = 12, image_size: int = 64, width: float = 1.0, blocks: int = 1) -> ResNetSmall:
    """Small ResNet (3 stages of BasicBlocks with explicit ``out = out + identity``)."""
    return ResNetSmall(num_classes, image_size, width=width, blocks=blocks)


@register_model("vgg-small")
def vgg_small(num_classes: int = 12, image_size: int = 64, width: float = 1.0, dropout: float = 0.5) -> VGGSmall:
    """Small VGG (6 conv in 3 blocks + 2 linear)."""
    return VGGSmall(num_classes, image_size, width=width, dropout=dropout)
