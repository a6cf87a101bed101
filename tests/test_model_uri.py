"""A model directory at a URI (s3://, against a local S3 server): load_model, evaluate, images
and the batch jobs' actors read it as they read a local one, and what cannot be read is one line
naming the URI."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

import raytrain_vae.evaluation as evaluate_mod
import raytrain_vae.images as images_mod
from raytrain_vae.batch_actors import Sampler
from raytrain_vae.cli import run_cli
from raytrain_vae.export import load_model
from raytrain_vae.model_io import MODEL_FILE, load_model_dir, model_files


def upload(s3_server, folder: Path, key: str) -> str:
    """Every file of `folder` under s3://BUCKET/key; the folder's URI."""
    for path in folder.iterdir():
        s3_server.put(f"{key}/{path.name}", path.read_bytes())
    return s3_server.url(key)


def one_error_line(capsys) -> str:
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_a_model_at_a_uri_loads_as_its_local_copy(s3_server, exported):
    uri = upload(s3_server, exported, "models/a")
    remote, remote_cfg = load_model_dir(uri)
    local, local_cfg = load_model_dir(exported)
    assert remote_cfg == local_cfg
    torch.testing.assert_close(remote.state_dict(), local.state_dict(), rtol=0, atol=0)
    assert not remote.training
    api_model = load_model(uri + "/")  # the Python API, a trailing slash as users type it
    torch.testing.assert_close(api_model.state_dict(), local.state_dict(), rtol=0, atol=0)


def test_evaluate_and_images_read_a_model_at_a_uri(s3_server, exported, tmp_path, capsys):
    uri = upload(s3_server, exported, "models/b")
    args = ["--k", "3", "--limit", "6", "--device", "cpu", "--json"]
    assert run_cli(lambda: evaluate_mod.main(["--model", uri, *args])) == 0
    remote = json.loads(capsys.readouterr().out)
    assert run_cli(lambda: evaluate_mod.main(["--model", str(exported), *args])) == 0
    local = json.loads(capsys.readouterr().out)
    for metrics in (remote, local):
        metrics.pop("seconds")
    assert remote == local  # the same model, images and seed: the same numbers

    out = tmp_path / "pictures"
    assert run_cli(lambda: images_mod.main(["--model", uri, "--output", str(out)])) == 0
    # 12 test images: 6 interpolated pairs (a split under 16 images once crashed the command).
    drawn = {p.name for p in out.iterdir()}
    assert {"samples.png", "reconstructions.png", "interpolations.png"} <= drawn


def test_a_uri_that_holds_no_usable_model_is_one_line_naming_it(
    s3_server, exported, tmp_path, capsys
):
    main = evaluate_mod.main
    nowhere = s3_server.url("models/nowhere")
    assert run_cli(lambda: main(["--model", nowhere])) == 2
    assert one_error_line(capsys) == f"error: {nowhere}: no such model directory"

    # A training run's folder: the newest checkpoint is named, as a URI the user can pass.
    for name in ("checkpoint_2026-01-01_00-00-00.1", "checkpoint_2026-01-02_00-00-00.1"):
        upload(s3_server, exported, f"runs/r/{name}")
    run = s3_server.url("runs/r")
    assert run_cli(lambda: main(["--model", run])) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: {run}: a training run's folder; pass one of its checkpoints")
    assert line.endswith(f"(the newest: {run}/checkpoint_2026-01-02_00-00-00.1)")

    # Altered weights: refused, naming the file at the URI, not the temporary copy.
    altered = tmp_path / "altered"
    shutil.copytree(exported, altered)
    weights = bytearray((altered / MODEL_FILE).read_bytes())
    weights[-1] ^= 0xFF
    (altered / MODEL_FILE).write_bytes(bytes(weights))
    uri = upload(s3_server, altered, "models/altered")
    assert run_cli(lambda: main(["--model", uri])) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: {uri}/{MODEL_FILE}: "), line
    assert tempfile.gettempdir() not in line


def test_batch_actors_load_the_models_files_not_the_drivers_folder(exported):
    """Ray Data's actors may run on nodes that cannot see the driver's disk: they get the model
    directory's files, and keep no temporary copy of them."""
    files = model_files(exported)
    assert set(files) == {"model.safetensors", "config.yaml", "metrics.json"}
    expected = load_model_dir(exported)[0]
    shutil.rmtree(exported)
    before = set(Path(tempfile.gettempdir()).glob("raytrain_vae-model-*"))
    sampler = Sampler(files, seed=0, temperature=1.0, pixels=False)
    assert set(Path(tempfile.gettempdir()).glob("raytrain_vae-model-*")) == before
    torch.testing.assert_close(sampler.model.state_dict(), expected.state_dict(), rtol=0, atol=0)
    table = sampler({"id": np.arange(3)})
    assert table.num_rows == 3 and table.column("id").to_pylist() == [0, 1, 2]


def test_model_files_of_a_folder_that_is_no_model_is_the_loaders_error(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(Exception, match="not a model directory"):
        model_files(tmp_path)
