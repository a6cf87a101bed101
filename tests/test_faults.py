"""Faults survived: a worker killed mid-run, a diverging trial, a run spread over two nodes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from raytrain_vae.config import load_config
from raytrain_vae.data.idx import SYSTEM_DIRS
from raytrain_vae.faults import FAIL_ONCE_ENV
from raytrain_vae.training import fit, history_of
from raytrain_vae.tune import search

pytestmark = pytest.mark.slow


def tiny(tmp_path: Path, name: str, *extra: str):
    assert Path(SYSTEM_DIRS["fashion_mnist"][0]).is_dir(), "needs dataset-fashion-mnist"
    return load_config(
        None,
        [
            f"data.root={tmp_path / 'data'}",
            "data.download=false",
            "data.limit=480",
            "data.val_fraction=0.25",
            "model.channels=[4,8]",
            "model.hidden_dim=32",
            "model.latent_dim=4",
            "train.batch_size=32",
            "train.lr=3e-3",
            "scaling.num_workers=2",
            f"run.name={name}",
            f"run.storage_path={tmp_path / 'runs'}",
            *extra,
        ],
    )


def test_worker_killed_mid_run_restarts_from_checkpoint_and_counts_each_epoch_once(tmp_path):
    marker = tmp_path / "died"
    ray.init(num_cpus=2, runtime_env={"env_vars": {FAIL_ONCE_ENV: f"3:{marker}"}})
    try:
        result = fit(tiny(tmp_path, "killed", "train.epochs=4", "run.max_failures=1"))
        reference = fit(tiny(tmp_path, "clean", "train.epochs=4"))
    finally:
        ray.shutdown()
    assert marker.exists(), "the injected failure never happened"
    history = history_of(result)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    # Resumed from the epoch-2 checkpoint with every random stream replayed: same numbers.
    for got, want in zip(history, history_of(reference), strict=True):
        assert got["val_neg_elbo"] == pytest.approx(want["val_neg_elbo"], rel=1e-5)


def test_diverging_trial_fails_with_its_reason_and_the_search_exports_a_finite_one(tmp_path):
    cfg = tiny(
        tmp_path,
        "diverge",
        "train.epochs=1",
        "scaling.num_workers=1",
        "search.num_samples=3",
        "search.max_concurrent_trials=1",
        "search.scheduler.type=none",
        "search.algorithm.sampler=random",
        "search.space={train.lr: {choice: [0.003, 1.0e10]}}",
        f"export.dir={tmp_path / 'export'}",
    )
    ray.init(num_cpus=2)
    try:
        table, export = search(cfg)
    finally:
        ray.shutdown()
    diverged = table[table["train.lr"] == 1.0e10]
    finite = table[table["train.lr"] == 0.003]
    assert len(diverged) and len(finite), table  # the seeded sampler tried both
    assert (diverged["status"] == "ERROR").all()
    assert diverged["error"].str.contains("diverged").all()
    assert (finite["status"] == "done").all()
    metrics = json.loads((export / "metrics.json").read_text())
    assert metrics["trial_id"] in set(finite["trial_id"])


def test_two_node_spread_run_matches_a_one_node_run(tmp_path):
    cfg = tiny(tmp_path, "spread", "train.epochs=2", "scaling.placement_strategy=STRICT_SPREAD")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address)
        spread = history_of(fit(cfg))
        workers = list_actors(filters=[("class_name", "=", "RayTrainWorker")], detail=True)
        nodes = {a["node_id"] for a in workers}
        ray.shutdown()
    finally:
        cluster.shutdown()
    assert len(nodes) == 2, workers  # one DDP rank per node
    ray.init(num_cpus=2)
    try:
        single = history_of(fit(tiny(tmp_path, "single", "train.epochs=2")))
    finally:
        ray.shutdown()
    for a, b in zip(spread, single, strict=True):
        assert a["val_neg_elbo"] == pytest.approx(b["val_neg_elbo"], rel=1e-4)
