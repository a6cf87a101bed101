"""The Ray Train worker function: wires one rank's data, model, checkpoints and reports to loop."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import ray.train
import ray.train.torch
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
from raytrain_vae.runtime import quiet_train_report_log


def log(line: str) -> None:
    # Ray Train patches print() to tee into its logger, which shows each line twice; the raw
    # stream is still forwarded to the driver once.
    print(line, file=sys.__stdout__, flush=True)


def train_loop_per_worker(loop_config: dict) -> None:
    """One DDP rank: load data, build model, resume if a checkpoint exists, train, report."""
    cfg = validate_config(loop_config["config"], "train loop config")
    quiet_train_report_log(cfg.run.log_level)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
        if cfg.scaling.retain_freed_memory:
            retain_freed_memory()
    stream = loop_config.get("stream")
    if stream is not None:
        run = build_streamed_rank_run(cfg, rank, world, device, stream)
    else:
        run = build_rank_run(cfg, rank, world, device)
    state = restore(run)
    if state.epoch >= cfg.train.epochs:
        report_finished_run(run, state)
        return
    run.trained = ray.train.torch.prepare_model(run.model)
    share_gradients_through_memory(run, ctx.get_local_world_size() == world)
    fail_once = fault_injector(rank)
    binarizer = torch.Generator(device=device)
    val_indices = None if stream else eval_indices(len(run.val_images), rank, world).to(device)
    for epoch in range(state.epoch, cfg.train.epochs):
        if fail_once:
            fail_once(epoch + 1)
        metrics = run_epoch(run, state, epoch, binarizer, val_indices)
        if rank == 0:
            log(format_metrics(metrics, cfg.train.epochs))
        report(run, state, metrics)


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


def build_streamed_rank_run(
    cfg: Config, rank: int, world: int, device: torch.device, stream: dict
) -> RankRun:
    """This rank's model and optimizer, with its images streamed from its dataset shards."""
    shards = ShardStream(stream["n_train"], cfg.data.shuffle_buffer, device)
    return new_rank_run(cfg, rank, world, device, tuple(stream["image_shape"]), stream=shards)


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


def restore(run: RankRun) -> TrainState:
    """The state to continue from: Ray Train's latest checkpoint, or a fresh start."""
    checkpoint = ray.train.get_checkpoint()
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


def report(run: RankRun, state: TrainState, metrics: dict, save: bool = True) -> None:
    """Report an epoch's metrics to Ray Train, with rank 0's checkpoint of the state if save."""
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if run.rank == 0 and save:
            save_checkpoint(Path(tmp), run.model, run.optimizer, state, run.cfg)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


def report_finished_run(run: RankRun, state: TrainState) -> None:
    """Report a run that resumed after its last epoch again, epoch by epoch, ending with its
    final checkpoint. A search restored after its driver died re-runs a trial whose end it had
    not recorded; reporting nothing would show that trial as having trained no epoch."""
    for i, metrics in enumerate(state.history):
        report(run, state, metrics, save=i == len(state.history) - 1)
