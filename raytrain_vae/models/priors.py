"""The top level's prior p(z): the standard normal, or a learned mixture of diagonal Gaussians
(model.prior_components), with its log density and its draws from standard normal noise."""

from __future__ import annotations

import math

import torch
from torch import nn

from raytrain_vae.models.base import log_normal


class MixturePrior(nn.Module):
    """p(z) = sum_k w_k N(z; m_k, diag(exp(s_k))) with learned weights, means and log-variances.

    A learned prior fits the top posteriors' aggregate instead of pulling every posterior to
    N(0, I), as in Tomczak & Welling's "VAE with a VampPrior" (2018), which learns a mixture for
    the same reason. KL(q || p) has no closed form under it: the model estimates it from the drawn
    z as log q(z | x) - log p(z), unbiased, the estimate the IWAE bound uses anyway."""

    def __init__(self, components: int, dim: int) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(components))
        # Means spread about the origin so that the components can part; unit variances.
        self.means = nn.Parameter(0.5 * torch.randn(components, dim))
        self.logvars = nn.Parameter(torch.zeros(components, dim))

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z) over the last dim, in float32: (..., dim) -> (...)."""
        log_w = torch.log_softmax(self.logits.float(), dim=0)
        per_component = log_normal(
            z.float().unsqueeze(-2), self.means.float(), self.logvars.float()
        )
        return torch.logsumexp(log_w + per_component, dim=-1)

    def draw(self, noise: torch.Tensor, picks: torch.Tensor, temperature: float) -> torch.Tensor:
        """z from standard normal numbers: `picks` (B,) choose each draw's component (through
        the normal CDF, so one N(0, 1) number picks component k with probability w_k), `noise`
        (B, dim) places z within it, its spread scaled by `temperature`."""
        weights = torch.softmax(self.logits.float(), dim=0)
        uniform = 0.5 * (1 + torch.erf(picks.float() / math.sqrt(2)))
        bounds = torch.cumsum(weights, dim=0)
        k = torch.searchsorted(bounds, uniform.unsqueeze(-1)).squeeze(-1).clamp(max=len(bounds) - 1)
        std = torch.exp(0.5 * self.logvars[k])
        return self.means[k] + temperature * noise.to(std) * std
