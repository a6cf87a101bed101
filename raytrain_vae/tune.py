"""Ray Tune + Optuna search over the YAML space: run the trials, export the best model."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import optuna
import pandas as pd
import ray
from ray import tune
from ray.train import Checkpoint
from ray.tune import PlacementGroupFactory
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from raytrain_vae.cli import config_parser, run_cli
from raytrain_vae.config import Config, ConfigError, is_uri, load_config, validate_config
from raytrain_vae.export import EXPORT_KIND, export_model
from raytrain_vae.outputs import check_output_dir
from raytrain_vae.rank_host import trial_process_host
from raytrain_vae.runtime import init_ray
from raytrain_vae.search_results import (
    best_trial,
    pareto_front,
    plot_pareto,
    print_summary,
    trial_table,
    write_table,
)
from raytrain_vae.search_space import Param, parse_space, trial_config, trial_configs
from raytrain_vae.storage import filesystem_for, ray_storage
from raytrain_vae.train import (
    build_trainer,
    data_cpus,
    loop_inputs,
    preflight,
    ray_storage_args,
    require_worker_resources,
    user_error_from,
    worker_resources,
)
from raytrain_vae.worker import run_rank

TRIAL_DRIVER_CPUS = 0.1  # the Tune function only waits on its TorchTrainer
SUMMARY_FILE = "summary"
PARETO_FILE = "pareto"


def run_trial(sampled: dict, base: dict, params: list[Param], trials_path: str) -> None:
    """Tune trainable: one trial = one rank in this process (a single-worker trial, when
    search.local_trials), or one Ray Train run whose epochs are forwarded to Tune."""
    cfg = trial_config(validate_config(base, "search config"), params, sampled)
    trial_id = tune.get_context().get_trial_id()
    label = f"trial {trial_id}"
    if runs_in_trial_process(cfg):
        # Tune's checkpoint bookkeeping logs each epoch at INFO through Ray Train's loggers.
        logging.getLogger("ray.train").setLevel(cfg.run.log_level)
        loop_config, datasets = loop_inputs(cfg, label)
        run_rank(loop_config, trial_process_host(datasets, cfg.scaling.use_gpu))
        return
    # A stable run name (no timestamp) lets Tuner.restore resume the trial's own Train run.
    trainer = build_trainer(
        cfg,
        name=f"train-{trial_id}",
        storage_path=trials_path,
        callbacks=[TuneReportCallback()],
        score=cfg.search.selection,
        label=label,
    )
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as exc:
        user_error = user_error_from(exc)
        raise (user_error or exc) from None


def trial_dirname(trial: tune.experiment.Trial) -> str:
    return f"trial_{trial.trial_id}"  # Tune's default spells out every sampled value


def runs_in_trial_process(cfg: Config) -> bool:
    """A single-worker trial runs in its Tune trial's own process unless search.local_trials is
    off: the same loop, without a Ray Train controller and worker group to start."""
    return cfg.search.local_trials and cfg.scaling.num_workers == 1


def trial_resources(cfg: Config) -> dict[str, float]:
    """What a trial reserves: its one rank's CPUs (and GPU) when it runs in its own process;
    otherwise a sliver, as its Ray Train workers reserve their own."""
    if runs_in_trial_process(cfg):
        return worker_resources(cfg)
    return {"CPU": TRIAL_DRIVER_CPUS}


def experiment_path(cfg: Config) -> str:
    return f"{cfg.resolved_storage_path().rstrip('/')}/{cfg.run.name}"


def concurrent_trials(cfg: Config, resources: dict[str, float]) -> int:
    """search.max_concurrent_trials, or as many trials as the cluster's CPUs and GPUs hold."""
    if cfg.search.max_concurrent_trials is not None:
        return cfg.search.max_concurrent_trials
    s = cfg.scaling
    per_trial = data_cpus(cfg) + trial_resources(cfg)["CPU"]
    if not runs_in_trial_process(cfg):
        per_trial += s.num_workers * s.cpus_per_worker
    fits = resources.get("CPU", 1) // per_trial
    if s.use_gpu:
        fits = min(fits, resources.get("GPU", 0) // (s.num_workers * s.gpus_per_worker))
    return max(1, int(fits))


def _largest_trial(configs: list[Config]) -> Config:
    """The trial config that asks for the most CPUs, then GPUs: if it fits, every trial does."""

    def need(c: Config) -> tuple[float, float]:
        s = c.scaling
        return s.num_workers * s.cpus_per_worker, s.num_workers * s.gpus_per_worker * s.use_gpu

    return max(configs, key=need)


def make_searcher(cfg: Config, params: list[Param]) -> OptunaSearch:
    algo = cfg.search.algorithm
    if algo.sampler == "random":
        sampler = optuna.samplers.RandomSampler(seed=algo.seed)
    else:
        sampler = optuna.samplers.TPESampler(
            seed=algo.seed, multivariate=not cfg.search.multi_objective
        )
    return OptunaSearch(
        space={p.path: p.distribution() for p in params},
        metric=cfg.search.metric,
        mode=cfg.search.mode,
        sampler=sampler,
    )


def make_tuner(cfg: Config, params: list[Param], callbacks: list | None = None) -> tune.Tuner:
    s = cfg.search
    trainable = _trainable(cfg, params)
    scheduler = None
    if s.scheduler.type == "asha":
        scheduler = ASHAScheduler(
            time_attr="training_iteration",
            max_t=cfg.train.epochs,
            grace_period=min(s.scheduler.grace_period, cfg.train.epochs),
            reduction_factor=s.scheduler.reduction_factor,
        )
    single = not s.multi_objective
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            metric=s.metric if single else None,
            mode=s.mode if single else None,
            search_alg=make_searcher(cfg, params),
            scheduler=scheduler,
            num_samples=s.num_samples,
            max_concurrent_trials=concurrent_trials(cfg, ray.cluster_resources()),
            trial_dirname_creator=trial_dirname,
            # A finished trial's process runs the next trial (Ray 2.60's default is a new process
            # each time: torch and this package imported again, seconds per trial).
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=cfg.run.name,
            **ray_storage_args(cfg.resolved_storage_path()),
            verbose=1,
            callbacks=callbacks,
            # For the trials run in their own process (a Ray Train run keeps its own).
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=cfg.run.checkpoints_to_keep,
                checkpoint_score_attribute=cfg.search.selection[0],
                checkpoint_score_order=cfg.search.selection[1],
            ),
            failure_config=tune.FailureConfig(
                max_failures=cfg.run.max_failures if runs_in_trial_process(cfg) else 0
            ),
        ),
    )


