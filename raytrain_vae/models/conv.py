"""The conv model family (model.type: conv): a stride-2 conv encoder and a mirrored decoder."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from raytrain_vae.config import ConfigError, ModelSection
from raytrain_vae.likelihoods import likelihood_for
from raytrain_vae.models.base import (
    MeanPass,
    Pass,
    log_normal,
    standard_normal_kl,
    temperatures,
)
from raytrain_vae.models.priors import MixturePrior
from raytrain_vae.perf.elu import ELU

ACTIVATIONS = {"relu": nn.ReLU, "elu": ELU, "silu": nn.SiLU}


def too_small_message(cfg: ModelSection, image_shape: tuple[int, int, int]) -> str:
    """Which image sizes the stride-2 stack takes, for an image it shrinks to nothing."""
    layers, k = len(cfg.channels), cfg.kernel_size
    smallest = 1
    while True:  # the smallest side that survives every layer (output sizes are monotone)
        side = smallest
        for _ in range(layers):
            side = (side + 2 * ((k - 1) // 2) - k) // 2 + 1
        if side >= 1:
            break
        smallest += 1
    fits = max(0, min(image_shape[1:]).bit_length() - 1)
    return (
        f"model.channels: {layers} stride-2 layers (kernel {k}) shrink a {image_shape[1]}x"
        f"{image_shape[2]} image to nothing; they take sides of {smallest} or more (sides "
        f"divisible by {2**layers} come back exactly, e.g. {2**layers}x{2**layers}); use at "
        f"most {fits} layers, or set data.image_size"
    )


class ResidualBlock(nn.Module):
    """x + conv1x1(act(conv3x3(act(x)))): more depth at one resolution, same shape out."""

    def __init__(self, channels: int, activation: type[nn.Module]) -> None:
        super().__init__()
        self.body = nn.Sequential(
            activation(),
            nn.Conv2d(channels, channels, 3, padding=1),
            activation(),
            nn.Conv2d(channels, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ConvVAE(nn.Module):
    """Stride-2 conv encoder -> dense -> (mu, logvar); mirrored transposed-conv decoder.

    The decoder returns the parameters of p(x|z) that model.likelihood names
    (raytrain_vae.likelihoods).
    """

    def __init__(self, cfg: ModelSection, image_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.cfg = cfg
        self.image_shape = tuple(image_shape)
        self.likelihood = likelihood_for(cfg.likelihood, cfg.mixture_components)
        c_in, h, w = self.image_shape
        k, pad = cfg.kernel_size, (cfg.kernel_size - 1) // 2
        act = ACTIVATIONS[cfg.activation]

        # Spatial size after each stride-2 conv, recorded so the decoder can return exactly to it.
        self._sizes = [(h, w)]
        for _ in cfg.channels:
            h, w = (h + 2 * pad - k) // 2 + 1, (w + 2 * pad - k) // 2 + 1
            if h < 1 or w < 1:
                raise ConfigError(too_small_message(cfg, self.image_shape))
            self._sizes.append((h, w))
        self._feature_shape = (cfg.channels[-1], h, w)
        flat = cfg.channels[-1] * h * w

        enc: list[nn.Module] = []
        prev = c_in
        for c in cfg.channels:
            enc += [nn.Conv2d(prev, c, k, stride=2, padding=pad), act()]
            enc += [ResidualBlock(c, act) for _ in range(cfg.residual_blocks)]
            prev = c
        enc.append(nn.Flatten())
        if cfg.hidden_dim:
            enc += [nn.Linear(flat, cfg.hidden_dim), act()]
        enc.append(nn.Linear(cfg.hidden_dim or flat, 2 * cfg.latent_dim))
        self.encoder = nn.Sequential(*enc)

        dense: list[nn.Module] = []
        if cfg.hidden_dim:
            dense += [nn.Linear(cfg.latent_dim, cfg.hidden_dim), act()]
        dense += [nn.Linear(cfg.hidden_dim or cfg.latent_dim, flat), act()]
        self.decoder_dense = nn.Sequential(*dense)
        # Stage i works at the resolution of encoder layer n-1-i, then upsamples by 2.
        ins = list(reversed(cfg.channels))
        pixels_out = self.likelihood.decoder_channels(c_in)
        outs = [*reversed(cfg.channels[:-1]), cfg.decoder_head_channels or pixels_out]
        self.decoder_blocks = nn.ModuleList(
            nn.Sequential(*(ResidualBlock(c, act) for _ in range(cfg.residual_blocks))) for c in ins
        )
        self.decoder_convs = nn.ModuleList(
            nn.ConvTranspose2d(i, o, k, stride=2, padding=pad)
            for i, o in zip(ins, outs, strict=True)
        )
        self.act = act()
        self.decoder_head = (
            nn.Conv2d(cfg.decoder_head_channels, pixels_out, 3, padding=1)
            if cfg.decoder_head_channels
            else None
        )
        for name, parameter in self.likelihood.new_parameters().items():
            self.register_parameter(name, parameter)
        self.top_prior = (
            MixturePrior(cfg.prior_components, cfg.latent_dim) if cfg.prior_components else None
        )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W) in [0, 1] -> mean and log-variance of q(z|x), each (B, latent_dim)."""
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar

    @staticmethod
    def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, samples: int = 1) -> torch.Tensor:
        """z = mu + sigma * eps, differentiable in mu and logvar: (samples, B, latent_dim)."""
        eps = torch.randn(samples, *mu.shape, dtype=mu.dtype, device=mu.device)
        return mu + eps * torch.exp(0.5 * logvar)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, latent_dim) -> parameters of p(x|z), (B, C, H, W): logits or Gaussian means."""
        return self.decode_through(z, None)

    def decode_through(
        self, z: torch.Tensor, at_stage: Callable[[int, torch.Tensor], torch.Tensor] | None
    ) -> torch.Tensor:
        """The decoder from the top z, with at_stage(i, h) (if given) applied to the features
        of stage i, at that stage's resolution, before its blocks and upsampling."""
        h = self.decoder_dense(z).view(-1, *self._feature_shape)
        sizes = list(reversed(self._sizes[:-1]))
        last = len(self.decoder_convs) - 1
        for i, (blocks, conv, size) in enumerate(
            zip(self.decoder_blocks, self.decoder_convs, sizes, strict=True)
        ):
            if at_stage is not None:
                h = at_stage(i, h)
            h = conv(blocks(h), output_size=size)
            if i < last or self.decoder_head is not None:
                h = self.act(h)
        if self.decoder_head is not None:
            h = self.decoder_head(h)
        return h

    # --- the interface every family offers (raytrain_vae.models) ---------------------------

    level_names: tuple[str, ...] = ("top",)

    @property
    def latent_dim(self) -> int:
        """Size of the top level's z: what encode returns and decode takes."""
        return self.cfg.latent_dim

    @property
    def noise_size(self) -> int:
        """Standard normal numbers one image's latents are drawn from, all levels (with a
        mixture prior, the last one picks the top z's component when sampling)."""
        return self.cfg.latent_dim + self.prior_picks

    @property
    def prior_picks(self) -> int:
        """1 where the top prior is a mixture (a number to pick its component), else 0."""
        return 0 if self.top_prior is None else 1

    @property
    def top_groups(self) -> int:
        """The top level's KL groups: one per dimension, or one in all under a mixture prior
        (whose KL does not split by dimension)."""
        return self.cfg.latent_dim if self.top_prior is None else 1

    def bottom_up(self, x: torch.Tensor) -> tuple:
        """What the inference path computes from x once, however many z are drawn from it."""
        return self.encode(x)

    def top_down(self, up: tuple, samples: int = 1, noise: torch.Tensor | None = None) -> Pass:
        """`samples` draws of z from q(z|x) (noise: their standard normal numbers, (samples, B,
        noise_size); None = fresh), decoded, with their KL and log densities."""
        mu, logvar = up
        z = self.draw_top(mu, logvar, samples, noise)
        kl_groups, log_prior, log_posterior = self.top_terms(z, mu, logvar)
        out = self.decode(z.flatten(0, 1))
        return Pass(out, kl_groups.sum(dim=-1), kl_groups, log_prior, log_posterior)

    def draw_top(
        self, mu: torch.Tensor, logvar: torch.Tensor, samples: int, noise: torch.Tensor | None
    ) -> torch.Tensor:
        """z of the top level, (samples, B, latent_dim), from fresh noise or the given numbers."""
        if noise is None:
            return self.reparameterize(mu, logvar, samples)
        noise = noise[..., : mu.shape[-1]]  # a mixture's pick is for sampling only
        return mu + noise.reshape(samples, *mu.shape).to(mu) * torch.exp(0.5 * logvar)

    def top_terms(
        self, z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The top level's KL per group (S, B, top_groups), log p(z) and log q(z|x) (S, B)."""
        z, mu, logvar = z.float(), mu.float(), logvar.float()
        log_q = log_normal(z, mu, logvar)
        if self.top_prior is not None:
            log_p = self.top_prior.log_prob(z)
            return (log_q - log_p).unsqueeze(-1), log_p, log_q
        kl_groups = standard_normal_kl(mu, logvar).expand(len(z), *mu.shape)
        zero = torch.zeros_like(mu)
        return kl_groups, log_normal(z, zero, zero), log_q

    def top_z(self, noise: torch.Tensor, temperature: float) -> torch.Tensor:
        """The top z that generate draws from standard normal noise (B, noise_size): z =
        temperature * noise under N(0, I); under a mixture, a component picked by the noise's
        last number and z drawn within it at that temperature."""
        eps = noise[:, : self.cfg.latent_dim]
        if self.top_prior is None:
            return eps * temperature
        return self.top_prior.draw(eps, noise[:, -1], temperature)

    def forward(self, x: torch.Tensor, samples: int = 1) -> Pass:
        """Stochastic pass with `samples` draws of z per image (see Pass)."""
        return self.top_down(self.bottom_up(x), samples)

    def mean_pass(self, x: torch.Tensor, up: tuple | None = None) -> MeanPass:
        """Decode the posterior mean of each image (up: bottom_up(x), if already computed)."""
        mu = self.encode(x)[0] if up is None else up[0]
        return MeanPass(self.decode(mu), [mu], [mu])

    def generate(self, noise: torch.Tensor, temperature: float | list[float] = 1.0) -> torch.Tensor:
        """Decoder output for new images from standard normal noise (B, noise_size), through
        top_z."""
        (t,) = temperatures(temperature, 1)
        return self.decode(self.top_z(noise, t))

    def mean_image(self, out: torch.Tensor) -> torch.Tensor:
        """Decoder output -> expected image E[x|z] in [0, 1]."""
        return self.likelihood.mean(out)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        temperature: float | list[float] = 1.0,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """n new images E[x|z], one top-down pass with every level drawn from its prior at its
        temperature (one number, or one per level, top first): (n, C, H, W) in [0, 1]."""
        device = next(self.parameters()).device
        noise = torch.randn(n, self.noise_size, generator=generator, device=device)
        return self.mean_image(self.generate(noise, temperature))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstruction: every level at its posterior mean."""
        return self.mean_image(self.mean_pass(x).out)

    @property
    def num_pixels(self) -> int:
        return math.prod(self.image_shape)
