"""The search's summary functions without Ray: how many trials run at once, the per-trial table
built from (fake) Tune results, the best trial to export, the Pareto front, and the user error
dug out of a Train failure. Ray is imported (by raytrain_vae.tune) but never started."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import pytest
import ray

from raytrain_vae.config import Config, ConfigError, UserError, load_config, validate_config
from raytrain_vae.search_results import best_trial, pareto_front, trial_table
from raytrain_vae.search_space import Param, parse_space
from raytrain_vae.training import user_error_from
from raytrain_vae.trial import (
    TRIAL_DRIVER_CPUS,
    concurrent_trials,
    runs_in_trial_process,
    trial_resources,
)

NAN = float("nan")
INF = float("inf")


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    """Every test here runs without a Ray cluster: starting one fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("ray.init called in a Ray-free test")

    monkeypatch.setattr(ray, "init", refuse)
    assert not ray.is_initialized()
    yield
    assert not ray.is_initialized()


# --- concurrent_trials ----------------------------------------------------------------------


def scaling(*overrides: str) -> Config:
    return load_config(None, [f"scaling.{o}" for o in overrides])


def test_concurrent_trials_max_concurrent_trials_wins_over_the_cluster():
    cfg = load_config(None, ["search.max_concurrent_trials=5"])
    assert concurrent_trials(cfg, {"CPU": 1.0}) == 5
    assert concurrent_trials(cfg, {"CPU": 1000.0, "GPU": 64.0}) == 5


def test_concurrent_trials_counts_trials_the_cpus_hold():
    cfg = scaling("num_workers=2", "cpus_per_worker=1")
    assert pytest.approx(0.1) == TRIAL_DRIVER_CPUS
    # Each trial needs 2 x 1 CPU for its workers + 0.1 for its own driver: 8 // 2.1 = 3.
    assert concurrent_trials(cfg, {"CPU": 8.0}) == 3
    # A little over 3 x 2.1 CPUs holds 3 trials; a little under, only 2.
    assert concurrent_trials(cfg, {"CPU": 6.4}) == 3
    assert concurrent_trials(cfg, {"CPU": 6.2}) == 2
    # GPUs are ignored when the trial does not use them.
    assert concurrent_trials(cfg, {"CPU": 8.0, "GPU": 0.0}) == 3
    # Fractional CPUs per worker: 2 x 0.5 + 0.1 = 1.1 per trial; 8 // 1.1 = 7.
    assert concurrent_trials(scaling("num_workers=2", "cpus_per_worker=0.5"), {"CPU": 8.0}) == 7


def test_one_worker_trials_run_in_their_own_process_and_reserve_their_worker():
    one = scaling("num_workers=1", "cpus_per_worker=1")
    assert runs_in_trial_process(one)
    assert trial_resources(one) == {"CPU": 1.0}  # no 0.1 on top: there is no TorchTrainer
    assert concurrent_trials(one, {"CPU": 8.0}) == 8
    gpu = scaling("num_workers=1", "cpus_per_worker=2", "use_gpu=true", "gpus_per_worker=0.5")
    assert trial_resources(gpu) == {"CPU": 2.0, "GPU": 0.5}
    assert concurrent_trials(gpu, {"CPU": 16.0, "GPU": 3.0}) == 6
    # search.local_trials=false: a Ray Train run, its worker reserved apart from the trial.
    train = load_config(None, ["scaling.num_workers=1", "search.local_trials=false"])
    assert not runs_in_trial_process(train)
    assert trial_resources(train) == {"CPU": TRIAL_DRIVER_CPUS}
    assert concurrent_trials(train, {"CPU": 8.0}) == 7  # 8 // 1.1
    # Several workers are always a Ray Train run (DDP).
    two = scaling("num_workers=2", "cpus_per_worker=1")
    assert not runs_in_trial_process(two) and trial_resources(two) == {"CPU": TRIAL_DRIVER_CPUS}


