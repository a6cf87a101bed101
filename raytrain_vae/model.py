"""ConvVAE: a convolutional encoder q(z|x) and decoder p(x|z) built from ModelConfig."""

from __future__ import annotations

import math
import os

import torch
from torch import nn

from raytrain_vae.config import Config, ConfigError, ModelConfig


class _ELUFromExp(torch.autograd.Function):
    """ELU (alpha 1) as max(x, exp(min(x, 0)) - 1), with the gradient taken from the output.

    The output is saved for backward, so it must not be modified in place (the model never
    does). Reverse mode only: no forward-mode autodiff or torch.func transforms."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        # exp(x) - 1 >= x for every x, so the max picks x above 0 and exp(x) - 1 below.
        y = x.clamp(max=0).exp_().sub_(1)
        y = torch.maximum(y, x, out=y)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        # d/dx = 1 above 0 and exp(x) = y + 1 below: no exp, and the input need not be kept.
        return torch.ops.aten.elu_backward(grad, 1.0, 1, 1.0, True, y)


class ELU(nn.ELU):
    """nn.ELU, faster on CPU in fp32/fp64: torch's CPU kernel calls a scalar expm1 per element
    and keeps the input for backward; exp is vectorised and the output gives the gradient.
    Through autograd, 1.4x an ELU's forward + backward and 1.04x a default training step
    (README, Performance)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # CUDA's ELU is one fused kernel already; in bf16 torch's kernel computes in fp32, while
        # exp() - 1 here would round twice.
        fast = x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
        if not fast or self.alpha != 1.0 or self.inplace:
            return super().forward(x)
        return _ELUFromExp.apply(x)


ACTIVATIONS = {"relu": nn.ReLU, "elu": ELU, "silu": nn.SiLU}


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

    The decoder returns the parameters of p(x|z): Bernoulli logits, or Gaussian means (with one
    learned log-sigma shared by all pixels).
    """

    def __init__(self, cfg: ModelConfig, image_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.cfg = cfg
        self.image_shape = tuple(image_shape)
        c_in, h, w = self.image_shape
        k, pad = cfg.kernel_size, (cfg.kernel_size - 1) // 2
        act = ACTIVATIONS[cfg.activation]

        # Spatial size after each stride-2 conv, recorded so the decoder can return exactly to it.
        self._sizes = [(h, w)]
        for _ in cfg.channels:
            h, w = (h + 2 * pad - k) // 2 + 1, (w + 2 * pad - k) // 2 + 1
            if h < 1 or w < 1:
                raise ConfigError(
                    f"model.channels: {len(cfg.channels)} stride-2 layers with kernel {k} shrink "
                    f"a {self.image_shape[1]}x{self.image_shape[2]} image to nothing"
                )
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
        outs = [*reversed(cfg.channels[:-1]), cfg.decoder_head_channels or c_in]
        self.decoder_blocks = nn.ModuleList(
            nn.Sequential(*(ResidualBlock(c, act) for _ in range(cfg.residual_blocks))) for c in ins
        )
        self.decoder_convs = nn.ModuleList(
            nn.ConvTranspose2d(i, o, k, stride=2, padding=pad)
            for i, o in zip(ins, outs, strict=True)
        )
        self.act = act()
        self.decoder_head = (
            nn.Conv2d(cfg.decoder_head_channels, c_in, 3, padding=1)
            if cfg.decoder_head_channels
            else None
        )
        if cfg.likelihood == "gaussian":
            self.log_sigma = nn.Parameter(torch.zeros(()))

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
        h = self.decoder_dense(z).view(-1, *self._feature_shape)
        sizes = list(reversed(self._sizes[:-1]))
        last = len(self.decoder_convs) - 1
        for i, (blocks, conv, size) in enumerate(
            zip(self.decoder_blocks, self.decoder_convs, sizes, strict=True)
        ):
            h = conv(blocks(h), output_size=size)
            if i < last or self.decoder_head is not None:
                h = self.act(h)
        if self.decoder_head is not None:
            h = self.decoder_head(h)
        return h

    def forward(
        self, x: torch.Tensor, samples: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stochastic pass with `samples` draws of z per image: (decoder output for every draw,
        (samples * B, C, H, W) sample-major; mu, logvar (B, latent_dim); z (samples, B, latent))."""
        mu, logvar = self.encode(x)
        z = self.reparameterize(mu, logvar, samples)
        return self.decode(z.flatten(0, 1)), mu, logvar, z

    def mean_image(self, out: torch.Tensor) -> torch.Tensor:
        """Decoder output -> expected image E[x|z] in [0, 1]."""
        if self.cfg.likelihood == "bernoulli":
            return torch.sigmoid(out)
        return out.clamp(0, 1)

    @torch.no_grad()
    def sample(
        self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """n new images E[x|z], z ~ N(0, temperature^2 I): (n, C, H, W) in [0, 1]."""
        device = next(self.parameters()).device
        z = torch.randn(n, self.cfg.latent_dim, generator=generator, device=device)
        return self.mean_image(self.decode(z * temperature))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstruction: decode the posterior mean of each image."""
        mu, _ = self.encode(x)
        return self.mean_image(self.decode(mu))

    @property
    def num_pixels(self) -> int:
        return math.prod(self.image_shape)


def training_memory_bytes(
    cfg: ModelConfig, image_shape: tuple[int, int, int], batch: int, samples: int = 1
) -> int:
    """Bytes one worker needs to train, roughly: every parameter four times in fp32 (weights,
    gradients, AdamW's two moments) plus each layer's output for a batch, kept for backward.
    Counted on the meta device, so nothing is allocated whatever the sizes."""
    outputs: list[int] = []
    with torch.device("meta"):
        model = ConvVAE(cfg, image_shape)
        for module in model.modules():
            if not list(module.children()):
                module.register_forward_hook(lambda _m, _i, out: outputs.append(out.numel()))
        model(torch.empty(batch, *image_shape), samples=samples)
    params = sum(p.numel() for p in model.parameters())
    return 4 * (4 * params + sum(outputs))


def machine_memory_bytes() -> int | None:
    """Physical memory of this machine, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_trainable(cfg: Config, image_shape: tuple[int, int, int]) -> None:
    """Refuse, before anything is allocated, a model that cannot be built for these images, or
    whose training needs more than 10x this machine's memory (workers elsewhere may be larger,
    but not by orders of magnitude)."""
    per_worker = cfg.train.batch_size // cfg.scaling.num_workers
    try:
        need = training_memory_bytes(cfg.model, image_shape, per_worker, cfg.train.iwae_k)
    except (RuntimeError, ValueError, OverflowError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:150]
        raise ConfigError(f"model: cannot be built ({reason})") from None
    check_fits_memory(
        need,
        f"model: training it with {per_worker} images per worker",
        "lower model.channels, model.hidden_dim, model.latent_dim or train.batch_size",
    )


def check_fits_memory(need: int, what: str, fix: str) -> None:
    """Refuse work that needs more than 10x this machine's memory: it could only fail later, in
    a worker, after minutes, or swap the machine to a halt."""
    have = machine_memory_bytes()
    if have and need > 10 * have:
        raise ConfigError(
            f"{what} needs about {need / 2**30:,.0f} GiB, over 10x this machine's "
            f"{have / 2**30:.0f} GiB; {fix}"
        )
