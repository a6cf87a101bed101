"""User images for reconstruct and encode: a dataset split, Parquet or an image folder, checked
row by row into id, label and uint8 pixel columns."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from raytrain_vae.config import UserError
from raytrain_vae.data import load_splits
from raytrain_vae.model_io import load_model_dir


def fixed_size_list(values: np.ndarray) -> pa.FixedSizeListArray:
    """(N, D) array -> Arrow fixed_size_list<D> column."""
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # an image folder's files, in any letter case


def read_inputs(model_dir: str, split: str, input_path: str | None) -> pa.Table:
    """Rows id, label (when known), pixels (fixed_size_list<uint8>) from the model's dataset
    split, or from Parquet (an `image` column of PNG/JPEG bytes, or a `pixels` column of C*H*W
    integers 0..255; optional integer `id` and `label`) or a folder of PNG/JPEG files.

    Input that cannot be read raises a one-line UserError naming the file (and the row,
    counted from 0, or the column); nothing is written."""
    model, cfg = load_model_dir(model_dir)
    shape = model.image_shape
    if input_path is None:
        return _split_rows(cfg, split)
    path = _input_path(input_path)
    where = _shown(path)
    if path.is_dir() and not list(path.glob("*.parquet")):
        pixels = _read_image_folder(path, shape)
        return pa.table(
            {"id": pa.array(np.arange(len(pixels)), pa.int64()), "pixels": fixed_size_list(pixels)}
        )
    table = _read_parquet(path, where)
    ids = _id_column(table, where)
    labels = _int_column(table, "label", where) if "label" in table.column_names else None
    if "pixels" in table.column_names:
        pixels = _pixels_column(table.column("pixels"), shape, where)
    elif "image" in table.column_names:
        pixels = _image_column(table.column("image"), shape, where)
    else:
        raise UserError(f"{where}: needs an `image` (PNG/JPEG bytes) or `pixels` column")
    columns = {"id": ids, "pixels": fixed_size_list(pixels)}
    if labels is not None:
        columns["label"] = labels
    return pa.table(columns)


def _split_rows(cfg, split: str) -> pa.Table:
    """The rows of one split (test, val or train) of the model's own dataset."""
    if split not in ("test", "val", "train"):
        raise UserError(f"split must be test, val or train (got '{_shown(split, 20)}')")
    splits = load_splits(cfg.data)
    images, labels = getattr(splits, split), getattr(splits, f"{split}_labels")
    if len(images) == 0:
        raise UserError(f"the {split} split of {cfg.data.dataset} has no images")
    return pa.table(
        {
            "id": pa.array(np.arange(len(images)), pa.int64()),
            "label": pa.array(labels.numpy(), pa.int64()),
            "pixels": fixed_size_list(images.reshape(len(images), -1).numpy()),
        }
    )


def _input_path(input_path: str) -> Path:
    """--input as an existing, non-empty file or a folder; anything else is a UserError."""
    shown = _shown(input_path)
    if not input_path:
        raise UserError("--input is empty: give a Parquet file or a folder of images")
    if "\0" in input_path:
        raise UserError(f"{shown}: --input holds a NUL byte")
    try:
        path = Path(input_path).expanduser()
        if path.is_dir():
            return path
        if not path.exists():
            raise UserError(f"{shown}: no such file or folder")
        if not path.is_file():
            raise UserError(f"{shown}: not a regular file or folder")
        if path.stat().st_size == 0:
            raise UserError(f"{shown}: empty file (Parquet expected)")
    except (OSError, RuntimeError) as exc:  # RuntimeError: ~user whose home is unknown
        raise UserError(f"{shown}: cannot read ({_reason(exc)})") from None
    return path


def _read_image_folder(path: Path, shape: tuple[int, int, int]) -> np.ndarray:
    """(N, C*H*W) uint8 from a folder's .png/.jpg/.jpeg files, in sorted file-name order."""
    try:
        files = sorted(
            p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        )
    except OSError as exc:
        raise UserError(f"{_shown(path)}: cannot list the folder ({_reason(exc)})") from None
    if not files:
        raise UserError(f"{_shown(path)}: no .png, .jpg, .jpeg or .parquet files to read")
    rows = []
    for file in files:
        try:
            data = file.read_bytes()
        except OSError as exc:
            raise UserError(f"{_shown(file)}: cannot read ({_reason(exc)})") from None
        rows.append(_decode_png(data, shape, _shown(file)))
    return np.stack(rows)


def _read_parquet(path: Path, where: str) -> pa.Table:
    """A Parquet file (or folder of them) with at least one row."""
    if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
        raise UserError(f"{where}: --input takes Parquet or a folder of images, not one image")
    try:  # a repeated column name fails here too ("Multiple matches for FieldRef")
        table = pq.read_table(path)
    except (OSError, ValueError, TypeError, pa.ArrowException) as exc:
        raise UserError(f"{where}: not readable as Parquet ({_reason(exc, 120, path)})") from None
    if table.num_rows == 0:
        raise UserError(f"{where}: no rows to read")
    return table


def _int_column(table: pa.Table, name: str, where: str) -> pa.ChunkedArray:
    """A column cast to int64 (as Arrow casts safely: 7.0 and "7" pass, 7.5 and "x" do not)."""
    column = table.column(name)
    try:
        return column.cast(pa.int64())
    except (ValueError, TypeError, pa.ArrowException) as exc:
        reason = f"{_shown(column.type, 40, keep_end=False)}: {_reason(exc)}"
        raise UserError(f"{where}: column `{name}` must hold integers ({reason})") from None


