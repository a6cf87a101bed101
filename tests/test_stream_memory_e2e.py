"""data.ingest: stream trains a set larger than its worker's memory: the worker's own pages
stay below the decoded set, which it would exceed by far if it held the set."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow
SIDE, IMAGES = 256, 6000  # 3x256x256: 1.1 GiB decoded
TRAIN = [
    "data.source=parquet", "data.image_column=pixels", "data.channels=3",
    f"data.pixels_shape=[3,{SIDE},{SIDE}]", "data.ingest=stream", "data.binarize=dynamic",
    "data.shuffle_buffer=64", "data.val_fraction=0.01", "data.test_fraction=0.01",
    "model.channels=[4,8]", "model.hidden_dim=0", "model.latent_dim=4",
    "train.epochs=1", "train.batch_size=32", "scaling.num_workers=1", "scaling.cpus_per_worker=1",
]  # fmt: skip


def write_flat_images(path: Path, n: int, side: int) -> int:
    """n RGB images, each one flat colour (Parquet's encodings shrink them to almost nothing,
    so the test spends its time training, not writing), in row groups of 64; returns the
    decoded bytes."""
    rng = np.random.default_rng(0)
    schema = pa.schema([("pixels", pa.list_(pa.uint8(), 3 * side * side))])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, n, 512):
            colours = rng.integers(0, 256, (min(512, n - start), 3, 1), np.uint8)
            flat = np.repeat(colours, side * side, axis=2).reshape(-1)
            column = pa.FixedSizeListArray.from_arrays(pa.array(flat), 3 * side * side)
            writer.write_table(pa.table({"pixels": column}, schema=schema), row_group_size=64)
    return n * 3 * side * side


def train_worker_peak_uss(cmd: list[str], log: Path, timeout_s: float = 600) -> int:
    """Run cmd; the peak unique memory (USS: its own pages, not the object store's shared
    ones) of the Ray Train worker it starts, sampled every 0.2 s."""
    peak, deadline = 0, time.monotonic() + timeout_s
    with log.open("w") as out:
        run = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        while run.poll() is None and time.monotonic() < deadline:
            for process in psutil.process_iter(["cmdline"]):
                try:
                    if "RayTrainWorker" in " ".join(process.info["cmdline"] or []):
                        peak = max(peak, process.memory_full_info().uss)
                except psutil.Error:
                    pass
            time.sleep(0.2)
        if run.poll() is None:
            run.kill()
    assert run.wait() == 0, log.read_text()[-3000:]
    return peak


def test_a_streamed_set_larger_than_the_worker_trains(tmp_path):
    decoded = write_flat_images(tmp_path / "set.parquet", IMAGES, SIDE)
    where = [f"data.path={tmp_path / 'set.parquet'}", f"run.storage_path={tmp_path / 'runs'}"]
    cmd = [sys.executable, "-m", "raytrain_vae.train", "vae", *TRAIN, *where]
    peak = train_worker_peak_uss(cmd, tmp_path / "train.log")
    log = (tmp_path / "train.log").read_text()
    assert "epoch 1/1" in log, log[-3000:]
    assert 0 < peak < decoded, f"worker peak {peak / 2**20:.0f} MiB, set {decoded / 2**20:.0f} MiB"
