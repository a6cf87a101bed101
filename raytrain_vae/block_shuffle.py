"""Training batches from streamed blocks through a local shuffle buffer: Ray Data's local
shuffle, done on whole blocks in the training process (benchmarks/ingest_throughput.py)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

Columns = dict[str, np.ndarray]  # equal-length columns of rows, as Ray Data's numpy batches


def _length(columns: Columns) -> int:
    return len(next(iter(columns.values()))) if columns else 0


class ShuffleBuffer:
    """Rows held in preallocated columns; a batch is a uniform random draw of the held rows,
    whose places the last rows fill. Each row is copied in once and out once, however large
    the buffer."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng, self.columns, self.size = rng, {}, 0

    def add(self, block: Columns) -> None:
        n = _length(block)
        if not self.columns:
            self.columns = {k: np.empty((2 * n, *v.shape[1:]), v.dtype) for k, v in block.items()}
        capacity = _length(self.columns)
        if self.size + n > capacity:
            grown = max(2 * capacity, self.size + n)
            for name, values in self.columns.items():
                bigger = np.empty((grown, *values.shape[1:]), values.dtype)
                bigger[: self.size] = values[: self.size]
                self.columns[name] = bigger
        for name, values in self.columns.items():
            values[self.size : self.size + n] = block[name]
        self.size += n

    def take(self, count: int) -> Columns:
        """count rows drawn at random (a copy), removed from the buffer."""
        chosen = self.rng.choice(self.size, count, replace=False)
        batch = {name: values[chosen] for name, values in self.columns.items()}
        tail = self.size - count
        holes = np.sort(chosen[chosen < tail])
        movers = np.setdiff1d(np.arange(tail, self.size), chosen, assume_unique=True)
        for values in self.columns.values():
            values[holes] = values[movers]
        self.size = tail
        return batch


def _ordered_batches(blocks: Iterable[Columns], batch_size: int) -> Iterator[Columns]:
    held: Columns | None = None
    for block in blocks:
        # A copy either way: blocks from Ray's object store are read-only, and torch warns.
        held = (
            {k: v.copy() for k, v in block.items()}
            if held is None
            else {k: np.concatenate([held[k], block[k]]) for k in held}
        )
        taken = _length(held) // batch_size * batch_size
        yield from ({k: v[i : i + batch_size] for k, v in held.items()}
                    for i in range(0, taken, batch_size))  # fmt: skip
        held = {k: v[taken:] for k, v in held.items()}
    if held is not None and _length(held):
        yield held


def block_batches(
    blocks: Iterable[Columns],
    batch_size: int,
    buffer: int = 0,
    rng: np.random.Generator | None = None,
) -> Iterator[Columns]:
    """Batches of batch_size rows (the last one smaller) from blocks of rows as they arrive.

    With buffer > 0 (and an rng), each batch is a random draw from at least `buffer` held
    rows (ShuffleBuffer); with buffer 0 the rows keep their order. Batches run across block
    boundaries, so ranks holding equal row counts take equal numbers of steps (DDP needs that)."""
    if buffer and rng is None:
        raise ValueError("a shuffle buffer needs an rng")
    blocks = (b for b in blocks if _length(b))  # a read task may find no row of its split
    if not buffer:
        yield from _ordered_batches(blocks, batch_size)
        return
    held = ShuffleBuffer(rng)
    for block in blocks:
        held.add(block)
        while held.size >= buffer + batch_size:
            yield held.take(batch_size)
    while held.size:
        yield held.take(min(batch_size, held.size))
