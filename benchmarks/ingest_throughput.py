"""Ingest throughput: images in each worker's memory vs streamed by Ray Data every epoch.

data.ingest=memory decodes every image once into each worker; data.ingest=stream reads, decodes
and shuffles them from storage in Ray Data tasks every epoch.

Every run trains the default config's model with its batch size through raytrain_vae.training.fit.
Fashion-MNIST in memory (data.source=fashion_mnist) is compared with the same images written to
Parquet as a uint8 pixels column (row groups of 2048) and streamed, with 1 worker and with 2, and
with 1 worker against a Parquet column of PNG bytes; then seeded smooth RGB noise, written as
32x32 and 64x64 PNG files (image_folder, discretized logistic likelihood), in memory and
streamed with 1 worker, to show how the cost grows with image size. The workers leave one whole
CPU free for the stream's read tasks (1 worker x 1 CPU, 2 workers x 0.5 CPU on 2 CPUs, one torch
thread each), in memory too. The cases take turns, in reverse order every other round, so drift
in a shared machine's speed hits every side; steady state is the median images/s over each
run's epochs after its first. Target: stream >= 0.9x memory at steady state.

    python benchmarks/ingest_throughput.py              # all of Fashion-MNIST, 5000 RGB images
    python benchmarks/ingest_throughput.py --rounds 2   # each case twice, in turns
    python benchmarks/ingest_throughput.py --smoke      # a few hundred images, 2 epochs: FMNIST
                                                        # memory and stream, an RGB 32x32
                                                        # folder streamed (each path once)
    python benchmarks/ingest_throughput.py data.shuffle_buffer=0   # overrides for every run
"""

from __future__ import annotations

import argparse
import io
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
import torch.nn.functional as F
from PIL import Image

from raytrain_vae.cli import run_cli
from raytrain_vae.config import load_config
from raytrain_vae.data import ingest_mode, load_splits
from raytrain_vae.ingest import STREAM_SPARE_CPUS
from raytrain_vae.runtime import init_ray
from raytrain_vae.training import fit, history_of

ROW_GROUP = 2048
TARGET = 0.9
RGB_IMAGES = 5000
DATA_CPUS = 1.0  # CPUs left free beside the workers for the stream's read tasks (worker_cpus)
RATIOS = (  # (label, case, its reference)
    ("stream/memory 1 worker", "FMNIST stream, 1 worker", "FMNIST memory, 1 worker"),
    ("stream/memory 2 workers", "FMNIST stream, 2 workers", "FMNIST memory, 2 workers"),
    ("PNG stream/memory 1 worker", "FMNIST PNG stream, 1 worker", "FMNIST memory, 1 worker"),
    ("RGB 32x32 stream/memory", "RGB 32x32 stream, 1 worker", "RGB 32x32 memory, 1 worker"),
    ("RGB 64x64 stream/memory", "RGB 64x64 stream, 1 worker", "RGB 64x64 memory, 1 worker"),
    ("RGB 64x64/32x32 memory img/s", "RGB 64x64 memory, 1 worker", "RGB 32x32 memory, 1 worker"),
)


class Case:
    """One configuration, and what its runs measured: each run's warm epochs' images/s, its
    first epoch's images/s and its last validation -ELBO. (A plain class: tests load this file
    without registering it as a module, which dataclasses need.)"""

    def __init__(self, label: str, overrides: list[str]) -> None:
        self.label, self.overrides = label, overrides
        self.warm: list[list[float]] = []
        self.first: list[float] = []
        self.val: list[float] = []

    @property
    def rate(self) -> float:
        return statistics.median(sum(self.warm, []))


