"""The VAE objective in nats per image: reconstruction NLL + beta * KL, the IWAE bound; bits/dim."""

from __future__ import annotations

import math

import torch

from raytrain_vae.models import VAE, Pass
from raytrain_vae.models.base import standard_normal_kl


def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per image, summed over latent dims: shape (B,)."""
    return standard_normal_kl(mu, logvar).sum(dim=1)


def reconstruction_nll(model: VAE, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-log p(x|z) per image in nats, summed over pixels: shape (B,)."""
    return model.likelihood.nll(out.float(), x, model).flatten(1).sum(dim=1)


def elbo_terms(model: VAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One-sample estimate of (reconstruction NLL, KL) per image; negative ELBO = their sum.

    `model` may be a DDP wrapper: its forward is what synchronises gradients."""
    p = model(x)
    vae = getattr(model, "module", model)
    return reconstruction_nll(vae, p.out, x), p.kl[0]


def free_bits_kl(kl_groups: torch.Tensor, free_bits: float) -> torch.Tensor:
    """The KL term of the free-bits objective: sum over latent groups (a dim of the top z, a
    channel of a lower level) of max(free_bits, batch-mean KL of that group), for (B, G). A
    group below the floor gets no gradient, so it is not pushed to collapse."""
    return kl_groups.mean(dim=0).clamp(min=free_bits).sum()


def log_importance_weights(model: VAE, p: Pass, x: torch.Tensor) -> torch.Tensor:
    """log p(x|z_s) + log p(z_s) - log q(z_s|x), shape (S, B), for a pass of S draws."""
    s, b = p.kl.shape
    log_px_z = -reconstruction_nll(model, p.out, x.repeat(s, 1, 1, 1)).view(s, b)
    return log_px_z + p.log_prior - p.log_posterior


def training_loss(
    model: VAE,
    x: torch.Tensor,
    kl_weight: float = 1.0,
    free_bits: float = 0.0,
    iwae_k: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scalar loss to minimise, per-image reconstruction NLL, per-image KL) for one batch.

    iwae_k = 1: mean of recon + kl_weight * KL (or the free-bits KL). iwae_k > 1: the negative
    IWAE bound -log (1/k) sum_s w_s, which tightens the ELBO; recon and KL are then reported as
    averages over the k draws, for logging. `model` may be a DDP wrapper."""
    vae = getattr(model, "module", model)
    p = model(x, samples=iwae_k)
    if iwae_k == 1:
        recon, kl = reconstruction_nll(vae, p.out, x), p.kl[0]
        kl_term = free_bits_kl(p.kl_groups[0], free_bits) if free_bits else kl.mean()
        return recon.mean() + kl_weight * kl_term, recon, kl
    log_w = log_importance_weights(vae, p, x)
    bound = torch.logsumexp(log_w, dim=0) - math.log(iwae_k)
    recon = reconstruction_nll(vae, p.out.detach(), x.repeat(iwae_k, 1, 1, 1)).view(iwae_k, -1)
    return -bound.mean(), recon.mean(dim=0), p.kl.detach().mean(dim=0)


def kl_weight(step: int, steps_per_epoch: int, beta: float, warmup_epochs: float) -> float:
    """beta ramped linearly from ~0 to beta over the first warmup_epochs of optimizer steps."""
    if warmup_epochs <= 0:
        return beta
    return beta * min(1.0, (step + 1) / (warmup_epochs * steps_per_epoch))


def bits_per_dim(nats_per_image: float, num_dims: int) -> float:
    """Negative log-likelihood in nats per image -> bits per pixel dimension."""
    return nats_per_image / (num_dims * math.log(2))


@torch.no_grad()
def iwae_nll(model: VAE, x: torch.Tensor, k: int, max_decodes: int = 1024) -> torch.Tensor:
    """Importance-weighted estimate of -log p(x) per image with k samples of q(z|x), in nats.

    -log (1/k) sum_i p(x|z_i) p(z_i) / q(z_i|x), an upper bound on the NLL that tightens with k
    (k = 1 is the one-sample negative ELBO). Samples are decoded in chunks of at most
    `max_decodes` images, combined with a running log-sum-exp, so memory does not grow with k.
    1024 keeps the default decoder's activations (25 MB) under glibc's 32 MB mmap cap, so a
    retained heap reuses them; 4096 page-faulted every chunk in and ran at half the speed."""
    if k < 1:
        raise ValueError(f"iwae_nll needs k >= 1 samples (got {k})")
    up = model.bottom_up(x)
    b = len(x)
    chunk = max(1, max_decodes // b)
    total = torch.full((b,), -math.inf, device=x.device)
    done = 0
    while done < k:
        c = min(chunk, k - done)
        log_w = log_importance_weights(model, model.top_down(up, c), x)
        total = torch.logaddexp(total, torch.logsumexp(log_w, dim=0))
        done += c
    return -(total - math.log(k))
