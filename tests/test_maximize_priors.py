"""Priors for activation maximization: densities match their reference, files round-trip and are refused."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from semlens.maximize.experts import RBMExpert, fit_gaussian, fit_gmm_patches, fit_rbm
from semlens.maximize.stats import fit_image_stats
from semlens.maximize.store import PriorError, fit_prior, load_prior, save_prior


def _images(n: int = 200, shape: tuple[int, int, int] = (3, 8, 8), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, shape[0], 1, 1, generator=g)
    return (0.6 * base + 0.4 * torch.rand(n, *shape, generator=g)).clamp(0, 1)


def test_gaussian_log_prob_matches_torch_multivariate_normal() -> None:
    x = _images(120, (2, 3, 3))
    expert = fit_gaussian(x, k=5)
    cov = expert.cov_mul(torch.eye(18).double())
    ref = torch.distributions.MultivariateNormal(expert.mean.double(), covariance_matrix=(cov + cov.T) / 2)
    probe = _images(4, (2, 3, 3), seed=9)
    assert torch.allclose(expert.log_prob(probe.double()), ref.log_prob(probe.reshape(4, -1).double()), atol=1e-6)


def test_gmm_patch_log_prob_matches_sklearn() -> None:
    x = _images(60, (3, 8, 8))
    expert = fit_gmm_patches(x, components=3, patch=4, stride=4)
    from sklearn.mixture import GaussianMixture

    gmm = GaussianMixture(3, covariance_type="full", reg_covar=1e-4, max_iter=200, random_state=0)
    pts = torch.nn.functional.unfold(x, 4, stride=4).transpose(1, 2).reshape(-1, 48).double().numpy()
    gmm.fit(pts)
    probe = _images(2, (3, 8, 8), seed=5).double()
    probe_pts = torch.nn.functional.unfold(probe, 4, stride=4).transpose(1, 2).reshape(-1, 48).numpy()
    ref = torch.from_numpy(gmm.score_samples(probe_pts)).reshape(2, 4).sum(dim=1)
    assert torch.allclose(expert.double().log_prob(probe), ref, atol=1e-6)


def test_rbm_log_density_gradcheck_and_closed_form() -> None:
    torch.manual_seed(0)
    rbm = RBMExpert((1, 2, 3), hidden=4).double()
    with torch.no_grad():
        rbm.weight.normal_()
        rbm.hidden_bias.normal_()
        rbm.visible_bias.normal_()
        rbm.s.uniform_(0.5, 2.0)
        rbm.m.normal_()
    x = torch.randn(3, 1, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(rbm.log_prob, (x,))
    # closed form of the paper: Σ_j log(1 + e^{w_jᵀv + b_j}) − ½‖v − a‖² − Σ log s
    v = (x.detach().reshape(3, -1) - rbm.m) / rbm.s
    ref = torch.log1p(torch.exp(v @ rbm.weight.T + rbm.hidden_bias)).sum(1) - 0.5 * ((v - rbm.visible_bias) ** 2).sum(
        1) - rbm.s.log().sum()
    assert torch.allclose(rbm.log_prob(x.detach()), ref, atol=1e-10)


def test_rbm_training_raises_data_density_over_noise() -> None:
    x = _images(200, (3, 4, 4))
    rbm = fit_rbm(x, hidden=16, epochs=15, lr=3e-3)
    noise = torch.rand(200, 3, 4, 4)
    assert float(rbm.log_prob(x).mean()) > float(rbm.log_prob(noise).mean()) + 1.0


@pytest.mark.parametrize("kind", ["gaussian", "gmm", "rbm", "vae", "gan"])
def test_prior_round_trip(tmp_path, kind: str) -> None:
    x = _images(64, (3, 8, 8))
    opts = {"gaussian": {"k": 8}, "gmm": {"components": 2, "patch": 4, "stride": 4},
            "rbm": {"hidden": 8, "epochs": 1}, "vae": {"code_dim": 4, "hidden": 16, "epochs": 1},
            "gan": {"code_dim": 4, "hidden": 16, "epochs": 1}}[kind]
    prior = fit_prior(kind, x, **opts)
    path = save_prior(prior, tmp_path / f"{kind}.safetensors")
    back = load_prior(path)
    assert back.kind == kind and back.shape == (3, 8, 8)
    probe = x[:3]
    if back.is_expert:
        assert torch.allclose(back.module.log_prob(probe), prior.module.log_prob(probe))
    else:
        z = torch.randn(3, 4)
        assert torch.allclose(back.module(z), prior.module(z))
        assert float(back.module(z).min()) >= float(x.min()) - 1e-6
    assert torch.allclose(back.stats.colour_sqrt, prior.stats.colour_sqrt)


def test_prior_refusals(tmp_path) -> None:
    x = _images(64, (3, 8, 8))
    path = save_prior(fit_prior("gaussian", x, k=4), tmp_path / "g.safetensors")
    prior = load_prior(path)
    with pytest.raises(PriorError, match=r"fitted on inputs of 3 channels × 8×8.*1 channels × 8×8"):
        prior.check_compatible(fit_image_stats(x[:, :1]), "prior g")
    with pytest.raises(PriorError, match=r"fitted on inputs of 3 channels × 8×8.*3 channels × 4×4"):
        prior.check_compatible(fit_image_stats(x[:, :, :4, :4]))
    with pytest.raises(PriorError, match="channel means"):
        prior.check_compatible(fit_image_stats((x - 0.5) / 0.25))
    prior.check_compatible(fit_image_stats(_images(64, (3, 8, 8), seed=3)))  # same distribution: accepted
    # a NaN in the file
    tensors = load_file(str(path))
    tensors["module.variances"][1] = math.nan
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    save_file(tensors, str(tmp_path / "nan.safetensors"), metadata=meta)
    with pytest.raises(PriorError, match=r"NaN or infinite values in module.variances"):
        load_prior(tmp_path / "nan.safetensors")
    with pytest.raises(PriorError, match="must be a .safetensors"):
        load_prior(tmp_path / "g.pt")
    save_file({"a": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(PriorError, match="is not a semlens prior"):
        load_prior(tmp_path / "other.safetensors")


def test_image_stats_whiten_colour_round_trip_and_decorrelate() -> None:
    x = _images(100, (3, 8, 8))
    s = fit_image_stats(x)
    w = s.whiten(x)
    assert torch.allclose(s.colour(w), x, atol=1e-5)
    pix = w.transpose(0, 1).reshape(3, -1)
    assert torch.allclose(torch.cov(pix), torch.eye(3), atol=1e-3)
    assert s.amplitude.shape == (3, 8, 5)
    # Parseval: mean squared amplitude = mean energy of the whitened images (per channel, ortho norm)
    assert float(s.squash(torch.full((1, 3, 8, 8), 100.0)).max()) <= float(s.hi.max()) + 1e-6


def test_variants_refuse_the_wrong_prior_kind() -> None:
    from semlens.maximize.run import MaximizeConfig, build_variant, parse_units

    x = _images(64, (3, 8, 8))
    stats = fit_image_stats(x)
    vae = fit_prior("vae", x, code_dim=4, hidden=8, epochs=1)
    gauss = fit_prior("gaussian", x, k=4)
    with pytest.raises(ValueError, match="variant 'expert' needs a density prior .* got a 'vae'"):
        build_variant(MaximizeConfig(variant="expert"), stats, vae)
    with pytest.raises(ValueError, match="variant 'code' needs a generator prior .* got a 'gaussian'"):
        build_variant(MaximizeConfig(variant="code"), stats, gauss)
    with pytest.raises(ValueError, match="--param 'fourier' does not apply"):
        build_variant(MaximizeConfig(variant="code", param="fourier"), stats, vae)
    with pytest.raises(ValueError, match="unknown variant 'fancy'"):
        build_variant(MaximizeConfig(variant="fancy"), stats)
    param, reg = build_variant(MaximizeConfig(variant="code", lam=0.5), stats, vae)
    z = torch.ones(2, 4)
    assert torch.allclose(reg(param.render(z), z), torch.full((2,), -2.0))  # −λ‖z‖² = −0.5·4
    assert parse_units("0-3,7") == [0, 1, 2, 3, 7]


@pytest.mark.parametrize("shape", [(3, 64, 64), (1, 5, 7), (2, 17, 9)])
def test_conv_decoder_makes_images_of_any_shape_inside_the_data_range(shape) -> None:
    from semlens.maximize.generators import CodePrior

    prior = CodePrior("vae", shape, code_dim=4, hidden=4)
    prior.decoder.lo.fill_(-1.0)
    prior.decoder.hi.fill_(2.0)
    with torch.no_grad():
        out = prior(torch.randn(5, 4) * 10)
    assert out.shape == (5, *shape)
    assert float(out.min()) >= -1.0 and float(out.max()) <= 2.0
    critic = prior.make_critic(3)  # the VAE encoder of the same family takes flat images
    assert critic(out.reshape(5, -1)).shape == (5, 3)


def test_prior_files_without_an_architecture_are_mlp_generators(tmp_path) -> None:
    """Files written before the conv decoder existed (config without "arch") still load, as MLPs."""
    from semlens.maximize.generators import CodePrior, Decoder

    mlp = CodePrior("gan", (3, 8, 8), code_dim=4, hidden=16, arch="mlp")
    cfg = {k: v for k, v in mlp.config().items() if k != "arch"}
    back = CodePrior.from_config(cfg)
    assert isinstance(back.decoder, Decoder) and back.hidden == 16
    back.load_state_dict(mlp.state_dict())
    z = torch.randn(2, 4)
    assert torch.equal(back(z), mlp(z))
    with pytest.raises(ValueError, match="unknown generator architecture 'unet'"):
        CodePrior("vae", (3, 8, 8), 4, arch="unet")


def test_default_lambda_of_the_expert_is_per_input_dimension() -> None:
    """log p(x) sums over D = C·H·W numbers: the expert's default λ is 0.1/D, any given λ is used as it is."""
    from semlens.maximize.run import MaximizeConfig

    assert MaximizeConfig(variant="expert").lam_value(3 * 64 * 64) == pytest.approx(0.1 / 12288)
    assert MaximizeConfig(variant="expert", lam=0.5).lam_value(3 * 64 * 64) == 0.5
    assert MaximizeConfig(variant="plain").lam_value(3 * 64 * 64) == pytest.approx(0.1 / 12288)
    assert MaximizeConfig(variant="code").lam_value(3 * 64 * 64) == 1e-4


