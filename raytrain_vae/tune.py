"""Ray Tune + Optuna search over the YAML space; each trial a Ray Train run; best model exported."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import optuna
import pandas as pd
import pyarrow.fs
import ray
from ray import tune
from ray.train import Checkpoint
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from raytrain_vae.cli import config_parser, run_cli
from raytrain_vae.config import Config, ConfigError, load_config, validate_config
from raytrain_vae.export import EXPORT_KIND, export_model
from raytrain_vae.outputs import check_output_dir
from raytrain_vae.runtime import init_ray
from raytrain_vae.search_space import Param, parse_space, trial_config, trial_configs
from raytrain_vae.train import (
    build_trainer,
    preflight,
    require_worker_resources,
    user_error_from,
)

TRIAL_DRIVER_CPUS = 0.1  # the Tune function only waits on its TorchTrainer
SUMMARY_FILE = "summary"
PARETO_FILE = "pareto"


def run_trial(sampled: dict, base: dict, params: list[Param], trials_path: str) -> None:
    """Tune trainable: one trial = one Ray Train run whose epochs are forwarded to Tune."""
    cfg = trial_config(validate_config(base, "search config"), params, sampled)
    trial_id = tune.get_context().get_trial_id()
    # A stable run name (no timestamp) lets Tuner.restore resume the trial's own Train run.
    trainer = build_trainer(
        cfg,
        name=f"train-{trial_id}",
        storage_path=trials_path,
        callbacks=[TuneReportCallback()],
        score=cfg.search.selection,
    )
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as exc:
        user_error = user_error_from(exc)
        raise (user_error or exc) from None


def experiment_path(cfg: Config) -> str:
    return f"{cfg.resolved_storage_path().rstrip('/')}/{cfg.run.name}"


def concurrent_trials(cfg: Config) -> int:
    """search.max_concurrent_trials, or as many trials as the cluster's CPUs and GPUs hold."""
    if cfg.search.max_concurrent_trials is not None:
        return cfg.search.max_concurrent_trials
    s = cfg.scaling
    resources = ray.cluster_resources()
    fits = resources.get("CPU", 1) // (s.num_workers * s.cpus_per_worker + TRIAL_DRIVER_CPUS)
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


def make_tuner(cfg: Config, params: list[Param]) -> tune.Tuner:
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
            max_concurrent_trials=concurrent_trials(cfg),
        ),
        run_config=tune.RunConfig(
            name=cfg.run.name, storage_path=cfg.resolved_storage_path(), verbose=1
        ),
    )


def _trainable(cfg: Config, params: list[Param]):
    fn = tune.with_parameters(
        run_trial,
        base=cfg.model_dump(mode="json"),
        params=params,
        trials_path=f"{experiment_path(cfg)}/trials",
    )
    return tune.with_resources(fn, {"cpu": TRIAL_DRIVER_CPUS})


def trial_table(cfg: Config, params: list[Param], results: tune.ResultGrid) -> pd.DataFrame:
    """One row per trial: status, epochs run, best metric and its checkpoint, decoded params."""
    metric, mode = cfg.search.selection
    rows = []
    for result in results:
        history = result.metrics_dataframe
        row = {"trial_id": (result.metrics or {}).get("trial_id") or Path(result.path).name}
        for p in params:
            value = p.decode(result.config[p.path])
            row[p.path] = json.dumps(value) if isinstance(value, list | dict) else value
        epochs = 0 if history is None or history.empty else int(history["epoch"].max())
        row["epochs"] = epochs
        if result.error:
            row["status"] = "ERROR"
        else:
            row["status"] = "done" if epochs >= cfg.train.epochs else "stopped early"
        if epochs:
            values = history[metric].astype(float)
            finite = values[values.map(math.isfinite)]
            if len(finite):
                best_idx = finite.idxmin() if mode == "min" else finite.idxmax()
                best = history.loc[best_idx]
                row[f"best_{metric}"] = float(best[metric])
                row["best_epoch"] = int(best["epoch"])
                row["best_checkpoint"] = best.get("checkpoint_path")
            last = history.iloc[-1]
            for key in ("val_neg_elbo", "val_recon", "val_kl"):
                row[key] = float(last[key])
            row["seconds"] = float(last.get("time_total_s", float("nan")))
            row["train_seconds"] = float(history["epoch_s"].sum())
        row["error"] = str(result.error).strip().splitlines()[-1][:200] if result.error else ""
        rows.append(row)
    return pd.DataFrame(rows)


