"""Benchmark networks with seeded random weights: a VGG-16-shaped net (13 conv + 3 linear, 224×224 input) and a
ResNet-style net for 64×64 inputs whose blocks add the skip connection in ``forward`` (``out = out + identity``)."""

from __future__ import annotations

import torch
from torch import nn

_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGG16Like(nn.Module):
    """VGG-16 layout: 13 3×3 convs with ReLU and 5 max-pools, adaptive 7×7 pool, 3 linear layers (dropout)."""

    def __init__(self, num_classes: int = 1000, width: float = 1.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for v in _VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                c = int(v * width)
                layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU(inplace=True)]
                c_in = c
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(7)
        hidden = int(4096 * width)
        self.classifier = nn.Sequential(
            nn.Linear(c_in * 49, hidden), nn.ReLU(inplace=True), nn.Dropout(),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus identity (or 1×1 conv-BN projection), then ReLU; the sum is a plain ``+``."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)  # called twice per forward, as in torchvision
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + identity
        return self.relu(out)


class ResNetLike(nn.Module):
    """ResNet-18-style net for 64×64 inputs: stem, 4 stages × ``blocks`` BasicBlocks, global pool, linear."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = (32, 64, 128, 256), blocks: int = 2) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU(inplace=True))
        stages, c_in = [], widths[0]
        for i, c in enumerate(widths):
            for b in range(blocks):
                stages.append(BasicBlock(c_in, c, 2 if (i > 0 and b == 0) else 1))
                c_in = c
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def randomize_batchnorm(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters (as after training)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=generator) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=generator) * 0.5 + 0.75)
                m.weight.copy_(torch.rand(c, generator=generator) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(c, generator=generator) * 0.05)
    return model


def vgg16_like(seed: int = 0, num_classes: int = 1000, width: float = 1.0) -> VGG16Like:
    torch.manual_seed(seed)
    return VGG16Like(num_classes, width).eval()


def resnet_like(seed: int = 0, num_classes: int = 10, **kw) -> ResNetLike:
    torch.manual_seed(seed)
    return randomize_batchnorm(ResNetLike(num_classes, **kw), torch.Generator().manual_seed(seed)).eval()
