"""One rank's run, in a Ray Train worker or a Tune trial: its data, model, checkpoints, reports."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from raytrain_vae.checkpoint import TrainState, load_checkpoint, save_checkpoint
from raytrain_vae.config import Config, ConfigError, validate_config
from raytrain_vae.data import eval_indices, load_splits
from raytrain_vae.faults import fault_injector
from raytrain_vae.ingest import ShardStream
from raytrain_vae.loop import (
    RankRun,
    format_metrics,
    memory_format_for,
    run_epoch,
)
from raytrain_vae.models import build_model
from raytrain_vae.optim import make_optimizer
from raytrain_vae.perf.heap import retain_freed_memory
from raytrain_vae.perf.shm_allreduce import shared_memory_all_reduce
from raytrain_vae.rank_host import RankHost, train_worker_host
from raytrain_vae.runtime import quiet_train_report_log, quiet_user_error_tracebacks
from raytrain_vae.tracking import RankTracker


def log(line: str) -> None:
    # Ray Train patches print() to tee into its logger, which shows each line twice; the raw
    # stream is still forwarded to the driver once.
    print(line, file=sys.__stdout__, flush=True)


def train_loop_per_worker(loop_config: dict) -> None:
    """One rank of a Ray Train worker group (the TorchTrainer's function)."""
    run_rank(loop_config, train_worker_host())


def run_rank(loop_config: dict, host: RankHost) -> None:
    """One rank: load data, build model, resume if a checkpoint exists, train, report.
    loop_config: the config, the stream's facts when streamed, and a label for the log lines."""
    cfg = validate_config(loop_config["config"], "train loop config")
    quiet_user_error_tracebacks(retried=cfg.run.max_failures != 0)
    quiet_train_report_log(cfg.run.log_level)
    if host.device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
        if cfg.scaling.retain_freed_memory:
            retain_freed_memory()
    run = build_run(cfg, host, loop_config.get("stream"))
    state = restore(run, host)
    if state.epoch >= cfg.train.epochs:
        report_finished_run(run, host, state)
        return
    run.trained = host.prepare_model(run.model)
    share_gradients_through_memory(run, host.local_world == host.world)
    tracking = loop_config.get("tracking")
    tracker = None
    if tracking and host.rank == 0:
        tracker = RankTracker(cfg, tracking, run, resumed=state.epoch > 0)
    try:
        train_epochs(run, host, state, loop_config.get("label"), tracker)
    except BaseException as exc:
        if tracker is not None:
            tracker.failed(exc)
        raise
    finally:
        if tracker is not None:
            tracker.close()


def train_epochs(
    run: RankRun, host: RankHost, state: TrainState, label: str | None, tracker: RankTracker | None
) -> None:
    """The remaining epochs: train, log (rank 0), track, report with a checkpoint."""
    cfg = run.cfg
    fail_once = fault_injector(host.rank)
    binarizer = torch.Generator(device=host.device)
    val_indices = None
    if run.stream is None:
        val_indices = eval_indices(len(run.val_images), host.rank, host.world).to(host.device)
    prefix = f"{label}: " if label else ""
    for epoch in range(state.epoch, cfg.train.epochs):
        if fail_once:
            fail_once(epoch + 1)
        metrics = run_epoch(run, state, epoch, binarizer, val_indices)
        if host.rank == 0:
            log(prefix + format_metrics(metrics, cfg.train.epochs))
        if tracker is not None:
            tracker.epoch(run, metrics)
        report(run, host, state, metrics)
    if tracker is not None:
        tracker.finished(run, state.history[-1])


def build_run(cfg: Config, host: RankHost, stream: dict | None) -> RankRun:
    """This rank's RankRun: its images in memory, or streamed from its dataset shards."""
    if stream is None:
        return build_rank_run(cfg, host.rank, host.world, host.device)
    shards = ShardStream(stream["n_train"], cfg.data.shuffle_buffer, host.device, host.dataset,
                         seed=cfg.train.seed, rank=host.rank)  # fmt: skip
    image_shape = tuple(stream["image_shape"])
    return new_rank_run(cfg, host.rank, host.world, host.device, image_shape, stream=shards)


def build_rank_run(cfg: Config, rank: int, world: int, device: torch.device) -> RankRun:
    """This rank's data on the device, a new model (seeded alike on every rank) and optimizer."""
    splits = load_splits(cfg.data)
    if len(splits.train) < world:
        raise ConfigError(
            f"{len(splits.train)} training images cannot be split over {world} workers"
        )
    return new_rank_run(
        cfg, rank, world, device, splits.image_shape,
        train_images=splits.train.to(device), val_images=splits.val.to(device),
    )  # fmt: skip


def new_rank_run(
    cfg: Config,
    rank: int,
    world: int,
    device: torch.device,
    image_shape: tuple[int, int, int],
    **images: object,
) -> RankRun:
    """A RankRun with a new model (seeded alike on every rank) and its optimizer; `images` are
    the images in memory (train_images, val_images) or the stream."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, image_shape)
    model = model.to(device, memory_format=memory_format_for(cfg))
    return RankRun(
        cfg=cfg,
        model=model,
        trained=model,
        optimizer=make_optimizer(model, cfg, device),
        train_images=images.get("train_images"),
        val_images=images.get("val_images"),
        dynamic_binarize=cfg.data.binarize == "dynamic",
        rank=rank,
        world=world,
        stream=images.get("stream"),
    )


def restore(run: RankRun, host: RankHost) -> TrainState:
    """The state to continue from: the host's latest checkpoint, or a fresh start."""
    checkpoint = host.get_checkpoint()
    if checkpoint is None:
        return TrainState()
    with checkpoint.as_directory() as folder:
        state = load_checkpoint(Path(folder), run.model, run.optimizer, run.cfg, run.device)
    if run.rank == 0:
        log(f"resumed from {checkpoint.path} after epoch {state.epoch}")
    return state


def share_gradients_through_memory(run: RankRun, one_host: bool) -> None:
    """Average CPU gradients through /dev/shm when every rank is on this host (perf/)."""
    cfg = run.cfg.scaling
    if run.world == 1 or run.device.type != "cpu" or not cfg.shared_memory_allreduce:
        return
    numel = sum(p.numel() for p in run.model.parameters())
    reducer = shared_memory_all_reduce(numel, one_host)
    if reducer is not None:
        run.trained.register_comm_hook(None, reducer.hook)
    if run.rank == 0:
        log(
            "gradients: all-reduced through shared memory (/dev/shm)"
            if reducer is not None
            else "gradients: shared memory unavailable here, all-reduced through Gloo"
        )


def report(
    run: RankRun, host: RankHost, state: TrainState, metrics: dict, save: bool = True
) -> None:
    """Report an epoch's metrics to the host, with rank 0's checkpoint of the state if save."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = None
        if run.rank == 0 and save:
            save_checkpoint(Path(tmp), run.model, run.optimizer, state, run.cfg)
            folder = tmp
        host.report(metrics, folder)


def report_finished_run(run: RankRun, host: RankHost, state: TrainState) -> None:
    """Report a run that resumed after its last epoch again, epoch by epoch, ending with its
    final checkpoint. A search restored after its driver died re-runs a trial whose end it had
    not recorded; reporting nothing would show that trial as having trained no epoch."""
    for i, metrics in enumerate(state.history):
        report(run, host, state, metrics, save=i == len(state.history) - 1)
