"""Tracking as users run it, against real components: a training run in a sqlite store and
TensorBoard, a search against a real `mlflow server` with its registered model, and a server
killed mid-run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from conftest import mlflow_server, own_lines
from mlflow import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_cli_train import assert_one_line_error
from test_tune_e2e import clean_env, write_search_config

from raytrain_vae.export import load_model
from raytrain_vae.pictures import sample_images

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "vae.yaml"


def train_command(tmp_path: Path, name: str, *overrides: str) -> list[str]:
    return [
        sys.executable, "-m", "raytrain_vae.train", str(CONFIG),
        f"data.root={tmp_path / 'data'}", "data.limit=600", "model.channels=[8,16]",
        "model.hidden_dim=16", "model.latent_dim=4", "train.batch_size=64",
        "scaling.num_workers=1", f"run.name={name}", f"run.storage_path={tmp_path / 'runs'}",
        *overrides,
    ]  # fmt: skip


def train(tmp_path: Path, name: str, *overrides: str) -> subprocess.CompletedProcess:
    cmd = train_command(tmp_path, name, *overrides)
    return subprocess.run(
        cmd, cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=300
    )


def history(tmp_path: Path, name: str) -> list[dict]:
    """The per-epoch metrics of a run's latest checkpoint."""
    latest = sorted((tmp_path / "runs" / name).glob("checkpoint_*/"))[-1]
    return json.loads((latest / "state.json").read_text())["history"]


def events(folder: Path) -> EventAccumulator:
    """Every event file of a TensorBoard folder (a resumed run adds one), read together."""
    accumulator = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


def test_a_bad_tracking_uri_is_one_line_before_ray(tmp_path):
    proc = train(tmp_path, "bad", "tracking.mlflow.uri=ftp://example.com/x")
    assert_one_line_error(proc, "tracking.mlflow.uri", "scheme 'ftp'")
    assert not (tmp_path / "runs").exists()


def test_a_training_run_in_sqlite_and_tensorboard_resumes_in_the_same_run(tmp_path):
    tracked = ["tracking.mlflow.uri=sqlite:///mlflow.db", "tracking.tensorboard=true"]
    proc = train(tmp_path, "tracked", "train.epochs=2", *tracked)  # relative to cwd: tmp_path
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning: " not in proc.stderr and "Traceback" not in own_lines(proc.stderr), proc.stderr
    proc = train(tmp_path, "tracked", "train.epochs=3", *tracked)
    assert proc.returncode == 0, proc.stderr[-3000:]

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("tracked").experiment_id])
    assert run.info.status == "FINISHED"
    params, tags = run.data.params, run.data.tags
    assert params["train.epochs"] == "2" and params["model.channels"] == "[8, 16]"
    assert params["tracking.mlflow.uri"] == f"sqlite:///{tmp_path}/mlflow.db"
    assert tags["ray.address"] and tags["raytrain_vae.version"]
    expected = [(m["epoch"], m["val_neg_elbo"]) for m in history(tmp_path, "tracked")]
    sent = client.get_metric_history(run.info.run_id, "val_neg_elbo")
    assert [(m.step, m.value) for m in sent] == expected and len(expected) == 3
    folder = client.download_artifacts(run.info.run_id, "model", str(tmp_path / "download"))
    assert load_model(folder).cfg.channels == [8, 16]

    board = events(tmp_path / "runs" / "tracked" / "tensorboard")
    assert [s.step for s in board.Scalars("val_neg_elbo")] == [1, 2, 3]
    for tag in ("samples", "reconstructions"):
        assert [i.step for i in board.Images(tag)] == [1, 2, 3]


def search_config(tmp_path: Path, uri: str) -> Path:
    path = write_search_config(tmp_path, "tracked-search", num_samples=2)
    cfg = yaml.safe_load(path.read_text())
    cfg["tracking"] = {
        "mlflow": {"uri": uri, "experiment": "searches", "register_as": "tiny-vae"},
        "tensorboard": True,
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_a_search_nests_its_trials_and_registers_a_model_that_loads_back(tmp_path):
    with mlflow_server(tmp_path / "mlflow") as server:
        # A token (this server ignores it) must never reach a param or tag.
        cmd = [sys.executable, "-m", "raytrain_vae.tune", str(search_config(tmp_path, server.url))]
        env = clean_env() | {"MLFLOW_TRACKING_TOKEN": "s3cret-t0ken"}
        proc = subprocess.run(
            cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        assert "registered as tiny-vae version 1" in proc.stdout, proc.stdout[-2000:]
        assert proc.stdout.splitlines()[-1].startswith("best trial "), proc.stdout[-2000:]
        client = MlflowClient(server.url)
        runs = client.search_runs([client.get_experiment_by_name("searches").experiment_id])
        (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert len(children) == 2 and len(runs) == 3
        for child in children:
            assert child.info.status == "FINISHED" and "train.lr" in child.data.params
            steps = client.get_metric_history(child.info.run_id, "val_neg_elbo")
            assert [m.step for m in steps] == [1, 2]
        assert client.get_model_version("tiny-vae", "1").run_id == parent.info.run_id
        registered = mlflow.artifacts.download_artifacts(
            artifact_uri=client.get_model_version_download_uri("tiny-vae", "1"),
            dst_path=str(tmp_path / "registered"),
            tracking_uri=server.url,
        )

    export = tmp_path / "export"
    best = json.loads((export / "metrics.json").read_text())
    assert parent.data.tags["best_trial_id"] == best["trial_id"]
    assert parent.data.params["search.num_samples"] == "2"
    shown = json.dumps([[r.data.params, r.data.tags] for r in runs])
    assert "s3cret" not in shown

    exported, again = load_model(export), load_model(registered)
    assert torch.equal(sample_images(exported, 8, seed=3), sample_images(again, 8, seed=3))
    trials = sorted(
        p.name for p in (tmp_path / "runs" / "tracked-search" / "tensorboard").iterdir()
    )
    assert trials == sorted(f"trial_{c.data.tags['raytrain_vae.trial_id']}" for c in children)


def test_a_tracking_server_killed_mid_run_changes_nothing(tmp_path):
    with mlflow_server(tmp_path / "mlflow") as server:
        cmd = train_command(
            tmp_path, "killed", "train.epochs=3", "data.limit=3000",
            f"tracking.mlflow.uri={server.url}",
        )  # fmt: skip
        proc = subprocess.Popen(
            cmd, cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "epoch 1/3" in line:
                server.kill()
        assert proc.wait(timeout=300) == 0, "".join(lines)[-3000:]
    out = "".join(lines)
    assert "epoch 3/3" in out
    warnings = [line for line in lines if "warning: MLflow" in line]
    assert any("failed (" in line for line in warnings), out[-3000:]
    assert any("not sent after" in line and "metrics of epochs" in line for line in warnings)

    plain = train(tmp_path, "untracked", "train.epochs=3", "data.limit=3000")
    assert plain.returncode == 0, plain.stderr[-3000:]
    keys = ("epoch", "train_loss", "val_neg_elbo", "val_recon", "val_kl")
    tracked = [{k: m[k] for k in keys} for m in history(tmp_path, "killed")]
    untracked = [{k: m[k] for k in keys} for m in history(tmp_path, "untracked")]
    assert tracked == untracked
