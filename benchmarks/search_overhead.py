"""Search overhead: the seconds a trial spends outside its epochs, and a search's wall time
against the epochs it trained.

Four searches of the quickstart's model and data run one after another in one Ray instance:
one-worker trials in their Tune trial's own process (the default), as many again as Ray Train
runs (`search.local_trials=false`, the reference), a trial of 2 DDP workers, and a longer search
of one-worker trials (--long-trials, 12). For each it prints the median per-trial overhead and
the search's wall time against the sum of its epochs (trials run one at a time; the targets: at
most 2 s, and a search within 1.2x its epochs plus Ray's start-up). A search pays once for its
first trial's process (a new Ray worker, then torch): the longer search shows what a search of
many short trials pays per trial.

A trial's wall time is measured on the driver, from the end of the trial before it (or the
search's start) to its own end, so it holds everything a trial costs: Tune starting its actor,
the Ray Train controller and workers if any, data loading, model building, the epochs, the
checkpoints and the teardown. Its overhead is that minus its epochs' time.

    python benchmarks/search_overhead.py          # the quickstart: 4 trials x 3 epochs, 6000 images
    python benchmarks/search_overhead.py --smoke  # 2 trials (1 as Ray Train runs, 3 in the
                                                  # longer search) x 1 epoch
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import ray
from ray import tune

from raytrain_vae.config import load_config
from raytrain_vae.tune import search

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"


def search_config(work: Path, name: str, args: argparse.Namespace, *extra: str):
    return load_config(
        str(QUICKSTART),
        [
            f"data.limit={args.limit}",
            f"train.epochs={args.epochs}",
            f"search.num_samples={args.trials}",
            "search.scheduler.type=none",  # every trial trains every epoch: comparable sums
            "search.max_concurrent_trials=1",
            f"run.name={name}",
            f"run.storage_path={work / 'runs'}",
            f"export.dir={work / name / 'export'}",
            "export.num_samples=4",
            "export.num_reconstructions=4",
            *extra,
        ],
    )


class TrialClock(tune.Callback):
    """When each trial ended, on the driver's clock."""

    def __init__(self) -> None:
        self.ended: dict[str, float] = {}

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:  # noqa: ANN001
        self.ended[trial.trial_id] = time.perf_counter()

    on_trial_error = on_trial_complete


def measure(work: Path, name: str, label: str, args: argparse.Namespace, *extra: str) -> dict:
    cfg = search_config(work, name, args, *extra)
    clock = TrialClock()
    start = time.perf_counter()
    table, _ = search(cfg, callbacks=[clock])
    wall = time.perf_counter() - start
    ends = sorted((t, tid) for tid, t in clock.ended.items())
    walls = {tid: t - prev for (prev, _), (t, tid) in zip([(start, "")] + ends, ends, strict=False)}
    epochs = dict(zip(table["trial_id"], table["train_seconds"].fillna(0.0), strict=True))
    overheads = [walls[tid] - epochs[tid] for _, tid in ends]  # in the order they ended
    epochs_s = float(sum(epochs.values()))
    return {
        "label": label,
        "trials": len(table),
        "overhead": statistics.median(overheads),
        "first": overheads[0],
        "wall": wall,
        "epochs": epochs_s,
        "ratio": wall / epochs_s,  # one trial at a time
    }


def report(row: dict) -> None:
    print(
        f"{row['label']:<44}: {row['trials']} trials, per-trial overhead (median) "
        f"{row['overhead']:6.2f} s, search {row['wall']:6.1f} s for {row['epochs']:6.1f} s of "
        f"epochs = {row['ratio']:.2f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--limit", type=int, default=6000)
    parser.add_argument("--long-trials", type=int, default=12, help="the longer search's trials")
    parser.add_argument(
        "--smoke", action="store_true", help="2 trials (1 as Ray Train runs) x 1 epoch, 300 images"
    )
    args = parser.parse_args()
    if args.smoke:
        args.trials, args.epochs, args.limit, args.long_trials = 2, 1, 300, 3
    cpus = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="search_overhead_"))
    start = time.perf_counter()
    ray.init(num_cpus=cpus)
    ray_start = time.perf_counter() - start
    print(f"machine: {cpus} CPUs; Ray start-up {ray_start:.1f} s")
    print(f"{args.trials} trials x {args.epochs} epochs on {args.limit} images, 1 at a time")
    try:
        local = measure(work, "local", "1 worker, in the trial's process", args)
        train = measure(
            work, "train", "1 worker, Ray Train run", args, "search.local_trials=false",
            *(["search.num_samples=1"] if args.smoke else []),  # ~15 s a trial: one shows it
        )  # fmt: skip
        workers = 2 if cpus >= 2 else 1
        ddp = measure(
            work, "ddp", f"{workers} workers (DDP), Ray Train run", args,
            f"scaling.num_workers={workers}",
            f"scaling.cpus_per_worker={(cpus - 0.1) / workers:.2f}",
            "search.num_samples=1",
        )  # fmt: skip
        long = measure(
            work, "long", f"1 worker, in the trial's process, {args.long_trials} trials", args,
            f"search.num_samples={args.long_trials}",
        )  # fmt: skip
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    print()
    for row in (local, train, ddp, long):
        report(row)
    print("\nsummary (targets: overhead <= 2 s, search <= 1.2x its epochs)")
    print(f"one-worker per-trial overhead: {local['overhead']:.2f} s")
    print(f"one-worker search / its epochs: {local['ratio']:.2f}x")
    for row in (local, long):
        limit = 1.2 * row["epochs"]
        verdict = "met" if row["wall"] <= limit else "not met"
        print(
            f"one-worker search of {row['trials']} trials after Ray start-up ({ray_start:.1f} s): "
            f"{row['wall']:.1f} s against 1.2 x epochs = {limit:.1f} s ({verdict})"
        )
    print(
        "one-worker first trial's overhead (Tune's start, the trial process): "
        f"{local['first']:.2f} s"
    )
    print(f"overhead in-process / Ray Train run: {local['overhead'] / train['overhead']:.2f}x")
    print(f"search wall in-process / Ray Train run: {local['wall'] / train['wall']:.2f}x")
    print(f"{workers}-worker DDP trial overhead: {ddp['overhead']:.2f} s")


if __name__ == "__main__":
    main()
