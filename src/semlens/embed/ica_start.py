"""The ``init="ica"`` start of the SRAE: x-features begin on the layer's independent components that carry the decision.

Why: the SRAE's objective is satisfied by any set of x-features whose contributions add up to the logit and are
decorrelated, and from the layer-wise pretrained start the fine-tuning settles in mixtures (two decision concepts in
one x-feature, an x-feature on concepts with no weight in the decision, an "absence" x-feature with a negative
weight). Independent component analysis separates super-Gaussian (sparse) sources of a linear mixture up to order
and scale — the situation of concepts that are present in some images and absent in most — so the fine-tuning can
start in the basin where each x-feature is one concept. docs/embed.md ("Planted dictionary") has the measurements.

The components are fitted with scikit-learn's FastICA on a bounded sample of the standardised layer (the first
``max_samples`` vectors of the split); everything else is streamed.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

__all__ = ["IndependentStart", "fit_independent_start"]


@dataclass
class IndependentStart:
    """Targets for the x-features of ``G`` groups.

    ``unmix`` ``(d, c)`` and ``offset`` ``(c,)`` map standardised activations ``z`` ``(N, d)`` to sign-aligned
    components ``z @ unmix - offset`` (zero at each component's median, positive where the concept is present);
    ``pick`` ``(G, k)``: the components each group's x-features start on; ``scale`` ``(G, k)``: their standard
    deviations after the ReLU (targets are divided by it, so each x-feature starts at unit scale).
    """

    unmix: torch.Tensor
    offset: torch.Tensor
    pick: torch.Tensor
    scale: torch.Tensor
    converged: bool

    def targets(self, z: torch.Tensor, groups: list[int] | None = None) -> torch.Tensor:
        """``(G, N, k)`` non-negative targets for standardised ``z`` ``(N, d)`` (only ``groups``' rows if given)."""
        pick, scale = (self.pick, self.scale) if groups is None else (self.pick[groups], self.scale[groups])
        c = torch.relu(z @ self.unmix.to(z) - self.offset.to(z))  # (N, c)
        return c[:, pick.to(z.device)].permute(1, 0, 2) / scale.to(z).unsqueeze(1)


def fit_independent_start(z: torch.Tensor, y: torch.Tensor, k: int, joint: bool, n_components: int = 32,
                          seed: int = 0) -> IndependentStart:
    """Fit FastICA on standardised ``z`` ``(N, d)`` and pick, per explained output, the ``k`` components that carry
    most of it.

    ``y`` ``(N, G)`` (one-vs-all: one column per group) or ``(N, m)`` (``joint``: the ``m`` outputs of one group).
    Each component is flipped to positive skewness (a sparse concept's activity is the long tail) and cut at its
    median (``relu(c − median)``). A component's weight for an output is ``|β| · std`` with ``β`` the least-squares
    coefficients of the output on all cut components; ``joint`` sums the weights over outputs. Returns an
    :class:`IndependentStart`.
    """
    from sklearn.decomposition import FastICA
    from sklearn.exceptions import ConvergenceWarning

    n, d = z.shape
    n_comp = max(k, min(d, n_components, n - 1))
    if n_comp > d or n_comp >= n:
        raise ValueError(f"init='ica' needs at least k={k} components from {d} dimensions and {n} vectors")
    ica = FastICA(n_components=n_comp, whiten="unit-variance", random_state=seed, max_iter=500)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        c = torch.as_tensor(ica.fit_transform(z.double().numpy()))
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    sign = torch.where(((c - c.mean(0)) ** 3).mean(0) < 0, -1.0, 1.0).double()
    c = c * sign
    med = c.median(0).values
    cut = torch.relu(c - med)
    # ica.transform(x) = (x - mean_) @ components_.T; fold mean, sign and median into one affine map
    comps = torch.as_tensor(ica.components_).T * sign  # (d, c)
    offset = torch.as_tensor(ica.mean_) @ comps + med
    ones = torch.ones(n, 1, dtype=torch.float64)
    yc = y.double() - y.double().mean(0)
    beta = torch.linalg.lstsq(torch.cat([cut, ones], 1), yc).solution[:-1]  # (c, G or m)
    weight = beta.abs() * cut.std(0).unsqueeze(1)
    if joint:
        weight = weight.sum(1, keepdim=True)
    pick = weight.topk(k, dim=0).indices.T.contiguous()  # (G, k)
    scale = cut.std(0)[pick].clamp(min=1e-6)
    return IndependentStart(comps.float(), offset.float(), pick, scale.float(), converged)