def _trainable(cfg: Config, params: list[Param]):
    fn = tune.with_parameters(
        run_trial,
        base=cfg.model_dump(mode="json"),
        params=params,
        trials_path=f"{experiment_path(cfg)}/trials",
    )
    # Per trial: a search over scaling keys may mix local and Ray Train trials.
    return tune.with_resources(
        fn,
        lambda sampled: PlacementGroupFactory(
            [trial_resources(trial_config(cfg, params, sampled))]
        ),
    )


def export_best(cfg: Config, best: pd.Series) -> Path:
    """Copy the best trial's best checkpoint (local or remote storage) into export.dir."""
    path = str(best["best_checkpoint"])
    # Under a filesystem we built (storage.ray_storage), Ray reports paths inside it.
    _, filesystem = ray_storage(cfg.resolved_storage_path())
    if is_uri(path):
        filesystem, path = filesystem_for(path)
    extra = {"trial_id": best["trial_id"], "experiment": experiment_path(cfg)}
    with Checkpoint(path, filesystem=filesystem).as_directory() as folder:
        return export_model(folder, cfg.resolved_export_dir(), extra)


def search(
    cfg: Config, resume: bool = False, callbacks: list | None = None
) -> tuple[pd.DataFrame, Path]:
    """Run (or resume) the search, write its summary, export the best model; (table, export).
    callbacks: extra ray.tune.Callback objects for a new search (a benchmark's timer)."""
    params = parse_space(cfg)
    if not params:
        raise ConfigError("search.space is empty: name at least one config key to search")
    # A URI storage needs an explicit export.dir, and it must be ours to replace: before Ray.
    check_output_dir(cfg.resolved_export_dir(), "export.dir", EXPORT_KIND)
    path = experiment_path(cfg)
    ray_path, filesystem = ray_storage(path)
    exists = tune.Tuner.can_restore(ray_path, storage_filesystem=filesystem)
    if exists and not resume:
        raise ConfigError(
            f"experiment {path} exists: pass --resume to continue it, or choose another run.name"
        )
    if resume and not exists:
        raise ConfigError(f"--resume: no experiment to resume at {path}")
    preflight(cfg)
    # With CheckpointConfig(num_to_keep), Tune saves its state when a trial has kept that many
    # checkpoints, and warns each time it does so within 5 s: every few epochs of a short trial.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    largest = _largest_trial(trial_configs(cfg, params))
    init_ray()
    require_worker_resources(largest, 0.0 if runs_in_trial_process(largest) else TRIAL_DRIVER_CPUS)
    if resume:
        tuner = tune.Tuner.restore(
            ray_path,
            trainable=_trainable(cfg, params),
            resume_errored=True,
            storage_filesystem=filesystem,
        )
    else:
        tuner = make_tuner(cfg, params, callbacks)
    results = tuner.fit()

    table = trial_table(cfg, params, results)
    print_summary(cfg, table)
    for written in write_table(table, path, SUMMARY_FILE):
        print(f"trial summary: {written}")
    if cfg.search.multi_objective:
        metrics, modes = list(cfg.search.metric), list(cfg.search.mode)
        front = pareto_front(table, metrics, modes)
        for written in write_table(front, path, PARETO_FILE):
            print(f"Pareto front: {written}")
        if not is_uri(path):
            plot_pareto(table, front, metrics, Path(path) / f"{PARETO_FILE}.png")
            print(f"Pareto plot: {path}/{PARETO_FILE}.png")
    best = best_trial(cfg, table)
    export = export_best(cfg, best)
    metric, _ = cfg.search.selection
    print(
        f"best trial {best['trial_id']}: {metric} {best[f'best_{metric}']:.3f} nats at epoch "
        f"{int(best['best_epoch'])}; exported to {export}"
    )
    return table, export


def main(argv: list[str] | None = None) -> int:
    parser = config_parser("python -m raytrain_vae.tune", __doc__)
    parser.add_argument(
        "--resume", action="store_true", help="continue an interrupted search of the same run.name"
    )
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    search(cfg, resume=args.resume)
    return 0


def cli() -> None:
    """Console-script entry point: user errors -> one line on stderr, exit status 2."""
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
