"""Ray Train: the DDP worker loop, the TorchTrainer built from a Config, and the train CLI."""

from __future__ import annotations

import json
import math
import os
import pickle
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import ray
import ray.train
import torch
import torch.distributed as dist
from ray.train import (
    CheckpointConfig,
    FailureConfig,
    LoggingConfig,
    Result,
    RunConfig,
    ScalingConfig,
)
from ray.train.torch import TorchTrainer

from raytrain_vae.cli import config_from_args, run_cli
from raytrain_vae.config import (
    Config,
    ConfigError,
    UserError,
    dump_config,
    read_yaml_mapping,
    stream_seed,
    validate_config,
)
from raytrain_vae.data import (
    IMAGE_SHAPE,
    Splits,
    check_split_fits,
    ensure_files,
    eval_indices,
    load_splits,
    shard_indices,
    to_model_input,
)
from raytrain_vae.export import ExportError, load_weights, save_weights
from raytrain_vae.heap import retain_freed_memory
from raytrain_vae.model import ConvVAE, check_trainable
from raytrain_vae.objectives import bits_per_dim, elbo_terms, kl_weight, training_loss
from raytrain_vae.runtime import init_ray, require_resources
from raytrain_vae.shm_allreduce import shared_memory_all_reduce

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
EVAL_BATCH = 1024
CONTROLLER_RETRIES = 2


