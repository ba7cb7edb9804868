"""Parameterisations (Fourier, MaCo), batched transforms and self-checks of activation maximization."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from semlens.maximize import Augment, FourierParam, MacoParam, fit_image_stats
from semlens.maximize.checks import heldout_density, path_vectors, self_checks, unit_scores


def _coloured_images(n: int = 300, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Correlated colour channels and a smooth (low-pass) spatial structure."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, 1, size, size, generator=g)
    smooth = nn.functional.avg_pool2d(nn.functional.pad(noise, (2, 2, 2, 2), mode="circular"), 5, stride=1)
    mix = torch.tensor([[1.0], [0.8], [0.3]])
    x = 0.5 + 0.2 * (mix[None, :, :, None] * smooth) + 0.03 * torch.randn(n, 3, size, size, generator=g)
    return x


def test_augment_equals_pad_grid_sample_crop() -> None:
    x = torch.rand(5, 3, 12, 10, dtype=torch.float64)
    for aug in (Augment(views=4, seed=3), Augment(views=3, pad=4, jitter=3, rotate=30, scale=(0.8, 1.2))):
        for step in (0, 7):
            assert torch.allclose(aug(x, step), aug.reference(x, step), atol=1e-12)
    ident = Augment(views=2, pad=0, jitter=0, rotate=0, scale=(1.0, 1.0))
    assert torch.allclose(ident(x, 1), x.repeat(2, 1, 1, 1), atol=1e-12)


def test_augment_rows_are_view_major_and_batch_independent() -> None:
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64)
    aug = Augment(views=3, seed=1)
    full = aug(x, 5)
    alone = aug(x[2:3], 5)
    assert torch.allclose(full[[2, 6, 10]], alone, atol=1e-12)


def test_fourier_param_reproduces_the_data_spectrum_and_colours() -> None:
    data = _coloured_images()
    stats = fit_image_stats(data)
    param = FourierParam(stats, init_scale=1.0)
    p = param.init(torch.arange(400))
    spec = torch.view_as_complex(p.detach().contiguous()) * param.scale
    z = torch.fft.irfft2(spec, s=(16, 16), norm="ortho")
    # E|c|² = 2 for complex c with N(0, 1) parts: the rendered power spectrum is 2·amplitude²
    power = torch.fft.rfft2(z, norm="ortho").abs().pow(2).mean(dim=0)[:, :, 1:8]
    target = 2 * stats.amplitude.pow(2)[:, :, 1:8]
    assert float((power.sum() / target.sum() - 1).abs()) < 0.1
    # colour mixing with the data's colour covariance
    cols = stats.colour(torch.randn(400, 3, 16, 16, generator=torch.Generator().manual_seed(2)))
    data_cov = torch.cov(data.transpose(0, 1).reshape(3, -1))
    assert torch.allclose(torch.cov(cols.transpose(0, 1).reshape(3, -1)), data_cov, atol=0.05 * float(data_cov.max()))
    x = param.render(p)
    assert x.shape == (400, 3, 16, 16)
    assert bool((x >= stats.lo[:, None, None] - 1e-6).all() and (x <= stats.hi[:, None, None] + 1e-6).all())


def test_fourier_one_over_f_scales_low_frequencies_up() -> None:
    stats = fit_image_stats(_coloured_images())
    scale = FourierParam(stats, spectrum="1/f").scale
    assert scale.shape == stats.amplitude.shape
    assert float(scale[0, 1, 1]) == pytest.approx(float(scale[0, 2, 2]) * 2, rel=1e-5)
    with pytest.raises(ValueError, match="unknown spectrum"):
        FourierParam(stats, spectrum="pink")


def test_maco_keeps_the_data_magnitude() -> None:
    stats = fit_image_stats(_coloured_images())
    param = MacoParam(stats)
    p = param.init([0, 1])
    z = torch.fft.irfft2(torch.polar(stats.amplitude.expand_as(p), p), s=(16, 16), norm="ortho")
    mag = torch.fft.rfft2(z, norm="ortho").abs()[:, :, :, 1:8]  # columns without Hermitian constraints
    assert torch.allclose(mag, stats.amplitude.expand_as(p)[:, :, :, 1:8], atol=1e-5)
    x = param.render(p)
    assert x.shape == (2, 3, 16, 16) and bool(torch.isfinite(x).all())


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.conv_layers = ["conv1", "conv2"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.conv1(x)))


def test_self_checks_on_natural_images_are_exact() -> None:
    torch.manual_seed(0)
    net = _Net()
    images = _coloured_images(40)
    scores = unit_scores(net, "conv2", "channel", images)
    assert torch.allclose(scores, net(images).mean(dim=(2, 3)), atol=1e-6)
    units = [0, 3, 4]
    best = scores[:, units].argmax(dim=0)
    checks = self_checks(net, "conv2", "channel", units, images[best], images, heldout_density(images, k=4), top_k=1)
    assert torch.allclose(checks.ratio, torch.ones(3), atol=1e-5)  # the top image reaches the dataset max
    assert torch.allclose(checks.path_similarity, torch.ones(3), atol=1e-5)  # same path as itself
    assert torch.equal(checks.top[:, 0], best)
    # path vectors are gradient × activation of conv1 channels, summed over space: they sum to the
    # unit's value minus its bias contribution (conv2 is linear in relu(conv1))
    paths = path_vectors(net, "conv2", "channel", torch.tensor(units), images[:3], "conv1")
    assert paths.shape == (3, 4)
    with torch.no_grad():
        value = net(images[:3]).mean(dim=(2, 3))[torch.arange(3), units] - net.conv2.bias[units]
    # relu(a)·∂/∂a = a·1[a>0]·∂/∂relu: contributions through conv1 sum to the bias-free unit value
    assert torch.allclose(paths.sum(dim=1), value, atol=1e-4)
