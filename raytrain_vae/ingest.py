"""Streaming ingest (data.ingest: stream): the user's files as Ray Data datasets that read,
decode and shuffle in Ray Data tasks every epoch, sharded over the Ray Train workers."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import ray.data
import torch
from ray.train import DataConfig

from raytrain_vae.block_shuffle import block_batches
from raytrain_vae.config import Config, UserError
from raytrain_vae.data import catalog_for, image_shape
from raytrain_vae.data.catalog import Unit
from raytrain_vae.data.files import ReadPlan, read_unit
from raytrain_vae.data.source import DataError

# Ray Data tasks that read and decode: one CPU each. With a fraction, Ray ran more task
# processes than the node has CPUs, killed the idle ones beyond that within a second, and started
# new ones (seconds of imports each) for the next tasks: a 32x32 PNG folder streamed at 800
# images/s with 0.25, at 6800 with 1 (2 CPUs, nothing training).
READ_TASK_CPUS = 1.0
# What a streamed run keeps free beside its workers: Ray 2.60 shares the spare CPUs with Ray
# Data in whole CPUs (0.5 spare became 0, and the stream stalled), so one whole CPU.
STREAM_SPARE_CPUS = 1.0
# Blocks each worker fetches ahead in a background thread while it trains on the current one.
PREFETCH_BLOCKS = 4
# A bad file met by a training read task travels to the worker as a block of this one column,
# not as an exception: Ray Data would log the task's traceback in the split coordinator, an
# actor of its own whose logging we cannot quiet. The worker raises it as our DataError. The
# block holds one row per worker: Ray Train's equal split drops up to (workers - 1) rows at the
# end of an epoch, so one always reaches a rank.
ERROR_COLUMN = "error"


def read_unit_rows(
    batch: dict[str, np.ndarray], plan: ReadPlan, error_rows: int = 0
) -> dict[str, np.ndarray]:
    """A Ray Data task: the units in a batch (one, as read) -> their decoded rows (none: {}).
    With error_rows > 0, a bad or unreadable file (our UserError) comes back as a block of
    that many ERROR_COLUMN rows instead of raising."""
    units = [Unit(**_unit_fields(batch, i)) for i in range(len(batch["split"]))]
    try:
        parts = [read_unit(unit, plan) for unit in units]
    except UserError as exc:
        if not error_rows:
            raise
        return {ERROR_COLUMN: np.full(error_rows, str(exc))}
    images = np.concatenate([p.images for p in parts])
    if not len(images):
        # A unit may hold no image of this split. Ray Data cannot type an empty image tensor
        # (it pickles the column, with a warning); a batch without columns gives an empty
        # block, which its batching skips.
        return {}
    if plan.cfg.hflip and units[0].split == "train":  # augmented here, not in the training loop
        flip = np.random.default_rng().random(len(images)) < 0.5
        images[flip] = images[flip][..., ::-1]
    return {
        "image": images,
        "label": np.concatenate([p.labels for p in parts]),
        "hash": np.concatenate([p.hashes for p in parts]),
    }


def _unit_fields(batch: dict[str, np.ndarray], i: int) -> dict:
    fields = {name: batch[name][i] for name in (f.name for f in dataclasses.fields(Unit))}
    fields["files"] = tuple(str(f) for f in fields["files"])
    fields["split"] = None if fields["split"] in (None, "") else str(fields["split"])
    for name in ("row_group", "first_row", "rows"):
        fields[name] = int(fields[name])
    fields["parquet"] = str(fields["parquet"])
    return fields


def units_dataset(
    units: tuple[Unit, ...], plan: ReadPlan, shuffle: bool, error_rows: int = 0
) -> ray.data.Dataset:
    """One block per unit (some files, or one row group), in a fresh random order on every
    pass when shuffle, mapped to decoded rows by Ray Data tasks. With error_rows, a bad file
    reaches the consumer as an ERROR_COLUMN block (read_unit_rows); without, the read raises."""
    items = [dataclasses.asdict(u) | {"split": u.split or ""} for u in units]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    if shuffle:
        ds = ds.randomize_block_order()
    return ds.map_batches(
        read_unit_rows,
        fn_kwargs={"plan": plan, "error_rows": error_rows},
        batch_size=1,
        num_cpus=READ_TASK_CPUS,
    )


def stream_datasets(cfg: Config) -> dict[str, ray.data.Dataset]:
    """The training (read and shuffled afresh each epoch) and validation (read once) datasets
    of a streamed run. A decode error inside a task reaches the driver as our own one-line
    error."""
    catalog = catalog_for(cfg.data)
    plan = ReadPlan.of(cfg.data, catalog)
    ctx = ray.data.DataContext.get_current()
    saved = ctx.raise_original_map_exception, ctx.enable_progress_bars
    # The datasets keep a copy of the context they were made in: our own errors, and no
    # progress bars for the epochs in the training log.
    ctx.raise_original_map_exception, ctx.enable_progress_bars = True, False
    try:
        train = units_dataset(
            catalog.units["train"], plan, shuffle=True, error_rows=cfg.scaling.num_workers
        )
        # Validation is read once, here, and kept in Ray's object store (spilled to disk when
        # it is full): the hash split spreads its images over every unit, so reading them
        # every epoch would read the whole set again. This one read shows its progress (with
        # bars off, Ray Data logs a warning on the driver).
        ctx.enable_progress_bars = saved[1]
        val = units_dataset(catalog.units["val"], plan, shuffle=False).materialize()
        val.context.enable_progress_bars = False  # its passes every epoch, like training's
        return {"train": train, "val": val}
    finally:
        ctx.raise_original_map_exception, ctx.enable_progress_bars = saved


def stream_facts(cfg: Config) -> dict:
    """What the workers of a streamed run need from the driver's listing: the epoch's image
    count and the image shape."""
    return {
        "n_train": catalog_for(cfg.data).counts["train"],
        "image_shape": list(image_shape(cfg.data)),
    }


class ShardedValidation(DataConfig):
    """Ray Train's data config, but validation is split without dropping rows (equal=False):
    every validation image is scored once. Training keeps Ray's equal split, so every rank
    takes the same number of steps (DDP needs that); it drops at most world-1 images an epoch."""

    def __init__(self) -> None:
        super().__init__(datasets_to_split=["train"])

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):  # noqa: ANN001, ANN201
        train = {k: v for k, v in datasets.items() if k != "val"}
        output = super().configure(train, world_size, worker_handles, worker_node_ids, **kwargs)
        if "val" in datasets:
            for i, split in enumerate(datasets["val"].streaming_split(world_size, equal=False)):
                output[i]["val"] = split
        return output


@dataclasses.dataclass
class ShardStream:
    """loop.BatchStream over this rank's dataset shards: Ray Train's shards, or in a trial's
    own process the whole datasets (`shard_of` gives either by name). Blocks come whole from
    Ray Data and are cut into batches here (block_shuffle), the local shuffle seeded by
    (seed, epoch, rank); the block order is Ray Data's fresh random order."""

    n_train: int
    shuffle_buffer: int
    device: torch.device
    shard_of: Callable[[str], Any]
    seed: int = 0
    rank: int = 0

    def row_batches(
        self, name: str, batch_size: int, rng: np.random.Generator | None
    ) -> Iterator[dict[str, np.ndarray]]:
        """Batches of a shard's rows (image, label, hash), shuffled through the buffer when
        an rng is given."""
        blocks = self.shard_of(name).iter_batches(
            batch_size=None, batch_format="numpy", prefetch_batches=PREFETCH_BLOCKS
        )
        buffer = self.shuffle_buffer if rng is not None else 0
        return block_batches(raise_carried_errors(blocks), batch_size, buffer, rng)

    def train_batches(self, epoch: int, batch_size: int) -> Iterator[torch.Tensor]:
        rng = np.random.default_rng([self.seed, epoch, self.rank])
        for rows in self.row_batches("train", batch_size, rng):
            yield torch.from_numpy(rows["image"]).to(self.device)

    def val_batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        for rows in self.row_batches("val", batch_size, None):
            yield torch.from_numpy(rows["image"]).to(self.device)


def raise_carried_errors(
    blocks: Iterator[dict[str, np.ndarray]],
) -> Iterator[dict[str, np.ndarray]]:
    """The blocks, until one carries a read task's error (ERROR_COLUMN): that is raised."""
    for block in blocks:
        if ERROR_COLUMN in block:
            raise DataError(str(block[ERROR_COLUMN][0]))
        yield block