def _id_column(table: pa.Table, where: str) -> pa.ChunkedArray | pa.Array:
    """The table's ids, which must be unique non-null integers; row numbers when it has none."""
    if "id" not in table.column_names:
        return pa.array(np.arange(table.num_rows), pa.int64())
    ids = _int_column(table, "id", where)
    if ids.null_count:
        row = int(np.flatnonzero(ids.is_null().to_numpy())[0])
        raise UserError(f"{where} row {row}: `id` is null (ids must be unique integers)")
    values = ids.to_numpy()
    order = np.argsort(values, kind="stable")
    same = np.flatnonzero(values[order][1:] == values[order][:-1])
    if same.size:
        first, second = order[same[0]], order[same[0] + 1]
        raise UserError(
            f"{where}: column `id` repeats {values[first]} (rows {first} and {second}); "
            "ids must be unique"
        )
    return ids


def _image_column(column: pa.ChunkedArray, shape: tuple[int, int, int], where: str) -> np.ndarray:
    """(N, C*H*W) uint8 from a column of image file bytes (PNG, JPEG)."""
    rows = []
    for row, data in enumerate(column.to_pylist()):
        if data is None:
            raise UserError(f"{where} row {row}: `image` is null")
        if not isinstance(data, bytes):
            kind = _shown(column.type, 40, keep_end=False)
            raise UserError(f"{where}: column `image` must hold image file bytes (got {kind})")
        rows.append(_decode_png(data, shape, f"{where} row {row}"))
    return np.stack(rows)


def _pixels_column(column: pa.ChunkedArray, shape: tuple[int, int, int], where: str) -> np.ndarray:
    """(N, C*H*W) uint8 from a list column of C*H*W integer values 0..255 per row."""
    size = int(np.prod(shape))
    kind, shown = column.type, _shown(column.type, 40, keep_end=False)
    if not (
        pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
    ):
        raise UserError(
            f"{where}: column `pixels` must hold a list of {size} values per row (got {shown})"
        )
    if not (pa.types.is_integer(kind.value_type) or pa.types.is_floating(kind.value_type)):
        raise UserError(f"{where}: column `pixels` must hold integers 0..255 (got {shown})")
    parts, start = [], 0
    for chunk in column.chunks:
        parts.append(_pixel_chunk(chunk, start, shape, where))
        start += len(chunk)
    return np.concatenate(parts)


def _pixel_chunk(
    chunk: pa.Array, start: int, shape: tuple[int, int, int], where: str
) -> np.ndarray:
    """One chunk of a `pixels` column (its first row is row `start`) -> (n, C*H*W) uint8."""
    size = int(np.prod(shape))
    if chunk.null_count:
        row = start + int(np.flatnonzero(chunk.is_null().to_numpy(zero_copy_only=False))[0])
        raise UserError(f"{where} row {row}: `pixels` is null")
    if pa.types.is_fixed_size_list(chunk.type):
        lengths = np.full(len(chunk), chunk.type.list_size)
    else:
        lengths = chunk.value_lengths().to_numpy()
    wrong = np.flatnonzero(lengths != size)
    if wrong.size:
        row, n = start + int(wrong[0]), int(lengths[wrong[0]])
        c, h, w = shape
        raise UserError(
            f"{where} row {row}: `pixels` holds {n} values, the model takes {size} ({c}x{h}x{w})"
        )
    values = chunk.flatten()
    if values.null_count:
        index = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
        raise UserError(f"{where} row {start + index // size}: `pixels` holds a null value")
    v = values.to_numpy()
    bad = (v < 0) | (v > 255)
    if v.dtype.kind == "f":
        bad |= ~np.isfinite(v) | (v != np.floor(v))
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        raise UserError(
            f"{where} row {start + index // size}: `pixels` holds {v[index].item()!r}; "
            "pixels must be integers 0..255"
        )
    return v.astype(np.uint8).reshape(-1, size)


def _decode_png(data: bytes, shape: tuple[int, int, int], where: str = "input") -> np.ndarray:
    """Image file bytes (PNG, JPEG or any format PIL reads) -> C*H*W uint8 values: colour
    becomes grey for a 1-channel model, grey becomes RGB for a 3-channel one."""
    c, h, w = shape
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise UserError(f"{where}: image is too large to decode") from None
    except Exception:  # PIL raises many types for bytes that are not an image
        raise UserError(f"{where}: not an image (PNG or JPEG expected)") from None
    if image.size != (w, h):  # checked before decoding: the header gives the size
        raise UserError(
            f"{where}: image is {image.size[0]}x{image.size[1]}, the model takes {w}x{h}"
        )
    try:
        image = image.convert("L" if c == 1 else "RGB")
    except Exception as exc:  # a truncated or corrupt file fails only once it is decoded
        raise UserError(f"{where}: broken {image.format or ''} image ({_reason(exc)})") from None
    array = np.asarray(image)
    return (array if c == 1 else array.transpose(2, 0, 1)).reshape(-1)


def _shown(text: object, limit: int = 100, keep_end: bool = True) -> str:
    """text as one printable line of at most limit characters for an error message: control
    characters (and undecodable file-name bytes) escaped; a long text keeps its end (where a
    path names its file) or, with keep_end=False, its start."""
    line = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in str(text))
    if len(line) <= limit:
        return line
    return "..." + line[3 - limit :] if keep_end else line[: limit - 3] + "..."


def _reason(exc: BaseException, limit: int = 80, path: Path | None = None) -> str:
    """The first line of an exception's message, shortened for a one-line error; path, which
    Arrow repeats in its messages, is shortened to its name."""
    lines = str(exc).strip().splitlines()
    line = lines[0] if lines else type(exc).__name__
    if path is not None:
        line = line.replace(str(path), path.name)
    return _shown(line, limit, keep_end=False)
