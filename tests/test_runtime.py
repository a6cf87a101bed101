"""Requests the cluster cannot hold fail (or wait, bounded) instead of hanging, and errors raised
inside Ray tasks reach the CLI as one line. One real local Ray for the module."""

from __future__ import annotations

import inspect
import logging
import time

import pytest
import ray

import raytrain_vae.runtime as runtime
from raytrain_vae.batch_actors import job_context
from raytrain_vae.cli import run_cli
from raytrain_vae.config import UserError
from raytrain_vae.generate import JobOptions
from raytrain_vae.runtime import (
    AUTH_NOTICE_MODULE,
    AUTH_ON_NOTICE,
    ResourceError,
    autoscaler_limits,
    require_resources,
)

pytestmark = pytest.mark.slow


def test_the_private_ray_reads_still_exist():
    # autoscaler_limits falls back to a bounded wait when these go; this says so loudly.
    from ray._private.state import state
    from ray.experimental.internal_kv import _internal_kv_get

    assert callable(state.get_max_resources_from_cluster_config)
    assert callable(_internal_kv_get)


def test_the_auth_notice_still_comes_from_the_logger_we_filter():
    # init_ray filters this logger; if Ray moves the notice, the test of a healthy search fails
    # on the warning, and this says where to look.
    from ray._private.authentication import authentication_token_setup as setup

    assert setup.logger.name == AUTH_NOTICE_MODULE
    assert AUTH_ON_NOTICE in inspect.getsource(setup)


def test_only_the_notice_that_auth_is_on_is_skipped():
    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord(AUTH_NOTICE_MODULE, logging.WARNING, "f.py", 1, message, (), None)

    assert not runtime.skip_auth_on_notice(record(f"{AUTH_ON_NOTICE}. Set RAY_AUTH_MODE=..."))
    assert runtime.skip_auth_on_notice(record("Token authentication is disabled for this ..."))


def test_a_cluster_without_an_autoscaler_is_recognised(ray_local, monkeypatch):
    deadline = time.monotonic() + 30  # the monitor reports a few seconds after start
    while autoscaler_limits() is None and time.monotonic() < deadline:
        time.sleep(1)
    assert autoscaler_limits() == {}
    # Joined as a client of that cluster (RAY_ADDRESS set): still refused at once.
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    start = time.monotonic()
    with pytest.raises(ResourceError, match="a cluster without an autoscaler"):
        require_resources([{"CPU": 1}] * 3, "3 workers", "lower it", wait_s=600)
    assert time.monotonic() - start < 5


def test_what_fits_returns_at_once(ray_local):
    require_resources([{"CPU": 1}, {"CPU": 0.5}], "two workers", "lower it", wait_s=600)


def test_embedded_ray_refuses_gpus_it_lacks(ray_local, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ResourceError) as info:
        require_resources([{"CPU": 0.5, "GPU": 1}], "1 actor(s)", "lower --num-gpus", 600)
    assert str(info.value) == (
        "1 actor(s) needs 1 GPU, but the cluster has 2 CPU, 0 GPU (this machine's Ray); "
        "lower --num-gpus"
    )


def test_an_autoscaler_that_may_grow_is_waited_for_then_named(ray_local, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    monkeypatch.setattr(runtime, "autoscaler_limits", lambda: None)  # cannot tell: wait
    monkeypatch.setattr(runtime, "POLL_S", 0.2)
    start = time.monotonic()
    with pytest.raises(ResourceError, match="waited 1 s for the autoscaler to add 8 CPU"):
        require_resources([{"CPU": 2}] * 4, "4 workers", "lower it", wait_s=1)
    assert 1 <= time.monotonic() - start < 10


def test_an_autoscaler_too_small_for_the_request_is_refused_at_once(ray_local, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    monkeypatch.setattr(runtime, "autoscaler_limits", lambda: {"CPU": 6.0})
    with pytest.raises(ResourceError, match="its autoscaler can add at most 6 CPU"):
        require_resources([{"CPU": 2}] * 4, "4 workers", "lower it", wait_s=600)


def test_a_user_error_inside_a_ray_task_is_one_line(ray_local, capsys):
    # Defined here, so that Ray ships the function by value (tests/ is not on workers' path).
    @ray.remote
    def refuse() -> None:
        raise UserError("row 3 of /data/in.parquet: not an image")

    assert run_cli(lambda: ray.get(refuse.remote())) == 2
    err = capsys.readouterr().err
    assert err.endswith("error: row 3 of /data/in.parquet: not an image\n"), err
    assert "Traceback" not in err


def test_a_user_error_inside_ray_data_is_one_line(ray_local, capsys):
    def refuse(batch):
        raise UserError("batch of ids: bad pixels")

    def job() -> int:
        options = JobOptions()
        with job_context(options.concurrency, options.resource_wait_s):  # every generate job
            ray.data.range(4).map_batches(refuse, num_cpus=0.5).take_all()
        return 0

    assert run_cli(job) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "error: batch of ids: bad pixels", err[-2000:]
    assert "Traceback" not in err