def _all_reduce(values: list[float] | torch.Tensor, op: str, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.cpu()


@torch.no_grad()
def negative_elbo_sums(
    model: ConvVAE, images: torch.Tensor, indices: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """[count, sum of reconstruction NLL, sum of KL] over images[indices] (beta = 1, eval mode).

    The reparameterisation noise is seeded so that the same model scores the same every time."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        for start in range(0, len(indices), EVAL_BATCH):
            x = to_model_input(images[indices[start : start + EVAL_BATCH]].to(device), False)
            recon, kl = elbo_terms(model, x)
            sums[0] += len(x)
            sums[1:] += torch.stack([recon.sum(), kl.sum()])
    model.train(was_training)
    return sums


def _save_checkpoint(
    folder: Path, model: ConvVAE, optimizer: torch.optim.Optimizer, state: dict, cfg: Config
) -> None:
    save_weights(model, folder / MODEL_FILE)
    torch.save(optimizer.state_dict(), folder / OPTIMIZER_FILE)
    (folder / STATE_FILE).write_text(json.dumps(state, indent=1))
    (folder / CONFIG_FILE).write_text(dump_config(cfg))
    (folder / METRICS_FILE).write_text(json.dumps(state["history"][-1], indent=1))


def _load_checkpoint(
    folder: Path,
    model: ConvVAE,
    optimizer: torch.optim.Optimizer,
    cfg: Config,
    device: torch.device,
) -> dict:
    _check_same_model(folder, cfg)
    model.load_state_dict(load_weights(folder / MODEL_FILE, device)[0])
    # weights_only: a checkpoint is data, never code to unpickle.
    try:
        optimizer_state = torch.load(
            folder / OPTIMIZER_FILE, map_location=device, weights_only=True
        )
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(
            f"{folder / OPTIMIZER_FILE}: refused, not a plain tensor state ({first})"
        ) from None
    optimizer.load_state_dict(optimizer_state)
    return json.loads((folder / STATE_FILE).read_text())


def make_optimizer(model: ConvVAE, cfg: Config, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the model, with the fused kernel where torch has one for the device."""
    # One kernel for every parameter instead of a loop over tensors: 1.02x a step alone and
    # 1.11x with channels_last on CPU in an in-process A/B (README, Performance). The state dict
    # is the same either way, so checkpoints of an unfused run resume.
    return torch.optim.AdamW(
        model.parameters(),
        lr=cfg.train.lr,
        weight_decay=cfg.train.weight_decay,
        fused=device.type in ("cpu", "cuda"),
    )


def set_learning_rate(
    optimizer: torch.optim.Optimizer, cfg: Config, step: int, steps_per_epoch: int
) -> None:
    """train.lr_schedule at this optimizer step; a pure function of the step, so a resumed run
    needs no scheduler state."""
    lr = cfg.train.lr
    if cfg.train.lr_schedule == "cosine":
        lr *= 0.5 * (1 + math.cos(math.pi * min(1.0, step / (cfg.train.epochs * steps_per_epoch))))
    for group in optimizer.param_groups:
        group["lr"] = lr


def _check_same_model(folder: Path, cfg: Config) -> None:
    saved = validate_config(read_yaml_mapping(folder / CONFIG_FILE), f"{folder / CONFIG_FILE}")
    if saved.model != cfg.model:
        raise ConfigError(
            f"run.name={cfg.run.name!r} already holds a checkpoint of another model "
            f"({saved.model.model_dump()}); choose a new run.name"
        )


def check_resumable(cfg: Config) -> None:
    """Refuse, before Ray starts, to resume run.name from local checkpoints of another model or
    with weights that fail their checksum (workers check again, e.g. on URI storage)."""
    storage = cfg.resolved_storage_path()
    if "://" in storage:
        return
    for folder in sorted((Path(storage) / cfg.run.name).glob("checkpoint_*")):
        if (folder / CONFIG_FILE).is_file():
            _check_same_model(folder, cfg)
            load_weights(folder / MODEL_FILE)


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


# Test-only fault injection: "<epoch>:<marker file>" makes rank 0 die (os._exit) once, at the
# start of that epoch, so tests can check that Ray Train restarts from the last checkpoint.
FAIL_ONCE_ENV = "RAYTRAIN_VAE_FAIL_ONCE_AT_EPOCH"


def _fail_once_if_asked(epoch: int, rank: int) -> None:
    spec = os.environ.get(FAIL_ONCE_ENV)
    if not spec or rank != 0:
        return
    at, marker = spec.split(":", 1)
    if epoch == int(at) and not os.path.exists(marker):
        Path(marker).touch()
        os._exit(1)


def _log(line: str) -> None:
    # Ray Train patches print() to tee into its logger, which shows each line twice; the raw
    # stream is still forwarded to the driver once.
    print(line, file=sys.__stdout__, flush=True)


def _quiet_report_log(level: str) -> None:
    # Ray 2.60 logs every report (with all metrics) at INFO through a logger named after its
    # file, which LoggingConfig's ray.train filter misses. Best effort: the module is private.
    try:
        from ray.train.v2._internal.execution import context

        context.logger.setLevel(level)
    except (ImportError, AttributeError):
        pass


def train_loop_per_worker(loop_config: dict) -> None:
    """One DDP rank: load data, build model, resume if a checkpoint exists, train, report."""
    cfg = validate_config(loop_config["config"], "train loop config")
    _quiet_report_log(cfg.run.log_level)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
        if cfg.scaling.retain_freed_memory:
            retain_freed_memory()

    splits: Splits = load_splits(cfg.data)
    if len(splits.train) < world:
        raise ConfigError(
            f"{len(splits.train)} training images cannot be split over {world} workers"
        )
    train_images = splits.train.to(device)
    val_images = splits.val.to(device)

    torch.manual_seed(cfg.train.seed)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    model = ConvVAE(cfg.model, splits.image_shape).to(device, memory_format=memory_format)
    optimizer = make_optimizer(model, cfg, device)

    state = {"epoch": 0, "step": 0, "history": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = _load_checkpoint(Path(folder), model, optimizer, cfg, device)
        if rank == 0:
            _log(f"resumed from {checkpoint.path} after epoch {state['epoch']}")
        if state["epoch"] >= cfg.train.epochs:
            _report_finished_run(state, model, optimizer, cfg, rank)
            return
    ddp_model = ray.train.torch.prepare_model(model)
    if world > 1 and device.type == "cpu" and cfg.scaling.shared_memory_allreduce:
        reducer = shared_memory_all_reduce(
            sum(p.numel() for p in model.parameters()), ctx.get_local_world_size() == world
        )
        if reducer is not None:
            ddp_model.register_comm_hook(None, reducer.hook)
        if rank == 0:
            _log(
                "gradients: all-reduced through shared memory (/dev/shm)"
                if reducer is not None
                else "gradients: shared memory unavailable here, all-reduced through Gloo"
            )

    per_worker_batch = cfg.train.batch_size // world
    n_shard = len(train_images) // world
    steps_per_epoch = -(-n_shard // per_worker_batch)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if cfg.train.amp == "bf16"
        else nullcontext()
    )
    val_idx = eval_indices(len(val_images), rank, world).to(device)
    binarizer = torch.Generator(device=device)

    for epoch in range(state["epoch"], cfg.train.epochs):
        _fail_once_if_asked(epoch + 1, rank)
        epoch_start = time.perf_counter()
        # Every random stream is a function of (seed, epoch, rank): a resumed epoch replays exactly.
        torch.manual_seed(stream_seed(cfg.train.seed * 7919 + epoch * 104729 + rank))
        binarizer.manual_seed(stream_seed(cfg.train.seed * 15485863 + epoch * 32452843 + rank))
        idx = shard_indices(len(train_images), rank, world, epoch, cfg.train.seed).to(device)
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, recon, kl: summed
        n_seen = 0
        weight = cfg.train.beta
        model.train()
        for start in range(0, n_shard, per_worker_batch):
            x = to_model_input(
                train_images[idx[start : start + per_worker_batch]],
                splits.dynamic_binarize,
                binarizer,
            ).contiguous(memory_format=memory_format)
            weight = kl_weight(
                state["step"], steps_per_epoch, cfg.train.beta, cfg.train.kl_warmup_epochs
            )
            set_learning_rate(optimizer, cfg, state["step"], steps_per_epoch)
            with autocast:
                loss, recon, kl = training_loss(
                    ddp_model, x, weight, cfg.train.free_bits, cfg.train.iwae_k
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.train.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step()
            state["step"] += 1
            # Accumulate on the device: no .item() sync inside the step.
            n_seen += len(x)
            sums += torch.stack([loss.detach() * len(x), recon.detach().sum(), kl.detach().sum()])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_seconds = time.perf_counter() - epoch_start

        val = negative_elbo_sums(model, val_images, val_idx, device)
        train_sums = torch.cat([torch.tensor([n_seen], dtype=torch.float64, device=device), sums])
        totals = _all_reduce(torch.cat([train_sums, val]), "sum", device).tolist()
        n_train, loss_sum, recon_sum, kl_sum, n_val, val_recon, val_kl = totals
        train_s, epoch_s = _all_reduce(
            [train_seconds, time.perf_counter() - epoch_start], "max", device
        ).tolist()
        if not all(math.isfinite(v) for v in (loss_sum, val_recon, val_kl)):
            # Raised on every rank alike (the sums are all-reduced), before a bad checkpoint.
            raise TrainingDiverged(
                f"training diverged in epoch {epoch + 1} (loss {loss_sum / n_train}, val "
                f"{(val_recon + val_kl) / n_val}); lower train.lr or set train.grad_clip"
            )
        val_neg_elbo = (val_recon + val_kl) / n_val
        metrics = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / n_train,
            "train_recon": recon_sum / n_train,
            "train_kl": kl_sum / n_train,
            "kl_weight": weight,
            "val_neg_elbo": val_neg_elbo,
            "val_recon": val_recon / n_val,
            "val_kl": val_kl / n_val,
            "val_bits_per_dim": bits_per_dim(val_neg_elbo, model.num_pixels),
            "images_per_s": n_train / train_s,
            "epoch_s": epoch_s,
        }
        state["epoch"] = epoch + 1
        state["history"].append(metrics)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                _save_checkpoint(Path(tmp), model, optimizer, state, cfg)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
                _log(format_metrics(metrics, cfg.train.epochs))
            ray.train.report(metrics, checkpoint=ckpt)


def _report_finished_run(
    state: dict, model: ConvVAE, optimizer: torch.optim.Optimizer, cfg: Config, rank: int
) -> None:
    """Report a run that resumed after its last epoch again, epoch by epoch, ending with its
    final checkpoint. A search restored after its driver died re-runs a trial whose end it had
    not recorded; reporting nothing would show that trial as having trained no epoch."""
    for i, metrics in enumerate(state["history"]):
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0 and i == len(state["history"]) - 1:
                _save_checkpoint(Path(tmp), model, optimizer, state, cfg)
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)


def format_metrics(m: dict, epochs: int) -> str:
    """One readable line per epoch; every loss is nats per image."""
    return (
        f"epoch {m['epoch']}/{epochs}  train_loss {m['train_loss']:.2f}  "
        f"val_neg_elbo {m['val_neg_elbo']:.2f} nats ({m['val_bits_per_dim']:.4f} bits/dim)  "
        f"val_recon {m['val_recon']:.2f}  val_kl {m['val_kl']:.2f}  "
        f"{m['images_per_s']:.0f} img/s  {m['epoch_s']:.1f} s"
    )


def history_of(result: Result) -> list[dict]:
    """Per-epoch metrics of a finished run, read from its final checkpoint (Ray's own
    metrics_dataframe keeps only the epochs whose checkpoints were kept)."""
    with result.checkpoint.as_directory() as folder:
        return json.loads((Path(folder) / STATE_FILE).read_text())["history"]


def build_trainer(
    cfg: Config,
    name: str | None = None,
    storage_path: str | None = None,
    callbacks: list | None = None,
    score: tuple[str, str] = ("val_neg_elbo", "min"),
) -> TorchTrainer:
    """A TorchTrainer for this config; tune passes its own run name, storage and callbacks.

    Ray keeps the run.checkpoints_to_keep best checkpoints by `score`, and always the latest."""
    s = cfg.scaling
    resources = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        resources["GPU"] = s.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.model_dump(mode="json")},
        scaling_config=ScalingConfig(
            num_workers=s.num_workers,
            use_gpu=s.use_gpu,
            resources_per_worker=resources,
            placement_strategy=s.placement_strategy,
        ),
        run_config=RunConfig(
            name=name or cfg.run.name,
            storage_path=storage_path or cfg.resolved_storage_path(),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.run.checkpoints_to_keep,
                checkpoint_score_attribute=score[0],
                checkpoint_score_order=score[1],
            ),
            # A worker group that cannot start (no room on the cluster) is a controller failure,
            # which Ray retries forever by default; resources are checked before fit().
            failure_config=FailureConfig(
                max_failures=cfg.run.max_failures, controller_failure_limit=CONTROLLER_RETRIES
            ),
            callbacks=callbacks,
            logging_config=LoggingConfig(log_level=cfg.run.log_level),
        ),
    )


