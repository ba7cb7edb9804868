"""Fit, save and load priors (density experts and generators) as safetensors + JSON config.

A prior file holds the prior's tensors, the :class:`ImageStats` of the data it was fitted on
(``stats.*``) and a config ``{"kind", "input_shape", ...}``. Loading never unpickles anything and
refuses, with a one-line error naming the file, a prior with non-finite values, an unknown kind,
or one fitted on another input shape / channel count / channel statistics than the model's data.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from semlens.checkpoint import load_finite_state, read_config, save_weights, sub_state
from semlens.maximize.experts import GaussianExpert, GMMPatchExpert, RBMExpert, fit_gaussian, fit_gmm_patches, fit_rbm
from semlens.maximize.generators import CodePrior, fit_gan, fit_vae
from semlens.maximize.stats import ImageStats, channel_means_differ, fit_image_stats

__all__ = ["Prior", "PriorError", "fit_prior", "save_prior", "load_prior", "EXPERT_KINDS", "CODE_KINDS", "PRIOR_KINDS"]

EXPERT_KINDS = ("gaussian", "gmm", "rbm")
CODE_KINDS = ("vae", "gan")
PRIOR_KINDS = EXPERT_KINDS + CODE_KINDS
_CLASSES: dict[str, Any] = {"gaussian": GaussianExpert, "gmm": GMMPatchExpert, "rbm": RBMExpert,
                            "vae": CodePrior, "gan": CodePrior}


class PriorError(ValueError):
    """A prior file that is unusable for this model or data."""


class Prior:
    """A fitted prior: ``module`` (expert with ``log_prob`` or :class:`CodePrior`) and the data's stats."""

    def __init__(self, module: nn.Module, stats: ImageStats) -> None:
        self.module, self.stats = module, stats

    @property
    def kind(self) -> str:
        return self.module.kind

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.module.shape)  # type: ignore[return-value]

    @property
    def is_expert(self) -> bool:
        return self.kind in EXPERT_KINDS

    def config(self) -> dict[str, Any]:
        return {**self.module.config(), "channel_mean": self.stats.channel_mean.tolist(),
                "channel_std": self.stats.channel_std.tolist()}

    def check_compatible(self, stats: ImageStats, source: str = "the prior") -> None:
        """Refuse a prior fitted on another input shape or on data with other channel statistics."""
        if tuple(stats.shape) != self.shape:
            c, h, w = self.shape
            raise PriorError(f"{source} was fitted on inputs of {c} channels × {h}×{w}, the data/model have "
                             f"{stats.shape[0]} channels × {stats.shape[1]}×{stats.shape[2]}")
        if channel_means_differ(stats.channel_mean, stats.channel_std, self.stats.channel_mean, self.stats.channel_std):
            raise PriorError(f"{source} was fitted on data with channel means {self.stats.channel_mean.tolist()}, "
                             f"these data have {stats.channel_mean.tolist()} (different normalisation?)")


def fit_prior(kind: str, images: Tensor, seed: int = 0, **options: Any) -> Prior:
    """Fit a prior of ``kind`` (gaussian, gmm, rbm, vae, gan) on ``images`` (N, C, H, W)."""
    fitters = {"gaussian": fit_gaussian, "gmm": fit_gmm_patches, "rbm": fit_rbm, "vae": fit_vae, "gan": fit_gan}
    if kind not in fitters:
        raise ValueError(f"unknown prior kind {kind!r}: use one of {', '.join(PRIOR_KINDS)}")
    stats = fit_image_stats(images)
    module = fitters[kind](images, seed=seed, **options)
    return Prior(module, stats)


def save_prior(prior: Prior, path: str | os.PathLike) -> Path:
    """Write ``prior`` to ``path`` (.safetensors) with its config."""
    tensors = {f"module.{k}": v for k, v in prior.module.state_dict().items()}
    tensors.update(prior.stats.state())
    return save_weights(tensors, path, {"semlens_prior": prior.config()})


def load_prior(path: str | os.PathLike) -> Prior:
    """Load a prior written by :func:`save_prior` (safetensors only; never a pickle)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise PriorError(f"prior {path} must be a .safetensors file written by `semlens maximize fit-prior`")
    cfg = read_config(path).get("semlens_prior")
    if not isinstance(cfg, dict) or cfg.get("kind") not in _CLASSES:
        raise PriorError(f"{path} is not a semlens prior (no or unknown 'kind' in its config)")
    state = load_finite_state(path, "prior", PriorError)
    try:
        module = _CLASSES[cfg["kind"]].from_config(cfg)
        module.load_state_dict(sub_state(state, "module."))
        stats = ImageStats.from_state(state)
    except (KeyError, RuntimeError, TypeError, ValueError) as err:
        raise PriorError(f"prior {path} does not match its config: {str(err).splitlines()[0]}") from err
    if tuple(stats.shape) != tuple(module.shape):
        raise PriorError(f"prior {path}: statistics of shape {stats.shape} for a prior of shape {module.shape}")
    return Prior(module.eval().requires_grad_(False), stats)
