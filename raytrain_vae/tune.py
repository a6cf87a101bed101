"""Ray Tune + Optuna search over the YAML space: run the trials, export the best model."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import optuna
import pandas as pd
import ray
from ray import tune
from ray.train import Checkpoint
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from raytrain_vae.cli import JSON_HELP, config_parser, print_json, run_cli, stdout_to_stderr
from raytrain_vae.config import Config, ConfigError, child_path, is_uri, load_config, shown_uri
from raytrain_vae.export import EXPORT_KIND, export_model
from raytrain_vae.live_view import TrialTable
from raytrain_vae.outputs import check_output_dir
from raytrain_vae.runtime import init_ray
from raytrain_vae.search_results import (
    best_trial,
    pareto_front,
    plot_pareto,
    print_summary,
    search_summary,
    trial_table,
    write_table,
)
from raytrain_vae.search_space import Param, parse_space, trial_configs
from raytrain_vae.search_tracking import SearchTracker
from raytrain_vae.storage import filesystem_for, ray_storage, reported_location
from raytrain_vae.tracking import run_tags
from raytrain_vae.training import (
    preflight,
    ray_storage_args,
    require_worker_resources,
)
from raytrain_vae.trial import (
    TRIAL_DRIVER_CPUS,
    concurrent_trials,
    largest_trial,
    runs_in_trial_process,
    trial_dirname,
    trial_trainable,
)

DESCRIPTION = """Search a VAE's hyperparameters with Ray Tune + Optuna (ASHA early stopping) over
the config's search.space, write the trial summary, and export the best model. Trials are
compared on the beta = 1 negative ELBO (nats per image)."""
EXAMPLES = """search space (search.space: dotted config key -> distribution):
  model.latent_dim: {choice: [8, 16, 32]}     train.lr: {loguniform: [1.0e-4, 3.0e-3]}
  train.beta: {uniform: [0.5, 2.0]}           model.hidden_dim: {randint: [64, 512]}
  also {quniform: [lo, hi, q]} and {qloguniform: [lo, hi, q]}

examples:
  raytrain-vae tune quickstart
  raytrain-vae tune configs/search.yaml search.num_samples=50 search.max_concurrent_trials=4
  raytrain-vae tune quickstart --resume            # continue an interrupted search
  raytrain-vae tune quickstart --json > search.json  # the summary for a program"""
SUMMARY_FILE = "summary"
PARETO_FILE = "pareto"


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


def set_tune_output_defaults() -> None:
    """Tune's output settings, unless the user set them: the live view we choose, and none of
    the warnings a healthy search would print."""
    # With CheckpointConfig(num_to_keep), Tune saves its state when a trial has kept that many
    # checkpoints, and warns each time it does so within 5 s: every few epochs of a short trial.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Ray 2.60's default output ignores a progress reporter and shows the first four metrics a
    # trial reports and no parameters; its classic output prints ours (live_view).
    # RAY_AIR_NEW_OUTPUT=1 brings the default back.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


def live_view(cfg: Config, params: list[Param]) -> TrialTable:
    """The trial table while the search runs: the search metric(s), the epoch and the sampled
    parameters, the best trial first."""
    s = cfg.search
    return TrialTable(
        metrics=list(s.metric) if s.multi_objective else [s.metric],
        params=[p.path for p in params],
        sort_by=s.selection,
        total=s.num_samples,
    )


def make_tuner(cfg: Config, params: list[Param], callbacks: list | None = None) -> tune.Tuner:
    s = cfg.search
    trainable = trial_trainable(cfg, params, cfg.run_folder())
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
            progress_reporter=live_view(cfg, params),
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