def test_generators_default_to_the_normalised_conv_decoder_and_older_conv_files_still_load(tmp_path) -> None:
    """New generators are ``conv-bn`` (batch normalisation before each hidden ReLU); a file written with the plain
    ``conv`` decoder keeps loading as one, with identical outputs; fitting survives a last batch of one image."""
    from semlens.maximize.generators import CodePrior, ConvDecoder

    x = torch.rand(65, 3, 8, 8)  # 65 = 64 + 1: the one-image batch is dropped (BatchNorm needs two)
    prior = fit_prior("gan", x, code_dim=4, hidden=4, epochs=1, batch_size=64)
    assert prior.module.arch == "conv-bn" and prior.module.config()["arch"] == "conv-bn"
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in prior.module.modules()) == 3
    assert not prior.module.training
    save_prior(prior, tmp_path / "gan.safetensors")
    back = load_prior(tmp_path / "gan.safetensors")
    z = torch.randn(3, 4)
    assert torch.equal(back.module(z), prior.module(z))
    assert torch.allclose(back.module(z[:1]), prior.module(z)[:1], atol=1e-6)  # eval mode: rows are independent
    old = CodePrior("vae", (3, 8, 8), 4, hidden=4, arch="conv")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in old.modules())
    again = CodePrior.from_config(old.config())
    again.load_state_dict(old.state_dict())
    assert isinstance(again.decoder, ConvDecoder) and torch.equal(again(z), old(z))


