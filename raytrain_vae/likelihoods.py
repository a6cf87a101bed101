"""p(x|z) families: each one class with its log-likelihood in nats, mean image and samples."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.special import log_ndtr

LOG_2PI = math.log(2 * math.pi)
LEVELS = 255  # 8-bit data arrive as k / 255, k = 0..255
# Smallest value 1 - exp(-w) may take before its log: it only bites when a bin is ~1e-12 of the
# distribution's width (a scale ~1e9 times the bin), where the exact value underflows to log(0).
FLOOR = 1e-12


def _log1mexp(w: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(-w)) for w >= 0, floored at log(FLOOR) so w == 0 gives no -inf or NaN grad."""
    return torch.log((-torch.expm1(-w)).clamp(min=FLOOR))


def _edges(x01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks of the bottom (k = 0) and top (k = 255) levels; their bins take the tails."""
    return x01 < 0.5 / LEVELS, x01 > (LEVELS - 0.5) / LEVELS


def _to_level(x01: torch.Tensor) -> torch.Tensor:
    """The nearest of the 256 levels k / 255 to values in (or beyond) [0, 1]."""
    return (x01 * LEVELS).round().clamp(0, LEVELS) / LEVELS


def _logistic_noise(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard logistic draws; u stays inside (0, 1) so log u and log(1 - u) are finite."""
    u = torch.rand(like.shape, generator=generator, device=like.device, dtype=like.dtype)
    u = u * (1 - 2e-5) + 1e-5
    return torch.log(u) - torch.log1p(-u)


def _logistic_bin_logprob(
    x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor
) -> torch.Tensor:
    """log P(level) for levels x in [-1, 1] (bins 2/255 wide) under logistic(mean, e^log_scale).

    sigmoid(u) - sigmoid(l) = sigmoid(u) sigmoid(-l) (1 - e^(l - u)) exactly, and each factor is
    exact in log space in either tail, so unlike PixelCNN++'s difference of CDFs this needs no
    switch to the density at the bin centre when the difference would round to zero."""
    inv_scale = torch.exp(-log_scale)
    centred, half_bin = (x - mean) * inv_scale, inv_scale / LEVELS
    log_cdf_upper = F.logsigmoid(centred + half_bin)
    log_sf_lower = F.logsigmoid(half_bin - centred)  # log(1 - sigmoid(lower))
    bottom, top = _edges((x + 1) / 2)
    inner = log_cdf_upper + log_sf_lower + _log1mexp(2 * half_bin)
    return torch.where(bottom, log_cdf_upper, torch.where(top, log_sf_lower, inner))


class Likelihood:
    """What a decoder's output means. A model holds one; the parameters it adds (if any) are
    registered on the model itself, so weight files keep their names."""

    name: ClassVar[str]
    bits_per_dim_meaning: ClassVar[str]

    def decoder_channels(self, image_channels: int) -> int:
        """Channels the decoder outputs for images with `image_channels` channels."""
        return image_channels

    def new_parameters(self) -> dict[str, nn.Parameter]:
        """Learned parameters of the likelihood, by the attribute name they take on the model."""
        return {}

    def nll(self, out: torch.Tensor, x: torch.Tensor, owner: nn.Module) -> torch.Tensor:
        """-log p(x | decoder output) in nats, shaped (B, ...) so that its sum over everything
        but dim 0 is each image's NLL; `owner` holds new_parameters()."""
        raise NotImplementedError

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        """The expected image E[x|z] in [0, 1]."""
        raise NotImplementedError

    def sample(
        self, out: torch.Tensor, owner: nn.Module, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """One image x ~ p(x|z) per output, in [0, 1]."""
        raise NotImplementedError

    def bits_per_dim(self, nats_per_image: float, num_dims: int) -> float:
        """NLL in nats per image -> bits per dimension; bits_per_dim_meaning says what a dim is."""
        return nats_per_image / (num_dims * math.log(2))


class Bernoulli(Likelihood):
    """Binary pixels; the decoder outputs logits (the loss is BCE with logits)."""

    name = "bernoulli"
    bits_per_dim_meaning = (
        "bits per binary pixel of binarised data: not comparable with 8-bit figures"
    )

    def nll(self, out: torch.Tensor, x: torch.Tensor, owner: nn.Module) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(out, x, reduction="none")

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(out)

    def sample(
        self, out: torch.Tensor, owner: nn.Module, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        return torch.bernoulli(torch.sigmoid(out), generator=generator)


EIGHT_BIT_MEANING = "bits per 8-bit sub-pixel, comparable with the literature's 8-bit figures"


class Gaussian(Likelihood):
    """A Gaussian N(mean, sigma^2) discretised over the 256 levels: level k gets the mass of
    [(k - 0.5)/255, (k + 0.5)/255], with k = 0 and k = 255 taking the tails. The decoder outputs
    the means on the [0, 1] scale; one learned log-sigma (same scale) is shared by all pixels.
    In float32 a bin much narrower than sigma keeps ~eps/width of relative precision: about
    2e-5 nats a pixel at sigma = 1, under 1e-4 bits/dim."""

    name = "gaussian"
    bits_per_dim_meaning = EIGHT_BIT_MEANING

    def new_parameters(self) -> dict[str, nn.Parameter]:
        return {"log_sigma": nn.Parameter(torch.zeros(()))}

    def nll(self, out: torch.Tensor, x: torch.Tensor, owner: nn.Module) -> torch.Tensor:
        inv_sigma = torch.exp(-owner.log_sigma)
        upper = (x - out + 0.5 / LEVELS) * inv_sigma
        lower = (x - out - 0.5 / LEVELS) * inv_sigma
        # Phi(upper) - Phi(lower) loses every digit when both are near 1; above the mean take the
        # same mass as Phi(-lower) - Phi(-upper), so log_ndtr always works in the accurate tail.
        right = upper + lower > 0
        hi, lo = torch.where(right, -lower, upper), torch.where(right, -upper, lower)
        log_hi = log_ndtr(hi)
        inner = log_hi + _log1mexp(log_hi - log_ndtr(lo))
        bottom, top = _edges(x)
        return -torch.where(bottom, log_ndtr(upper), torch.where(top, log_ndtr(-lower), inner))

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return out.clamp(0, 1)

    def sample(
        self, out: torch.Tensor, owner: nn.Module, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        noise = torch.randn(out.shape, generator=generator, device=out.device, dtype=out.dtype)
        return _to_level(out + noise * owner.log_sigma.exp())


class DiscretizedLogistic(Likelihood):
    """Each sub-pixel a logistic discretised over the 256 levels (edge levels take the tails).

    As in PixelCNN++ the data are rescaled to [-1, 1] (bins 2/255 wide): the decoder's first C
    channels are the means on that scale, the next C the log-scales, clamped below at -7."""

    name = "discretized_logistic"
    bits_per_dim_meaning = EIGHT_BIT_MEANING

    def decoder_channels(self, image_channels: int) -> int:
        return 2 * image_channels

    @staticmethod
    def _split(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        means, log_scales = out.chunk(2, dim=1)
        return means, log_scales.clamp(min=-7.0)

    def nll(self, out: torch.Tensor, x: torch.Tensor, owner: nn.Module) -> torch.Tensor:
        means, log_scales = self._split(out)
        return -_logistic_bin_logprob(2 * x - 1, means, log_scales)

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        # The underlying logistic's mean, clamped: the discretised mean differs from it only
        # where the edge levels take much of the tails.
        return ((self._split(out)[0] + 1) / 2).clamp(0, 1)

    def sample(
        self, out: torch.Tensor, owner: nn.Module, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        means, log_scales = self._split(out)
        draw = means + log_scales.exp() * _logistic_noise(means, generator)
        return _to_level((draw + 1) / 2)


class DiscretizedLogisticMixture(Likelihood):
    """PixelCNN++'s mixture of K discretised logistics, on the same [-1, 1] scale.

    Decoder channels, in order: K mixture logits (shared by a pixel's channels), C*K means and
    C*K log-scales (channel-major: channel c's K values together) and, for C = 3 only, 3*K
    coefficients (tanh) that make the mixture autoregressive over channels within a component:
    mean_g += a * x_r and mean_b += b * x_r + c * x_g. So C = 1 needs 3K channels, C = 3 10K;
    other C have independent channels and need K(1 + 2C)."""

    name = "discretized_logistic_mixture"
    bits_per_dim_meaning = EIGHT_BIT_MEANING

    def __init__(self, components: int = 5) -> None:
        if components < 1:
            raise ValueError(f"a mixture needs at least one component (got {components})")
        self.components = components

    def decoder_channels(self, image_channels: int) -> int:
        k = self.components
        return k * (1 + 2 * image_channels) + (3 * k if image_channels == 3 else 0)

    def _split(self, out: torch.Tensor):
        """(logits (B, K, H, W), means, log-scales, coefficients or None (B, C|3, K, H, W))."""
        k, per_component = self.components, out.shape[1] // self.components
        c = 3 if per_component == 10 else (per_component - 1) // 2  # 1 + 2C is never 10
        logits, means, log_scales, coeffs = out.split(
            [k, c * k, c * k, (per_component - 1 - 2 * c) * k], 1
        )
        coeffs = torch.tanh(coeffs.unflatten(1, (3, k))) if c == 3 else None
        log_scales = log_scales.unflatten(1, (c, k)).clamp(min=-7.0)
        return logits, means.unflatten(1, (c, k)), log_scales, coeffs

    @staticmethod
    def _condition(
        means: torch.Tensor, coeffs: torch.Tensor | None, x: torch.Tensor
    ) -> torch.Tensor:
        """Means shifted by earlier channels' values x (B, C, 1|K, H, W), on the [-1, 1] scale."""
        if coeffs is None:
            return means
        r, g, b = means.unbind(1)
        g = g + coeffs[:, 0] * x[:, 0]
        b = b + coeffs[:, 1] * x[:, 0] + coeffs[:, 2] * x[:, 1]
        return torch.stack(torch.broadcast_tensors(r, g, b), dim=1)

    def nll(self, out: torch.Tensor, x: torch.Tensor, owner: nn.Module) -> torch.Tensor:
        logits, means, log_scales, coeffs = self._split(out)
        x = (2 * x - 1).unsqueeze(2)  # (B, C, 1, H, W), broadcast over the components
        # Channel dependence uses the true values of the earlier channels (teacher forcing).
        log_p = _logistic_bin_logprob(x, self._condition(means, coeffs, x), log_scales)
        log_joint = log_p.sum(dim=1) + F.log_softmax(logits, dim=1)  # (B, K, H, W)
        return -torch.logsumexp(log_joint, dim=1).flatten(1)  # per pixel: (B, H*W)

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        logits, means, _, coeffs = self._split(out)
        # Within a component E[x_g] = mu_g + a E[x_r] (linear), so condition on expected values;
        # channel 0's is final at once and each pass makes one more channel's final.
        expected = means
        for _ in range(means.shape[1] - 1 if coeffs is not None else 0):
            expected = self._condition(means, coeffs, expected)
        mixed = (F.softmax(logits, dim=1).unsqueeze(1) * expected).sum(dim=2)
        return ((mixed + 1) / 2).clamp(0, 1)

    def sample(
        self, out: torch.Tensor, owner: nn.Module, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        logits, means, log_scales, coeffs = self._split(out)
        # Gumbel-max picks one component per pixel with probabilities softmax(logits).
        u = torch.rand(logits.shape, generator=generator, device=out.device, dtype=out.dtype)
        pick = (logits - torch.log(-torch.log(u.clamp(1e-10, 1 - 1e-7)))).argmax(1, keepdim=True)
        index = pick.unsqueeze(1).expand(-1, means.shape[1], -1, -1, -1)
        means, log_scales = means.gather(2, index), log_scales.gather(2, index)
        coeffs = None if coeffs is None else coeffs.gather(2, index[:, :3])
        spread = log_scales.exp() * _logistic_noise(means, generator)
        # Later channels' means use the sampled levels of earlier ones. With the noise fixed,
        # each pass makes one more channel final, so C passes give the exact sequential draw.
        x = torch.zeros_like(means)
        for _ in range(means.shape[1] if coeffs is not None else 1):
            x = 2 * _to_level((self._condition(means, coeffs, x) + spread + 1) / 2) - 1
        return ((x + 1) / 2).squeeze(2)


LIKELIHOODS: dict[str, type[Likelihood]] = {
    cls.name: cls for cls in (Bernoulli, Gaussian, DiscretizedLogistic, DiscretizedLogisticMixture)
}


def likelihood_for(name: str, components: int = 5) -> Likelihood:
    """The likelihood that model.likelihood names; `components` is the mixture's K."""
    cls = LIKELIHOODS[name]
    return cls(components) if cls is DiscretizedLogisticMixture else cls()
