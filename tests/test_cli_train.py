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
    final = [line for line in proc.stdout.splitlines() if line.startswith("final checkpoint: ")]
    assert len(final) == 1, proc.stdout
    ckpt = Path(final[0].removeprefix("final checkpoint: "))
    assert ckpt.parent == tmp_path / "runs" / "cli"
    assert (ckpt / "model.safetensors").is_file()
    metrics = json.loads((ckpt / "metrics.json").read_text())
    assert metrics["epoch"] == 1 and metrics["val_neg_elbo"] > 0