def pareto_front(table: pd.DataFrame, metrics: list[str], modes: list[str]) -> pd.DataFrame:
    """Trials no other trial beats on every metric (and strictly on one): the trade-off curve."""
    signs = [1 if m == "min" else -1 for m in modes]
    points = table.dropna(subset=metrics)
    keep = []
    for i, a in points.iterrows():
        dominated = False
        for j, b in points.iterrows():
            not_worse = all(s * b[m] <= s * a[m] for m, s in zip(metrics, signs, strict=True))
            better = any(s * b[m] < s * a[m] for m, s in zip(metrics, signs, strict=True))
            if j != i and not_worse and better:
                dominated = True
                break
        if not dominated:
            keep.append(i)
    return points.loc[keep].sort_values(metrics[0])


def plot_pareto(table: pd.DataFrame, front: pd.DataFrame, metrics: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    ax.scatter(table[metrics[0]], table[metrics[1]], c="0.6", label="trials")
    ax.plot(front[metrics[0]], front[metrics[1]], "o-", c="C3", label="Pareto front")
    ax.set_xlabel(f"{metrics[0]} (nats)")
    ax.set_ylabel(f"{metrics[1]} (nats)")
    ax.set_title("Rate vs distortion")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_table(table: pd.DataFrame, folder: str, stem: str) -> list[str]:
    """CSV and Parquet next to the experiment (local path or pyarrow URI)."""
    fs, base = (
        pyarrow.fs.FileSystem.from_uri(folder)
        if "://" in folder
        else (pyarrow.fs.LocalFileSystem(), folder)
    )
    fs.create_dir(base, recursive=True)
    written = []
    for ext in ("csv", "parquet"):
        path = f"{base}/{stem}.{ext}"
        with fs.open_output_stream(path) as out:
            if ext == "csv":
                out.write(table.to_csv(index=False).encode())
            else:
                table.to_parquet(out, index=False)
        written.append(f"{folder}/{stem}.{ext}")
    return written


def best_trial(cfg: Config, table: pd.DataFrame) -> pd.Series:
    metric, mode = cfg.search.selection
    column = f"best_{metric}"
    candidates = table.dropna(subset=[column]) if column in table else table.iloc[0:0]
    candidates = candidates[candidates["best_checkpoint"].notna()]
    if candidates.empty:
        raise ConfigError(f"no trial reported a finite {metric}: nothing to export")
    return candidates.sort_values(column, ascending=mode == "min").iloc[0]


def export_best(cfg: Config, best: pd.Series) -> Path:
    """Copy the best trial's best checkpoint (local or remote storage) into export.dir."""
    path = str(best["best_checkpoint"])
    filesystem = None
    if "://" in cfg.resolved_storage_path():
        filesystem, path = pyarrow.fs.FileSystem.from_uri(path)
    extra = {"trial_id": best["trial_id"], "experiment": experiment_path(cfg)}
    with Checkpoint(path, filesystem=filesystem).as_directory() as folder:
        return export_model(folder, cfg.resolved_export_dir(), extra)


def search(cfg: Config, resume: bool = False) -> tuple[pd.DataFrame, Path]:
    """Run (or resume) the search, write its summary, export the best model; (table, export)."""
    params = parse_space(cfg)
    if not params:
        raise ConfigError("search.space is empty: name at least one config key to search")
    # A URI storage needs an explicit export.dir, and it must be ours to replace: before Ray.
    check_output_dir(cfg.resolved_export_dir(), "export.dir", EXPORT_KIND)
    path = experiment_path(cfg)
    exists = tune.Tuner.can_restore(path)
    if exists and not resume:
        raise ConfigError(
            f"experiment {path} exists: pass --resume to continue it, or choose another run.name"
        )
    if resume and not exists:
        raise ConfigError(f"--resume: no experiment to resume at {path}")
    preflight(cfg)
    largest = _largest_trial(trial_configs(cfg, params))
    init_ray()
    require_worker_resources(largest, TRIAL_DRIVER_CPUS)
    if resume:
        tuner = tune.Tuner.restore(path, trainable=_trainable(cfg, params), resume_errored=True)
    else:
        tuner = make_tuner(cfg, params)
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
        if "://" not in path:
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


def print_summary(cfg: Config, table: pd.DataFrame) -> None:
    shown = [c for c in table.columns if c not in {"best_checkpoint", "error"}]
    with pd.option_context("display.width", 200, "display.max_columns", 50):
        print("\nTrials (losses in nats per image, beta = 1):")
        print(table[shown].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    errors = table[table["error"] != ""]
    for _, row in errors.iterrows():
        print(f"trial {row['trial_id']} failed: {row['error']}")
    if "seconds" in table and table["seconds"].notna().any():
        overhead = (table["seconds"] - table["train_seconds"]).dropna()
        print(
            f"per-trial overhead outside epochs (Ray Train start-up, teardown): "
            f"{overhead.mean():.1f} s on average over {len(overhead)} trials"
        )


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
