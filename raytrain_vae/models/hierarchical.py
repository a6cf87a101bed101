"""The hierarchical family (model.type: hierarchical): the conv VAE's dense top z, and below it
spatial latents in the decoder's path (model.levels), inferred from a shared bottom-up path."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from raytrain_vae.config import ConfigError, ModelSection
from raytrain_vae.models.base import MeanPass, Pass, gaussian_kl, log_normal, temperatures
from raytrain_vae.models.conv import ACTIVATIONS, ConvVAE, ResidualBlock


class Level(nn.Module):
    """One stochastic layer at one resolution of the top-down path (`width` feature maps).

    Prior p(z | h) from the top-down features h; posterior q(z | h, x) as a correction of it
    (means and log-variances shifted by a conv of h and the bottom-up features at the same
    resolution), as in the Ladder VAE / NVAE / VDVAE. A drawn z is added back into h through a
    1x1 conv, then a residual block mixes it in."""

    def __init__(self, width: int, channels: int, activation: type[nn.Module]) -> None:
        super().__init__()
        # A hidden 3x3 layer in each, as in VDVAE's blocks: measured better than a single conv
        # (docs/hierarchical.md).
        self.prior = gaussian_head(width, width, channels, activation)
        self.correction = gaussian_head(2 * width, width, channels, activation)
        self.merge = nn.Conv2d(channels, width, 1)
        self.block = ResidualBlock(width, activation)
        # The posterior starts as the prior (KL 0), and the level's z is mixed in gently: a
        # new level neither drowns the top z's signal nor starts with a large KL.
        nn.init.zeros_(self.correction[-1].weight)
        nn.init.zeros_(self.correction[-1].bias)
        with torch.no_grad():
            self.merge.weight.mul_(0.1)

    def prior_params(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """p(z | h): mean and log-variance maps."""
        mu, logvar = self.prior(h).chunk(2, dim=1)
        return mu, logvar

    def correction_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The correction's first conv weight, split into its top-down and bottom-up shares
        (the order in which the two are concatenated)."""
        weight = self.correction[1].weight
        return weight.chunk(2, dim=1)

    def bottom_up_term(self, up: torch.Tensor) -> torch.Tensor:
        """The bottom-up features' share of the correction's first conv. It depends on x alone,
        so it is computed once per image however many z are drawn (the IWAE bound's cost)."""
        return F.conv2d(self.correction[0](up), self.correction_weights()[1], None, padding=1)

    def prior_and_posterior(self, h: torch.Tensor, up_term: torch.Tensor) -> tuple:
        """(mu_p, logvar_p, mu_q, logvar_q) from the top-down features h of `samples` draws,
        stacked (samples * B, ...), and the images' bottom_up_term (B, ...). The same maps as
        the correction's conv of the concatenated features, with h's activation shared by both
        nets and the bottom-up share broadcast over the draws."""
        a = self.prior[0](h)
        mu_p, logvar_p = self.prior[1:](a).chunk(2, dim=1)
        top_down_share = self.correction_weights()[0]
        hidden = F.conv2d(a, top_down_share, self.correction[1].bias, padding=1)
        hidden = (hidden.unflatten(0, (-1, len(up_term))) + up_term).flatten(0, 1)
        d_mu, d_logvar = self.correction[2:](hidden).chunk(2, dim=1)
        return mu_p, logvar_p, mu_p + d_mu, logvar_p + d_logvar

    def mix(self, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.block(h + self.merge(z))


def gaussian_head(
    in_channels: int, hidden: int, channels: int, activation: type[nn.Module]
) -> nn.Sequential:
    """Features -> (mean, log-variance) maps of `channels` latent channels, concatenated."""
    return nn.Sequential(
        activation(),
        nn.Conv2d(in_channels, hidden, 3, padding=1),
        activation(),
        nn.Conv2d(hidden, 2 * channels, 1),
    )


class HierarchicalVAE(ConvVAE):
    """A ConvVAE (the same encoder, dense top z with a N(0, I) prior, and decoder) whose decoder
    stages hold the stochastic layers of model.levels, top to bottom. With no levels it is the
    conv family's model, parameter for parameter."""

    def __init__(self, cfg: ModelSection, image_shape: tuple[int, int, int]) -> None:
        super().__init__(cfg, image_shape)
        act = ACTIVATIONS[cfg.activation]
        n = len(cfg.channels)
        stage_of = {self._sizes[n - i]: i for i in range(n)}  # decoder stage by its resolution
        self.level_stages: list[int] = []
        self.level_shapes: list[tuple[int, int, int]] = []
        for level in cfg.levels:
            size = next((hw for hw in stage_of if hw[0] == level.size), None)
            if size is None:
                sides = ", ".join(str(hw[0]) for hw in sorted(stage_of))
                raise ConfigError(
                    f"model.levels: no decoder stage of side {level.size} for a {image_shape[1]}x"
                    f"{image_shape[2]} image with model.channels {cfg.channels}; sides: {sides}"
                )
            self.level_stages.append(stage_of[size])
            self.level_shapes.append((level.channels, *size))
        if self.level_stages != sorted(self.level_stages):
            raise ConfigError("model.levels: list the levels top (smallest side) to bottom")
        widths = list(reversed(cfg.channels))
        self.levels = nn.ModuleList(
            Level(widths[stage], level.channels, act)
            for stage, level in zip(self.level_stages, cfg.levels, strict=True)
        )
        per_stage = 2 + cfg.residual_blocks  # conv, activation, residual blocks
        # Views of the encoder's stages (a tuple: not registered again as submodules).
        self._encoder_stages = tuple(
            self.encoder[i * per_stage : (i + 1) * per_stage] for i in range(n)
        )
        self._encoder_head_start = n * per_stage
        # Numbered: two levels may share a shape.
        self.level_names = (
            "top",
            *(f"l{i}_{c}x{h}x{w}" for i, (c, h, w) in enumerate(self.level_shapes, start=1)),
        )

    @property
    def noise_size(self) -> int:
        levels = sum(c * h * w for c, h, w in self.level_shapes)
        return self.cfg.latent_dim + levels + self.prior_picks

    def bottom_up(self, x: torch.Tensor) -> tuple:
        """(top mu, top logvar, the encoder's features at each resolution, finest first)."""
        features = []
        h = x
        for stage in self._encoder_stages:
            h = stage(h)
            features.append(h)
        mu, logvar = self.encoder[self._encoder_head_start :](h).chunk(2, dim=1)
        return mu, logvar, features

    def features_at(self, features: list[torch.Tensor], stage: int) -> torch.Tensor:
        """The bottom-up features at decoder stage `stage`'s resolution."""
        return features[len(features) - 1 - stage]

    def split_noise(self, noise: torch.Tensor) -> list[torch.Tensor]:
        """(N, noise_size) -> the top's (N, latent_dim), then each level's (N, C, H, W) (a
        mixture prior's pick, last, is left out)."""
        sizes = [self.cfg.latent_dim, *(c * h * w for c, h, w in self.level_shapes)]
        parts = noise[:, : sum(sizes)].split(sizes, dim=1)
        levels = zip(parts[1:], self.level_shapes, strict=True)
        return [parts[0], *(p.reshape(-1, *shape) for p, shape in levels)]

    def walk_levels(
        self, z_top: torch.Tensor, draw: Callable[[int, Level, torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """The decoder from z_top, with draw(level index, Level, h) -> z at each level."""

        def at_stage(stage: int, h: torch.Tensor) -> torch.Tensor:
            for i, (level_stage, level) in enumerate(
                zip(self.level_stages, self.levels, strict=True)
            ):
                if level_stage == stage:
                    h = level.mix(h, draw(i, level, h))
            return h

        return self.decode_through(z_top, at_stage)

    def top_down(self, up: tuple, samples: int = 1, noise: torch.Tensor | None = None) -> Pass:
        mu, logvar, features = up
        b = len(mu)
        parts = None if noise is None else self.split_noise(noise.reshape(samples * b, -1))
        z_top = self.draw_top(mu, logvar, samples, None if parts is None else parts[0])
        top_kl, top_log_p, top_log_q = self.top_terms(z_top, mu, logvar)
        kl_parts, log_p, log_q = [top_kl], [top_log_p], [top_log_q]

        def draw(i: int, level: Level, h: torch.Tensor) -> torch.Tensor:
            up_term = level.bottom_up_term(self.features_at(features, self.level_stages[i]))
            mu_p, logvar_p, mu_q, logvar_q = level.prior_and_posterior(h, up_term)
            # In float32 whatever the autocast: log q - log p sums thousands of dimensions.
            mu_q, logvar_q = mu_q.float(), logvar_q.float()
            eps = standard_normal_like(mu_q) if parts is None else parts[i + 1].to(mu_q)
            z = mu_q + eps * torch.exp(0.5 * logvar_q)
            kl, lp, lq = level_terms(z, mu_q, logvar_q, mu_p, logvar_p)
            kl_parts.append(kl.view(samples, b, -1))
            log_p.append(lp.view(samples, b))
            log_q.append(lq.view(samples, b))
            return z

        out = self.walk_levels(z_top.flatten(0, 1), draw)
        kl_groups = torch.cat(kl_parts, dim=2)
        return Pass(out, kl_groups.sum(dim=2), kl_groups, sum(log_p), sum(log_q))

    def mean_pass(self, x: torch.Tensor, up: tuple | None = None) -> MeanPass:
        """Every level at its posterior mean, given the means above it (up: bottom_up(x), if
        already computed)."""
        mu, _, features = self.bottom_up(x) if up is None else up
        means, shifts = [mu], [mu]

        def draw(i: int, level: Level, h: torch.Tensor) -> torch.Tensor:
            up_term = level.bottom_up_term(self.features_at(features, self.level_stages[i]))
            mu_p, _, mu_q, _ = level.prior_and_posterior(h, up_term)
            means.append(mu_q.flatten(1))
            shifts.append((mu_q - mu_p).flatten(1))
            return mu_q

        return MeanPass(self.walk_levels(mu, draw), means, shifts)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """From a top z, every lower level at its prior mean (temperature 0 below the top)."""
        return self.walk_levels(z, lambda _i, level, h: level.prior_params(h)[0])

    def generate(self, noise: torch.Tensor, temperature: float | list[float] = 1.0) -> torch.Tensor:
        """Decoder output from standard normal noise (B, noise_size): one top-down pass, each
        level drawn from its prior with its temperature (one, or one per level, top first)."""
        temps = temperatures(temperature, 1 + len(self.levels))
        parts = self.split_noise(noise)

        def draw(i: int, level: Level, h: torch.Tensor) -> torch.Tensor:
            mu_p, logvar_p = level.prior_params(h)
            return mu_p + temps[i + 1] * parts[i + 1].to(mu_p) * torch.exp(0.5 * logvar_p)

        return self.walk_levels(self.top_z(noise, temps[0]), draw)


def standard_normal_like(t: torch.Tensor) -> torch.Tensor:
    """torch.randn_like(t), in t's memory layout. For a channels-last t, drawn as (N, H, W, C)
    and viewed as (N, C, H, W): randn_like fills a channels-last tensor element by element,
    about 10x slower than a contiguous draw on CPU."""
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        n, c, h, w = t.shape
        return torch.randn(n, h, w, c, dtype=t.dtype, device=t.device).permute(0, 3, 1, 2)
    return torch.randn_like(t)


def level_terms(
    z: torch.Tensor,
    mu_q: torch.Tensor,
    logvar_q: torch.Tensor,
    mu_p: torch.Tensor,
    logvar_p: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A spatial level's KL per channel (N, C) in closed form, log p(z) and log q(z|x) (N,),
    in float32 whatever the autocast."""
    z, mu_q, logvar_q, mu_p, logvar_p = (t.float() for t in (z, mu_q, logvar_q, mu_p, logvar_p))
    kl = gaussian_kl(mu_q, logvar_q, mu_p, logvar_p).flatten(2).sum(dim=2)
    log_p = log_normal(z.flatten(1), mu_p.flatten(1), logvar_p.flatten(1))
    log_q = log_normal(z.flatten(1), mu_q.flatten(1), logvar_q.flatten(1))
    return kl, log_p, log_q
