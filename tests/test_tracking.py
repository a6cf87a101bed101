"""Tracking without Ray: the config keys, secrets kept out, the MLflow sink against a real
sqlite store and a dead port, TensorBoard events read back with TensorBoard's own reader."""

from __future__ import annotations

import pickle
import subprocess
import time
from pathlib import Path

import pandas as pd
import pyarrow.fs as pafs
import pytest
import torch
from conftest import S3Server, free_port, tiny_config
from mlflow import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import raytrain_vae
from raytrain_vae.config import ConfigError, load_config, shown_uri
from raytrain_vae.mlflow_runs import RunSpec
from raytrain_vae.mlflow_sink import MlflowSink
from raytrain_vae.models import build_model
from raytrain_vae.search_space import parse_space
from raytrain_vae.search_tracking import SearchTracker
from raytrain_vae.tensorboard_log import Board
from raytrain_vae.tracking import KeptValidation, check_tracking, flat_params, run_tags


def metrics_of(epoch: int) -> dict[str, float]:
    return {"epoch": epoch, "val_neg_elbo": 300.0 - epoch, "train_loss": 310.0 - epoch}


@pytest.mark.parametrize(
    ("value", "phrase"),
    [
        ("ftp://host/x", "scheme 'ftp'"),
        ("http://", "no host"),
        ("sqlite://", "needs a path"),
        ("'  '", "non-empty"),
    ],
)
def test_bad_tracking_uris_are_refused_with_the_key(value: str, phrase: str):
    with pytest.raises(ConfigError, match="tracking.mlflow.uri") as err:
        load_config(None, [f"tracking.mlflow.uri={value}"])
    assert phrase in str(err.value)


def test_register_as_needs_a_registry_and_a_plain_name():
    with pytest.raises(ConfigError, match="register_as needs a registry"):
        load_config(None, ["tracking.mlflow.register_as=vae"])
    with pytest.raises(ConfigError, match="a model name is"):
        load_config(None, ["tracking.mlflow.uri=sqlite:///x.db", "tracking.mlflow.register_as=a/b"])


def test_local_stores_are_made_absolute_on_the_driver(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sqlite = load_config(None, ["tracking.mlflow.uri=sqlite:///mlflow.db"]).tracking.mlflow.uri
    assert sqlite == f"sqlite:///{tmp_path}/mlflow.db"
    folder = load_config(None, ["tracking.mlflow.uri=mlruns"]).tracking.mlflow.uri
    assert folder == (tmp_path / "mlruns").as_uri()


def test_a_store_in_a_missing_folder_is_refused_before_ray(tmp_path):
    cfg = load_config(None, [f"tracking.mlflow.uri=sqlite:///{tmp_path}/nowhere/mlflow.db"])
    with pytest.raises(ConfigError, match="nowhere does not exist"):
        check_tracking(cfg)
    check_tracking(load_config(None, [f"tracking.mlflow.uri=sqlite:///{tmp_path}/m.db"]))


def test_credentials_in_the_uri_are_refused_and_never_shown():
    uri = "https://alice:s3cret@mlflow.example.com:8443/prefix?token=t0ken#frag"
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"tracking.mlflow.uri={uri}"])
    assert "MLFLOW_TRACKING_TOKEN" in str(err.value)
    for secret in ("alice", "s3cret", "t0ken"):
        assert secret not in str(err.value)
    assert shown_uri(uri) == "https://mlflow.example.com:8443/prefix"


def test_params_are_the_flattened_config_and_tags_hold_no_secret(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "t0ken")
    cfg = load_config(None, ["tracking.mlflow.uri=https://mlflow.example.com"])
    params = flat_params(cfg)
    assert params["train.lr"] == str(cfg.train.lr) and params["model.channels"] == "[32, 64]"
    assert params["tracking.mlflow.uri"] == "https://mlflow.example.com"
    assert "t0ken" not in " ".join([*params.values(), *run_tags("127.0.0.1:6379").values()])


def test_tags_name_the_version_the_commit_and_the_cluster():
    tags = run_tags("127.0.0.1:6379")
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True
    ).stdout.strip()
    assert tags["raytrain_vae.version"] == raytrain_vae.__version__
    assert tags["ray.address"] == "127.0.0.1:6379"
    assert tags.get("mlflow.source.git.commit") == (head or None)  # a checkout has one


def open_sink(uri: str, key: str = "runs/a", resume: bool = True, **spec) -> tuple:
    sink = MlflowSink(uri)
    run = sink.open_run(RunSpec(experiment="exp", key=key, name="a", resume=resume, **spec))
    return sink, run


