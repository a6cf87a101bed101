"""The user's files (image_folder, parquet) listed once from metadata: what each split holds,
in units of work that read independently, with no pass over the images themselves."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from raytrain_vae.config import DataSection, is_uri
from raytrain_vae.data.preprocess import spec_of
from raytrain_vae.data.source import DataError
from raytrain_vae.data.splits import SPLIT_CODES, key_hash, limit_cut, split_codes
from raytrain_vae.storage import filesystem_for, list_files, read_bytes

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
PARQUET_SUFFIXES = (".parquet",)
# Image files read by one task: about UNIT_BYTES decoded, within these bounds. Ray Data spends
# tens of milliseconds of CPU on each task and block, which 64 files of 32x32 did not amortise
# (the stream ran at 0.33x of memory; 512 files: 0.8x). A unit is also what an epoch shuffles
# as a whole before the local shuffle buffer mixes units.
UNIT_BYTES = 4 * 2**20
MIN_FILES_PER_UNIT, MAX_FILES_PER_UNIT = 64, 1024


@dataclass(frozen=True)
class Unit:
    """Work read in one go: some image files, or one row group of one Parquet file.
    `split` keeps only that split's rows (by hash); None keeps every row (a test_path)."""

    files: tuple[str, ...] = ()
    parquet: str = ""
    row_group: int = 0
    first_row: int = 0
    rows: int = 0
    split: str | None = None


@dataclass(frozen=True)
class Catalog:
    """What data.path (and data.test_path) hold: units per split, image counts per split,
    label names (image_folder's subfolders), the hash cut of data.limit, the first image's
    (C, H, W) and where it came from."""

    root: str
    units: dict[str, tuple[Unit, ...]]
    counts: dict[str, int]
    classes: tuple[str, ...]
    cut: float
    native_shape: tuple[int, int, int]
    first: str


def relative_key(path: str, root: str) -> str:
    """An image's key: its path relative to the folder (or file) it was listed from. For a URI,
    its path alone (no ?query) with %-escapes undone, so a bucket and a local copy agree."""
    uri = is_uri(path)
    if uri:
        path, root = urlsplit(path).path, urlsplit(root).path
    root = root.rstrip("/")
    key = path[len(root) + 1 :] if path.startswith(root + "/") else path.rsplit("/", 1)[-1]
    return unquote(key) if uri else key


def listed_root(path: str) -> str:
    """data.path as list_files names what is under it (a local path made absolute, ~ expanded),
    so that relative_key finds the subfolders of a relative or ~ path."""
    return path if is_uri(path) else os.path.abspath(os.path.expanduser(path))


def label_of(key: str, classes: tuple[str, ...]) -> int:
    """image_folder: the index of the subfolder an image is in, -1 at the top level."""
    top = key.split("/", 1)[0] if "/" in key else None
    return classes.index(top) if top in classes else -1


def build_catalog(cfg: DataSection) -> Catalog:
    """List data.path (and data.test_path) and assign every image its split."""
    if cfg.source == "image_folder":
        return _folder_catalog(cfg)
    return _parquet_catalog(cfg)


