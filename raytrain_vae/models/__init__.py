"""Model families, chosen by model.type; each is one module with the same VAE interface.

A model takes (ModelSection, image_shape (C, H, W)) and offers: encode(x) -> (mu, logvar),
reparameterize(mu, logvar, samples), decode(z), forward(x, samples) -> (decoder output, mu,
logvar, z), mean_image(out), sample(n), reconstruct(x), likelihood, image_shape and num_pixels.
"""

from __future__ import annotations

from torch import nn

from raytrain_vae.config import ModelSection
from raytrain_vae.models.conv import ConvVAE

MODEL_FAMILIES: dict[str, type[nn.Module]] = {"conv": ConvVAE}


def build_model(cfg: ModelSection, image_shape: tuple[int, int, int]) -> VAE:
    """A new, untrained model of the family model.type names, for images of image_shape."""
    return MODEL_FAMILIES[cfg.type](cfg, image_shape)


# The type every family offers (the interface above); a Protocol once there are two families.
VAE = ConvVAE
