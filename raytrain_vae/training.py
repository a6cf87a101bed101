"""Ray Train from a Config: the TorchTrainer, checks before it starts, fit(), and the train CLI."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import ray
import ray.train
from ray.train import (
    CheckpointConfig,
    FailureConfig,
    LoggingConfig,
    Result,
    RunConfig,
    ScalingConfig,
)
from ray.train.torch import TorchTrainer

from raytrain_vae.checkpoint import check_resumable, read_state
from raytrain_vae.cli import JSON_HELP, config_parser, print_json, run_cli, stdout_to_stderr
from raytrain_vae.config import Config, ConfigError, UserError, child_path, load_config
from raytrain_vae.data import (
    check_split_fits,
    decoded_bytes,
    ensure_files,
    image_shape,
    ingest_mode,
)
from raytrain_vae.ingest import STREAM_SPARE_CPUS, ShardedValidation, stream_datasets, stream_facts
from raytrain_vae.model_io import METRICS_FILE, STATE_FILE
from raytrain_vae.models.sizing import check_trainable, machine_memory_bytes
from raytrain_vae.runtime import check_writable, init_ray, require_resources
from raytrain_vae.storage import (
    delete_folder,
    file_names_under,
    path_exists,
    ray_storage,
    reported_location,
)
from raytrain_vae.tracking import check_tracking, run_tags, tracking_spec
from raytrain_vae.worker import train_loop_per_worker

CONTROLLER_RETRIES = 2
# What Ray Train writes into a run's folder before the run starts (its storage check).
RAY_STORAGE_MARKER = ".validate_storage_marker"
DESCRIPTION = """Train one VAE with Ray Train (PyTorch DDP over scaling.num_workers workers) from a
config. Re-running the same run.name resumes it from its last checkpoint. Every loss is the
negative ELBO per image in nats."""
EXAMPLES = """examples:
  raytrain-vae train vae
  raytrain-vae train configs/vae.yaml scaling.num_workers=4 train.epochs=20
  raytrain-vae train cifar10 run.storage_path=s3://bucket/runs tracking.tensorboard=true"""


def history_of(result: Result) -> list[dict]:
    """Per-epoch metrics of a finished run, read from its final checkpoint (Ray's own
    metrics_dataframe keeps only the epochs whose checkpoints were kept)."""
    with result.checkpoint.as_directory() as folder:
        return read_state(Path(folder)).history


def build_trainer(
    cfg: Config,
    name: str | None = None,
    storage_path: str | None = None,
    callbacks: list | None = None,
    score: tuple[str, str] = ("val_neg_elbo", "min"),
    label: str = "",
    tracking: dict | None = None,
) -> TorchTrainer:
    """A TorchTrainer for this config; tune passes its own run name, storage, callbacks, a
    label for the log lines and what its rank 0 tracks (tracking.tracking_spec).

    Ray keeps the run.checkpoints_to_keep best checkpoints by `score`, and always the latest."""
    s = cfg.scaling
    loop_config, datasets = loop_inputs(cfg, label, tracking)
    streamed = {"datasets": datasets, "dataset_config": ShardedValidation()} if datasets else {}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        **streamed,
        scaling_config=ScalingConfig(
            num_workers=s.num_workers,
            use_gpu=s.use_gpu,
            resources_per_worker=worker_resources(cfg),
            placement_strategy=s.placement_strategy,
        ),
        run_config=RunConfig(
            name=name or cfg.run.name,
            **ray_storage_args(storage_path or cfg.resolved_storage_path()),
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


def loop_inputs(cfg: Config, label: str = "", tracking: dict | None = None) -> tuple[dict, dict]:
    """The rank function's config (with the stream's facts when streamed, a label for its log
    lines, and what it tracks) and, when streamed, its datasets."""
    loop_config: dict = {"config": cfg.model_dump(mode="json"), "label": label}
    if tracking is not None:
        loop_config["tracking"] = tracking
    if ingest_mode(cfg.data) != "stream":
        return loop_config, {}
    loop_config["stream"] = stream_facts(cfg)
    return loop_config, stream_datasets(cfg)


def ray_storage_args(path: str) -> dict:
    """RunConfig's storage arguments for a local path or URI (storage.ray_storage)."""
    storage_path, filesystem = ray_storage(path)
    return {"storage_path": storage_path, "storage_filesystem": filesystem}


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


def worker_resources(cfg: Config) -> dict[str, float]:
    """What one Ray Train worker reserves: its CPUs, and its GPUs when scaling.use_gpu."""
    s = cfg.scaling
    return {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if s.use_gpu else {})}


def data_cpus(cfg: Config) -> float:
    """CPUs a run keeps free beside its workers for Ray Data's read tasks when it streams
    (Ray Train leaves Ray Data only what its workers do not hold: with none, reading waits)."""
    return STREAM_SPARE_CPUS if ingest_mode(cfg.data) == "stream" else 0.0


def worker_bundles(cfg: Config, extra_cpus: float = 0.0) -> list[dict[str, float]]:
    """The resources of one run: a bundle per worker, plus extra_cpus (a Tune trial's own, and
    room for the stream's read tasks)."""
    bundles = [worker_resources(cfg) for _ in range(cfg.scaling.num_workers)]
    extra = extra_cpus + data_cpus(cfg)
    if extra:
        bundles.append({"CPU": extra})
    return bundles


