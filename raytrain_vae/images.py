"""PNG pictures of a model: sample grids and reconstruction grids (inputs above outputs)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image

from raytrain_vae.model import ConvVAE


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> None:
    """Save (N, C, H, W) images in [0, 1] as one PNG grid, nrow images per row."""
    nrow = nrow or max(1, math.ceil(math.sqrt(len(images))))
    save_image(make_grid(images.detach().float().cpu().clamp(0, 1), nrow=nrow, padding=2), path)


@torch.no_grad()
def sample_grid(model: ConvVAE, path: str | Path, n: int = 64, seed: int = 0) -> None:
    """A grid of n new images E[x|z], z ~ N(0, I), reproducible by seed."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    save_grid(model.sample(n, generator=generator), path)


@torch.no_grad()
def reconstruction_grid(model: ConvVAE, images: torch.Tensor, path: str | Path) -> None:
    """Inputs (float in [0, 1]) on the upper row(s), their reconstructions right below."""
    nrow = min(len(images), 16)
    rows = []
    recon = model.reconstruct(images)
    for start in range(0, len(images), nrow):
        for part in (images, recon):
            row = part[start : start + nrow]
            blank = row.new_zeros(nrow - len(row), *row.shape[1:])  # keep columns aligned
            rows.append(torch.cat([row, blank]))
    save_grid(torch.cat(rows), path, nrow=nrow)