def user_error_from(exc: ray.train.TrainingFailedError) -> UserError | None:
    """The first worker's UserError inside a Train failure, so the CLI can report it in one line."""
    failures = getattr(exc, "worker_failures", None) or {}
    for failure in failures.values():
        for candidate in (
            failure,
            getattr(failure, "cause", None),
            getattr(failure, "__cause__", None),
        ):
            if isinstance(candidate, UserError):
                return candidate
    return None


def worker_bundles(cfg: Config, extra_cpus: float = 0.0) -> list[dict[str, float]]:
    """The resources of one run: a bundle per worker, plus extra_cpus (a Tune trial's own)."""
    s = cfg.scaling
    bundle = {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if s.use_gpu else {})}
    bundles = [dict(bundle) for _ in range(s.num_workers)]
    if extra_cpus:
        bundles.append({"CPU": extra_cpus})
    return bundles


def require_worker_resources(cfg: Config, extra_cpus: float = 0.0) -> None:
    """Refuse (or, on an autoscaling cluster, wait a bounded time for) a run whose workers the
    cluster cannot hold: otherwise Ray waits for them forever."""
    s = cfg.scaling
    gpus = f" x {s.gpus_per_worker:g} GPU" if s.use_gpu else ""
    trial = f" + {extra_cpus:g} CPU for the trial" if extra_cpus else ""
    what = f"scaling: {s.num_workers} worker(s) x {s.cpus_per_worker:g} CPU{gpus}{trial}"
    fix = "lower scaling.num_workers, scaling.cpus_per_worker" + (
        " or scaling.gpus_per_worker (or set scaling.use_gpu=false)" if s.use_gpu else ""
    )
    require_resources(worker_bundles(cfg, extra_cpus), what, fix, s.resource_wait_s)