def require_worker_resources(cfg: Config, extra_cpus: float = 0.0) -> None:
    """Refuse (or, on an autoscaling cluster, wait a bounded time for) a run whose workers the
    cluster cannot hold: otherwise Ray waits for them forever."""
    s = cfg.scaling
    gpus = f" x {s.gpus_per_worker:g} GPU" if s.use_gpu else ""
    trial = f" + {extra_cpus:g} CPU for the trial" if extra_cpus else ""
    reading = f" + {data_cpus(cfg):g} CPU for streaming data" if data_cpus(cfg) else ""
    what = f"scaling: {s.num_workers} worker(s) x {s.cpus_per_worker:g} CPU{gpus}{trial}{reading}"
    fix = "lower scaling.num_workers, scaling.cpus_per_worker" + (
        " or scaling.gpus_per_worker (or set scaling.use_gpu=false)" if s.use_gpu else ""
    )
    require_resources(worker_bundles(cfg, extra_cpus), what, fix, s.resource_wait_s)


def check_data_fits_memory(cfg: Config) -> None:
    """Refuse data.ingest: memory for a set the workers of this machine could not all hold
    (each keeps its own decoded copy): it could only end in a worker killed for memory."""
    if ingest_mode(cfg.data) != "memory" or not cfg.data.reads_files:
        return
    have = machine_memory_bytes()
    need = decoded_bytes(cfg.data) * min(cfg.scaling.num_workers, os.cpu_count() or 1)
    if have and need > 0.8 * have:
        raise ConfigError(
            f"data.ingest=memory: {cfg.scaling.num_workers} worker(s) would each hold "
            f"{decoded_bytes(cfg.data) / 2**30:.1f} GiB of decoded images, more than this "
            f"machine's {have / 2**30:.0f} GiB allow; set data.ingest=stream (or auto)"
        )


def preflight(cfg: Config) -> None:
    """Fail fast, before Ray starts, on what the driver can check: the model fits the images and
    this machine's memory, paths are usable, and, when Ray runs embedded on this machine, the
    data is here (downloaded once, not per worker)."""
    if cfg.data.reads_files:
        ensure_files(cfg.data)  # the user's files are listed here, wherever Ray runs
    check_trainable(cfg, image_shape(cfg.data))
    check_split_fits(cfg)
    check_data_fits_memory(cfg)
    check_writable(cfg.resolved_storage_path(), "run.storage_path")
    check_resumable(cfg)
    check_tracking(cfg)
    if not os.environ.get("RAY_ADDRESS") and not ray.is_initialized():
        ensure_files(cfg.data)


def fit(cfg: Config) -> Result:
    """Run (or resume, if run.name has checkpoints) one distributed training run."""
    preflight(cfg)
    init_ray()
    require_worker_resources(cfg)
    folder = cfg.run_folder()
    new_run = not path_exists(folder)
    try:
        return build_trainer(cfg, tracking=run_tracking(cfg)).fit()
    except ray.train.TrainingFailedError as exc:
        user_error = user_error_from(exc)
        if user_error is not None:
            if new_run:
                remove_if_unstarted(folder)
            raise user_error from None
        raise


def remove_if_unstarted(folder: str) -> None:
    """Delete a new run's folder that holds nothing but Ray Train's storage marker: a run
    refused for its input leaves no empty run behind. A folder that cannot be read or deleted
    is left as it is; the refusal's reason is what the user needs to see."""
    try:
        if file_names_under(folder) in ([], [RAY_STORAGE_MARKER]):
            delete_folder(folder)
    except UserError:
        pass


def run_tracking(cfg: Config) -> dict | None:
    """What a training run's rank 0 tracks: its own MLflow run, found again by the run's
    folder when it resumes, and TensorBoard events in that folder."""
    if not cfg.tracked:
        return None
    folder = cfg.run_folder()
    tags = run_tags(ray.get_runtime_context().gcs_address)
    return tracking_spec(cfg, folder, tags, child_path(folder, "tensorboard"), mlflow=True)


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = config_parser(prog or "python -m raytrain_vae.train", DESCRIPTION, EXAMPLES)
    parser.add_argument("--json", action="store_true", help=JSON_HELP)
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    with stdout_to_stderr(args.json):
        result = fit(cfg)
    if result.checkpoint is None:
        print(f"run {cfg.run.name!r} reported no checkpoint", file=sys.stderr)
        return 1
    final = reported_location(cfg.resolved_storage_path(), result.checkpoint.path)
    print(f"final checkpoint: {final}", file=sys.stderr if args.json else None)
    print(
        f"metrics: {final}/{METRICS_FILE} (per-epoch history in {final}/{STATE_FILE})",
        file=sys.stderr if args.json else None,
    )
    if args.json:
        print_json({"checkpoint": final, "metrics": result.metrics})
    return 0


def cli() -> None:
    """Console-script entry point: user errors -> one line on stderr, exit status 2."""
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