def export_best(cfg: Config, best: pd.Series) -> Path:
    """Copy the best trial's best checkpoint (local or remote storage) into export.dir."""
    path = reported_location(cfg.resolved_storage_path(), str(best["best_checkpoint"]))
    filesystem = None
    if is_uri(path):
        filesystem, path = filesystem_for(path)
    extra = {"trial_id": best["trial_id"], "experiment": cfg.run_folder()}
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
    path = cfg.run_folder()
    ray_path, filesystem = ray_storage(path)
    exists = tune.Tuner.can_restore(ray_path, storage_filesystem=filesystem)
    if exists and not resume:
        raise ConfigError(
            f"experiment {path} exists: pass --resume to continue it, or choose another run.name"
        )
    if resume and not exists:
        raise ConfigError(f"--resume: no experiment to resume at {path}")
    preflight(cfg)
    set_tune_output_defaults()
    largest = largest_trial(trial_configs(cfg, params))
    init_ray()
    require_worker_resources(largest, 0.0 if runs_in_trial_process(largest) else TRIAL_DRIVER_CPUS)
    if resume:
        tuner = tune.Tuner.restore(
            ray_path,
            trainable=trial_trainable(cfg, params, path),
            resume_errored=True,
            storage_filesystem=filesystem,
        )
    else:
        tuner = make_tuner(cfg, params, [*(callbacks or []), *search_trackers(cfg, params)])
    table = trial_table(cfg, params, tuner.fit())
    print_summary(cfg, table)
    best = best_trial(cfg, table)
    written = write_outputs(cfg, table, path, str(best["trial_id"]))
    export = export_best(cfg, best)
    if cfg.tracking.mlflow.uri:
        report_tracking(cfg, params, best, export, written)
    metric, _ = cfg.search.selection
    print(
        f"best trial {best['trial_id']}: {metric} {best[f'best_{metric}']:.3f} nats at epoch "
        f"{int(best['best_epoch'])}; exported to {export}"
    )
    return table, export


def search_trackers(cfg: Config, params: list[Param]) -> list[SearchTracker]:
    """The search's MLflow runs, when tracking.mlflow.uri is set (Tune keeps the callback with
    the experiment, so a resumed search goes on with it)."""
    if not cfg.tracking.mlflow.uri:
        return []
    tags = run_tags(ray.get_runtime_context().gcs_address)
    return [SearchTracker(cfg, params, cfg.run_folder(), tags)]


def write_outputs(cfg: Config, table: pd.DataFrame, path: str, exported: str) -> list[str]:
    """The trial summary and, in multi-objective mode, the Pareto front and its plot (the
    exported trial starred)."""
    written = write_table(table, path, SUMMARY_FILE)
    for file in written:
        print(f"trial summary: {file}")
    if cfg.search.multi_objective:
        metrics, modes = list(cfg.search.metric), list(cfg.search.mode)
        front = pareto_front(table, metrics, modes)
        for file in write_table(front, path, PARETO_FILE):
            print(f"Pareto front: {file}")
            written.append(file)
        if not is_uri(path):
            plot_pareto(table, front, metrics, Path(path) / f"{PARETO_FILE}.png", exported)
            print(f"Pareto plot: {path}/{PARETO_FILE}.png")
            written.append(f"{path}/{PARETO_FILE}.png")
    return written


def report_tracking(
    cfg: Config, params: list[Param], best: pd.Series, export: Path, written: list[str]
) -> None:
    """The search's end in MLflow: best trial, export, files, registered version."""
    path = cfg.run_folder()
    tracker, SearchTracker.active = SearchTracker.active, None
    if tracker is None or tracker.path != path:  # a resumed search that was not tracked before
        tracker = SearchTracker(cfg, params, path, run_tags(ray.get_runtime_context().gcs_address))
    files = [Path(f) for f in written if not is_uri(f) and f.endswith((".csv", ".png"))]
    version = tracker.finish_search(best, export, files)
    run_id = tracker.parent().run_id
    if run_id is None:
        print(f"MLflow: the search was not recorded ({shown_uri(cfg.tracking.mlflow.uri)} failed)")
        return
    where = f"MLflow: search run {run_id} in experiment {tracker.experiment}"
    registered = cfg.tracking.mlflow.register_as
    if registered:
        where += f"; registered as {registered} version {version or '(not sent)'}"
    print(f"{where} ({shown_uri(cfg.tracking.mlflow.uri)})")


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = config_parser(prog or "python -m raytrain_vae.tune", DESCRIPTION, EXAMPLES)
    parser.add_argument(
        "--resume", action="store_true", help="continue an interrupted search of the same run.name"
    )
    parser.add_argument("--json", action="store_true", help=JSON_HELP)
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    with stdout_to_stderr(args.json):
        table, export = search(cfg, resume=args.resume)
    if args.json:
        path = cfg.run_folder()
        summary = child_path(path, f"{SUMMARY_FILE}.csv")
        print_json(search_summary(cfg, table, export, path, summary))
    return 0


def cli() -> None:
    """Console-script entry point: user errors -> one line on stderr, exit status 2."""
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
