"""A model's pictures as image tensors: sample grids and reconstruction grids (inputs above
outputs), for PNG files and for TensorBoard alike."""

from __future__ import annotations

import math

import torch
from PIL import Image, ImageDraw, ImageFont

from raytrain_vae.config import Config
from raytrain_vae.models import VAE


def grid(images: torch.Tensor, nrow: int | None = None) -> torch.Tensor:
    """(N, C, H, W) images in [0, 1] as one (3, H', W') grid on the CPU, nrow images per row."""
    from torchvision.utils import make_grid  # here: torchvision slows start-up

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


MIN_WIDTH = 512  # px: a grid of 28x28 images is upscaled (without smoothing) to at least this
TITLE_PX, LABEL_PX = 16, 14  # font sizes
TITLE_BAND = TITLE_PX + 16  # px above the grid


def titled(
    picture: torch.Tensor, title: str, row_labels: list[str] | None = None, rows: int = 1
) -> Image.Image:
    """A grid (3, H, W) in [0, 1] as a picture for people: upscaled by a whole factor to at
    least MIN_WIDTH px (nearest neighbour: pixels stay sharp), a title band above, and, given
    row_labels, each of its `rows` rows labelled on the left (cycling through the labels)."""
    array = (picture.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    grid_image = Image.fromarray(array)
    scale = max(1, math.ceil(MIN_WIDTH / grid_image.width))
    grid_image = grid_image.resize(
        (grid_image.width * scale, grid_image.height * scale), Image.Resampling.NEAREST
    )
    title_font, label_font = font(TITLE_PX), font(LABEL_PX)
    left = 0
    if row_labels:
        left = 12 + max(int(label_font.getlength(label)) for label in row_labels)
    top = TITLE_BAND
    canvas = Image.new("RGB", (left + grid_image.width, top + grid_image.height), "white")
    canvas.paste(grid_image, (left, top))
    draw = ImageDraw.Draw(canvas)
    draw.text((6, 7), title, fill="black", font=title_font)
    row_height = grid_image.height / rows
    for row in range(rows if row_labels else 0):
        y = top + (row + 0.5) * row_height
        draw.text(
            (4, y), row_labels[row % len(row_labels)], fill="black", font=label_font, anchor="lm"
        )
    return canvas


def picture_title(cfg: Config, metrics: dict, what: str) -> str:
    """'quickstart: samples · val -ELBO 268.35 nats/image, 0.4938 bits/dim (epoch 3)'."""
    title = f"{cfg.run.name}: {what}"
    if isinstance(metrics.get("val_neg_elbo"), int | float):
        title += f" · val -ELBO {metrics['val_neg_elbo']:.2f} nats/image"
        if isinstance(metrics.get("val_bits_per_dim"), int | float):
            title += f", {metrics['val_bits_per_dim']:.4f} bits/dim"
        if "epoch" in metrics:
            title += f" (epoch {metrics['epoch']})"
    return title


def input_label(cfg: Config) -> str:
    """What the input row shows: test images as the model sees them (binarized or not)."""
    return "input (binarized)" if cfg.data.binarize != "none" else "input"


def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's own font at this size (no system font needed); its bitmap font without FreeType."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1, or no FreeType
        return ImageFont.load_default()
