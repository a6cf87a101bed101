"""Gradient all-reduce through shared memory for CPU DDP ranks that share one host.

Gloo moves a CPU gradient bucket over loopback TCP through several threads per message: on a
small VM a 6.8 MB all-reduce takes about 9 ms and even a one-float all-reduce takes 1 ms. Ranks
on one host can instead write their bucket into a shared file in /dev/shm, wait until every rank
has written, and each sum all of them in the same order (so the replicas stay bit-identical).
"""

import mmap
import os
import platform
import time
import uuid

import numpy as np
import torch
import torch.distributed as dist

SHM_DIR = "/dev/shm"
BUDGET_BYTES = 32 << 20  # the whole shared file, whatever the world size: chunks if needed
FLAG_STRIDE = 8  # int64s between two ranks' flags: one 64-byte cache line each
HEADER_BYTES = 4096
TIMEOUT_S = 1800.0  # Gloo's default collective timeout
SPIN_S = 0.01  # spin (yielding the core) this long for the other ranks, then sleep
SLEEP_MIN_S, SLEEP_MAX_S = 50e-6, 1e-3

# The flag is written after the data with plain stores: correct under x86-64's total store
# order, not under the weaker orders of ARM or POWER, which keep Gloo.
SUPPORTED_MACHINES = {"x86_64", "amd64"}


class SharedMemoryAllReduce:
    """A DDP communication hook that averages gradient buckets through one shared file.

    Slots are double-buffered by generation: a rank writes generation g + 2 into the slot of g
    only after every rank has flagged g + 1, that is, after every rank has finished reading g.
    """

    def __init__(self, mapping: mmap.mmap, rank: int, world: int, capacity: int) -> None:
        self._mmap = mapping
        flags = np.frombuffer(mapping, np.int64, world * FLAG_STRIDE)
        self._flags = flags[::FLAG_STRIDE]
        self._slots = torch.frombuffer(
            mapping, dtype=torch.float32, offset=HEADER_BYTES, count=2 * world * capacity
        ).view(2, world, capacity)
        self.rank, self.world, self.capacity = rank, world, capacity
        self._generation = 0

    def all_reduce_mean_(self, flat: torch.Tensor) -> torch.Tensor:
        """Replace the 1-D float32 tensor `flat` by its mean over all ranks, in place."""
        for start in range(0, flat.numel(), self.capacity):
            chunk = flat[start : start + self.capacity]
            self._generation += 1
            slots = self._slots[self._generation % 2, :, : chunk.numel()]
            slots[self.rank].copy_(chunk)
            self._flags[self.rank] = self._generation
            self._wait_for_all(self._generation)
            torch.sum(slots, dim=0, out=chunk)
        return flat.div_(self.world)

    def _wait_for_all(self, generation: int) -> None:
        # Ranks normally arrive within a few ms of each other: spin for those. A rank that lags
        # for longer (a slow disk, a busy core) is waited for in sleeps, so the waiting rank does
        # not burn the core it shares with other work; the sleeps add at most SLEEP_MAX_S.
        start = time.monotonic()
        nap = SLEEP_MIN_S
        while self._flags.min() < generation:
            waited = time.monotonic() - start
            if waited < SPIN_S:
                os.sched_yield()
                continue
            if waited > TIMEOUT_S:
                raise RuntimeError(
                    f"shared-memory all-reduce: a rank did not arrive in {TIMEOUT_S:.0f} s"
                )
            time.sleep(nap)
            nap = min(2 * nap, SLEEP_MAX_S)

    # Real (not string) annotations: DDP checks them when the hook is registered.
    def hook(self, _state: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        """DDP comm hook: average the (float32) bucket now and hand DDP a finished future."""
        buffer = self.all_reduce_mean_(bucket.buffer())
        done: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        done.set_result(buffer)
        return done


def _map_shared_file(path: str, size: int, create: bool) -> mmap.mmap | None:
    try:
        fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
    except OSError:
        return None
    try:
        if create:
            # Reserve the pages now: an over-full tmpfs fails here with ENOSPC instead of
            # killing a rank with SIGBUS in the middle of a step.
            os.posix_fallocate(fd, 0, size)
        return mmap.mmap(fd, size)
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


def shared_memory_all_reduce(num_gradients: int, all_local: bool) -> SharedMemoryAllReduce | None:
    """Collective over the default process group: every rank gets a hook, or every rank gets
    None (ranks on several hosts, another architecture, no /dev/shm or no room in it)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    capacity = max(1, min(num_gradients, (BUDGET_BYTES - HEADER_BYTES) // (2 * world * 4)))
    size = HEADER_BYTES + 2 * world * capacity * 4
    usable = (
        all_local
        and world > 1
        and platform.machine().lower() in SUPPORTED_MACHINES
        and os.path.isdir(SHM_DIR)
    )
    name = [os.path.join(SHM_DIR, f"raytrain_vae-{uuid.uuid4().hex}") if rank == 0 else None]
    dist.broadcast_object_list(name, src=0)
    path = name[0]
    mapping = _map_shared_file(path, size, create=True) if usable and rank == 0 else None
    dist.barrier()
    if usable and rank != 0:
        mapping = _map_shared_file(path, size, create=False)
    ok = torch.tensor([int(mapping is not None)])
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)  # also: every rank has opened the file
    if rank == 0 and os.path.exists(path):
        os.unlink(path)  # the mappings live on, and nothing is left behind if a rank dies
    if not ok.item():
        if mapping is not None:
            mapping.close()
        return None
    return SharedMemoryAllReduce(mapping, rank, world, capacity)
