"""Reference CNNs: shapes at several image sizes, conv_layers in forward order, LRP-friendly layers."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from semlens.layers import capture_activations, count_hooks, get_module
from semlens.models import available_models, build_model
from semlens.models.cnn import BasicBlock

NAMES = ["alexnet-like", "alexnet-b", "resnet-small", "vgg-small"]
ALLOWED = (nn.Conv2d, nn.Linear, nn.ReLU, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.BatchNorm2d, nn.Dropout,
           nn.Flatten)


def test_all_reference_models_are_registered():
    assert set(NAMES) <= set(available_models())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", [32, 64, 160])
def test_forward_shapes_and_conv_layers(name, size):
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, image_size=size, width=0.25).eval()
    y = model(torch.rand(2, 3, size, size))
    assert y.shape == (2, 7) and torch.isfinite(y).all()
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert sorted(model.conv_layers) == sorted(convs) and len(convs) >= 5
    # conv_layers are listed in the order the forward pass calls them
    order: list[str] = []
    hooks = [get_module(model, n).register_forward_hook(lambda m, i, o, n=n: order.append(n))
             for n in model.conv_layers]
    model(torch.rand(1, 3, size, size))
    for h in hooks:
        h.remove()
    assert order == model.conv_layers
    assert count_hooks(model) == 0


@pytest.mark.parametrize("name", NAMES)
def test_only_standard_layers_and_no_reused_relu(name):
    model = build_model(name, num_classes=5, image_size=64, width=0.25)
    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    assert all(isinstance(m, ALLOWED) for m in leaves), {type(m).__name__ for m in leaves}
    relus = [n for n, m in model.named_modules() if isinstance(m, nn.ReLU)]
    calls = {n: 0 for n in relus}
    hooks = [get_module(model, n).register_forward_hook(lambda m, i, o, n=n: calls.__setitem__(n, calls[n] + 1))
             for n in relus]
    model(torch.rand(1, 3, 64, 64))
    for h in hooks:
        h.remove()
    assert all(v == 1 for v in calls.values()), calls
    assert not any(getattr(m, "inplace", False) for m in leaves)


def test_alexnet_variants():
    a = build_model("alexnet-like", num_classes=12)
    b = build_model("alexnet-b", num_classes=12)
    assert a.conv_layers == [f"features.conv{i}" for i in range(1, 6)] == b.conv_layers
    assert sum(isinstance(m, nn.BatchNorm2d) for m in a.modules()) == 0
    assert sum(isinstance(m, nn.BatchNorm2d) for m in b.modules()) == 5
    assert sum(isinstance(m, nn.Linear) for m in a.modules()) == 3
    names = [n for n, _ in b.features.named_children()]
    assert all(names[names.index(f"conv{i}") + 1] == f"bn{i}" for i in range(1, 6))
    big = build_model("alexnet-like", num_classes=3, image_size=224)
    assert big.features.conv1.stride == (4, 4) and big.features.conv1.kernel_size == (11, 11)


def test_resnet_residual_is_an_explicit_sum():
    src = inspect.getsource(BasicBlock.forward)
    assert "out = out + identity" in src
    model = build_model("resnet-small", num_classes=4, blocks=2, width=0.25).eval()
    block = model.layers.layer2[0]
    assert block.downsample is not None
    x = torch.rand(2, 3, 64, 64)
    with capture_activations(model, ["layers.layer2.0.bn2", "layers.layer2.0.downsample", "layers.layer2.0"]) as a:
        model(x)
    # block output = relu(main branch + shortcut), checked from the captured parts
    expected = torch.relu(a["layers.layer2.0.bn2"] + a["layers.layer2.0.downsample"])
    assert torch.allclose(a["layers.layer2.0"], expected, atol=1e-6)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="num_classes"):
        build_model("alexnet-like", num_classes=0)
    with pytest.raises(ValueError, match="image_size"):
        build_model("vgg-small", image_size=16)
    with pytest.raises(ValueError, match="width"):
        build_model("resnet-small", width=0)
