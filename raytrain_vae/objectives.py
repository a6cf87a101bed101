"""The VAE objective in nats per image: reconstruction NLL + beta * closed-form KL; bits/dim."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from raytrain_vae.model import ConvVAE

LOG_2PI = math.log(2 * math.pi)


def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per image, summed over latent dims: shape (B,)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1)


def reconstruction_nll(model: ConvVAE, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-log p(x|z) per image in nats, summed over pixels: shape (B,)."""
    out = out.float()
    if model.cfg.likelihood == "bernoulli":
        nll = F.binary_cross_entropy_with_logits(out, x, reduction="none")
    else:
        log_sigma = model.log_sigma
        nll = 0.5 * ((x - out) * torch.exp(-log_sigma)).pow(2) + log_sigma + 0.5 * LOG_2PI
    return nll.flatten(1).sum(dim=1)


def elbo_terms(model: ConvVAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One-sample estimate of (reconstruction NLL, KL) per image; negative ELBO = their sum.

    `model` may be a DDP wrapper: its forward is what synchronises gradients."""
    out, mu, logvar = model(x)
    vae = getattr(model, "module", model)
    return reconstruction_nll(vae, out, x), kl_to_standard_normal(mu.float(), logvar.float())


def kl_weight(step: int, steps_per_epoch: int, beta: float, warmup_epochs: float) -> float:
    """beta ramped linearly from ~0 to beta over the first warmup_epochs of optimizer steps."""
    if warmup_epochs <= 0:
        return beta
    return beta * min(1.0, (step + 1) / (warmup_epochs * steps_per_epoch))


def bits_per_dim(nats_per_image: float, num_dims: int) -> float:
    """Negative log-likelihood in nats per image -> bits per pixel dimension."""
    return nats_per_image / (num_dims * math.log(2))
