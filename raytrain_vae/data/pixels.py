"""Pixel-value columns (a list of C*H*W integers 0..255 per row) into uint8 rows in one
vectorised pass over the column, naming the first bad row of a bad one."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from raytrain_vae.data.source import DataError


def _shown_type(kind: pa.DataType) -> str:
    """A column type for a one-line message: printable, at most 40 characters."""
    text = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in str(kind))
    return text if len(text) <= 40 else text[:37] + "..."


def pixel_rows(
    column: pa.ChunkedArray | pa.Array,
    size: int,
    where: str,
    name: str,
    needs: str,
    first: int = 0,
    numbers: np.ndarray | None = None,
) -> np.ndarray:
    """(N, size) uint8 from a list column of `size` integer values 0..255 per row; `where`
    names the file, rows count from `first` (or are numbered by `numbers`, one per row), and
    `needs` says where `size` comes from (in the message for a row of another length)."""
    kind = column.type
    lists = pa.types.is_list(kind) or pa.types.is_large_list(kind)
    if not (lists or pa.types.is_fixed_size_list(kind)):
        raise DataError(
            f"{where}: column `{name}` must hold a list of {size} values per row "
            f"(got {_shown_type(kind)})"
        )
    if not (pa.types.is_integer(kind.value_type) or pa.types.is_floating(kind.value_type)):
        raise DataError(
            f"{where}: column `{name}` must hold integers 0..255 (got {_shown_type(kind)})"
        )
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    parts, start = [], 0
    try:
        for chunk in chunks:
            parts.append(_chunk_rows(chunk, start, size, where, name, needs))
            start += len(chunk)
    except _BadRow as bad:
        row = first + bad.index if numbers is None else int(numbers[bad.index])
        raise DataError(f"{where} row {row}: {bad.reason}") from None
    return np.concatenate(parts) if parts else np.empty((0, size), np.uint8)


class _BadRow(Exception):
    """A bad row at an index of the column, numbered by the caller for its message."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(reason)
        self.index, self.reason = index, reason


def _chunk_rows(
    chunk: pa.Array, start: int, size: int, where: str, name: str, needs: str
) -> np.ndarray:
    """One chunk (its first row is row `start`) -> (n, size) uint8."""
    if chunk.null_count:
        index = start + int(np.flatnonzero(chunk.is_null().to_numpy(zero_copy_only=False))[0])
        raise _BadRow(index, f"`{name}` is null")
    if pa.types.is_fixed_size_list(chunk.type):
        lengths = np.full(len(chunk), chunk.type.list_size)
    else:
        lengths = chunk.value_lengths().to_numpy()
    wrong = np.flatnonzero(lengths != size)
    if wrong.size:
        index, n = start + int(wrong[0]), int(lengths[wrong[0]])
        raise _BadRow(index, f"`{name}` holds {n} values, {needs}")
    values = chunk.flatten()  # honours the chunk's offset (a slice or a take)
    if values.null_count:
        index = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
        raise _BadRow(start + index // size, f"`{name}` holds a null value")
    v = values.to_numpy()
    bad = (v < 0) | (v > 255)
    if v.dtype.kind == "f":
        bad |= ~np.isfinite(v) | (v != np.floor(v))
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        raise _BadRow(
            start + index // size,
            f"`{name}` holds {v[index].item()!r}; pixels must be integers 0..255",
        )
    return v.astype(np.uint8).reshape(-1, size)
