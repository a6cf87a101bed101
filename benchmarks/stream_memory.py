"""Stream memory: what a training worker holds when Ray Data streams its images, as the set grows.

data.ingest=stream must train a set larger than the workers' memory: a worker holds its model,
the batches in flight and Ray Data's buffers, never the set. Each case writes RGB images as a
Parquet pixels column (row groups of 64), runs `python -m raytrain_vae.train` on them (1 worker,
1 epoch, a small model) and samples the Ray Train worker's unique memory (USS: its own pages,
not the object store's shared ones) every 0.2 s. The same set is also trained in memory, where
the worker decodes every image. Target: the streamed worker's peak stays flat as the set grows
4x, and below the decoded set once that is larger than the worker.

    python benchmarks/stream_memory.py            # 3x128x128: 4000 and 16000 images (0.8 GB)
    python benchmarks/stream_memory.py --smoke    # 3x32x32: 300 and 1200 images
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

TRAIN = [
    "data.source=parquet", "data.image_column=pixels", "data.channels=3",
    "data.binarize=dynamic", "data.shuffle_buffer=64", "data.val_fraction=0.02",
    "model.channels=[8,16]", "model.hidden_dim=0", "model.latent_dim=4",
    "train.epochs=1", "train.batch_size=32",
    "scaling.num_workers=1", "scaling.cpus_per_worker=1",
]  # fmt: skip


def write_images(folder: Path, n: int, side: int) -> None:
    """n RGB side x side images (a flat colour with an inverted square: unlike, and quick to
    write) as Parquet pixels."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = np.repeat(rng.integers(0, 256, (n, 3, 1, 1), np.uint8), side, 2).repeat(side, 3)
    corner = rng.integers(0, side // 2, (n, 2))
    for image, (y, x) in zip(images, corner, strict=True):
        image[:, y : y + side // 4, x : x + side // 4] ^= 255
    flat = images.reshape(-1)
    column = pa.FixedSizeListArray.from_arrays(pa.array(flat), 3 * side * side)
    pq.write_table(pa.table({"pixels": column}), folder / "part-0.parquet", row_group_size=64)


def worker_peak_uss(cmd: list[str], log: Path, timeout_s: float = 1800) -> tuple[int, float]:
    """(peak unique memory of the run's Ray Train worker, wall seconds) of one training run;
    a run still going after timeout_s is killed and reported as failed."""
    start = time.perf_counter()
    with log.open("w") as out:
        run = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        peak = 0
        while run.poll() is None:
            if time.perf_counter() - start > timeout_s:
                run.kill()
                run.wait()
                break
            for process in psutil.process_iter(["cmdline"]):
                try:
                    # This run's embedded Ray is the only one: run nothing else meanwhile.
                    if "RayTrainWorker" in " ".join(process.info["cmdline"] or []):
                        peak = max(peak, process.memory_full_info().uss)
                except psutil.Error:
                    pass
            time.sleep(0.2)
    if run.returncode != 0 or not peak:
        tail = "\n".join(log.read_text().splitlines()[-20:])  # the folder is deleted on exit
        sys.exit(f"{tail}\ntraining failed (exit {run.returncode}) or its worker was never seen")
    return peak, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="3x32x32, 300 and 1200 images")
    args = parser.parse_args()
    side, small = (32, 300) if args.smoke else (128, 4000)
    work = Path(tempfile.mkdtemp(prefix="stream_memory_"))
    print(f"machine: {psutil.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB")
    rows = []
    try:
        for n, ingest in ((small, "stream"), (4 * small, "stream"), (small, "memory")):
            folder = work / f"{n}"
            decoded = n * 3 * side * side
            if not folder.exists():  # the in-memory case trains the small set again
                write_images(folder, n, side)
            cmd = [
                sys.executable, "-m", "raytrain_vae.train", "vae", *TRAIN,
                f"data.path={folder}", f"data.pixels_shape=[3,{side},{side}]",
                f"data.ingest={ingest}", f"run.storage_path={work / 'runs'}",
                f"run.name={ingest}-{n}",
            ]  # fmt: skip
            peak, wall = worker_peak_uss(cmd, work / f"{ingest}-{n}.log")
            rows.append((ingest, n, decoded, peak, wall))
            print(
                f"{ingest:<6} {n:6d} images 3x{side}x{side}: decoded {decoded / 2**20:7.1f} MiB, "
                f"worker peak USS {peak / 2**20:7.1f} MiB, {wall:5.1f} s",
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    (_, _, d1, s1, _), (_, _, d4, s4, _), (_, _, _, m1, _) = rows
    print(f"\nstreamed worker peak, 4x the images / 1x: {s4 / s1:.2f} (decoded set 4.00x)")
    print(f"streamed worker peak / decoded set, 4x the images: {s4 / d4:.2f}")
    print(f"in-memory worker peak - streamed worker peak, 1x: {(m1 - s1) / 2**20:.1f} MiB "
          f"(decoded set {d1 / 2**20:.1f} MiB)")  # fmt: skip


if __name__ == "__main__":
    main()
