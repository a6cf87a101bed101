"""A model's pictures as image tensors: sample grids and reconstruction grids (inputs above
outputs), for PNG files and for TensorBoard alike."""

from __future__ import annotations

import math

import torch
from torchvision.utils import make_grid

from raytrain_vae.models import VAE


def grid(images: torch.Tensor, nrow: int | None = None) -> torch.Tensor:
    """(N, C, H, W) images in [0, 1] as one (3, H', W') grid on the CPU, nrow images per row."""
    nrow = nrow or max(1, math.ceil(math.sqrt(len(images))))
    return make_grid(images.detach().float().cpu().clamp(0, 1), nrow=nrow, padding=2)


@torch.no_grad()
def sample_images(model: VAE, n: int = 64, seed: int = 0) -> torch.Tensor:
    """n new images E[x|z], z ~ N(0, I), reproducible by seed."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    return model.sample(n, generator=generator)


@torch.no_grad()
def reconstruction_grid(model: VAE, images: torch.Tensor) -> torch.Tensor:
    """Inputs (float in [0, 1]) on the upper row(s), their reconstructions right below."""
    nrow = min(len(images), 16)
    rows = []
    recon = model.reconstruct(images)
    for start in range(0, len(images), nrow):
        for part in (images, recon):
            row = part[start : start + nrow]
            blank = row.new_zeros(nrow - len(row), *row.shape[1:])  # keep columns aligned
            rows.append(torch.cat([row, blank]))
    return grid(torch.cat(rows), nrow=nrow)
