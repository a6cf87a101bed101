"""The real training CLI as a user runs it: a subprocess that starts its own embedded Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_train_cli_runs_and_prints_final_checkpoint(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [
        sys.executable,
        "-m",
        "raytrain_vae.train",
        "configs/vae.yaml",
        f"data.root={tmp_path / 'data'}",
        "data.limit=400",
        "model.channels=[8,16]",
        "model.hidden_dim=32",
        "train.epochs=1",
        "train.batch_size=64",
        "scaling.num_workers=2",
        "run.name=cli",
        f"run.storage_path={tmp_path / 'runs'}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "epoch 1/1" in out and "val_neg_elbo" in out
    if os.uname().machine.lower() in ("x86_64", "amd64"):  # two CPU workers on one host
        assert "gradients: all-reduced through shared memory" in out
    final = [line for line in proc.stdout.splitlines() if line.startswith("final checkpoint: ")]
    assert len(final) == 1, proc.stdout
    ckpt = Path(final[0].removeprefix("final checkpoint: "))
    assert ckpt.parent == tmp_path / "runs" / "cli"
    assert (ckpt / "model.safetensors").is_file()
    metrics = json.loads((ckpt / "metrics.json").read_text())
    assert metrics["epoch"] == 1 and metrics["val_neg_elbo"] > 0


def run_train(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [
        sys.executable, "-m", "raytrain_vae.train", "configs/vae.yaml",
        f"data.root={tmp_path / 'data'}", "data.limit=400", "model.hidden_dim=32",
        "train.batch_size=64", "scaling.num_workers=1", "run.name=resumed",
        f"run.storage_path={tmp_path / 'runs'}", *overrides,
    ]  # fmt: skip
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess, *phrases: str) -> None:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]


@pytest.mark.slow
def test_resuming_with_another_architecture_or_tampered_weights_is_refused(tmp_path):
    first = run_train(tmp_path, "model.channels=[8,16]", "train.epochs=1", "--json")
    assert first.returncode == 0, first.stderr[-3000:]
    printed = json.loads(first.stdout)  # --json: stdout holds the JSON only
    assert printed["metrics"]["epoch"] == 1 and printed["metrics"]["val_neg_elbo"] > 0
    assert Path(printed["checkpoint"]).parent == tmp_path / "runs" / "resumed"
    assert "final checkpoint: " in first.stderr

    # Same run.name, a different model: its checkpoint cannot be resumed into this one.
    other = run_train(tmp_path, "model.channels=[4,8]", "train.epochs=2")
    assert_one_line_error(other, "run.name='resumed'", "another model")

    # The checkpoint's weights edited after they were written (header still valid).
    checkpoints = sorted(p for p in (tmp_path / "runs" / "resumed").glob("checkpoint_*/"))
    weights = checkpoints[-1] / "model.safetensors"
    data = bytearray(weights.read_bytes())
    header_len = 8 + int.from_bytes(data[:8], "little")
    data[header_len + 40] ^= 0xFF
    weights.write_bytes(bytes(data))
    tampered = run_train(tmp_path, "model.channels=[8,16]", "train.epochs=2")
    assert_one_line_error(tampered, "checksum")


@pytest.mark.slow
def test_more_cpus_than_the_local_ray_has_is_refused_not_waited_for(tmp_path):
    proc = run_train(tmp_path, "scaling.cpus_per_worker=1000", "train.epochs=1")
    assert_one_line_error(
        proc, "scaling: 1 worker(s) x 1000 CPU", "needs 1000 CPU", "lower scaling.num_workers"
    )
    assert not list((tmp_path / "runs").glob("resumed/checkpoint_*"))
