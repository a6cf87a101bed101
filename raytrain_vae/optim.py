"""The optimizer (AdamW) and its learning-rate schedule, a pure function of the step."""

from __future__ import annotations

import math

import torch
from torch import nn

from raytrain_vae.config import Config


def make_optimizer(model: nn.Module, cfg: Config, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the model, with the fused kernel where torch has one for the device."""
    # One kernel for every parameter instead of a loop over tensors (docs/performance.md). The
    # state dict is the same either way, so checkpoints of an unfused run resume.
    return torch.optim.AdamW(
        model.parameters(),
        lr=cfg.train.lr,
        weight_decay=cfg.train.weight_decay,
        fused=device.type in ("cpu", "cuda"),
    )


def set_learning_rate(
    optimizer: torch.optim.Optimizer, cfg: Config, step: int, steps_per_epoch: int
) -> None:
    """train.lr_schedule at this optimizer step; a pure function of the step, so a resumed run
    needs no scheduler state."""
    lr = cfg.train.lr
    if cfg.train.lr_schedule == "cosine":
        lr *= 0.5 * (1 + math.cos(math.pi * min(1.0, step / (cfg.train.epochs * steps_per_epoch))))
    for group in optimizer.param_groups:
        group["lr"] = lr