def files_per_unit(image_bytes: int) -> int:
    """Files in a unit of images of this decoded size: about UNIT_BYTES, within the bounds."""
    return max(MIN_FILES_PER_UNIT, min(MAX_FILES_PER_UNIT, UNIT_BYTES // max(1, image_bytes)))


def _chunks(files: list[str], split: str | None, per_unit: int) -> tuple[Unit, ...]:
    return tuple(
        Unit(files=tuple(files[i : i + per_unit]), split=split)
        for i in range(0, len(files), per_unit)
    )


def _folder_catalog(cfg: DataSection) -> Catalog:
    root = listed_root(cfg.path)
    files = list_files(cfg.path, IMAGE_SUFFIXES)
    keys = [relative_key(f, root) for f in files]
    classes = tuple(sorted({k.split("/", 1)[0] for k in keys if "/" in k}))
    hashes = np.array([key_hash(k) for k in keys], dtype=np.int64)
    cut = limit_cut(hashes, cfg)
    codes = split_codes(hashes, cfg, cut)
    first = files[0]
    native = _image_file_shape(first)
    per_unit = files_per_unit(int(np.prod(spec_of(cfg, native[0]).output_shape(native[1:]))))
    units, counts = {}, {}
    for name, code in SPLIT_CODES.items():
        chosen = [f for f, c in zip(files, codes, strict=True) if c == code]
        units[name], counts[name] = _chunks(chosen, name, per_unit), len(chosen)
    if cfg.test_path:
        test_files = list_files(cfg.test_path, IMAGE_SUFFIXES)
        units["test"], counts["test"] = _chunks(test_files, None, per_unit), len(test_files)
    return Catalog(root, units, counts, classes, cut, native, first)


def _image_file_shape(path: str) -> tuple[int, int, int]:
    """(C, H, W) of an image file from its header (channels: 1 for grey modes, else 3)."""
    return _image_bytes_shape(read_bytes(path), path)


def _image_bytes_shape(data: bytes, where: str) -> tuple[int, int, int]:
    try:
        image = Image.open(io.BytesIO(data))
    except Exception:  # PIL raises many types for bytes that are not an image
        raise DataError(f"{where}: not a readable PNG/JPEG image") from None
    return (1 if image.mode in ("1", "L", "I", "I;16", "F") else 3, image.height, image.width)


def parquet_row_groups(path: str) -> tuple[pq.FileMetaData, pa.Schema]:
    """A Parquet file's footer (row groups, row counts) and schema, read without its data."""
    fs, local = filesystem_for(path)
    try:
        with fs.open_input_file(local) as f:
            reader = pq.ParquetFile(f)
            return reader.metadata, reader.schema_arrow
    except (OSError, pa.ArrowException) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:100]
        raise DataError(f"{path}: not readable as Parquet ({reason})") from None


def check_columns(path: str, schema: pa.Schema, cfg: DataSection) -> None:
    """The configured columns exist in a Parquet file; name the ones it has when not."""
    for key in ("image_column", "label_column", "id_column"):
        name = getattr(cfg, key)
        if name is not None and name not in schema.names:
            have = ", ".join(schema.names[:20])
            raise DataError(f"{path}: no column {name!r} (data.{key}); it has: {have}")


def _parquet_units(path: str, cfg: DataSection, split: str | None) -> list[Unit]:
    units = []
    for file in list_files(path, PARQUET_SUFFIXES):
        meta, schema = parquet_row_groups(file)
        check_columns(file, schema, cfg)
        first = 0
        for g in range(meta.num_row_groups):
            rows = meta.row_group(g).num_rows
            if rows:
                units.append(
                    Unit(parquet=file, row_group=g, first_row=first, rows=rows, split=split)
                )
            first += rows
    if not units:
        raise DataError(f"{path}: Parquet holds no rows")
    return units


def row_hashes(unit: Unit, root: str, ids: pa.Array | None = None) -> np.ndarray:
    """The hash of each row of a Parquet unit: of its id (data.id_column), else of
    'relative path#row in the file'."""
    if ids is not None:
        return np.array([key_hash(str(v)) for v in ids.to_pylist()], dtype=np.int64)
    rel = relative_key(unit.parquet, root)
    rows = range(unit.first_row, unit.first_row + unit.rows)
    return np.array([key_hash(f"{rel}#{r}") for r in rows], dtype=np.int64)


def _unit_ids(unit: Unit, cfg: DataSection) -> pa.Array | None:
    if cfg.id_column is None:
        return None
    fs, local = filesystem_for(unit.parquet)
    with fs.open_input_file(local) as f:
        table = pq.ParquetFile(f).read_row_group(unit.row_group, columns=[cfg.id_column])
    return table.column(0).combine_chunks()


def _parquet_catalog(cfg: DataSection) -> Catalog:
    root = listed_root(cfg.path)
    units = _parquet_units(cfg.path, cfg, None)
    hashes = np.concatenate([row_hashes(u, root, _unit_ids(u, cfg)) for u in units])
    cut = limit_cut(hashes, cfg)
    codes = split_codes(hashes, cfg, cut)
    counts = {name: int((codes == code).sum()) for name, code in SPLIT_CODES.items()}
    by_split = {name: tuple(_with_split(units, name)) for name in SPLIT_CODES}
    if cfg.test_path:
        test_units = _parquet_units(cfg.test_path, cfg, None)
        by_split["test"], counts["test"] = tuple(test_units), sum(u.rows for u in test_units)
    elif counts["test"] == 0:
        by_split["test"] = ()
    first = units[0]
    return Catalog(
        root, by_split, counts, (), cut, _parquet_shape(first, cfg), f"{first.parquet} row 0"
    )


def _with_split(units: list[Unit], split: str) -> list[Unit]:
    return [Unit(u.files, u.parquet, u.row_group, u.first_row, u.rows, split) for u in units]


def _parquet_shape(unit: Unit, cfg: DataSection) -> tuple[int, int, int]:
    """(C, H, W) of the first row's image: data.pixels_shape, or its file header."""
    if cfg.pixels_shape is not None:
        return tuple(cfg.pixels_shape)  # type: ignore[return-value]
    fs, local = filesystem_for(unit.parquet)
    with fs.open_input_file(local) as f:
        table = pq.ParquetFile(f).read_row_group(unit.row_group, columns=[cfg.image_column])
    value = table.column(0)[0].as_py()
    if value is None:
        raise DataError(f"{unit.parquet} row {unit.first_row}: column {cfg.image_column!r} is null")
    if not isinstance(value, bytes):
        raise DataError(
            f"{unit.parquet}: column {cfg.image_column!r} holds {table.column(0).type}, not "
            "image bytes; for pixel values set data.pixels_shape: [C, H, W]"
        )
    return _image_bytes_shape(value, f"{unit.parquet} row 0")
