"""Model families, chosen by model.type; each is one module with the same VAE interface.

A model takes (ModelSection, image_shape (C, H, W)) and offers: forward(x, samples) -> Pass
(bottom_up(x) once, then top_down(up, samples, noise)); mean_pass(x) -> MeanPass; encode(x) ->
the top level's (mu, logvar); decode(z) from a top z; generate(noise, temperature) and sample(n,
temperature) for new images, and top_z(noise, temperature) for the top z they start from;
reconstruct(x); mean_image(out); latent_dim, noise_size, top_groups, level_names, likelihood,
image_shape and num_pixels.
"""

from __future__ import annotations

from torch import nn

from raytrain_vae.config import ModelSection
from raytrain_vae.models.base import MeanPass, Pass
from raytrain_vae.models.conv import ConvVAE
from raytrain_vae.models.hierarchical import HierarchicalVAE

MODEL_FAMILIES: dict[str, type[nn.Module]] = {"conv": ConvVAE, "hierarchical": HierarchicalVAE}


def build_model(cfg: ModelSection, image_shape: tuple[int, int, int]) -> VAE:
    """A new, untrained model of the family model.type names, for images of image_shape."""
    return MODEL_FAMILIES[cfg.type](cfg, image_shape)


# The type every family offers (the interface above): every family extends the conv one.
VAE = ConvVAE
__all__ = ["MODEL_FAMILIES", "VAE", "ConvVAE", "HierarchicalVAE", "MeanPass", "Pass", "build_model"]
