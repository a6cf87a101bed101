"""What every model family returns: a stochastic pass (Pass), a posterior-mean pass, and the
Gaussian densities and KL divergences they are computed with."""

from __future__ import annotations

from typing import NamedTuple

import torch

from raytrain_vae.likelihoods import LOG_2PI


class Pass(NamedTuple):
    """One stochastic pass with S draws of every latent per image (B images).

    out: decoder output for every draw, (S * B, C, H, W), sample-major.
    kl: KL(q || p) per draw and image, (S, B): closed form at each level given the levels
        drawn above it (the top level's is exact; under a mixture prior it is the draw's
        log q(z|x) - log p(z), an unbiased estimate).
    kl_groups: the same KL split by group, (S, B, G): one group per latent dimension of the top
        level (one in all under a mixture prior) and per channel of each lower level (summed
        over its positions). Free bits act on groups; `evaluate` reports them.
    log_prior, log_posterior: log p(z) and log q(z | x) of the drawn latents, all levels,
        (S, B): log p(x | z) + log_prior - log_posterior is the IWAE bound's log weight.
    """

    out: torch.Tensor
    kl: torch.Tensor
    kl_groups: torch.Tensor
    log_prior: torch.Tensor
    log_posterior: torch.Tensor


class MeanPass(NamedTuple):
    """The deterministic pass: every level at its posterior mean (given the means above it).

    out: decoder output, (B, C, H, W). means: each level's posterior mean, flattened to
    (B, units), top level first (active units are counted on these). shifts: the same less each
    level's prior mean (the top's prior mean is 0): what the image adds to what the levels above
    already say (conditional active units are counted on these)."""

    out: torch.Tensor
    means: list[torch.Tensor]
    shifts: list[torch.Tensor]


def log_normal(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, exp(logvar)) summed over the last dim."""
    return -0.5 * ((z - mu).pow(2) * torch.exp(-logvar) + logvar + LOG_2PI).sum(dim=-1)


def gaussian_kl(
    mu_q: torch.Tensor, logvar_q: torch.Tensor, mu_p: torch.Tensor, logvar_p: torch.Tensor
) -> torch.Tensor:
    """KL(N(mu_q, exp(logvar_q)) || N(mu_p, exp(logvar_p))) elementwise (diagonal Gaussians)."""
    return 0.5 * (
        logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p).pow(2)) * torch.exp(-logvar_p) - 1.0
    )


def standard_normal_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) elementwise."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


def temperatures(temperature: float | list[float], levels: int) -> list[float]:
    """One temperature per level (top first) from one number or a list of `levels` numbers."""
    if isinstance(temperature, int | float):
        return [float(temperature)] * levels
    if len(temperature) != levels:
        raise ValueError(f"temperature: {levels} levels need {levels} values (got {temperature})")
    return [float(t) for t in temperature]
