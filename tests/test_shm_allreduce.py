"""The shared-memory gradient all-reduce, in two real processes over a Gloo process group."""

from __future__ import annotations

import os
import socket
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from raytrain_vae.perf import shm_allreduce
from raytrain_vae.perf.shm_allreduce import SUPPORTED_MACHINES, shared_memory_all_reduce

needs_x86 = pytest.mark.skipif(
    os.uname().machine.lower() not in SUPPORTED_MACHINES or not os.path.isdir("/dev/shm"),
    reason="the shared-memory path runs on x86-64 with /dev/shm",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, world: int, *args) -> None:
    mp.spawn(fn, args=(world, _free_port(), *args), nprocs=world, join=True)


def _init(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )


def _finish() -> None:
    """End a spawned rank once its results are saved. torch 2.14's Gloo aborts now and then in a
    thread destructor as the interpreter exits ("terminate called without an active exception",
    4 of 12 plain two-rank DDP runs here, with or without our hook), so leave without running
    C++ static destructors."""
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def _mean_of_ranks(rank, world, port, out_dir, budget):
    _init(rank, world, port)
    shm_allreduce.BUDGET_BYTES = budget
    reducer = shared_memory_all_reduce(num_gradients=1000, all_local=True)
    assert reducer is not None
    # Rank r contributes r + i at position i: the mean is (world - 1) / 2 + i, exactly.
    results = []
    for n in (1, 7, 1000, 333):
        t = torch.arange(n, dtype=torch.float32) + rank
        results.append(reducer.all_reduce_mean_(t).clone())
    torch.save({"results": results, "capacity": reducer.capacity}, f"{out_dir}/{rank}.pt")
    _finish()


@needs_x86
@pytest.mark.parametrize("world, budget", [(2, 32 << 20), (3, 4096 + 2 * 3 * 4 * 64)])
def test_all_reduce_is_the_exact_mean_also_in_chunks(tmp_path, world, budget):
    _spawn(_mean_of_ranks, world, str(tmp_path), budget)
    for rank in range(world):
        got = torch.load(tmp_path / f"{rank}.pt")
        # A small budget forces chunks (64 floats per slot) and reuses both slots many times.
        assert got["capacity"] == (1000 if budget > 1 << 20 else 64)
        for t, n in zip(got["results"], (1, 7, 1000, 333), strict=True):
            assert torch.equal(t, torch.arange(n, dtype=torch.float32) + (world - 1) / 2)
    assert not [f for f in os.listdir("/dev/shm") if f.startswith("raytrain_vae-")]


def _train_ddp(rank, world, port, out_dir, use_shm):
    _init(rank, world, port)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ELU(), torch.nn.Linear(64, 5))
    ddp = DDP(model, bucket_cap_mb=0.001)  # several buckets per step
    if use_shm:
        reducer = shared_memory_all_reduce(sum(p.numel() for p in model.parameters()), True)
        ddp.register_comm_hook(None, reducer.hook)
    torch.save(model.state_dict(), f"{out_dir}/init.pt")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(rank)
    for _ in range(5):
        x = torch.randn(8, 20, generator=g)
        loss = ddp(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save(model.state_dict(), f"{out_dir}/{rank}.pt")
    _finish()


@needs_x86
def test_ddp_with_the_hook_trains_like_gloo_and_replicas_stay_identical(tmp_path):
    for kind, use_shm in (("gloo", False), ("shm", True)):
        (tmp_path / kind).mkdir()
        _spawn(_train_ddp, 2, str(tmp_path / kind), use_shm)
    gloo = torch.load(tmp_path / "gloo" / "0.pt")
    shm = [torch.load(tmp_path / "shm" / f"{r}.pt") for r in range(2)]
    for name, value in gloo.items():
        assert torch.equal(shm[0][name], shm[1][name]), name
        torch.testing.assert_close(shm[0][name], value, rtol=1e-5, atol=1e-6)
    init = torch.load(tmp_path / "shm" / "init.pt")
    assert all(not torch.equal(init[name], shm[0][name]) for name in init), "no training happened"


def _fallback(rank, world, port, out_dir):
    _init(rank, world, port)
    # One rank on another host is enough: every rank must get None, and nobody may hang.
    reducer = shared_memory_all_reduce(num_gradients=10, all_local=rank == 0)
    torch.save(reducer is None, f"{out_dir}/{rank}.pt")
    _finish()


def test_any_rank_off_the_host_makes_every_rank_keep_gloo(tmp_path):
    _spawn(_fallback, 2, str(tmp_path))
    assert [torch.load(tmp_path / f"{r}.pt") for r in range(2)] == [True, True]
    assert not [f for f in os.listdir("/dev/shm") if f.startswith("raytrain_vae-")]


def _late_rank(rank, world, port, out_dir):
    _init(rank, world, port)
    reducer = shared_memory_all_reduce(num_gradients=10, all_local=True)
    if rank == 1:
        time.sleep(0.6)  # a straggler: a slow disk, a busy core
    cpu, wall = time.thread_time(), time.monotonic()
    result = reducer.all_reduce_mean_(torch.full((10,), float(rank)))
    cpu, wall = time.thread_time() - cpu, time.monotonic() - wall
    torch.save({"result": result, "cpu": cpu, "wall": wall}, f"{out_dir}/{rank}.pt")
    _finish()


@needs_x86
def test_a_rank_waiting_for_a_straggler_sleeps_instead_of_spinning(tmp_path):
    _spawn(_late_rank, 2, str(tmp_path))
    waiter = torch.load(tmp_path / "0.pt")
    assert torch.equal(waiter["result"], torch.full((10,), 0.5))
    assert waiter["wall"] > 0.4
    # Spinning would cost about the whole wait in CPU time; sleeping costs the first 10 ms.
    assert waiter["cpu"] < 0.1 * waiter["wall"]
