"""Reading the user's files (image_folder, parquet): a unit of the catalog into decoded rows,
and every split into memory; the stream reads the same units in Ray Data tasks."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from raytrain_vae.config import DataSection
from raytrain_vae.data.catalog import Catalog, Unit, label_of, relative_key, row_hashes
from raytrain_vae.data.pixels import pixel_rows
from raytrain_vae.data.preprocess import ImageSpec, decode_image, preprocess, spec_of
from raytrain_vae.data.source import DataError
from raytrain_vae.data.splits import SPLIT_CODES, binarize_by_hash, key_hash, split_codes
from raytrain_vae.storage import filesystem_for, read_bytes

# Salts of the fixed binarisations, so that train (static), val and test draw differently.
BINARIZE_SALT = {"train": 1, "val": 7, "test": 8}


@dataclass(frozen=True)
class Rows:
    """Decoded images of one unit (or many): uint8 (N, C, H, W), int64 labels (-1 = none),
    int64 key hashes (stable ids), and the file (or row) each came from."""

    images: np.ndarray
    labels: np.ndarray
    hashes: np.ndarray
    where: list[str]


@dataclass(frozen=True)
class ReadPlan:
    """How to read units: the data config, the catalog's root, cut and classes, the image
    spec, and the size every image must have when no data.image_size makes them one."""

    cfg: DataSection
    root: str
    cut: float
    classes: tuple[str, ...]
    spec: ImageSpec
    shape: tuple[int, int, int]
    first: str

    @classmethod
    def of(cls, cfg: DataSection, catalog: Catalog) -> ReadPlan:
        spec = spec_of(cfg, 3)
        shape = spec.output_shape(catalog.native_shape[1:])
        return cls(cfg, catalog.root, catalog.cut, catalog.classes, spec, shape, catalog.first)


def read_unit(unit: Unit, plan: ReadPlan) -> Rows:
    """One unit's images of its split, decoded and shaped; binarised once (by their hash)
    where data.binarize fixes them."""
    rows = _read_files(unit, plan) if unit.files else _read_row_group(unit, plan)
    fixed = plan.cfg.binarize != "none" and (unit.split != "train" or plan.cfg.binarize == "static")
    if fixed and len(rows.images):
        salt = BINARIZE_SALT[unit.split or "test"]
        return Rows(binarize_by_hash(rows.images, rows.hashes, salt), rows.labels, rows.hashes,
                    rows.where)  # fmt: skip
    return rows


def _check_shape(image: torch.Tensor, plan: ReadPlan, where: str) -> np.ndarray:
    if tuple(image.shape) != plan.shape:
        _, h, w = image.shape
        raise DataError(
            f"images of two sizes: {where} is {w}x{h}, {plan.first} is {plan.shape[2]}x"
            f"{plan.shape[1]}; set data.image_size (and data.crop) to bring them to one"
        )
    return image.numpy()


def _read_files(unit: Unit, plan: ReadPlan) -> Rows:
    images = [_check_shape(decode_image(read_bytes(f), plan.spec, f), plan, f) for f in unit.files]
    keys = [relative_key(f, plan.root) for f in unit.files]
    return Rows(
        np.stack(images),
        np.array([label_of(k, plan.classes) for k in keys], dtype=np.int64),
        np.array([key_hash(k) for k in keys], dtype=np.int64),
        list(unit.files),
    )


def _read_row_group(unit: Unit, plan: ReadPlan) -> Rows:
    cfg = plan.cfg
    columns = [c for c in (cfg.image_column, cfg.label_column, cfg.id_column) if c]
    fs, local = filesystem_for(unit.parquet)
    with fs.open_input_file(local) as f:
        table = pq.ParquetFile(f).read_row_group(
            unit.row_group, columns=list(dict.fromkeys(columns))
        )
    ids = table.column(cfg.id_column).combine_chunks() if cfg.id_column else None
    hashes = row_hashes(unit, plan.root, ids)
    keep = np.arange(len(hashes))
    if unit.split is not None:
        keep = np.flatnonzero(split_codes(hashes, cfg, plan.cut) == SPLIT_CODES[unit.split])
    where = [f"{unit.parquet} row {unit.first_row + i}" for i in keep]
    column = table.column(cfg.image_column)
    if cfg.pixels_shape is not None:
        images = _pixel_images(column, keep, unit, plan)
    else:
        values = column.take(keep).to_pylist()
        decoded = [_bytes_image(v, plan, w) for v, w in zip(values, where, strict=True)]
        images = np.stack(decoded) if decoded else np.empty((0, *plan.shape), np.uint8)
    labels = np.full(len(keep), -1, dtype=np.int64)
    if cfg.label_column:
        labels = np.asarray(table.column(cfg.label_column).to_numpy(zero_copy_only=False))[keep]
    return Rows(images, labels.astype(np.int64), hashes[keep], where)


def _pixel_images(
    column: pa.ChunkedArray, keep: np.ndarray, unit: Unit, plan: ReadPlan
) -> np.ndarray:
    """The kept rows of a pixels column (data.pixels_shape) as uint8 (n, C, H, W) through the
    spec, converted (and checked) as one batch."""
    shape = tuple(plan.cfg.pixels_shape)
    size = int(np.prod(shape))
    needs = f"data.pixels_shape {list(shape)} needs {size}"
    rows = pixel_rows(column.take(keep), size, unit.parquet, plan.cfg.image_column, needs,
                      numbers=unit.first_row + keep)  # fmt: skip
    images = preprocess(torch.from_numpy(rows.reshape(-1, *shape)), plan.spec)
    if len(keep):
        _check_shape(images[0], plan, f"{unit.parquet} row {unit.first_row + int(keep[0])}")
    return images.numpy()


def _bytes_image(value: object, plan: ReadPlan, where: str) -> np.ndarray:
    if value is None:
        raise DataError(f"{where}: column {plan.cfg.image_column!r} is null")
    if not isinstance(value, bytes):
        raise DataError(f"{where}: {plan.cfg.image_column!r} is not image bytes")
    return _check_shape(decode_image(value, plan.spec, where), plan, where)


def read_units(units: tuple[Unit, ...], plan: ReadPlan) -> Rows:
    """Every unit, decoded on a few threads (PIL and zlib release the GIL), in unit order."""
    if not units:
        return Rows(np.empty((0, *plan.shape), np.uint8), np.empty(0, np.int64),
                    np.empty(0, np.int64), [])  # fmt: skip
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        parts = list(pool.map(lambda u: read_unit(u, plan), units))
    return Rows(
        np.concatenate([p.images for p in parts]),
        np.concatenate([p.labels for p in parts]),
        np.concatenate([p.hashes for p in parts]),
        [w for p in parts for w in p.where],
    )
