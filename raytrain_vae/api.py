"""The Python API for notebooks and scripts: load_config, train, search, load_model, evaluate."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import torch
import yaml
from ray.train import Result

from raytrain_vae.config import Config, apply_overrides, dump_config, load_config, validate_config
from raytrain_vae.evaluation import evaluate as evaluate_images
from raytrain_vae.evaluation import evaluate_export
from raytrain_vae.export import load_model
from raytrain_vae.models import VAE
from raytrain_vae.training import fit
from raytrain_vae.tune import search as run_search

__all__ = ["SearchResult", "evaluate", "load_config", "load_model", "search", "train"]


class SearchResult(NamedTuple):
    """A finished search: one row per trial (pandas), and the exported best model's folder."""

    trials: pd.DataFrame
    export: Path


def resolved(config: Config | str | Path, overrides: Sequence[str] = ()) -> Config:
    """A Config from a Config, a YAML path or a shipped config's name, with key.sub=value
    overrides applied and validated like the command line's."""
    if not isinstance(config, Config):
        return load_config(config, list(overrides))
    if not overrides:
        return config
    raw = apply_overrides(yaml.safe_load(dump_config(config)), list(overrides))
    return validate_config(raw, "config (with overrides)")


def train(config: Config | str | Path, overrides: Sequence[str] = ()) -> Result:
    """Train one VAE with Ray Train (DDP over scaling.num_workers), or resume run.name's last
    checkpoint; Ray's Result: `.checkpoint.path` (the final model folder), `.metrics`."""
    return fit(resolved(config, overrides))


def search(
    config: Config | str | Path, overrides: Sequence[str] = (), resume: bool = False
) -> SearchResult:
    """Search the config's search.space with Ray Tune + Optuna, write the trial summary and
    export the best model to export.dir; resume=True continues an interrupted search."""
    return SearchResult(*run_search(resolved(config, overrides), resume=resume))


def evaluate(
    model: str | Path | VAE,
    images: torch.Tensor | None = None,
    *,
    split: str = "test",
    limit: int | None = None,
    k: int = 1000,
    batch_size: int = 100,
    seed: int = 0,
    device: str | torch.device | None = None,
) -> dict:
    """Held-out metrics in nats per image (negative ELBO, its terms, IWAE NLL with k samples,
    bits/dim). `model` is an export folder, scored on its own data's `split` (first `limit`
    images), or a loaded VAE scored on `images` (uint8, N x C x H x W). device: None = where
    the model is (an export folder loads on the CPU)."""
    if isinstance(model, VAE):
        if images is None:
            raise ValueError("evaluate(model=VAE) needs images (uint8, N x C x H x W)")
        return evaluate_images(model, images[:limit], k, batch_size, seed, device)
    if images is not None:
        return evaluate_images(load_model(model), images[:limit], k, batch_size, seed, device)
    return evaluate_export(model, split, limit, k, batch_size, seed, device or "cpu")