def test_a_streamed_trial_keeps_a_cpu_free_for_reading(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")  # listed only by name here: nothing is decoded
    cfg = load_config(
        None,
        ["data.source=image_folder", f"data.path={tmp_path}", "data.ingest=stream",
         "scaling.num_workers=1", "scaling.cpus_per_worker=1"],
    )  # fmt: skip
    assert concurrent_trials(cfg, {"CPU": 8.0}) == 4  # (1 + 1) per trial


def test_concurrent_trials_is_gpu_bound_when_trials_use_gpus():
    cfg = scaling("num_workers=2", "cpus_per_worker=1", "use_gpu=true", "gpus_per_worker=1")
    # CPUs would hold 16 // 2.1 = 7 trials; 5 GPUs hold 5 // 2 = 2.
    assert concurrent_trials(cfg, {"CPU": 16.0, "GPU": 5.0}) == 2
    # With plenty of GPUs, the CPUs bound it again.
    assert concurrent_trials(cfg, {"CPU": 16.0, "GPU": 64.0}) == 7
    # Half a GPU per worker: a trial needs 1 GPU; 3 GPUs hold 3 trials.
    half = scaling("num_workers=2", "cpus_per_worker=1", "use_gpu=true", "gpus_per_worker=0.5")
    assert concurrent_trials(half, {"CPU": 16.0, "GPU": 3.0}) == 3


def test_concurrent_trials_is_never_below_one():
    cfg = scaling("num_workers=4", "cpus_per_worker=2")
    assert concurrent_trials(cfg, {"CPU": 2.0}) == 1  # 2 // 8.1 = 0
    assert concurrent_trials(cfg, {}) == 1  # no CPU key: counted as 1 CPU
    gpu = scaling("num_workers=2", "use_gpu=true")
    assert concurrent_trials(gpu, {"CPU": 64.0}) == 1  # no GPU at all
    assert concurrent_trials(gpu, {"CPU": 64.0, "GPU": 1.0}) == 1  # 1 // 2 = 0
    assert isinstance(concurrent_trials(cfg, {"CPU": 64.0}), int)


# --- trial_table ----------------------------------------------------------------------------


@dataclass
class FakeResult:
    """What trial_table reads of a ray.train.Result."""

    metrics_dataframe: pd.DataFrame | None
    config: dict[str, Any]
    path: str
    metrics: dict[str, Any] | None = field(default_factory=dict)
    error: BaseException | None = None


def history(
    neg_elbo: list[float], trial: str = "t", epoch_s: float = 2.0, start_s: float = 5.0
) -> pd.DataFrame:
    """Per-epoch rows as Tune records them: epoch 1.., metrics, timings, checkpoint path."""
    rows = []
    for i, value in enumerate(neg_elbo):
        epoch = i + 1
        rows.append(
            {
                "epoch": epoch,
                "val_neg_elbo": value,
                "val_recon": value - 10.0 if math.isfinite(value) else value,
                "val_kl": 10.0 + epoch,
                "epoch_s": epoch_s,
                "time_total_s": start_s + epoch * epoch_s,
                "checkpoint_path": f"/exp/{trial}/checkpoint_{epoch:06d}",
                "training_iteration": epoch,
            }
        )
    return pd.DataFrame(rows)


def search_config(*overrides: str, epochs: int = 3) -> Config:
    return validate_config(
        {
            "train": {"epochs": epochs},
            "search": {
                "space": {
                    "train.lr": {"loguniform": [1e-4, 1e-2]},
                    "model.channels": {"choice": [[16, 32], [32, 64, 64]]},
                    "model.latent_dim": {"qloguniform": [4, 64, 4]},
                },
                **{k: v for k, v in (o.split("=", 1) for o in overrides)},
            },
        },
        "test config",
    )


@pytest.fixture(scope="module")
def cfg() -> Config:
    return search_config()


@pytest.fixture(scope="module")
def params(cfg) -> list[Param]:
    return parse_space(cfg)


def sampled(lr: float, channels: list[int], latent: float = 16.0) -> dict[str, Any]:
    """A trial's config as Tune keeps it: Optuna's encoded values (lists as JSON labels,
    q-log-uniform values not yet rounded)."""
    return {"train.lr": lr, "model.channels": json.dumps(channels), "model.latent_dim": latent}


def test_params_encode_list_choices_as_json_labels(params):
    # The premise of the fake results below: a list choice is sampled as its JSON label.
    by_path = {p.path: p for p in params}
    channels = by_path["model.channels"]
    assert channels.kind == "choice"
    assert channels.decode("[16, 32]") == [16, 32]
    assert channels.decode("[32, 64, 64]") == [32, 64, 64]
    assert by_path["train.lr"].decode(3e-3) == 3e-3
    assert by_path["model.latent_dim"].decode(13.7) == 12


def test_trial_table_rows(cfg, params):
    results = [
        # Ran every epoch; the best epoch is 2, not the last.
        FakeResult(
            history([300.0, 250.0, 260.0], "a"),
            sampled(1e-3, [16, 32]),
            "/exp/trials/run_a",
            metrics={"trial_id": "a", "val_neg_elbo": 260.0},
        ),
        # Stopped by ASHA after one epoch; no trial_id reported: the folder name stands for it.
        FakeResult(
            history([400.0], "b"), sampled(2e-4, [32, 64, 64], 13.7), "/exp/trials/run_b", {}
        ),
    ]
    table = trial_table(cfg, params, results)
    assert list(table["trial_id"]) == ["a", "run_b"]
    assert list(table["status"]) == ["done", "stopped early"]
    assert list(table["epochs"]) == [3, 1]

    a, b = table.iloc[0], table.iloc[1]
    assert a["best_val_neg_elbo"] == 250.0
    assert a["best_epoch"] == 2
    assert a["best_checkpoint"] == "/exp/a/checkpoint_000002"
    assert b["best_val_neg_elbo"] == 400.0
    assert b["best_epoch"] == 1
    assert b["best_checkpoint"] == "/exp/b/checkpoint_000001"

    # Decoded params: numbers as numbers, lists as JSON text (CSV/Parquet-friendly).
    assert a["train.lr"] == 1e-3
    assert b["train.lr"] == 2e-4
    assert a["model.channels"] == "[16, 32]"
    assert json.loads(b["model.channels"]) == [32, 64, 64]
    assert b["model.latent_dim"] == 12  # 13.7 rounded to the q=4 grid, as the trial ran

    # The last epoch's metrics and the timings.
    assert (a["val_neg_elbo"], a["val_recon"], a["val_kl"]) == (260.0, 250.0, 13.0)
    assert a["train_seconds"] == 6.0  # 3 epochs x 2 s
    assert a["seconds"] == 11.0  # 5 s start-up + 3 x 2 s
    assert b["train_seconds"] == 2.0
    assert list(table["error"]) == ["", ""]


def test_trial_table_best_skips_nan_and_infinite_epochs(cfg, params):
    results = [
        FakeResult(history([NAN, 270.0, -INF], "n"), sampled(1e-3, [16, 32]), "/x/n"),
        FakeResult(history([NAN, NAN, NAN], "d"), sampled(1e-3, [16, 32]), "/x/diverged"),
    ]
    table = trial_table(cfg, params, results)
    finite = table.iloc[0]
    assert finite["best_val_neg_elbo"] == 270.0
    assert finite["best_epoch"] == 2
    assert finite["best_checkpoint"] == "/exp/n/checkpoint_000002"
    diverged = table.iloc[1]
    assert diverged["status"] == "done"
    assert diverged["epochs"] == 3
    assert pd.isna(diverged["best_val_neg_elbo"])
    assert pd.isna(diverged["best_epoch"])
    assert pd.isna(diverged["best_checkpoint"])
    assert math.isnan(diverged["val_neg_elbo"])


def test_trial_table_errors(cfg, params):
    long_last = "ValueError: " + "x" * 300
    error = RuntimeError(f"Traceback (most recent call last):\n  File 'w.py'\n{long_last}\n\n")
    results = [
        # Failed after two epochs: its best so far is still reported.
        FakeResult(
            history([300.0, 280.0], "e"), sampled(1e-3, [16, 32]), "/x/e", {"trial_id": "e"}, error
        ),
        # Failed before reporting anything.
        FakeResult(None, sampled(1e-4, [32, 64, 64]), "/x/f", None, ValueError("boom")),
        # An empty history, no error: ran no epoch.
        FakeResult(pd.DataFrame(), sampled(1e-4, [16, 32]), "/x/g"),
    ]
    table = trial_table(cfg, params, results)
    assert list(table["trial_id"]) == ["e", "f", "g"]
    assert list(table["status"]) == ["ERROR", "ERROR", "stopped early"]
    assert list(table["epochs"]) == [2, 0, 0]
    e, f, g = (table.iloc[i] for i in range(3))
    assert e["error"] == long_last[:200]
    assert len(e["error"]) == 200
    assert e["best_val_neg_elbo"] == 280.0
    assert e["best_epoch"] == 2
    assert f["error"] == "boom"
    assert pd.isna(f["best_val_neg_elbo"]) and pd.isna(f["seconds"])
    assert g["error"] == ""
    assert f["model.channels"] == "[32, 64, 64]"


def test_trial_table_error_after_every_epoch_is_still_an_error(cfg, params):
    results = [FakeResult(history([300.0, 290.0, 280.0]), sampled(1e-3, [16, 32]), "/x/h", {})]
    results[0].error = RuntimeError("teardown failed")
    table = trial_table(cfg, params, results)
    assert table.iloc[0]["status"] == "ERROR"
    assert table.iloc[0]["epochs"] == 3
    assert table.iloc[0]["error"] == "teardown failed"


def test_trial_table_mode_max_picks_the_largest(params):
    cfg = search_config("metric=val_kl", "mode=max")
    assert cfg.search.selection == ("val_kl", "max")
    hist = history([300.0, 250.0, 260.0], "m")
    hist["val_kl"] = [5.0, 9.0, INF]  # infinite: skipped even though it is the largest
    table = trial_table(cfg, params, [FakeResult(hist, sampled(1e-3, [16, 32]), "/x/m")])
    row = table.iloc[0]
    assert row["best_val_kl"] == 9.0
    assert row["best_epoch"] == 2
    assert row["best_checkpoint"] == "/exp/m/checkpoint_000002"
    assert "best_val_neg_elbo" not in table


# --- best_trial -----------------------------------------------------------------------------


def table_of(rows: list[tuple[str, float, str | None]], metric: str = "val_neg_elbo"):
    return pd.DataFrame(
        [{"trial_id": t, f"best_{metric}": v, "best_checkpoint": c} for t, v, c in rows]
    )


def test_best_trial_picks_the_lowest_finite_value_with_a_checkpoint(cfg):
    table = table_of(
        [
            ("a", 250.0, "/ck/a"),
            ("b", 200.0, None),  # best value, but no checkpoint to export
            ("c", NAN, "/ck/c"),  # never finite
            ("d", 220.0, "/ck/d"),
            ("e", 240.0, "/ck/e"),
        ]
    )
    best = best_trial(cfg, table)
    assert best["trial_id"] == "d"
    assert best["best_val_neg_elbo"] == 220.0
    assert best["best_checkpoint"] == "/ck/d"


def test_best_trial_from_a_trial_table(cfg, params):
    results = [
        FakeResult(history([300.0, 260.0, 270.0], "a"), sampled(1e-3, [16, 32]), "/x/a"),
        FakeResult(history([NAN, NAN], "b"), sampled(1e-3, [16, 32]), "/x/b"),
        FakeResult(history([280.0, 240.0], "c"), sampled(1e-4, [16, 32]), "/x/c"),
        FakeResult(None, sampled(1e-4, [16, 32]), "/x/d", error=RuntimeError("x")),
    ]
    best = best_trial(cfg, trial_table(cfg, params, results))
    assert best["trial_id"] == "c"
    assert best["best_epoch"] == 2
    assert best["best_checkpoint"] == "/exp/c/checkpoint_000002"


def test_best_trial_raises_when_no_trial_can_be_exported(cfg):
    with pytest.raises(ConfigError, match="no trial reported a finite val_neg_elbo"):
        best_trial(cfg, table_of([("a", NAN, "/ck/a"), ("b", 200.0, None)]))
    with pytest.raises(ConfigError, match="nothing to export"):
        best_trial(cfg, table_of([("a", NAN, None)]))


@pytest.mark.parametrize("how", ["failed before epoch 1", "every epoch NaN"])
def test_best_trial_raises_config_error_when_the_table_has_no_best_columns(cfg, params, how):
    if how == "failed before epoch 1":
        result = FakeResult(None, sampled(1e-3, [16, 32]), "/x/f", error=RuntimeError("boom"))
    else:
        result = FakeResult(history([NAN, NAN, NAN]), sampled(1e-3, [16, 32]), "/x/nan")
    table = trial_table(cfg, params, [result])
    assert "best_val_neg_elbo" not in table and "best_checkpoint" not in table
    with pytest.raises(ConfigError, match="nothing to export"):
        best_trial(cfg, table)


def test_best_trial_respects_mode_max():
    cfg = search_config("metric=val_kl", "mode=max")
    table = table_of(
        [("a", 5.0, "/ck/a"), ("b", 9.0, "/ck/b"), ("c", 12.0, None), ("d", 7.0, "/ck/d")],
        metric="val_kl",
    )
    assert best_trial(cfg, table)["trial_id"] == "b"
    # The same table under mode min picks the other end.
    assert best_trial(search_config("metric=val_kl", "mode=min"), table)["trial_id"] == "a"


def test_best_trial_multi_objective_selects_by_neg_elbo():
    cfg = load_config(
        None,
        [
            "search.metric=[val_recon, val_kl]",
            "search.mode=[min, max]",
            "search.scheduler.type=none",
        ],
    )
    assert cfg.search.multi_objective
    assert cfg.search.selection == ("val_neg_elbo", "min")
    table = table_of([("a", 250.0, "/ck/a"), ("b", 230.0, "/ck/b")])
    assert best_trial(cfg, table)["trial_id"] == "b"


# --- pareto_front ---------------------------------------------------------------------------


def points(rows: dict[str, tuple[float, float]]) -> pd.DataFrame:
    return pd.DataFrame(
        [{"trial_id": t, "val_recon": r, "val_kl": k} for t, (r, k) in rows.items()]
    )


def front_ids(front: pd.DataFrame) -> set[str]:
    return set(front["trial_id"])


def test_pareto_front_min_min_with_ties_and_nan():
    table = points(
        {
            "p1": (1.0, 5.0),
            "p2": (2.0, 3.0),
            "p3": (3.0, 3.0),  # dominated by p2 (worse recon, same KL)
            "p4": (4.0, 1.0),
            "p5": (2.0, 3.0),  # ties p2 exactly: neither dominates the other
            "p6": (5.0, 5.0),  # dominated by everything but itself
            "p7": (1.0, 6.0),  # dominated by p1 (same recon, worse KL)
            "p8": (NAN, 0.0),  # no value: dropped, not on the front
        }
    )
    front = pareto_front(table, ["val_recon", "val_kl"], ["min", "min"])
    assert front_ids(front) == {"p1", "p2", "p5", "p4"}
    assert list(front["val_recon"]) == sorted(front["val_recon"])
    # Rows come back whole, under their original index.
    assert set(front.index) == {0, 1, 3, 4}
    assert list(front.columns) == ["trial_id", "val_recon", "val_kl"]


def test_pareto_front_mixed_min_max():
    table = points(
        {
            "e": (0.5, 0.5),
            "a": (1.0, 1.0),
            "b": (2.0, 3.0),
            "c": (2.0, 2.0),  # dominated by b: same recon, less KL
            "d": (3.0, 3.0),  # dominated by b: worse recon, same KL
            "f": (3.0, 4.0),
        }
    )
    front = pareto_front(table, ["val_recon", "val_kl"], ["min", "max"])
    assert front_ids(front) == {"e", "a", "b", "f"}
    assert list(front["trial_id"]) == ["e", "a", "b", "f"]
    # Minimising both, e beats every other point.
    assert front_ids(pareto_front(table, ["val_recon", "val_kl"], ["min", "min"])) == {"e"}
    # Maximising both, f (largest recon and KL) does.
    assert front_ids(pareto_front(table, ["val_recon", "val_kl"], ["max", "max"])) == {"f"}


def test_pareto_front_of_identical_points_keeps_them_all():
    table = points({"a": (1.0, 2.0), "b": (1.0, 2.0), "c": (1.0, 2.0)})
    front = pareto_front(table, ["val_recon", "val_kl"], ["min", "min"])
    assert front_ids(front) == {"a", "b", "c"}


# --- user_error_from ------------------------------------------------------------------------


class FakeTrainingFailed(Exception):
    """Stands for ray.train.TrainingFailedError: worker_failures maps rank -> exception."""

    def __init__(self, worker_failures):
        super().__init__("training failed")
        self.worker_failures = worker_failures


class WrappedTaskError(Exception):
    """Stands for Ray's RayTaskError, which keeps the task's exception as .cause."""

    def __init__(self, cause):
        super().__init__(f"task failed: {cause}")
        self.cause = cause


def chained(cause: BaseException) -> Exception:
    try:
        raise RuntimeError("worker crashed") from cause
    except RuntimeError as exc:
        return exc


def test_user_error_from_a_direct_failure():
    wanted = ConfigError("bad config")
    exc = FakeTrainingFailed({0: RuntimeError("other"), 1: wanted})
    assert user_error_from(exc) is wanted


def test_user_error_from_a_cause_attribute():
    wanted = UserError("bad data")
    exc = FakeTrainingFailed({0: ValueError("x"), 1: WrappedTaskError(wanted)})
    assert user_error_from(exc) is wanted


def test_user_error_from_a_chained_cause():
    wanted = ConfigError("bad override")
    exc = FakeTrainingFailed({3: chained(wanted)})
    assert user_error_from(exc) is wanted


def test_user_error_from_returns_the_first_rank_in_order():
    first, second = UserError("first"), UserError("second")
    exc = FakeTrainingFailed({2: WrappedTaskError(first), 0: second})
    assert user_error_from(exc) is first


def test_user_error_from_none_when_there_is_none():
    assert user_error_from(FakeTrainingFailed({})) is None
    assert user_error_from(FakeTrainingFailed(None)) is None
    assert user_error_from(Exception("no worker_failures attribute")) is None
    not_user = FakeTrainingFailed(
        {0: RuntimeError("a"), 1: WrappedTaskError(ValueError("b")), 2: chained(OSError("c"))}
    )
    assert user_error_from(not_user) is None


def test_config_error_is_a_user_error():
    # The premise that makes ConfigError count in the tests above.
    assert issubclass(ConfigError, UserError)


@dataclass
class LiveTrial:
    """What the live table reads of a Tune Trial."""

    trial_id: str
    status: str
    config: dict
    last_result: dict = field(default_factory=dict)


def test_live_table_shows_metric_epoch_and_params_best_first_and_nothing_else(capsys):
    from raytrain_vae.live_view import TrialTable
    from raytrain_vae.tune import live_view

    cfg = load_config("quickstart")
    table = live_view(cfg, parse_space(cfg))
    assert isinstance(table, TrialTable)
    config = {"model.latent_dim": 16, "model.channels": "[16, 32]"}
    config |= {"train.beta": 1.2241566, "train.lr": 0.0010951}
    trials = [
        LiveTrial(
            "aaaa0001", "TERMINATED", config, {"epoch": 3, "val_neg_elbo": 287.8203, "pid": 7}
        ),
        LiveTrial("aaaa0002", "RUNNING", config, {"epoch": 1, "val_neg_elbo": 268.3541}),
        LiveTrial("aaaa0003", "PENDING", config),
    ]
    assert table.should_report(trials)
    table.report(trials, done=False)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "== trials: 3 of 4 (1 PENDING, 1 RUNNING, 1 TERMINATED) =="
    assert lines[1].split() == [
        "trial", "status", "epoch", "val_neg_elbo",
        "model.latent_dim", "model.channels", "train.beta", "train.lr",
    ]  # fmt: skip
    assert lines[2].split() == [
        "aaaa0002",
        "RUNNING",
        "1",
        "268.354",
        "16",
        "[16,",
        "32]",
        "1.224",
        "0.001095",
    ]
    assert lines[3].split()[:4] == ["aaaa0001", "TERMINATED", "3", "287.820"]
    assert lines[4].split()[:4] == ["aaaa0003", "PENDING", "-", "-"]  # no result yet: last
    assert "pid" not in "\n".join(lines) and "127.0.0.1" not in "\n".join(lines)

    # Not again within the interval; at the end only when the table changed.
    assert not table.should_report(trials)
    assert table.should_report(trials, done=True)
    table.report(trials, done=True)
    assert capsys.readouterr().out == ""
    trials[2].status = "TERMINATED"
    table.report(trials, done=True)
    assert "2 TERMINATED" in capsys.readouterr().out


def test_live_table_of_a_multi_objective_search_shows_both_metrics_and_ranks_by_the_elbo():
    from raytrain_vae.tune import live_view

    cfg = load_config(
        "quickstart",
        [
            "search.metric=[val_recon, val_kl]",
            "search.mode=[min, min]",
            "search.scheduler.type=none",
        ],
    )
    first = {"epoch": 2, "val_recon": 250.0, "val_kl": 12.5, "val_neg_elbo": 262.5}
    second = {"epoch": 2, "val_recon": 240.0, "val_kl": 20.0, "val_neg_elbo": 260.0}
    trials = [LiveTrial("b1", "RUNNING", {}, first), LiveTrial("b2", "RUNNING", {}, second)]
    lines = live_view(cfg, []).text(trials).splitlines()
    assert lines[1].split() == ["trial", "status", "epoch", "val_recon", "val_kl", "val_neg_elbo"]
    assert [line.split()[0] for line in lines[2:]] == ["b2", "b1"]


def test_live_table_shows_the_best_20_a_nan_and_integer_parameters_as_given():
    from raytrain_vae.live_view import TrialTable

    table = TrialTable(["val_neg_elbo"], ["model.latent_dim"], ("val_neg_elbo", "min"), total=30)
    trials = [
        LiveTrial(f"t{i:02d}", "TERMINATED", {"model.latent_dim": 100000 + i},
                  {"epoch": 3, "val_neg_elbo": 300.0 - i})
        for i in range(24)
    ]  # fmt: skip
    trials.append(
        LiveTrial("diverged", "ERROR", {"model.latent_dim": 8}, {"epoch": 1, "val_neg_elbo": NAN})
    )
    trials.append(LiveTrial("nokey", "PENDING", {}))
    lines = table.text(trials).splitlines()
    assert len(lines) == 1 + 1 + 20 + 1 and lines[-1] == "... and 6 more trials"
    assert lines[2].split() == ["t23", "TERMINATED", "3", "277.000", "100023"]  # an int stays one
    shown = table.frame(trials)
    assert shown.iloc[-2:]["trial"].tolist() == ["diverged", "nokey"]  # NaN and no result last
    assert shown.iloc[-2]["val_neg_elbo"] == "nan" and shown.iloc[-1]["model.latent_dim"] == "-"
