"""The findings that lost data or hung, reproduced as the tester ran them: the real CLIs as
subprocesses, with their own embedded Ray where they get that far."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from raytrain_vae.data.idx import SYSTEM_DIRS
from raytrain_vae.outputs import MARKER

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def tree(root: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(root)): None if p.is_dir() else p.read_bytes()
        for p in sorted(root.rglob("*"))
    }


def run(
    args: list[str], cwd: Path, timeout: float = 240
) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    return proc, time.monotonic() - start


def assert_one_line_exit_2(proc: subprocess.CompletedProcess, *phrases: str) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert len(errors[0]) <= 300
    for phrase in phrases:
        assert phrase in errors[0], errors[0]
    return errors[0]


def search_config(folder: Path, **space) -> Path:
    """A tiny search on the system's Fashion-MNIST (as the tester ran it)."""
    assert Path(SYSTEM_DIRS["fashion_mnist"][0]).is_dir(), "needs dataset-fashion-mnist"
    cfg = {
        "data": {"root": str(folder / "data"), "download": False, "limit": 300},
        "model": {"channels": [4, 8], "hidden_dim": 16, "latent_dim": 2},
        "train": {"epochs": 1, "batch_size": 32},
        "scaling": {"num_workers": 1},
        "run": {"name": "tiny", "storage_path": str(folder / "runs")},
        "search": {
            "num_samples": 2,
            "max_concurrent_trials": 1,
            "scheduler": {"type": "none"},
            "space": space or {"train.lr": {"loguniform": [3.0e-4, 3.0e-3]}},
        },
    }
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_search_into_a_folder_of_the_users_files_loses_nothing(tmp_path):
    # mkdir -p mine && echo keep > mine/notes.txt, plus an earlier export in a subfolder.
    work = tmp_path / "work"
    (work / "mine" / "old-export").mkdir(parents=True)
    (work / "mine" / "notes.txt").write_text("keep\n")
    (work / "mine" / "old-export" / MARKER).write_text(json.dumps({"kind": "export"}))
    (work / "mine" / "old-export" / "model.safetensors").write_bytes(b"an earlier export")
    # A checkout in the current directory: export.dir=. must not delete it.
    (work / ".git").mkdir()
    (work / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (work / ".venv" / "bin").mkdir(parents=True)
    (work / ".venv" / "bin" / "python").write_text("#!")
    config = search_config(tmp_path)
    before = tree(work)
    for value, phrase in (
        ("mine", "files raytrain_vae did not write"),
        (".", "is the current directory"),
        ('""', "must not be empty"),
    ):
        proc, seconds = run(["raytrain_vae.tune", str(config), f"export.dir={value}"], work)
        assert_one_line_exit_2(proc, "export.dir", phrase)
        assert "Started a local Ray instance" not in proc.stderr  # refused before Ray
        assert tree(work) == before
    assert not (tmp_path / "runs").exists()


def test_generate_overwrite_never_deletes_a_folder_it_did_not_write(tmp_path, model_dir):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"\xff\xd8 irreplaceable")
    before = tree(tmp_path)
    args = ["raytrain_vae.generate", "sample", "--model", str(model_dir), "--num-samples", "8"]
    proc, _ = run([*args, "--output", "photos", "--overwrite"], tmp_path)
    assert_one_line_exit_2(proc, "--output", "did not write")
    assert tree(tmp_path) == before
    # That its own earlier output is what --overwrite replaces, and that a second run without
    # it is refused, test_generate.py's test_overwrite_replaces_existing_output shows.


def test_generate_with_a_gpu_the_machine_lacks_fails_within_seconds(tmp_path, model_dir):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    args = ["raytrain_vae.generate", "sample", "--model", str(model_dir), "--num-samples", "8"]
    proc, seconds = run([*args, "--output", "out", "--num-gpus", "1"], tmp_path, timeout=120)
    assert_one_line_exit_2(proc, "1 actor(s)", "GPU", "this machine's Ray", "--num-gpus")
    assert seconds < 60, seconds  # it used to wait forever, "pending: 1 CPU, 1 GPU"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_search_whose_space_needs_more_workers_than_cpus_fails_within_seconds(tmp_path):
    config = search_config(tmp_path, **{"scaling.num_workers": {"choice": [4]}})
    proc, seconds = run(["raytrain_vae.tune", str(config)], tmp_path, timeout=180)
    line = assert_one_line_exit_2(proc, "scaling: 4 worker(s) x 1 CPU + 0.1 CPU for the trial")
    assert "lower scaling.num_workers" in line
    assert seconds < 90, seconds  # it used to retry WorkerGroupStartupTimeoutError forever
    assert not list((tmp_path / "runs").glob("tiny/trials/train-*"))