def test_a_dead_server_never_holds_the_caller_up(capfd):
    sink, run = open_sink(f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    for epoch in range(1, 51):
        run.log_metrics(metrics_of(epoch), epoch)
    run.finish()
    assert time.monotonic() - started < 1.0  # queued, not sent: microseconds per call
    left = sink.close(timeout_s=2.0)
    assert left[0] == ("a", "start") and left[-1] == ("a", "status FINISHED")
    err = capfd.readouterr().err.splitlines()
    assert len([line for line in err if "failed (" in line]) == 1, err  # one warning, not 50
    assert any(
        "not sent after 2 s: a: start, metrics of epochs 1-50, status FINISHED (" in line
        for line in err
    ), err


def test_a_run_round_trips_and_resumes_by_key(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.yaml").write_text("x: 1\n")
    sink, run = open_sink(uri, params={"train.lr": "0.001"}, tags={"k": "v"})
    for epoch in (1, 2):
        run.log_metrics(metrics_of(epoch), epoch)
    run.log_artifacts(model_dir, "model")
    run.finish()
    assert sink.close(timeout_s=60) == []
    again_sink, again = open_sink(uri)  # resumed: the same run goes on
    again.log_metrics(metrics_of(3), 3)
    assert again_sink.close(60) == []
    fresh_sink, fresh = open_sink(uri, resume=False)  # a new run under the same key
    fresh.finish()
    assert fresh_sink.close(60) == []

    client = MlflowClient(uri)
    assert again.run_id == run.run_id != fresh.run_id
    got = client.get_run(run.run_id)
    assert got.data.params == {"train.lr": "0.001"} and got.data.tags["k"] == "v"
    history = client.get_metric_history(run.run_id, "val_neg_elbo")
    assert [(m.step, m.value) for m in history] == [(1, 299.0), (2, 298.0), (3, 297.0)]
    assert [a.path for a in client.list_artifacts(run.run_id, "model")] == ["model/config.yaml"]
    artifacts = Path(client.get_experiment(got.info.experiment_id).artifact_location[7:])
    assert artifacts == tmp_path / "mlartifacts"  # beside the store, not in a worker's cwd


def test_a_folder_store_works_too(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = load_config(None, ["tracking.mlflow.uri=mlruns"]).tracking.mlflow.uri
    sink, run = open_sink(uri, params={"train.lr": "0.001"})
    run.log_metrics(metrics_of(1), 1)
    run.finish()
    assert sink.close(timeout_s=60) == []
    got = MlflowClient(uri).get_run(run.run_id)
    assert got.info.status == "FINISHED" and got.data.metrics["val_neg_elbo"] == 299.0
    assert (tmp_path / "mlruns").is_dir()


def test_a_refused_call_is_dropped_and_the_rest_still_sent(tmp_path, capfd):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    sink, run = open_sink(uri)
    run.log_metrics({"x" * 300: 1.0}, 1)  # MLflow refuses keys over 250 characters
    run.log_metrics(metrics_of(2), 2)
    run.finish()
    assert sink.close(timeout_s=60) == []
    assert (
        "refused metrics of epoch 1 of run a: 'Metric name' exceeds"
        in capfd.readouterr().err.replace("\n", " ")
    )
    got = MlflowClient(uri).get_run(run.run_id)
    assert got.info.status == "FINISHED" and got.data.metrics["val_neg_elbo"] == 298.0


def read_events(folder: Path) -> EventAccumulator:
    (events,) = folder.glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events), size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


def test_tensorboard_events_read_back(tmp_path):
    cfg = tiny_config()
    model = build_model(cfg.model, (1, 28, 28))
    board = Board(str(tmp_path / "tb"))
    for epoch in (1, 2):
        board.epoch(metrics_of(epoch), model, torch.rand(8, 1, 28, 28))
    board.close()
    events = read_events(tmp_path / "tb")
    assert [(s.step, s.value) for s in events.Scalars("val_neg_elbo")] == [(1, 299.0), (2, 298.0)]
    assert "epoch" not in events.Tags()["scalars"]
    for tag in ("samples", "reconstructions"):
        images = events.Images(tag)
        assert [i.step for i in images] == [1, 2]
        assert images[0].encoded_image_string.startswith(b"\x89PNG")
    assert events.Tags()["graph"]
    assert model.training  # the pictures leave the model in the mode they found it


def test_tensorboard_events_reach_a_uri(s3_server: S3Server):
    model = build_model(tiny_config().model, (3, 32, 32))
    board = Board(s3_server.url("tb-run/tensorboard"))
    board.epoch(metrics_of(1), model, None)  # no images at hand: samples only
    board.close()
    found = s3_server.filesystem().get_file_info(
        pafs.FileSelector(f"{s3_server.bucket}/tb-run/tensorboard")
    )
    assert [Path(f.path).name.startswith("events.out.tfevents.") for f in found] == [True]


def test_a_stream_keeps_its_first_validation_images():
    class Stream:
        n_train = 10

        def val_batches(self, batch_size):
            yield from torch.arange(2 * 5 * 4).view(2, 5, 1, 2, 2).to(torch.uint8)

    kept = KeptValidation(Stream(), keep=3)
    assert len(list(kept.val_batches(5))) == 2 and kept.n_train == 10
    assert torch.equal(kept.kept, torch.arange(12).view(3, 1, 2, 2).to(torch.uint8))


class FakeTrial:
    """What the search tracker reads of a Tune trial."""

    def __init__(self, trial_id: str, lr: float, error: Exception | None = None) -> None:
        self.trial_id, self.config, self.error = trial_id, {"train.lr": lr}, error

    def get_error(self) -> Exception | None:
        return self.error


def test_a_search_tracker_nests_trials_and_keeps_its_place_when_resumed(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = load_config(
        None,
        [f"tracking.mlflow.uri={uri}", "train.epochs=3", "search.num_samples=3",
         "search.space={train.lr: {loguniform: [0.0001, 0.01]}}"],
    )  # fmt: skip
    tracker = SearchTracker(cfg, parse_space(cfg), str(tmp_path / "exp"), {"ray.address": "x"})
    tracker.setup()
    done, stopped = FakeTrial("a", 0.001), FakeTrial("b", 0.002)
    failed = FakeTrial("c", 0.003, RuntimeError("worker died\nTraceback ..."))
    for trial in (done, stopped, failed):
        tracker.on_trial_start(0, [], trial)
    for epoch in (1, 2, 3):
        tracker.on_trial_result(0, [], done, {"epoch": epoch, "val_neg_elbo": 300.0 - epoch})
    tracker.on_trial_result(0, [], stopped, {"epoch": 1, "val_neg_elbo": 400.0, "trial_id": "b"})
    tracker.on_trial_complete(0, [], stopped)
    tracker.on_trial_error(0, [], failed)
    # The interrupted search's process ends (here: its sender finishes) before the resume; two
    # senders writing one sqlite store at once would lock each other out.
    tracker._sink.close(60)

    # Tune pickles the callback with the experiment and restores its state on resume.
    resumed = pickle.loads(pickle.dumps(tracker))
    resumed.set_state(tracker.get_state())
    for epoch in (1, 2, 3):  # a restored trial reports its epochs again
        resumed.on_trial_result(0, [], done, {"epoch": epoch, "val_neg_elbo": 300.0 - epoch})
    resumed.on_trial_complete(0, [], done)
    export = tmp_path / "export"
    export.mkdir()
    (export / "config.yaml").write_text("x: 1\n")
    front = [tmp_path / "pareto.csv", tmp_path / "pareto.png"]
    for file in front:
        file.write_bytes(b"front")
    best = pd.Series({"trial_id": "a", "best_val_neg_elbo": 297.0})
    assert resumed.finish_search(best, export, front) is None  # no register_as

    client = MlflowClient(uri)
    runs = {r.info.run_name: r for r in client.search_runs(["1"])}
    assert set(runs) == {"vae", "trial_a", "trial_b", "trial_c"}
    parent = runs.pop("vae")
    assert parent.data.tags["best_trial_id"] == "a" and parent.info.status == "FINISHED"
    assert parent.data.metrics == {"best_val_neg_elbo": 297.0}
    assert parent.data.params["search.space.train.lr.loguniform"] == "[0.0001, 0.01]"
    listed = {a.path for a in client.list_artifacts(parent.info.run_id, "search")}
    assert listed == {"search/pareto.csv", "search/pareto.png"}
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in runs.values())
    assert runs["trial_a"].data.params == {"train.lr": "0.001"}
    history = client.get_metric_history(runs["trial_a"].info.run_id, "val_neg_elbo")
    assert [m.step for m in history] == [1, 2, 3]  # not six: the resumed reports were skipped
    assert runs["trial_a"].info.status == "FINISHED"
    assert runs["trial_b"].data.tags["stopped_early"] == "true"
    assert runs["trial_c"].info.status == "FAILED"
    assert runs["trial_c"].data.tags["failure_reason"] == "worker died"
