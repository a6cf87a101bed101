"""Ray Data batch sampling: Parquet schema, exact row counts, determinism, bad input refused."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from PIL import Image

from raytrain_vae.config import UserError, dump_config, load_config
from raytrain_vae.export import save_weights
from raytrain_vae.generate import latents_for, sample
from raytrain_vae.model import ConvVAE

REPO = Path(__file__).resolve().parents[1]
LATENT = 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    cfg = load_config(
        None, ["model.channels=[4,8]", "model.hidden_dim=16", f"model.latent_dim={LATENT}"]
    )
    torch.manual_seed(0)
    save_weights(ConvVAE(cfg.model, (1, 28, 28)), folder / "model.safetensors")
    (folder / "config.yaml").write_text(dump_config(cfg))
    return folder


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2)
    yield
    ray.shutdown()


def read_rows(folder: Path) -> pa.Table:
    table = pq.read_table(folder)
    return table.sort_by("id")


def test_bad_inputs_are_refused_before_ray_starts(model_dir, tmp_path):
    with pytest.raises(UserError, match="num-samples"):
        sample(str(model_dir), 0, str(tmp_path / "x"))
    with pytest.raises(UserError, match="no such model directory"):
        sample(str(tmp_path / "missing"), 5, str(tmp_path / "x"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.yaml").write_text(dump_config(load_config(None)))
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="unreadable weights"):
        sample(str(broken), 5, str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()
    assert not ray.is_initialized()


def test_cli_bad_input_is_one_line_with_status_2(model_dir, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "raytrain_vae.generate", "sample", "--model", str(model_dir),
         "--num-samples", "-3", "--output", str(tmp_path / "o")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error:")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_schema_row_count_and_images(ray_local, model_dir, tmp_path):
    out = tmp_path / "samples"
    rows = sample(str(model_dir), 50, str(out), seed=3, batch_size=16, pixels=True)
    assert rows == 50
    table = read_rows(out)
    assert table.num_rows == 50
    assert table.column("id").to_pylist() == list(range(50))
    schema = table.schema
    assert schema.field("id").type == pa.int64()
    assert schema.field("latent").type == pa.list_(pa.float32(), LATENT)
    assert schema.field("image").type == pa.binary()
    assert schema.field("pixels").type == pa.list_(pa.uint8(), 784)
    latents = np.array(table.column("latent").to_pylist(), dtype=np.float32)
    expected = latents_for(np.arange(50), LATENT, seed=3).numpy()
    np.testing.assert_array_equal(latents, expected)
    for png, pixels in zip(
        table.column("image").to_pylist()[:5], table.column("pixels").to_pylist()[:5], strict=True
    ):
        image = Image.open(io.BytesIO(png))
        assert image.size == (28, 28) and image.mode == "L"
        np.testing.assert_array_equal(
            np.asarray(image).reshape(-1), np.array(pixels, dtype=np.uint8)
        )
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


@pytest.mark.slow
def test_same_seed_same_rows_whatever_batch_size_and_concurrency(ray_local, model_dir, tmp_path):
    def run(name: str, **kwargs) -> pa.Table:
        assert sample(str(model_dir), 40, str(tmp_path / name), **kwargs) == 40
        return read_rows(tmp_path / name)

    a = run("a", seed=7, batch_size=40, concurrency=1)
    b = run("b", seed=7, batch_size=7, concurrency=2)  # 2 actors on 2 CPUs must not deadlock
    assert a.equals(b)
    c = run("c", seed=8, batch_size=40)
    assert not a.column("latent").equals(c.column("latent"))


@pytest.mark.slow
def test_overwrite_replaces_existing_output(ray_local, model_dir, tmp_path):
    out = tmp_path / "out"
    sample(str(model_dir), 10, str(out))
    with pytest.raises(UserError, match="--overwrite"):
        sample(str(model_dir), 12, str(out))
    assert read_rows(out).num_rows == 10  # untouched by the refused run
    sample(str(model_dir), 12, str(out), overwrite=True)
    assert read_rows(out).num_rows == 12
