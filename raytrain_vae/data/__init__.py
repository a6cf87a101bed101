"""Training data: the source data.source names, split into train/val/test, shaped, sharded,
binarized.

Public datasets live one per module behind data.source.DataSource (idx.py: mnist,
fashion_mnist; cifar.py: cifar10); the user's own files (image_folder, parquet) are listed by
catalog.py and read by files.py, in memory here or streamed by raytrain_vae.ingest."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raytrain_vae.config import Config, ConfigError, DataSection, stream_seed
from raytrain_vae.data.catalog import Catalog, build_catalog
from raytrain_vae.data.cifar import CIFAR_SOURCE
from raytrain_vae.data.files import ReadPlan, read_units
from raytrain_vae.data.idx import IDX_SOURCE
from raytrain_vae.data.preprocess import preprocess, spec_of
from raytrain_vae.data.source import DataError, DataSource

SOURCES: dict[str, DataSource] = {
    "mnist": IDX_SOURCE,
    "fashion_mnist": IDX_SOURCE,
    "cifar10": CIFAR_SOURCE,
}
_CATALOGS: dict[str, Catalog] = {}

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


def catalog_for(cfg: DataSection) -> Catalog:
    """The listing of the user's files, made once per process for a given data section."""
    key = cfg.model_dump_json()
    if key not in _CATALOGS:
        _CATALOGS[key] = build_catalog(cfg)
    return _CATALOGS[key]


def split_counts(cfg: DataSection) -> dict[str, int]:
    """Images in each split (train, val, test), known from listing the files or the source."""
    if cfg.reads_files:
        return dict(catalog_for(cfg).counts)
    n_train, n_val = cfg.split_sizes(SOURCES[cfg.source].train_split_images)
    return {"train": n_train, "val": n_val, "test": -1}


def check_split_fits(cfg: Config) -> None:
    """Refuse, before Ray starts, splits that leave a worker no training image or leave no
    validation image (data.limit is checked with the config; this covers the whole split)."""
    counts = split_counts(cfg.data)
    if counts["train"] < cfg.scaling.num_workers:
        raise ConfigError(
            f"data.val_fraction={cfg.data.val_fraction:g} leaves {counts['train']} training "
            f"image(s) of {cfg.data.path or cfg.data.source}, fewer than "
            f"scaling.num_workers={cfg.scaling.num_workers}"
        )
    if counts["val"] < 1:
        raise ConfigError(
            f"data.val_fraction={cfg.data.val_fraction:g} leaves no validation image among the "
            f"{counts['train']} of {cfg.data.path}; raise it or add images"
        )


def image_shape(cfg: DataSection) -> tuple[int, int, int]:
    """(C, H, W) of the images the model sees: the source's, through data.channels, data.crop
    and data.image_size (the user's files: the first image's size unless those set it)."""
    if cfg.reads_files:
        return ReadPlan.of(cfg, catalog_for(cfg)).shape
    native = SOURCES[cfg.source].image_shape
    return spec_of(cfg, native[0]).output_shape(native[1:])


def decoded_bytes(cfg: DataSection) -> int:
    """Bytes of the training and validation images once decoded (uint8)."""
    counts = split_counts(cfg)
    c, h, w = image_shape(cfg)
    return (counts["train"] + counts["val"]) * c * h * w


def ingest_mode(cfg: DataSection) -> str:
    """memory or stream: data.ingest, with auto resolved against data.stream_above_mb."""
    if cfg.ingest == "stream" and not cfg.reads_files:
        raise ConfigError(
            f"data.ingest=stream reads files from storage: data.source={cfg.source} is decoded "
            "in memory (use memory or auto, or image_folder/parquet)"
        )
    if cfg.ingest == "auto":
        big = cfg.reads_files and decoded_bytes(cfg) > cfg.stream_above_mb * 2**20
        return "stream" if big else "memory"
    return cfg.ingest


def ensure_files(cfg: DataSection) -> None:
    """Make the dataset present (found, or downloaded if allowed) and, for the user's files,
    listed and readable, before Ray starts."""
    if cfg.reads_files:
        catalog_for(cfg)
    else:
        SOURCES[cfg.source].ensure(cfg)


def load_splits(cfg: DataSection) -> Splits:
    """Read the dataset and return train/val/test as uint8 (N, C, H, W) tensors."""
    if cfg.reads_files:
        return _load_file_splits(cfg)
    raw = SOURCES[cfg.source].read(cfg)
    order = torch.randperm(len(raw.train), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_train, n_val = cfg.split_sizes(len(order))
    if n_train < 1:
        raise DataError(
            f"{min(len(order), cfg.limit or len(order))} images (data.limit={cfg.limit}) leave "
            "no training images after data.val_fraction"
        )
    val_idx, train_idx = order[:n_val], order[n_val : n_val + n_train]
    spec = spec_of(cfg, raw.train.shape[1])
    train, val, test = (
        preprocess(t, spec) for t in (raw.train[train_idx], raw.train[val_idx], raw.test)
    )

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


def split_images(
    cfg: DataSection, split: str, limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images, labels) of one split (train, val or test), the first `limit` only when
    given: the user's files are read unit by unit until there are enough, not all decoded."""
    if not cfg.reads_files:
        splits = load_splits(cfg)
        images, labels = getattr(splits, split), getattr(splits, f"{split}_labels")
        return images[:limit], labels[:limit]
    catalog = catalog_for(cfg)
    plan = ReadPlan.of(cfg, catalog)
    units, taken = [], 0
    for unit in catalog.units[split]:
        if limit is not None and taken >= limit:
            break
        units.append(unit)
        taken += len(unit.files) or unit.rows
    rows = read_units(tuple(units), plan)
    return torch.from_numpy(rows.images[:limit]), torch.from_numpy(rows.labels[:limit])


def _load_file_splits(cfg: DataSection) -> Splits:
    """The user's files, every split decoded (and fixed binarizations drawn) in memory."""
    catalog = catalog_for(cfg)
    plan = ReadPlan.of(cfg, catalog)
    rows = {name: read_units(catalog.units[name], plan) for name in ("train", "val", "test")}
    tensors = {
        name: (torch.from_numpy(r.images), torch.from_numpy(r.labels)) for name, r in rows.items()
    }
    return Splits(
        train=tensors["train"][0],
        train_labels=tensors["train"][1],
        val=tensors["val"][0],
        val_labels=tensors["val"][1],
        test=tensors["test"][0],
        test_labels=tensors["test"][1],
        dynamic_binarize=cfg.binarize == "dynamic",
        source=cfg.path,
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
