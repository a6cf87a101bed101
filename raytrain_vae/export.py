"""A self-contained model directory from a checkpoint: weights, config, metrics, pictures, card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from raytrain_vae.config import Config
from raytrain_vae.data import split_images, to_model_input
from raytrain_vae.images import reconstruction_grid, sample_grid
from raytrain_vae.likelihoods import likelihood_for
from raytrain_vae.model_io import METRICS_FILE, load_model_dir, save_model_dir
from raytrain_vae.models import VAE
from raytrain_vae.outputs import check_output_dir, staged_dir
from raytrain_vae.pictures import input_label, picture_title

SAMPLES_PNG = "samples.png"
RECONSTRUCTIONS_PNG = "reconstructions.png"
CARD_FILE = "README.md"
EXPORT_KIND = "export"


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> VAE:
    """The exported model in eval mode (safetensors weights, config.yaml architecture)."""
    model, _ = load_model_dir(directory, device)
    return model


def _data_spec(cfg: Config, shape: tuple[int, int, int]) -> str:
    """The images the model takes, as training shaped them (batch jobs shape inputs alike)."""
    d = cfg.data
    c, h, w = shape
    steps = [f"{c}x{h}x{w} ({'grey' if c == 1 else 'RGB'})"]
    if d.crop:
        steps.append(f"centre crop {d.crop[1]}x{d.crop[0]}")
    if d.image_size:
        steps.append(f"resized to {d.image_size[1]}x{d.image_size[0]}")
    return f"Images: {', '.join(steps)}, from {d.path or d.source} ({d.binarize} binarization)."


def _model_card(cfg: Config, metrics: dict[str, Any], shape: tuple[int, int, int]) -> str:
    m = cfg.model
    family = "HierarchicalVAE" if m.type == "hierarchical" else "ConvVAE"
    levels = "".join(f", level {lv.channels}x{lv.size}x{lv.size}" for lv in m.levels)
    if m.prior_components:
        levels += f", a learned {m.prior_components}-Gaussian mixture as the top z's prior"
    lines = [
        f"# {family} exported by raytrain_vae",
        "",
        _data_spec(cfg, shape),
        f"Likelihood {m.likelihood} (bits/dim: "
        f"{likelihood_for(m.likelihood, m.mixture_components).bits_per_dim_meaning}); "
        f"latent_dim {m.latent_dim}, channels {m.channels}, kernel {m.kernel_size}, hidden "
        f"{m.hidden_dim}{levels}.",
        f"Trained {metrics.get('epoch', '?')} epochs, batch {cfg.train.batch_size}, "
        f"lr {cfg.train.lr:g}, beta {cfg.train.beta:g}.",
        "",
        "| metric (nats per image, beta = 1) | value |",
        "|---|---|",
    ]
    for key in ("val_neg_elbo", "val_recon", "val_kl", "val_bits_per_dim"):
        if key in metrics:
            lines.append(f"| {key} | {metrics[key]:.4f} |")
    lines += [
        "",
        "Files: `model.safetensors` (weights), `config.yaml` (the resolved training config), "
        "`metrics.json`, `samples.png`, `reconstructions.png` (test images above their "
        "reconstructions).",
        "",
        "```python",
        "import raytrain_vae",
        "model = raytrain_vae.load_model('.')  # no pickle is loaded",
        f"images = model.sample(16)        # (16, {shape[0]}, {shape[1]}, {shape[2]}) in [0, 1]",
        "```",
        "",
    ]
    return "\n".join(lines)


def export_model(
    checkpoint_dir: str | Path, export_dir: str | Path, extra_metrics: dict | None = None
) -> Path:
    """Write a model directory from a training checkpoint, replacing export_dir atomically.

    Everything is written into a temporary sibling first; export_dir is replaced only if it is
    absent, empty or a previous export, and only once the new one is complete."""
    export_dir = check_output_dir(export_dir, "export.dir", EXPORT_KIND)
    model, cfg = load_model_dir(checkpoint_dir)
    metrics = json.loads((Path(checkpoint_dir) / METRICS_FILE).read_text())
    metrics.update(extra_metrics or {})
    with staged_dir(export_dir, "export.dir", EXPORT_KIND) as tmp:
        save_model_dir(model, cfg, tmp, metrics)
        title = picture_title(cfg, metrics, "samples")
        sample_grid(model, tmp / SAMPLES_PNG, n=cfg.export.num_samples, title=title)
        test, _ = split_images(cfg.data, "test", cfg.export.num_reconstructions)
        title = picture_title(cfg, metrics, "test reconstructions")
        inputs = to_model_input(test, False)
        reconstruction_grid(model, inputs, tmp / RECONSTRUCTIONS_PNG, title, input_label(cfg))
        (tmp / CARD_FILE).write_text(_model_card(cfg, metrics, model.image_shape))
    return export_dir
