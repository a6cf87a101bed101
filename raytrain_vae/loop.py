"""One rank's training, as small functions that run without Ray: step, epoch, validation,
cross-rank reduction, divergence check and the epoch's metrics."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import astuple, dataclass
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn

from raytrain_vae.checkpoint import TrainState
from raytrain_vae.config import Config, UserError, stream_seed
from raytrain_vae.data import shard_indices, to_model_input
from raytrain_vae.models import VAE
from raytrain_vae.objectives import bits_per_dim, elbo_terms, kl_weight, training_loss
from raytrain_vae.optim import set_learning_rate

EVAL_BATCH = 1024
EVAL_PIXELS = EVAL_BATCH * 28 * 28  # 1024 RGB 256x256 images would take gigabytes of activations


def eval_batch_size(image_shape: tuple[int, ...]) -> int:
    """Images per evaluation batch: EVAL_BATCH for 28x28 grey, fewer for larger images."""
    return max(1, min(EVAL_BATCH, EVAL_PIXELS // math.prod(image_shape)))


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


@dataclass
class EpochSums:
    """One epoch's sums over images (not means), of one rank or of all ranks together."""

    n_train: float = 0.0
    train_loss: float = 0.0
    train_recon: float = 0.0
    train_kl: float = 0.0
    n_val: float = 0.0
    val_recon: float = 0.0
    val_kl: float = 0.0

    @classmethod
    def from_tensor(cls, values: torch.Tensor) -> EpochSums:
        return cls(*values.tolist())

    def to_tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.tensor(astuple(self), dtype=torch.float64, device=device)


class BatchStream(Protocol):
    """Images streamed to this rank (data.ingest: stream) instead of held in memory."""

    n_train: int  # training images of one epoch, over all ranks

    def train_batches(self, epoch: int, batch_size: int) -> Iterable[torch.Tensor]:
        """This rank's share of an epoch, freshly shuffled: uint8 (B, C, H, W) on the device."""
        ...

    def val_batches(self, batch_size: int) -> Iterable[torch.Tensor]:
        """This rank's share of the validation images (disjoint from other ranks' shares)."""
        ...


