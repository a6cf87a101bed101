"""Ray Tune + Optuna searches on CPU: ASHA, best-trial export that reproduces its metric, Pareto."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from raytrain_vae.config import load_config
from raytrain_vae.data import load_splits
from raytrain_vae.data.idx import SYSTEM_DIRS
from raytrain_vae.loop import negative_elbo_sums
from raytrain_vae.model_io import load_model_dir
from raytrain_vae.tune import search

pytestmark = pytest.mark.slow


def tiny_search_config(tmp_path: Path, name: str, extra: list[str]):
    assert Path(SYSTEM_DIRS["fashion_mnist"][0]).is_dir(), "needs dataset-fashion-mnist"
    return load_config(
        None,
        [
            f"data.root={tmp_path / 'data'}",
            "data.download=false",
            "data.limit=400",
            "data.val_fraction=0.25",
            "model.hidden_dim=32",
            "train.batch_size=32",
            "train.epochs=2",
            "scaling.num_workers=1",
            f"run.name={name}",
            f"run.storage_path={tmp_path / 'runs'}",
            "run.checkpoints_to_keep=1",
            "search.max_concurrent_trials=1",
            f"export.dir={tmp_path / name / 'export'}",
            "export.num_samples=16",
            "export.num_reconstructions=8",
            "search.space={model.latent_dim: {choice: [2, 4]}, "
            "model.channels: {choice: [[4, 8], [8, 16]]}, "
            "train.lr: {loguniform: [3.0e-4, 3.0e-3]}, train.beta: {loguniform: [0.5, 2.0]}}",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def asha_search(ray_local, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tune")
    cfg = tiny_search_config(
        tmp,
        "asha",
        [
            "search.num_samples=4",
            "search.scheduler.type=asha",
            "search.scheduler.grace_period=1",
            "search.scheduler.reduction_factor=2",
            "train.epochs=8",
            "data.limit=1600",  # epochs of ~0.4 s: long against the time a stop takes to land
        ],
    )
    table, export = search(cfg)
    return cfg, table, export


def test_search_runs_every_trial_and_asha_stops_some(asha_search):
    cfg, table, _ = asha_search
    assert len(table) == 4
    assert set(table["status"]) <= {"done", "stopped early"}
    assert (table["status"] == "stopped early").any(), table
    assert (table["status"] == "done").any()
    stopped = table[table["status"] == "stopped early"]
    assert (stopped["epochs"] < cfg.train.epochs).all()
    # An ASHA stop really ended the Train run. Its workers may finish an epoch or two while the
    # stop travels (Tune's decision, then the trial actor and its Train controller are killed),
    # but they never train on to the end: rungs are at 1, 2 and 4 of 8 epochs.
    for _, row in stopped.iterrows():
        run_dir = Path(row["best_checkpoint"]).parent
        epochs = [
            json.loads((c / "metrics.json").read_text())["epoch"]
            for c in run_dir.glob("checkpoint_*")
        ]
        assert max(epochs) <= row["epochs"] + 2 < cfg.train.epochs
    lists = [json.loads(v) for v in table["model.channels"]]
    assert all(v in ([4, 8], [8, 16]) for v in lists)


def test_summary_written_next_to_experiment(asha_search):
    cfg, table, _ = asha_search
    folder = Path(cfg.resolved_storage_path()) / cfg.run.name
    csv = pd.read_csv(folder / "summary.csv")
    parquet = pd.read_parquet(folder / "summary.parquet")
    assert len(csv) == len(parquet) == len(table)
    assert {"trial_id", "status", "epochs", "best_val_neg_elbo", "model.latent_dim"} <= set(csv)


def test_best_trial_is_chosen_by_val_neg_elbo_and_export_reproduces_it(asha_search):
    cfg, table, export = asha_search
    best = table.loc[table["best_val_neg_elbo"].idxmin()]
    metrics = json.loads((export / "metrics.json").read_text())
    assert metrics["trial_id"] == best["trial_id"]
    assert metrics["val_neg_elbo"] == pytest.approx(best["best_val_neg_elbo"])
    assert {
        "model.safetensors",
        "config.yaml",
        "metrics.json",
        "samples.png",
        "reconstructions.png",
        "README.md",
    } <= {p.name for p in export.iterdir()}

    model, trial_cfg = load_model_dir(export)
    assert trial_cfg.model.latent_dim == best["model.latent_dim"]
    assert trial_cfg.model.channels == json.loads(best["model.channels"])
    val = load_splits(trial_cfg.data).val
    sums = negative_elbo_sums(model, val, torch.arange(len(val)), torch.device("cpu"))
    count, recon, kl = sums.tolist()
    assert (recon + kl) / count == pytest.approx(best["best_val_neg_elbo"], rel=1e-3)


def test_multi_objective_search_writes_a_non_dominated_pareto_front(ray_local, tmp_path):
    cfg = tiny_search_config(
        tmp_path,
        "pareto",
        [
            "search.num_samples=3",
            "search.metric=[val_recon, val_kl]",
            "search.mode=[min, min]",
            "search.scheduler.type=none",
            "train.epochs=1",
        ],
    )
    table, export = search(cfg)
    folder = tmp_path / "runs" / "pareto"
    front = pd.read_csv(folder / "pareto.csv")
    assert (folder / "pareto.png").stat().st_size > 0
    assert 1 <= len(front) <= len(table) == 3
    points = table[["val_recon", "val_kl"]].to_numpy()
    for r, k in front[["val_recon", "val_kl"]].to_numpy():
        dominated = [(pr <= r and pk <= k and (pr < r or pk < k)) for pr, pk in points]
        assert not any(dominated)
    # Every trial off the front is dominated by one on it.
    on_front = set(front["trial_id"])
    for _, row in table[~table["trial_id"].isin(on_front)].iterrows():
        assert any(
            (f.val_recon <= row.val_recon and f.val_kl <= row.val_kl) for f in front.itertuples()
        )
    assert (export / "model.safetensors").is_file()


def test_single_worker_trials_run_in_their_own_process_and_ddp_trials_as_ray_train_runs(
    ray_local, tmp_path
):
    """One search over the worker count: a 1-worker trial runs in its Tune trial's process
    (checkpoints in the trial's folder), a 2-worker trial as a Ray Train run (DDP, checkpoints
    under trials/); both report every epoch and either can be exported."""
    cfg = tiny_search_config(
        tmp_path,
        "mixed",
        [
            "search.num_samples=3",
            "search.scheduler.type=none",
            "search.algorithm.sampler=random",
            "search.space={scaling.num_workers: {choice: [1, 2]}}",
            "scaling.cpus_per_worker=0.5",
        ],
    )
    table, export = search(cfg)
    assert set(table["scaling.num_workers"]) == {1, 2}, table  # the seeded sampler tried both
    assert (table["status"] == "done").all() and (table["epochs"] == 2).all(), table
    experiment = tmp_path / "runs" / "mixed"
    for _, row in table.iterrows():
        checkpoint = Path(row["best_checkpoint"])
        if row["scaling.num_workers"] == 1:
            assert checkpoint.parent == experiment / f"trial_{row['trial_id']}"
        else:
            assert checkpoint.parent == experiment / "trials" / f"train-{row['trial_id']}"
        assert json.loads((checkpoint / "metrics.json").read_text())["epoch"] == row["best_epoch"]
    assert (export / "model.safetensors").is_file()
