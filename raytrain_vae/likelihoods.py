"""p(x|z) families: each one class with its log-likelihood in nats, mean image and samples."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

LOG_2PI = math.log(2 * math.pi)


class Likelihood:
    """What a decoder's output means. A model holds one; the parameters it adds (if any) are
    registered on the model itself, so weight files keep their names."""

    name: ClassVar[str]

    def decoder_channels(self, image_channels: int) -> int:
        """Channels the decoder outputs for images with `image_channels` channels."""
        return image_channels

    def new_parameters(self) -> dict[str, nn.Parameter]:
        """Learned parameters of the likelihood, by the attribute name they take on the model."""
        return {}

    def nll(self, out: torch.Tensor, x: torch.Tensor, owner: nn.Module) -> torch.Tensor:
        """-log p(x | decoder output) per element, in nats; `owner` holds new_parameters()."""
        raise NotImplementedError

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        """The expected image E[x|z] in [0, 1]."""
        raise NotImplementedError

    def sample(
        self, out: torch.Tensor, owner: nn.Module, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """One image x ~ p(x|z) per output, in [0, 1]."""
        raise NotImplementedError


class Bernoulli(Likelihood):
    """Binary pixels; the decoder outputs logits (the loss is BCE with logits)."""

    name = "bernoulli"

    def nll(self, out: torch.Tensor, x: torch.Tensor, owner: nn.Module) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(out, x, reduction="none")

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(out)

    def sample(
        self, out: torch.Tensor, owner: nn.Module, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return torch.bernoulli(torch.sigmoid(out), generator=generator)


class Gaussian(Likelihood):
    """Grey levels as N(mean, sigma^2), with one learned log-sigma shared by every pixel."""

    name = "gaussian"

    def new_parameters(self) -> dict[str, nn.Parameter]:
        return {"log_sigma": nn.Parameter(torch.zeros(()))}

    def nll(self, out: torch.Tensor, x: torch.Tensor, owner: nn.Module) -> torch.Tensor:
        log_sigma = owner.log_sigma
        return 0.5 * ((x - out) * torch.exp(-log_sigma)).pow(2) + log_sigma + 0.5 * LOG_2PI

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return out.clamp(0, 1)

    def sample(
        self, out: torch.Tensor, owner: nn.Module, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        noise = torch.randn(out.shape, generator=generator, device=out.device, dtype=out.dtype)
        return (out + noise * owner.log_sigma.exp()).clamp(0, 1)


LIKELIHOODS: dict[str, type[Likelihood]] = {cls.name: cls for cls in (Bernoulli, Gaussian)}


def likelihood_for(name: str) -> Likelihood:
    """The likelihood that model.likelihood names."""
    return LIKELIHOODS[name]()
