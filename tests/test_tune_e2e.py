"""The search as users run it: a killed driver resumed with --resume, and `ray job submit`."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import psutil
import pytest
import yaml

from raytrain_vae.data.idx import SYSTEM_DIRS
from raytrain_vae.export import load_model

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def write_search_config(
    tmp_path: Path, name: str, num_samples: int, epochs: int = 2, limit: int = 300, workers: int = 1
) -> Path:
    assert Path(SYSTEM_DIRS["fashion_mnist"][0]).is_dir(), "needs dataset-fashion-mnist"
    cfg = {
        "data": {"root": str(tmp_path / "data"), "download": False, "limit": limit},
        "model": {"channels": [4, 8], "hidden_dim": 16, "latent_dim": 2},
        "train": {"epochs": epochs, "batch_size": 32},
        "scaling": {"num_workers": workers, "cpus_per_worker": 1 if workers == 1 else 0.9},
        "run": {"name": name, "storage_path": str(tmp_path / "runs")},
        "search": {
            "num_samples": num_samples,
            "max_concurrent_trials": 1,
            "scheduler": {"type": "none"},
            "space": {"train.lr": {"loguniform": [3.0e-4, 3.0e-3]}},
        },
        "export": {"dir": str(tmp_path / "export"), "num_samples": 4, "num_reconstructions": 4},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def kill_group(proc: subprocess.Popen, grace: float = 15) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def test_killed_search_resumes_and_exports_best_over_all_trials(tmp_path):
    # Trials of a few seconds each (one-worker trials start in well under a second): the
    # driver is killed while the second runs, long before the third.
    config = write_search_config(tmp_path, "resume", num_samples=3, epochs=4, limit=4000)
    cmd = [sys.executable, "-m", "raytrain_vae.tune", str(config)]
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen(
        cmd, cwd=REPO, env=clean_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    experiment = tmp_path / "runs" / "resume"
    try:
        deadline = time.monotonic() + 240
        # The second trial starts only after the first finished (1 at a time).
        while len(list(experiment.glob("trial_*"))) < 2 and time.monotonic() < deadline:
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.1)
        assert len(list(experiment.glob("trial_*"))) >= 2, "search never reached its 2nd trial"
    finally:
        kill_group(first)  # SIGKILL-equivalent for the driver and its embedded Ray
    assert not (tmp_path / "export").exists()

    again = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True)
    assert again.returncode == 2 and "--resume" in again.stderr

    resumed = subprocess.run(
        [*cmd, "--resume", "--json"],
        cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    table = pd.read_csv(tmp_path / "runs" / "resume" / "summary.csv")
    assert len(table) == 3 and set(table["status"]) == {"done"}, table
    assert (table["epochs"] == 4).all()
    best = table.loc[table["best_val_neg_elbo"].idxmin()]
    assert f"best trial {best['trial_id']}" in resumed.stderr  # --json: people's lines on stderr
    summary = json.loads(resumed.stdout)  # and nothing but the JSON on stdout, Ray's lines neither
    assert summary["best_trial"] == best["trial_id"] and summary["metric"] == "val_neg_elbo"
    assert summary["best_val_neg_elbo"] == pytest.approx(best["best_val_neg_elbo"])
    assert [t["trial_id"] for t in summary["trials"]] == list(table["trial_id"])
    assert summary["export"] == str(tmp_path / "export")
    load_model(tmp_path / "export")


# What Ray prints at error level: its Python loggers ("ERROR", "CRITICAL"), its C++ core
# ("[2026-11-30 13:04:24,564 E 13971 14035] core_worker.cc"), and uncaught tracebacks.
# Error and warning levels as Ray's Python loggers, its C++ core and Python warnings print them.
ALARM_LINE = re.compile(
    r"\b(ERROR|CRITICAL|WARNING)\b|\[[0-9-]+ [0-9:,]+ [WEF] \d+ \d+\]|^Traceback|Traceback \("
    r"|\w+Warning: "
)


# One-worker trials run in the trial's process; 2-worker trials are Ray Train runs (DDP), whose
# controller's actors print notices of their own.
@pytest.mark.parametrize("workers", [1, 2])
def test_a_healthy_search_prints_no_error_or_warning_line_and_ends_with_its_summary(
    tmp_path, workers
):
    trials = 2 if workers == 1 else 1
    config = write_search_config(tmp_path, "healthy", num_samples=trials, workers=workers)
    proc = subprocess.run(
        [sys.executable, "-m", "raytrain_vae.tune", str(config)],
        cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    alarms = [line for line in (proc.stdout + proc.stderr).splitlines() if ALARM_LINE.search(line)]
    # The whole output too: an alarm line alone (a bare "Traceback") does not say what failed.
    assert not alarms, (
        "\n".join(alarms[:20]) + "\n--- output:\n" + (proc.stdout + proc.stderr)[-6000:]
    )
    epoch_lines = [line for line in proc.stdout.splitlines() if "epoch 1/2" in line]
    assert len(epoch_lines) == trials, proc.stdout[-3000:]
    assert all(re.search(r"trial \w{8}: epoch", x) for x in epoch_lines)
    # Lines a Ray process forwards ("(run_trial pid=...) ...") reach the driver's stdout on their
    # own schedule; the driver's own lines must end with the export.
    own = [x for x in proc.stdout.strip().splitlines() if not re.match(r"(\x1b\[\d+m)?\(", x)]
    assert own[-1].startswith("best trial ") and "exported to" in own[-1], proc.stdout[-2000:]
    # The live table (raytrain_vae.live_view) is the one Tune printed, at least at the end.
    assert f"== trials: {trials} of {trials} ({trials} TERMINATED) ==" in proc.stdout
    assert "loc" not in proc.stdout.split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_job_agent(head: Head, deadline: float) -> None:
    """The dashboard answers seconds before its job agent registers: until then a submission
    fails with "No available agent to submit job". Submit a no-op job until one is taken."""
    while True:
        proc = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", head.url, "--no-wait", "--", "true"],
            env=head.env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if proc.returncode == 0:
            return
        assert "No available agent" in proc.stderr + proc.stdout, proc.stderr[-2000:]
        assert time.monotonic() < deadline, "the head's job agent never registered"
        time.sleep(1)


@dataclass
class Head:
    """A running `ray start --head`: its dashboard's URL, its token, and the environment a
    client needs to reach it (RAY_AUTH_MODE=token and the token's file)."""

    url: str
    token: str
    env: dict[str, str]


def processes_of(temp_dir: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if any(temp_dir in part for part in process.info["cmdline"] or []):
            found.append(process)
    return found


@pytest.fixture(scope="module")
def ray_head():
    """One head for the module's job tests (each start costs seconds); every job they submit has
    ended before the test returns."""
    # Ray's socket paths must stay short: a pytest tmp path is too long for them.
    temp_dir = tempfile.mkdtemp(prefix="rtv-", dir="/tmp")
    port, dashboard = free_port(), free_port()
    # Started as the README says (a token, and RAY_AUTH_MODE=token: Ray 2.60's `ray start`
    # otherwise runs without authentication), with a token of its own rather than the user's
    # ~/.ray/auth_token, which would turn authentication on for every later `ray start` here.
    token_file = Path(temp_dir) / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    env = clean_env() | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}
    head = subprocess.Popen(
        [
            str(BIN / "ray"), "start", "--head", "--block",
            "--node-ip-address=127.0.0.1", f"--port={port}",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
            "--num-cpus=2", f"--temp-dir={temp_dir}",
        ],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{url}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # 401 without the token: the server is up
                break
            except OSError:
                assert head.poll() is None, "ray start --head exited"
                time.sleep(1)
        head_info = Head(url, token_file.read_text(), env)
        wait_for_job_agent(head_info, deadline)
        yield head_info
    finally:
        # `ray start --block` takes 15 s or more to obey SIGTERM, so it gets 3 s, then SIGKILL
        # for its group. Processes that left the group (Ray's workers, job drivers) must be gone
        # soon after: none may outlive the test.
        kill_group(head, grace=3)
        deadline = time.monotonic() + 15
        while processes_of(temp_dir) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = processes_of(temp_dir)
        for process in left:
            process.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, [" ".join(p.cmdline()[:2]) for p in left if p.is_running()]


def test_ray_job_submit_runs_the_search_on_a_running_head(ray_head, tmp_path):
    config = write_search_config(tmp_path, "job", num_samples=2)
    submit = subprocess.run(
        [
            str(BIN / "ray"), "job", "submit", "--address", ray_head.url,
            "--working-dir", str(REPO),
            "--", "python", "-m", "raytrain_vae.tune", str(config),
        ],
        cwd=REPO, env=ray_head.env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    out = submit.stdout + submit.stderr
    assert submit.returncode == 0, out[-4000:]
    assert "succeeded" in out
    table = pd.read_csv(tmp_path / "runs" / "job" / "summary.csv")
    assert len(table) == 2
    model = load_model(tmp_path / "export")
    assert model.sample(3).shape == (3, 1, 28, 28)


def test_head_dashboard_needs_the_token_and_listens_on_loopback_only(ray_head):
    # Token auth is on: the jobs API refuses a request without the token and takes one with it.
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{ray_head.url}/api/jobs/", timeout=10)
    assert refused.value.code in (401, 403)
    request = urllib.request.Request(
        f"{ray_head.url}/api/jobs/", headers={"Authorization": f"Bearer {ray_head.token}"}
    )
    with urllib.request.urlopen(request, timeout=10) as reply:
        assert reply.status == 200
    port = int(ray_head.url.rsplit(":", 1)[1])
    listening = {
        c.laddr.ip
        for c in psutil.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    }
    assert listening == {"127.0.0.1"}, listening


def test_job_asking_for_more_workers_than_a_fixed_cluster_holds_fails_fast(ray_head, tmp_path):
    # A plain `ray start --head` has no autoscaler: nothing will ever add the missing CPUs.
    config = write_search_config(tmp_path, "toolarge", num_samples=1)
    start = time.monotonic()
    submit = subprocess.run(
        [
            str(BIN / "ray"), "job", "submit", "--address", ray_head.url,
            "--working-dir", str(REPO),
            "--", "python", "-m", "raytrain_vae.train", str(config), "scaling.num_workers=4",
        ],
        cwd=REPO, env=ray_head.env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    out = submit.stdout + submit.stderr
    assert submit.returncode != 0, out[-3000:]
    # `ray job submit` shows the job's log as it runs and again when the job fails.
    errors = {line for line in out.splitlines() if line.startswith("error: ")}
    assert errors == {
        "error: scaling: 4 worker(s) x 1 CPU needs 4 CPU, but the cluster has 2 CPU "
        "(a cluster without an autoscaler); lower scaling.num_workers, scaling.cpus_per_worker"
    }, out[-3000:]
    assert "Traceback" not in out
    assert time.monotonic() - start < 120
    assert not (tmp_path / "runs" / "toolarge").exists()
