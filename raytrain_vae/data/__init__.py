"""Training data: the source data.dataset names, split into train/val/test, sharded, binarized.

Sources live one per module (idx.py: mnist, fashion_mnist) behind data.source.DataSource."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raytrain_vae.config import Config, ConfigError, DataSection, stream_seed
from raytrain_vae.data.idx import IDX_SOURCE
from raytrain_vae.data.source import DataError, DataSource

SOURCES: dict[str, DataSource] = {"mnist": IDX_SOURCE, "fashion_mnist": IDX_SOURCE}

# The validation split and the fixed binarization of evaluation images must not move when a
# trial changes train.seed, or trials would be compared on different data.
SPLIT_SEED = 20240607
EVAL_BINARIZE_SEED = 7


@dataclass(frozen=True)
class Splits:
    """uint8 image tensors (N, C, H, W) with labels; val is held out from the training split."""

    train: torch.Tensor
    train_labels: torch.Tensor
    val: torch.Tensor
    val_labels: torch.Tensor
    test: torch.Tensor
    test_labels: torch.Tensor
    dynamic_binarize: bool
    source: str

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.shape[1:])  # type: ignore[return-value]


def _bernoulli_u8(images: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(images.float() / 255, generator=g).to(torch.uint8) * 255


def check_split_fits(cfg: Config) -> None:
    """Refuse, before Ray starts, a validation fraction that leaves a worker no training image
    (data.limit is checked with the config; this covers the whole training split)."""
    n_train, _ = cfg.data.split_sizes(SOURCES[cfg.data.dataset].train_split_images)
    if n_train < cfg.scaling.num_workers:
        raise ConfigError(
            f"data.val_fraction={cfg.data.val_fraction:g} leaves {n_train} training image(s) of "
            f"{cfg.data.dataset}, fewer than scaling.num_workers={cfg.scaling.num_workers}"
        )


def image_shape(cfg: DataSection) -> tuple[int, int, int]:
    """(C, H, W) of the images data.dataset gives, known without reading them."""
    return SOURCES[cfg.dataset].image_shape


def ensure_files(cfg: DataSection) -> None:
    """Make the dataset's files present (found, or downloaded if allowed) before Ray starts."""
    SOURCES[cfg.dataset].ensure(cfg)


def load_splits(cfg: DataSection) -> Splits:
    """Read the dataset and return train/val/test as uint8 (N, C, H, W) tensors."""
    raw = SOURCES[cfg.dataset].read(cfg)
    order = torch.randperm(len(raw.train), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_train, n_val = cfg.split_sizes(len(order))
    if n_train < 1:
        raise DataError(
            f"{min(len(order), cfg.limit or len(order))} images (data.limit={cfg.limit}) leave "
            "no training images after data.val_fraction"
        )
    val_idx, train_idx = order[:n_val], order[n_val : n_val + n_train]
    train, val, test = raw.train[train_idx], raw.train[val_idx], raw.test

    if cfg.binarize == "static":
        train = _bernoulli_u8(train, SPLIT_SEED + 1)
    if cfg.binarize != "none":
        # Dynamic binarization still evaluates on one fixed sample, so epochs and trials compare.
        val = _bernoulli_u8(val, EVAL_BINARIZE_SEED)
        test = _bernoulli_u8(test, EVAL_BINARIZE_SEED + 1)
    return Splits(
        train=train.contiguous(),
        train_labels=raw.train_labels[train_idx],
        val=val.contiguous(),
        val_labels=raw.train_labels[val_idx],
        test=test.contiguous(),
        test_labels=raw.test_labels,
        dynamic_binarize=cfg.binarize == "dynamic",
        source=raw.where,
    )


def shard_indices(n: int, rank: int, world: int, epoch: int, seed: int) -> torch.Tensor:
    """This rank's training indices for an epoch: a fresh seeded shuffle, split into equal,
    disjoint shards (the n % world left over rotate each epoch) so every rank takes equal steps."""
    g = torch.Generator().manual_seed(stream_seed(seed * 1_000_003 + epoch))
    per_rank = n // world
    return torch.randperm(n, generator=g)[rank * per_rank : (rank + 1) * per_rank]


def eval_indices(n: int, rank: int, world: int) -> torch.Tensor:
    """This rank's evaluation indices: unshuffled, disjoint, together covering every image once."""
    return torch.arange(n)[rank::world]


def to_model_input(
    batch: torch.Tensor, dynamic: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """uint8 pixels -> float in [0, 1], Bernoulli-sampled afresh when binarization is dynamic."""
    x = batch.float().div_(255)
    return torch.bernoulli(x, generator=generator) if dynamic else x