@dataclass
class RankRun:
    """What one rank trains with, fixed for the whole run: images in memory (uint8 tensors
    on the device), or a stream of them."""

    cfg: Config
    model: VAE  # the model itself: evaluation, checkpoints
    trained: nn.Module  # what training calls: the model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    train_images: torch.Tensor | None  # uint8 (N, C, H, W) on the device; None when streamed
    val_images: torch.Tensor | None
    dynamic_binarize: bool
    rank: int = 0
    world: int = 1
    stream: BatchStream | None = None

    # Derived once: train_step reads them every step.
    @functools.cached_property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @functools.cached_property
    def n_train(self) -> int:
        return self.stream.n_train if self.stream is not None else len(self.train_images)

    @functools.cached_property
    def batch_per_rank(self) -> int:
        return self.cfg.train.batch_size // self.world

    @functools.cached_property
    def steps_per_epoch(self) -> int:
        return -(-(self.n_train // self.world) // self.batch_per_rank)

    @functools.cached_property
    def autocast(self) -> AbstractContextManager:
        """The forward pass's autocast (re-entered every step)."""
        return autocast_for(self.cfg, self.device)


def autocast_for(cfg: Config, device: torch.device) -> AbstractContextManager:
    """bf16 autocast when train.amp asks for it, else nothing."""
    if cfg.train.amp == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def memory_format_for(cfg: Config) -> torch.memory_format:
    return torch.channels_last if cfg.train.channels_last else torch.contiguous_format


def seed_epoch(cfg: Config, epoch: int, rank: int, binarizer: torch.Generator) -> None:
    """Every random stream is a function of (seed, epoch, rank): a resumed epoch replays exactly."""
    seed = cfg.train.seed
    torch.manual_seed(stream_seed(seed * 7919 + epoch * 104729 + rank))
    binarizer.manual_seed(stream_seed(seed * 15485863 + epoch * 32452843 + rank))


def train_step(run: RankRun, state: TrainState, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One optimizer step on batch x; (loss, per-image recon, per-image KL, KL weight used)."""
    cfg = run.cfg.train
    weight = kl_weight(state.step, run.steps_per_epoch, cfg.beta, cfg.kl_warmup_epochs)
    set_learning_rate(run.optimizer, run.cfg, state.step, run.steps_per_epoch)
    with run.autocast:
        loss, recon, kl = training_loss(run.trained, x, weight, cfg.free_bits, cfg.iwae_k)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    run.optimizer.step()
    state.step += 1
    return loss.detach(), recon.detach(), kl.detach(), weight


def epoch_batches(run: RankRun, epoch: int) -> Iterator[torch.Tensor]:
    """This rank's uint8 batches of an epoch: a seeded shuffle of the images in memory, split
    into equal disjoint shards, or the stream's shard."""
    if run.stream is not None:
        yield from run.stream.train_batches(epoch, run.batch_per_rank)
        return
    n = len(run.train_images)
    idx = shard_indices(n, run.rank, run.world, epoch, run.cfg.train.seed).to(run.device)
    for start in range(0, n // run.world, run.batch_per_rank):
        batch = run.train_images[idx[start : start + run.batch_per_rank]]
        yield mirror_half(batch) if run.cfg.data.hflip else batch


def mirror_half(batch: torch.Tensor) -> torch.Tensor:
    """data.hflip: each image mirrored left-right with probability 1/2 (torch's seeded stream,
    so a resumed epoch flips alike)."""
    flip = torch.rand(len(batch), device=batch.device) < 0.5
    return torch.where(flip[:, None, None, None], batch.flip(-1), batch)


def train_epoch(
    run: RankRun, state: TrainState, epoch: int, binarizer: torch.Generator
) -> tuple[torch.Tensor, float]:
    """One pass over this rank's shard: ([images, loss sum, recon sum, KL sum] as a float64
    tensor on the device, the last KL weight). Sums stay on the device: no sync per step."""
    seed_epoch(run.cfg, epoch, run.rank, binarizer)
    sums = torch.zeros(4, dtype=torch.float64, device=run.device)
    weight = run.cfg.train.beta
    memory_format = memory_format_for(run.cfg)
    run.model.train()
    for batch in epoch_batches(run, epoch):
        x = to_model_input(batch, run.dynamic_binarize, binarizer)
        loss, recon, kl, weight = train_step(run, state, x.contiguous(memory_format=memory_format))
        sums[0] += len(x)
        sums[1:] += torch.stack([loss * len(x), recon.sum(), kl.sum()])
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)
    return sums, weight


def negative_elbo_sums(
    model: VAE, images: torch.Tensor, indices: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """[count, sum of reconstruction NLL, sum of KL] over images[indices] (beta = 1, eval mode).

    The reparameterisation noise is seeded so that the same model scores the same every time."""
    size = eval_batch_size(tuple(images.shape[1:]))
    batches = (images[indices[i : i + size]] for i in range(0, len(indices), size))
    return batch_elbo_sums(model, batches, device)


@torch.no_grad()
def batch_elbo_sums(
    model: VAE, batches: Iterable[torch.Tensor], device: torch.device
) -> torch.Tensor:
    """negative_elbo_sums over uint8 batches as they come (from memory or a stream)."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        for batch in batches:
            x = to_model_input(batch.to(device), False)
            recon, kl = elbo_terms(model, x)
            sums[0] += len(x)
            sums[1:] += torch.stack([recon.sum(), kl.sum()])
    model.train(was_training)
    return sums


def all_reduce(values: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum (or max) a float64 tensor over the ranks of torch.distributed, if there are several;
    returned on the CPU."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return values.cpu()


def reduce_sums(
    train: torch.Tensor,
    val: torch.Tensor,
    reduce: Callable[[torch.Tensor], torch.Tensor] = all_reduce,
) -> EpochSums:
    """This rank's training and validation sums, summed over every rank in one message."""
    return EpochSums.from_tensor(reduce(torch.cat([train, val])))


def check_finite(totals: EpochSums, epoch: int) -> None:
    """Raise TrainingDiverged on a NaN or infinite sum: on every rank alike (the sums are
    all-reduced), and before a bad checkpoint is written."""
    if all(math.isfinite(v) for v in (totals.train_loss, totals.val_recon, totals.val_kl)):
        return
    raise TrainingDiverged(
        f"training diverged in epoch {epoch + 1} (loss {totals.train_loss / totals.n_train}, val "
        f"{(totals.val_recon + totals.val_kl) / totals.n_val}); lower train.lr or set "
        "train.grad_clip"
    )


def epoch_metrics(
    totals: EpochSums, epoch: int, weight: float, seconds: tuple[float, float], num_pixels: int
) -> dict[str, float]:
    """The reported metrics of an epoch: count-weighted means over all ranks, in nats/image.
    seconds: (training, whole epoch), the slowest rank's."""
    train_s, epoch_s = seconds
    val_neg_elbo = (totals.val_recon + totals.val_kl) / totals.n_val
    return {
        "epoch": epoch + 1,
        "train_loss": totals.train_loss / totals.n_train,
        "train_recon": totals.train_recon / totals.n_train,
        "train_kl": totals.train_kl / totals.n_train,
        "kl_weight": weight,
        "val_neg_elbo": val_neg_elbo,
        "val_recon": totals.val_recon / totals.n_val,
        "val_kl": totals.val_kl / totals.n_val,
        "val_bits_per_dim": bits_per_dim(val_neg_elbo, num_pixels),
        "images_per_s": totals.n_train / train_s,
        "epoch_s": epoch_s,
    }


def format_metrics(m: dict, epochs: int) -> str:
    """One readable line per epoch; every loss is nats per image."""
    return (
        f"epoch {m['epoch']}/{epochs}  train_loss {m['train_loss']:.2f}  "
        f"val_neg_elbo {m['val_neg_elbo']:.2f} nats ({m['val_bits_per_dim']:.4f} bits/dim)  "
        f"val_recon {m['val_recon']:.2f}  val_kl {m['val_kl']:.2f}  "
        f"{m['images_per_s']:.0f} img/s  {m['epoch_s']:.1f} s"
    )


def run_epoch(
    run: RankRun,
    state: TrainState,
    epoch: int,
    binarizer: torch.Generator,
    val_indices: torch.Tensor,
    reduce: Callable[[torch.Tensor, str], torch.Tensor] = all_reduce,
) -> dict[str, float]:
    """Train one epoch, validate, reduce over ranks, check, and record it in state."""
    start = time.perf_counter()
    train, weight = train_epoch(run, state, epoch, binarizer)
    train_s = time.perf_counter() - start
    if run.stream is not None:
        size = eval_batch_size(run.model.image_shape)
        val = batch_elbo_sums(run.model, run.stream.val_batches(size), run.device)
    else:
        val = negative_elbo_sums(run.model, run.val_images, val_indices, run.device)
    totals = reduce_sums(train, val, lambda t: reduce(t, "sum"))
    seconds = torch.tensor([train_s, time.perf_counter() - start], dtype=torch.float64)
    slowest = reduce(seconds.to(run.device), "max").tolist()
    check_finite(totals, epoch)
    metrics = epoch_metrics(totals, epoch, weight, tuple(slowest), run.model.num_pixels)
    state.epoch = epoch + 1
    state.history.append(metrics)
    return metrics
