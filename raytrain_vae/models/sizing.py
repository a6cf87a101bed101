"""How much memory a model needs to train, estimated on the meta device, against this machine."""

from __future__ import annotations

import functools
import os

import torch

from raytrain_vae.config import Config, ConfigError, ModelSection
from raytrain_vae.models import build_model


def training_memory_bytes(
    cfg: ModelSection, image_shape: tuple[int, int, int], batch: int, samples: int = 1
) -> int:
    """Bytes one worker needs to train, roughly: every parameter four times in fp32 (weights,
    gradients, AdamW's two moments) plus each layer's output for a batch, kept for backward.
    Counted on the meta device, so nothing is allocated whatever the sizes."""
    return _memory_bytes(cfg.model_dump_json(), tuple(image_shape), batch, samples)


# A search checks every combination of its choices, and most differ only in keys that leave the
# model alone (learning rate, beta): each model is counted once.
@functools.lru_cache(maxsize=1024)
def _memory_bytes(model_json: str, image_shape: tuple[int, ...], batch: int, samples: int) -> int:
    cfg = ModelSection.model_validate_json(model_json)
    outputs: list[int] = []
    with torch.device("meta"):
        model = build_model(cfg, image_shape)
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