def worker_cpus(total: float, workers: int) -> float:
    """CPUs per worker that leave one whole CPU beside the workers, in memory too: Ray Data
    (2.60) shares what Ray Train's workers leave in whole CPUs only (a leftover 0.5 CPU gives
    its read tasks none, and a 2 x 0.75 CPU stream stalled in its second epoch). Whole CPUs
    when at least one, else quarters; a worker's threads are int(CPUs), at least 1, so 2 CPUs
    give 1 worker x 1 CPU and 2 workers x 0.5 CPU, one thread each."""
    share = (total - DATA_CPUS) / workers
    return float(math.floor(share)) if share >= 1 else max(0.25, math.floor(share * 4) / 4)


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 (C, H, W) -> PNG file bytes."""
    buf = io.BytesIO()
    Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).save(buf, "PNG")
    return buf.getvalue()


def write_parquet(path: Path, images: torch.Tensor, png: bool, rows_per_group: int) -> str:
    """Images as a Parquet file: a uint8 list column `pixels` (C*H*W values), or an `image`
    column of PNG bytes; returns the path."""
    arrays = images.numpy()
    if png:
        column, name = pa.array([png_bytes(a) for a in arrays], pa.binary()), "image"
    else:
        flat = arrays.reshape(len(arrays), -1)
        offsets = np.arange(0, flat.size + 1, flat.shape[1], dtype=np.int32)
        column, name = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat.ravel())), "pixels"
    pq.write_table(pa.table({name: column}), path, row_group_size=rows_per_group)
    return str(path)


def fmnist_parquet(folder: Path, limit: int | None) -> dict[str, str]:
    """The Fashion-MNIST images the memory runs train and validate on (grey levels), and its test
    split (at most as many images), written as pixels and as PNG bytes: {kind_split: path}."""
    limited = [f"data.limit={limit}"] if limit else []
    splits = load_splits(load_config(None, ["data.binarize=none", *limited]).data)
    train = torch.cat([splits.train, splits.val])
    group = max(64, min(ROW_GROUP, len(train) // 8))
    paths = {}
    for kind in ("pixels", "png"):
        for split, images in (("train", train), ("test", splits.test[: len(train)])):
            target = folder / f"fmnist_{kind}_{split}.parquet"
            paths[f"{kind}_{split}"] = write_parquet(target, images, kind == "png", group)
        size = os.path.getsize(paths[f"{kind}_train"]) / 1e6
        print(
            f"Parquet ({kind}): {len(train)} training images, row groups of {group}, {size:.1f} MB"
        )
    return paths


def rgb_folder(folder: Path, n: int, size: int, seed: int) -> str:
    """n seeded smooth RGB noise images (bicubic upsampling of size/4 noise) as PNG files."""
    folder.mkdir()
    g = torch.Generator().manual_seed(seed)
    for start in range(0, n, 500):
        low = torch.rand(min(500, n - start), 3, size // 4, size // 4, generator=g)
        high = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
        images = (high.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        for i, image in enumerate(images, start):
            Image.fromarray(image.transpose(1, 2, 0)).save(folder / f"{i:06d}.png")
    mb = sum(f.stat().st_size for f in folder.iterdir()) / 1e6
    print(f"image_folder RGB {size}x{size}: {n} PNG files, {mb:.1f} MB")
    return str(folder)


def build_cases(data: dict[str, str], cpus: float, fmnist_limit: list[str]) -> list[list[Case]]:
    """The groups of cases that take turns (a group's first case is its memory reference)."""
    one = ["scaling.num_workers=1", f"scaling.cpus_per_worker={worker_cpus(cpus, 1)}"]
    two = ["scaling.num_workers=2", f"scaling.cpus_per_worker={worker_cpus(cpus, 2)}"]
    memory = ["data.source=fashion_mnist", "data.ingest=memory", *fmnist_limit]

    def parquet(kind: str, column: str) -> list[str]:
        shape = ["data.pixels_shape=[1,28,28]"] if kind == "pixels" else []
        return ["data.source=parquet", f"data.path={data[kind + '_train']}",
                f"data.test_path={data[kind + '_test']}", f"data.image_column={column}", *shape,
                "data.channels=1", "data.ingest=stream"]  # fmt: skip

    def rgb(size: int, ingest: str) -> Case:
        return Case(f"RGB {size}x{size} {ingest}, 1 worker", [
            "data.source=image_folder", f"data.path={data[f'rgb{size}']}", f"data.ingest={ingest}",
            "model.likelihood=discretized_logistic", "data.binarize=none", *one])  # fmt: skip

    return [
        [
            Case("FMNIST memory, 1 worker", [*memory, *one]),
            Case("FMNIST stream, 1 worker", [*parquet("pixels", "pixels"), *one]),
            Case("FMNIST PNG stream, 1 worker", [*parquet("png", "image"), *one]),
        ],
        [
            Case("FMNIST memory, 2 workers", [*memory, *two]),
            Case("FMNIST stream, 2 workers", [*parquet("pixels", "pixels"), *two]),
        ],
        [rgb(32, "memory"), rgb(32, "stream")],
        [rgb(64, "memory"), rgb(64, "stream")],
    ]


def run_case(case: Case, common: list[str], storage: str) -> None:
    """One training run of a case through fit(); its epochs' figures are added to the case."""
    name = f"ingest-{time.time_ns()}"
    names = [f"run.name={name}", f"run.storage_path={storage}"]
    cfg = load_config(None, [*common, *case.overrides, *names])
    expected = "stream" if "data.ingest=stream" in case.overrides else "memory"
    if ingest_mode(cfg.data) != expected:
        raise SystemExit(f"{case.label}: data.ingest resolved to {ingest_mode(cfg.data)}")
    history = history_of(fit(cfg))
    shutil.rmtree(Path(storage) / name, ignore_errors=True)
    rates = [h["images_per_s"] for h in history]
    case.first.append(rates[0])
    case.warm.append(rates[1:])
    case.val.append(history[-1]["val_neg_elbo"])


def report(case: Case) -> None:
    """A case's steady-state images/s, with every run's epochs."""
    warm = ", ".join(f"{r:.0f}" for r in sum(case.warm, []))
    first = ", ".join(f"{r:.0f}" for r in case.first)
    val = ", ".join(f"{v:.1f}" for v in case.val)
    print(
        f"{case.label:<30}: {case.rate:7.0f} img/s  (warm epochs: {warm}; first epoch: {first}; "
        f"last val_neg_elbo: {val})"
    )


def summary(groups: list[list[Case]], rounds: int) -> None:
    """Per-round and overall ratios of each stream case to its memory reference, and of the
    64x64 images' rate to the 32x32 ones' (the pairs whose cases ran)."""
    ran = {case.label: case for group in groups for case in group}
    pairs = [(label, ran[a], ran[b]) for label, a, b in RATIOS if a in ran and b in ran]
    for i in range(rounds):
        ratios = "  ".join(
            f"{label} {statistics.median(a.warm[i]) / statistics.median(b.warm[i]):.2f}x"
            for label, a, b in pairs
        )
        print(f"round {i + 1}: {ratios}")
    print(f"summary (target: stream >= {TARGET}x memory at steady state)")
    for label, a, b in pairs:
        ratio = a.rate / b.rate
        met = "met" if ratio >= TARGET else "BELOW target"
        print(f"{label}: {ratio:.2f}x" + (f"  ({met})" if "stream" in label else ""))


def header(cpus: float, epochs: int, rounds: int, work: Path) -> None:
    """The machine, the CPUs each side gets, and the model."""
    cfg = load_config(None, [])
    print(
        f"machine: {os.cpu_count()} CPUs ({cpus:g} for Ray), torch threads "
        f"{torch.get_num_threads()}; workers: 1 x {worker_cpus(cpus, 1):g} CPU, 2 x "
        f"{worker_cpus(cpus, 2):g} CPU (>= {DATA_CPUS:g} CPU left for reading; the project "
        f"keeps {STREAM_SPARE_CPUS:g})"
    )
    print(
        f"model channels={cfg.model.channels} latent={cfg.model.latent_dim} "
        f"batch={cfg.train.batch_size} epochs={epochs} rounds={rounds}  "
        f"work folder: {work} (deleted at the end)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    limit = f"images per set (default: all of Fashion-MNIST, {RGB_IMAGES} of each RGB size)"
    parser.add_argument("--limit", type=int, help=limit)
    parser.add_argument("--rounds", type=int, default=1, help="turns each case takes")
    smoke = "a few hundred images, 2 epochs: FMNIST memory and stream, RGB 32x32 stream"
    parser.add_argument("--smoke", action="store_true", help=smoke)
    parser.add_argument("overrides", nargs="*", help="key.sub=value for every run's config")
    args = parser.parse_args()
    if args.rounds < 1 or args.epochs < 2:
        parser.error("--rounds must be at least 1 and --epochs at least 2 (the first is dropped)")
    epochs, rounds = (2, 1) if args.smoke else (args.epochs, args.rounds)
    fmnist_n = 600 if args.smoke else args.limit
    rgb_n = 300 if args.smoke else args.limit or RGB_IMAGES
    load_config(None, [f"train.epochs={epochs}", *args.overrides])  # a bad key fails here

    work = Path(tempfile.mkdtemp(prefix="ingest_throughput_"))
    init_ray()
    try:
        cpus = ray.cluster_resources().get("CPU", 1.0)
        header(cpus, epochs, rounds, work)
        data = fmnist_parquet(work, fmnist_n)
        for i, size in enumerate((32, 64)):
            data[f"rgb{size}"] = rgb_folder(work / f"rgb{size}", rgb_n, size, seed=i)
        groups = build_cases(data, cpus, [f"data.limit={fmnist_n}"] if fmnist_n else [])
        if args.smoke:  # one run of each path: memory, a pixels column, an image folder (RGB)
            groups = [groups[0][:2], groups[2][1:]]
        common = [f"train.epochs={epochs}", *args.overrides]
        for r in range(rounds):
            for group in groups:
                for case in group if r % 2 == 0 else group[::-1]:
                    run_case(case, common, str(work / "runs"))
        for group in groups:
            for case in group:
                report(case)
        summary(groups, rounds)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))  # a config error: one line and exit status 2
