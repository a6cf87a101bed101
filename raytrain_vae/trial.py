"""One trial of a search: what it runs (a rank in its own process, or a Ray Train run), what it
reserves, and how many fit at once."""

from __future__ import annotations

import logging

import ray
from ray import tune
from ray.tune import PlacementGroupFactory
from ray.tune.integration.ray_train import TuneReportCallback

from raytrain_vae.config import Config, validate_config
from raytrain_vae.rank_host import trial_process_host
from raytrain_vae.search_space import Param, trial_config
from raytrain_vae.tracking import tracking_spec
from raytrain_vae.training import (
    build_trainer,
    data_cpus,
    loop_inputs,
    user_error_from,
    worker_resources,
)
from raytrain_vae.worker import run_rank

TRIAL_DRIVER_CPUS = 0.1  # a trial that runs a TorchTrainer only waits on it


def run_trial(sampled: dict, base: dict, params: list[Param], experiment: str) -> None:
    """Tune trainable: one trial = one rank in this process (a single-worker trial, when
    search.local_trials), or one Ray Train run whose epochs are forwarded to Tune."""
    cfg = trial_config(validate_config(base, "search config"), params, sampled)
    trial_id = tune.get_context().get_trial_id()
    label = f"trial {trial_id}"
    tracking = trial_tracking(cfg, experiment, trial_id)
    if runs_in_trial_process(cfg):
        # Tune's checkpoint bookkeeping logs each epoch at INFO through Ray Train's loggers.
        logging.getLogger("ray.train").setLevel(cfg.run.log_level)
        loop_config, datasets = loop_inputs(cfg, label, tracking)
        run_rank(loop_config, trial_process_host(datasets, cfg.scaling.use_gpu))
        return
    # A stable run name (no timestamp) lets Tuner.restore resume the trial's own Train run.
    trainer = build_trainer(
        cfg,
        name=f"train-{trial_id}",
        storage_path=f"{experiment}/trials",
        callbacks=[TuneReportCallback()],
        score=cfg.search.selection,
        label=label,
        tracking=tracking,
    )
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as exc:
        user_error = user_error_from(exc)
        raise (user_error or exc) from None


def trial_tracking(cfg: Config, experiment: str, trial_id: str) -> dict | None:
    """What a trial's rank 0 tracks: its TensorBoard events (the search's driver sends its
    MLflow runs)."""
    if not cfg.tracking.tensorboard:
        return None
    folder = f"{experiment}/tensorboard/trial_{trial_id}"
    return tracking_spec(cfg, f"{experiment}/trial_{trial_id}", {}, folder, mlflow=False)


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


def largest_trial(configs: list[Config]) -> Config:
    """The trial config that asks for the most CPUs, then GPUs: if it fits, every trial does."""

    def need(c: Config) -> tuple[float, float]:
        s = c.scaling
        return s.num_workers * s.cpus_per_worker, s.num_workers * s.gpus_per_worker * s.use_gpu

    return max(configs, key=need)


def trial_trainable(cfg: Config, params: list[Param], experiment: str):
    """run_trial as Tune's trainable, with the base config and what each trial reserves;
    experiment: the search's folder (local path or URI)."""
    fn = tune.with_parameters(
        run_trial, base=cfg.model_dump(mode="json"), params=params, experiment=experiment
    )
    # Per trial: a search over scaling keys may mix local and Ray Train trials.
    return tune.with_resources(
        fn,
        lambda sampled: PlacementGroupFactory(
            [trial_resources(trial_config(cfg, params, sampled))]
        ),
    )
