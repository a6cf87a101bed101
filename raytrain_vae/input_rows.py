"""One unit of user input (some image files, or a Parquet row group) into checked rows: id,
label and uint8 pixels shaped as in training; each bad row is one UserError naming it."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from raytrain_vae.config import UserError
from raytrain_vae.data.pixels import pixel_rows
from raytrain_vae.data.preprocess import ImageSpec, crop_and_resize
from raytrain_vae.storage import filesystem_for


@dataclass(frozen=True)
class InputUnit:
    """Input read in one go: some image files (ids from first_id on, in sorted-name order), or
    one row group of a Parquet file (ids from its `id` column, else row numbers counted over
    every file from first_id)."""

    files: tuple[str, ...] = ()
    parquet: str = ""
    row_group: int = 0
    first_row: int = 0  # the unit's first row within its file, for messages
    first_id: int = 0


@dataclass(frozen=True)
class InputPlan:
    """What every unit's rows become: the model's (C, H, W), through the training data's
    crop and resize (spec); `root` is --input, for messages."""

    shape: tuple[int, int, int]
    spec: ImageSpec
    root: str


def fixed_size_list(values: np.ndarray) -> pa.FixedSizeListArray:
    """(N, D) array -> Arrow fixed_size_list<D> column."""
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


def read_input_unit(unit: InputUnit, plan: InputPlan) -> pa.Table:
    """One unit's rows: id, source (the file, or 'file#row' for Parquet: where the row came
    from), pixels as checked uint8 values, and label when the Parquet has one."""
    if unit.files:
        pixels = np.stack([_decode_png(read_file(f), plan, shown_text(f)) for f in unit.files])
        ids = np.arange(unit.first_id, unit.first_id + len(unit.files))
        return pa.table(
            {
                "id": pa.array(ids, pa.int64()),
                "source": pa.array(list(unit.files), pa.string()),
                "pixels": fixed_size_list(pixels),
            }
        )
    where = shown_text(unit.parquet)
    table = _read_row_group(unit)
    ids = _id_column(table, where, unit)
    labels = _int_column(table, "label", where) if "label" in table.column_names else None
    if "pixels" in table.column_names:
        pixels = _pixels_column(table.column("pixels"), plan.shape, where, unit.first_row)
    elif "image" in table.column_names:
        pixels = _image_column(table.column("image"), plan, where, unit.first_row)
    else:
        raise UserError(f"{where}: needs an `image` (PNG/JPEG bytes) or `pixels` column")
    rows = range(unit.first_row, unit.first_row + table.num_rows)
    sources = pa.array([f"{unit.parquet}#{row}" for row in rows], pa.string())
    columns = {"id": ids, "source": sources, "pixels": fixed_size_list(pixels)}
    if labels is not None:
        columns["label"] = labels
    return pa.table(columns)


def read_file(file: str) -> bytes:
    fs, inner = filesystem_for(file)
    try:
        with fs.open_input_stream(inner) as stream:
            return stream.read()
    except OSError as exc:
        raise UserError(f"{shown_text(file)}: cannot read ({short_reason(exc)})") from None


def _read_row_group(unit: InputUnit) -> pa.Table:
    fs, inner = filesystem_for(unit.parquet)
    try:
        with fs.open_input_file(inner) as f:
            table = pq.ParquetFile(f).read_row_group(unit.row_group)
    except (OSError, ValueError, TypeError, pa.ArrowException) as exc:
        reason = short_reason(exc, 120, Path(inner))
        raise UserError(f"{shown_text(unit.parquet)}: not readable as Parquet ({reason})") from None
    names = table.schema.names
    if len(set(names)) != len(names):
        repeated = next(n for n in names if names.count(n) > 1)
        column = shown_text(repeated, 40)
        raise UserError(
            f"{shown_text(unit.parquet)}: not readable as Parquet (column {column!r} appears twice)"
        )
    return table


def _int_column(table: pa.Table, name: str, where: str) -> pa.ChunkedArray:
    """A column cast to int64 (as Arrow casts safely: 7.0 and "7" pass, 7.5 and "x" do not)."""
    column = table.column(name)
    try:
        return column.cast(pa.int64())
    except (ValueError, TypeError, pa.ArrowException) as exc:
        reason = f"{shown_text(column.type, 40, keep_end=False)}: {short_reason(exc)}"
        raise UserError(f"{where}: column `{name}` must hold integers ({reason})") from None


def _id_column(table: pa.Table, where: str, unit: InputUnit) -> pa.ChunkedArray | pa.Array:
    """The unit's ids, which must be non-null integers, unique within a row group (checking
    across units would take a pass over the input); row numbers when there is no `id`."""
    if "id" not in table.column_names:
        return pa.array(np.arange(unit.first_id, unit.first_id + table.num_rows), pa.int64())
    ids = _int_column(table, "id", where)
    if ids.null_count:
        row = unit.first_row + int(np.flatnonzero(ids.is_null().to_numpy())[0])
        raise UserError(f"{where} row {row}: `id` is null (ids must be unique integers)")
    values = ids.to_numpy()
    order = np.argsort(values, kind="stable")
    same = np.flatnonzero(values[order][1:] == values[order][:-1])
    if same.size:
        first, second = order[same[0]], order[same[0] + 1]
        first, second = unit.first_row + first, unit.first_row + second
        raise UserError(
            f"{where}: column `id` repeats {values[first - unit.first_row]} (rows {first} and "
            f"{second}); "
            "ids must be unique"
        )
    return ids


def _image_column(column: pa.ChunkedArray, plan: InputPlan, where: str, first: int) -> np.ndarray:
    """(N, C*H*W) uint8 from a column of image file bytes (PNG, JPEG); rows count from first."""
    rows = []
    for row, data in enumerate(column.to_pylist(), start=first):
        if data is None:
            raise UserError(f"{where} row {row}: `image` is null")
        if not isinstance(data, bytes):
            kind = shown_text(column.type, 40, keep_end=False)
            raise UserError(f"{where}: column `image` must hold image file bytes (got {kind})")
        rows.append(_decode_png(data, plan, f"{where} row {row}"))
    return np.stack(rows)


def _pixels_column(
    column: pa.ChunkedArray, shape: tuple[int, int, int], where: str, first: int
) -> np.ndarray:
    """(N, C*H*W) uint8 from a list column of C*H*W integer values 0..255 per row (the model's
    own size: pixels are taken as they are); rows count from first."""
    c, h, w = shape
    needs = f"the model takes {c * h * w} ({c}x{h}x{w})"
    return pixel_rows(column, c * h * w, where, "pixels", needs, first)


def _decode_png(data: bytes, plan: InputPlan, where: str = "input") -> np.ndarray:
    """Image file bytes (PNG, JPEG or any format PIL reads) -> C*H*W uint8 values, shaped as
    in training: colour becomes grey for a 1-channel model (grey becomes RGB for a 3-channel
    one), then the training's crop and resize. A model trained at its images' own size takes
    only that size."""
    c, h, w = plan.shape
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise UserError(f"{where}: image is too large to decode") from None
    except Exception:  # PIL raises many types for bytes that are not an image
        raise UserError(f"{where}: not an image (PNG or JPEG expected)") from None
    fixed_size = plan.spec.size is None and plan.spec.crop is None
    if fixed_size and image.size != (w, h):  # checked before decoding: the header has it
        raise UserError(
            f"{where}: image is {image.size[0]}x{image.size[1]}, the model takes {w}x{h}"
        )
    try:
        image = image.convert("L" if c == 1 else "RGB")
    except Exception as exc:  # a truncated or corrupt file fails only once it is decoded
        raise UserError(
            f"{where}: broken {image.format or ''} image ({short_reason(exc)})"
        ) from None
    array = np.array(image)
    tensor = torch.from_numpy(array[None] if c == 1 else array.transpose(2, 0, 1).copy())
    shaped = crop_and_resize(tensor, plan.spec, where)
    if tuple(shaped.shape) != (c, h, w):
        raise UserError(
            f"{where}: image is {image.size[0]}x{image.size[1]}, the model takes {w}x{h}"
        )
    return shaped.reshape(-1).numpy()


def shown_text(text: object, limit: int = 100, keep_end: bool = True) -> str:
    """text as one printable line of at most limit characters for an error message: control
    characters (and undecodable file-name bytes) escaped; a long text keeps its end (where a
    path names its file) or, with keep_end=False, its start."""
    line = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in str(text))
    if len(line) <= limit:
        return line
    return "..." + line[3 - limit :] if keep_end else line[: limit - 3] + "..."


def short_reason(exc: BaseException, limit: int = 80, path: Path | None = None) -> str:
    """The first line of an exception's message, shortened for a one-line error; path, which
    Arrow repeats in its messages, is shortened to its name."""
    lines = str(exc).strip().splitlines()
    line = lines[0] if lines else type(exc).__name__
    if path is not None:
        line = line.replace(str(path), path.name)
    return shown_text(line, limit, keep_end=False)
