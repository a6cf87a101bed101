"""What runs one rank of training: a Ray Train worker, or a Tune trial's own process."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import ray.train
import ray.train.torch
import ray.tune
import torch


@dataclasses.dataclass(frozen=True)
class RankHost:
    """Where a rank's place, device, checkpoints, reports and data come from. The training
    loop is the same function either way; only these calls differ."""

    rank: int
    world: int
    local_world: int
    device: torch.device
    get_checkpoint: Callable[[], ray.train.Checkpoint | None]
    report: Callable[[dict, str | None], None]  # metrics, and a checkpoint folder or None
    dataset: Callable[[str], Any]  # a name -> something with iter_torch_batches
    prepare_model: Callable[[torch.nn.Module], torch.nn.Module]


def train_worker_host() -> RankHost:
    """A rank of a Ray Train worker group (DDP when there are several)."""
    ctx = ray.train.get_context()
    return RankHost(
        rank=ctx.get_world_rank(),
        world=ctx.get_world_size(),
        local_world=ctx.get_local_world_size(),
        device=ray.train.torch.get_device(),
        get_checkpoint=ray.train.get_checkpoint,
        report=lambda metrics, folder: ray.train.report(
            metrics, checkpoint=folder and ray.train.Checkpoint.from_directory(folder)
        ),
        dataset=ray.train.get_dataset_shard,
        prepare_model=ray.train.torch.prepare_model,
    )


def trial_process_host(datasets: dict[str, Any], use_gpu: bool) -> RankHost:
    """The only rank, run in a Tune trial's own process: no worker group to start, checkpoints
    and reports go straight to Tune (inside a trial, Ray 2.60 refuses ray.train.report)."""
    device = torch.device("cuda" if use_gpu else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(0)  # the trial's GPU: Ray sets CUDA_VISIBLE_DEVICES to it
    return RankHost(
        rank=0,
        world=1,
        local_world=1,
        device=device,
        get_checkpoint=ray.tune.get_checkpoint,
        report=lambda metrics, folder: ray.tune.report(
            metrics, checkpoint=folder and ray.tune.Checkpoint.from_directory(folder)
        ),
        dataset=datasets.__getitem__,
        prepare_model=lambda model: model,
    )