def test_default_generator_epochs_make_the_default_number_of_steps() -> None:
    from semlens.maximize.generators import DEFAULT_STEPS, default_epochs

    assert default_epochs(2000, 64) == 125          # 32 batches per epoch (the last of 16): 125 × 32 = 4,000 steps
    assert default_epochs(2000, 64) * 32 >= DEFAULT_STEPS > (default_epochs(2000, 64) - 1) * 32
    assert default_epochs(10**6, 64) == 1           # a large data set: one epoch already makes more steps
    assert default_epochs(3, 64, steps=10) == 10    # one batch per epoch


def test_the_gan_no_longer_collapses(monkeypatch) -> None:
    """The fix for a collapsed GAN (code AM could not move any unit): batch normalisation in the generator and
    spectral normalisation in the discriminator. On 600 concept-world images of 32×32, 250 steps, the images'
    std over codes is 0.16 / 0.19 (seeds 0 / 1; the data's 0.31); the former generator and discriminator (plain
    ``conv``, no spectral normalisation) collapse to 0.05 / 0.07."""
    import semlens.maximize.generators as gen
    from semlens.world import generate_concepts

    x = generate_concepts(600, 32, seed=3, masks=False).images
    z = torch.randn(200, 16, generator=torch.Generator().manual_seed(1))

    def spread(prior) -> float:
        with torch.no_grad():
            return float(prior(z).std(dim=0).mean())

    new = gen.fit_gan(x, code_dim=16, hidden=8, epochs=25, seed=0)
    assert spread(new) > 0.12
    monkeypatch.setattr(gen, "_spectral", lambda net: net)  # the former, unnormalised discriminator
    old = gen.fit_gan(x, code_dim=16, hidden=8, epochs=25, seed=0, arch="conv")
    assert spread(old) < 0.1
