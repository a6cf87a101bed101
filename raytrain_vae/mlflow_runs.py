"""Which MLflow run: found again by a key (its storage path) when a run or search resumes,
or created, nested under its parent, in an experiment whose artifacts sit beside the store."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any, Protocol

KEY_TAG = "raytrain_vae.run_key"  # finds the run again when a training or search resumes
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag: the UI nests the run under its parent
KIND_TAG = "mlflow.experimentKind"  # the UI opens on training runs, not on GenAI traces
PARAM_LIMIT = 6000  # MLflow refuses longer parameter values


class OpenedRun(Protocol):
    run_id: str | None


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """Which MLflow run: under which experiment, found again by key, nested or not, and the
    params it starts with (logged once, when it is created)."""

    experiment: str
    key: str
    name: str
    tags: dict[str, str] = dataclasses.field(default_factory=dict)
    params: dict[str, str] = dataclasses.field(default_factory=dict)
    parent: OpenedRun | None = None  # opened first: the sink keeps order
    resume: bool = True  # continue the run with this key if there is one


def run_key(path: str) -> str:
    """A tag value naming a run by where its files live (its storage path, or its trial's)."""
    return hashlib.sha256(path.encode()).hexdigest()[:32]


def open_run(client: Any, spec: RunSpec, uri: str) -> str:
    """The run with this key (to continue it), or a new one with its params."""
    experiment_id = experiment_id_of(client, spec.experiment, uri)
    if spec.resume:
        found = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{KEY_TAG}` = '{run_key(spec.key)}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if found:
            client.update_run(found[0].info.run_id, status="RUNNING")
            return found[0].info.run_id
    tags = {**spec.tags, KEY_TAG: run_key(spec.key)}
    if spec.parent is not None:
        tags[PARENT_TAG] = spec.parent.run_id  # sent before: the queue keeps order
    run_id = client.create_run(experiment_id, run_name=spec.name, tags=tags).info.run_id
    if spec.params:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:PARAM_LIMIT]) for k, v in spec.params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(run_id, params=items[i : i + 100])
    return run_id


def experiment_id_of(client: Any, name: str, uri: str) -> str:
    """The experiment's id, created if need be (beside a local sqlite store, its artifacts)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(
            name,
            artifact_location=local_artifact_root(uri),
            tags={KIND_TAG: "custom_model_development"},
        )
    except MlflowException:  # created meanwhile by another process
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def local_artifact_root(uri: str) -> str | None:
    """Artifacts of a sqlite store go beside the database (MLflow's default is ./mlruns of
    whichever process creates the experiment: a Ray worker's temporary directory)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return None
