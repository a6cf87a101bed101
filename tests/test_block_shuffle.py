"""The streamed runs' own batching and local shuffle (block_shuffle): no Ray."""

from __future__ import annotations

import numpy as np
import pytest

from raytrain_vae.block_shuffle import ShuffleBuffer, block_batches


def blocks_of(rows: np.ndarray, sizes: list[int]) -> list[dict[str, np.ndarray]]:
    """rows cut into consecutive blocks of the given sizes, with an id column, read-only as
    Ray's are."""
    edges = np.cumsum([0, *sizes])
    assert edges[-1] == len(rows)
    out = [
        {"image": rows[a:b], "id": np.arange(a, b)}
        for a, b in zip(edges[:-1], edges[1:], strict=True)
    ]
    for block in out:
        for column in block.values():
            column.flags.writeable = False
    return out


def ids(batches: list[dict[str, np.ndarray]]) -> np.ndarray:
    """The rows' ids in the order the batches hold them, after checking that each batch's
    columns still belong together (image row i holds i)."""
    for b in batches:
        assert (b["image"][:, 0] == b["id"]).all()
    return np.concatenate([b["id"] for b in batches])


ROWS = np.arange(1000, dtype=np.int64)[:, None].repeat(3, axis=1)  # row i holds i, i, i


@pytest.mark.parametrize("buffer", [0, 64, 5000])
def test_every_row_once_in_full_batches_but_the_last(buffer):
    rng = np.random.default_rng(0)
    batches = list(block_batches(blocks_of(ROWS, [1, 300, 7, 450, 242]), 32, buffer, rng))
    assert [len(b["id"]) for b in batches] == [32] * 31 + [8]
    assert sorted(ids(batches).tolist()) == list(range(1000))
    got = np.concatenate([b["image"] for b in batches])
    assert (got == got[:, :1]).all()  # rows stay whole
    assert all(b["image"].flags.writeable for b in batches)


def test_without_a_buffer_the_order_is_kept():
    batches = list(block_batches(blocks_of(ROWS, [10, 990]), 64))
    assert ids(batches).tolist() == list(range(1000))


def test_equal_rows_cut_differently_give_equal_steps():
    """Two DDP ranks with the same number of rows in other blocks take as many steps."""
    a = block_batches(blocks_of(ROWS, [500, 500]), 128, 100, np.random.default_rng(1))
    b = block_batches(blocks_of(ROWS, [3, 997]), 128, 100, np.random.default_rng(2))
    assert len(list(a)) == len(list(b)) == 8


def test_the_buffer_shuffles_and_draws_only_from_rows_it_has_seen():
    blocks = blocks_of(ROWS, [100] * 10)
    batches = list(block_batches(blocks, 50, 200, np.random.default_rng(3)))
    order = ids(batches)
    assert order.tolist() != list(range(1000))
    # The first batch leaves once 250 rows are held: it is drawn from the first 300 (3 blocks),
    # and spread over them rather than taken from the front.
    first = batches[0]["id"]
    assert first.max() < 300 and first.min() < 100 and first.max() >= 200
    # A shuffle buffer of 200 moves no row far: each leaves within buffer + a block of its place.
    assert (np.arange(1000) - np.argsort(order) < 300).all()


def test_a_seeded_rng_gives_the_same_order():
    def order(seed: int) -> list[int]:
        rng = np.random.default_rng(seed)
        return ids(list(block_batches(blocks_of(ROWS, [250] * 4), 64, 128, rng))).tolist()

    assert order(5) == order(5) != order(6)


def test_a_buffer_without_an_rng_is_refused():
    with pytest.raises(ValueError, match="rng"):
        list(block_batches(blocks_of(ROWS, [1000]), 10, 10))


def test_no_blocks_or_empty_blocks_give_no_batches():
    empty = [{}, {"image": np.empty((0, 3)), "id": np.empty(0)}]
    assert list(block_batches([], 10, 10, np.random.default_rng(0))) == []
    assert list(block_batches(empty, 10, 10, np.random.default_rng(0))) == []
    batches = list(block_batches([empty[0], *blocks_of(ROWS, [1000]), empty[1]], 600))
    assert ids(batches).tolist() == list(range(1000))


def test_a_buffer_draw_is_uniform_over_the_rows_it_holds():
    """5 of 50 held rows, 2000 times: each row comes out about 200 times (sd 13.4)."""
    rng = np.random.default_rng(7)
    counts = np.zeros(50, np.int64)
    for _ in range(2000):
        held = ShuffleBuffer(rng)
        held.add({"id": np.arange(20)})
        held.add({"id": np.arange(20, 50)})
        taken = held.take(5)["id"]
        assert held.size == 45 and len(set(taken.tolist())) == 5
        left = held.columns["id"][: held.size]
        assert sorted([*left.tolist(), *taken.tolist()]) == list(range(50))
        counts[taken] += 1
    assert counts.min() > 150 and counts.max() < 250