def preflight(cfg: Config) -> None:
    """Fail fast, before Ray starts, on what the driver can check: the model fits the images and
    this machine's memory, paths are usable, and, when Ray runs embedded on this machine, the
    data is here (downloaded once, not per worker)."""
    check_trainable(cfg, IMAGE_SHAPE)
    check_split_fits(cfg)
    check_writable(cfg.resolved_storage_path(), "run.storage_path")
    check_resumable(cfg)
    if not os.environ.get("RAY_ADDRESS") and not ray.is_initialized():
        ensure_files(cfg.data)


def check_writable(path: str, key: str) -> None:
    """A local folder we can write in, or create in the nearest existing folder above it; nothing
    is created here (URIs are left to pyarrow)."""
    if "://" in path:
        return
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ConfigError(f"{key} {path}: not writable ({folder} is not a folder)")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise ConfigError(f"{key} {path}: not writable ({exc.strerror or exc})") from None


def fit(cfg: Config) -> Result:
    """Run (or resume, if run.name has checkpoints) one distributed training run."""
    preflight(cfg)
    init_ray()
    require_worker_resources(cfg)
    try:
        return build_trainer(cfg).fit()
    except ray.train.TrainingFailedError as exc:
        user_error = user_error_from(exc)
        if user_error is not None:
            raise user_error from None
        raise


def main(argv: list[str] | None = None) -> int:
    cfg = config_from_args(argv, prog="python -m raytrain_vae.train", description=__doc__)
    result = fit(cfg)
    if result.checkpoint is None:
        print(f"run {cfg.run.name!r} reported no checkpoint", file=sys.stderr)
        return 1
    final = result.checkpoint.path
    print(f"final checkpoint: {final}")
    print(f"metrics: {final}/{METRICS_FILE} (per-epoch history in {final}/{STATE_FILE})")
    return 0


def cli() -> None:
    """Console-script entry point: user errors -> one line on stderr, exit status 2."""
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
