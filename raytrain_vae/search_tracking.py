"""A search in MLflow, sent from the driver: one parent run, a nested run per trial (sampled
params, per-epoch metrics, status and the reason it failed), the best trial, the export and its
registered version."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
from ray import tune

from raytrain_vae.config import REPORTED_METRICS, Config
from raytrain_vae.mlflow_runs import RunSpec
from raytrain_vae.mlflow_sink import MlflowSink, RunHandle, first_line
from raytrain_vae.search_space import Param
from raytrain_vae.tracking import CLOSE_TIMEOUT_S, MODEL_ARTIFACTS, experiment_name, flat_params

TRACKED_METRICS = (
    *REPORTED_METRICS,
    "train_recon",
    "train_kl",
    "kl_weight",
    "images_per_s",
    "epoch_s",
)
FAILURE_TAG = "failure_reason"


class SearchTracker(tune.Callback):
    """Tune callback: the search's MLflow runs. Only the driver talks to MLflow for a search;
    each call queues (mlflow_sink), so a slow or dead server never holds the search up."""

    # The tracker Tune runs: a resumed search runs the copy Tune kept with the experiment, not
    # one the driver made, and the search's end (best trial, export) goes to that copy's runs.
    active: SearchTracker | None = None

    def __init__(self, cfg: Config, params: list[Param], path: str, tags: dict[str, str]):
        self.cfg, self.params, self.path, self.tags = cfg, params, path, tags
        self.logged_epochs: dict[str, int] = {}  # trial id -> last epoch sent (kept on resume)
        self._sink: MlflowSink | None = None
        self._parent: RunHandle | None = None
        self._trials: dict[str, RunHandle] = {}

    def __getstate__(self) -> dict:
        # Tune pickles its callbacks with the experiment; threads and handles start afresh.
        return {k: v for k, v in self.__dict__.items() if k not in ("_sink", "_parent", "_trials")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _sink=None, _parent=None, _trials={})

    def get_state(self) -> dict:
        return {"logged_epochs": dict(self.logged_epochs)}

    def set_state(self, state: dict) -> None:
        self.logged_epochs = dict(state.get("logged_epochs", {}))

    def parent(self) -> RunHandle:
        """The search's run (found again by the experiment's path when it resumes)."""
        if self._parent is None:
            self._sink = MlflowSink(self.cfg.tracking.mlflow.uri)
            spec = RunSpec(
                experiment=experiment_name(self.cfg),
                key=self.path,
                name=self.cfg.run.name,
                tags={**self.tags, "raytrain_vae.kind": "search"},
                params=flat_params(self.cfg),
            )
            self._parent = self._sink.open_run(spec)
        return self._parent

    @property
    def experiment(self) -> str:
        return experiment_name(self.cfg)

    def setup(self, **info: Any) -> None:
        SearchTracker.active = self
        self.parent()

    def trial_run(self, trial: Any) -> RunHandle:
        """The trial's nested run, with its sampled params."""
        if trial.trial_id not in self._trials:
            parent = self.parent()
            sampled = {p.path: p.decode(trial.config[p.path]) for p in self.params}
            spec = RunSpec(
                experiment=experiment_name(self.cfg),
                key=f"{self.path}/trial_{trial.trial_id}",
                name=f"trial_{trial.trial_id}",
                tags={**self.tags, "raytrain_vae.trial_id": trial.trial_id},
                params={k: json.dumps(v) if isinstance(v, list) else v for k, v in sampled.items()},
                parent=parent,
            )
            self._trials[trial.trial_id] = parent.sink.open_run(spec)
        return self._trials[trial.trial_id]

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.trial_run(trial)

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        epoch = result.get("epoch")
        if not isinstance(epoch, int) or epoch <= self.logged_epochs.get(trial.trial_id, 0):
            return  # a resumed trial reports its earlier epochs again
        self.logged_epochs[trial.trial_id] = epoch
        metrics = {k: result[k] for k in TRACKED_METRICS if isinstance(result.get(k), int | float)}
        self.trial_run(trial).log_metrics(metrics, epoch)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        epochs = self.logged_epochs.get(trial.trial_id, 0)
        run = self.trial_run(trial)
        run.set_tags({"stopped_early": str(epochs < self.cfg.train.epochs).lower()})
        run.finish()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        error = trial.get_error()
        reason = first_line(error) if error is not None else "failed"
        run = self.trial_run(trial)
        run.set_tags({FAILURE_TAG: reason})
        run.finish("FAILED")

    def finish_search(self, best: pd.Series, export: Path, files: list[Path]) -> str | None:
        """Mark the best trial, log the export (and the summary and Pareto files), register it
        when tracking.mlflow.register_as says so, and wait (bounded) for all of it to be sent.
        Returns the registered version, or None."""
        parent = self.parent()
        metric, _ = self.cfg.search.selection
        trial_id = str(best["trial_id"])
        parent.set_tags({"best_trial_id": trial_id})
        parent.log_metrics({f"best_{metric}": float(best[f"best_{metric}"])}, 0)
        if trial_id in self._trials:
            self._trials[trial_id].set_tags({"best_trial": "true"})
        parent.log_artifacts(export, MODEL_ARTIFACTS)
        for file in files:
            parent.log_artifact(file, "search")
        name = self.cfg.tracking.mlflow.register_as
        registered = parent.register(name, MODEL_ARTIFACTS) if name else None
        parent.finish()
        self._sink.close(CLOSE_TIMEOUT_S)
        if registered is None or not registered.done.is_set():
            return None
        return str(registered.result.version)
