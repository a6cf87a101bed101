"""Ray Data batch sampling: Parquet schema, exact row counts, determinism, bad input refused."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from conftest import make_idx_dataset, tiny_config, write_model_dir
from PIL import Image

from raytrain_vae import batch_actors
from raytrain_vae.batch_actors import latents_for, png_bytes
from raytrain_vae.config import UserError, dump_config, load_config
from raytrain_vae.export import load_model
from raytrain_vae.generate import encode_images, main, sample
from raytrain_vae.inputs import read_inputs
from raytrain_vae.model_io import model_files

REPO = Path(__file__).resolve().parents[1]
LATENT = 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    write_model_dir(folder, tiny_config("model.hidden_dim=16", f"model.latent_dim={LATENT}"))
    return folder


@pytest.mark.parametrize("retain", ["true", "false"])
def test_cpu_actors_retain_freed_memory_as_the_model_config_says(tmp_path, monkeypatch, retain):
    cfg = load_config(None, ["model.channels=[4,8]", f"scaling.retain_freed_memory={retain}"])
    write_model_dir(tmp_path, cfg)
    calls = []
    monkeypatch.setattr(batch_actors, "retain_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model, device = batch_actors.load_actor_model(model_files(tmp_path))
    assert device == "cpu" and not model.training
    assert calls == ([1] if retain == "true" else [])


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


@pytest.mark.slow
def test_cli_rate_counts_the_rows_own_time(ray_local, model_dir, tmp_path, capsys):
    argv = ["sample", "--model", str(model_dir), "--num-samples", "12"]
    assert main([*argv, "--output", str(tmp_path / "out")]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    pattern = r"wrote 12 rows to .+ in ([0-9.]+) s: [0-9]+ rows/s over the ([0-9.]+) s of the job "
    match = re.fullmatch(pattern + r"itself \(Ray's start-up and checks: ([0-9.]+) s\)", line)
    assert match, line
    total, job, before = map(float, match.groups())
    assert job <= total and abs(total - job - before) <= 0.11


@pytest.fixture(scope="module")
def written_model(tmp_path_factory) -> tuple[Path, object]:
    """A model dir whose config points at tiny MNIST-format IDX files (dataset split input)."""
    folder = tmp_path_factory.mktemp("idxmodel")
    written = make_idx_dataset(n_train=40, n_test=30, height=28, width=28)
    written.write(folder / "data")
    cfg = tiny_config(
        "data.source=mnist",
        f"data.root={folder / 'data'}",
        "data.download=false",
        "data.binarize=none",
        "model.hidden_dim=16",
        f"model.latent_dim={LATENT}",
    )
    write_model_dir(folder, cfg, seed=1)
    return folder, written


@pytest.mark.slow
def test_reconstruct_split_keeps_ids_labels_and_latents_aligned(ray_local, written_model, tmp_path):
    model_dir, written = written_model
    rows = encode_images(
        str(model_dir), str(tmp_path / "r"), split="test", batch_size=7, concurrency=2
    )
    assert rows == 30
    table = read_rows(tmp_path / "r")
    assert table.column("id").to_pylist() == list(range(30))
    assert table.column("label").to_pylist() == written.test_labels.tolist()
    assert table.schema.field("latent_mu").type == pa.list_(pa.float32(), LATENT)
    model = load_model(model_dir)
    x = torch.from_numpy(written.test_images).float().unsqueeze(1) / 255
    mu, logvar = model.encode(x)
    got = np.array(table.column("latent_mu").to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(got, mu.detach().numpy(), rtol=1e-4, atol=1e-5)
    recon = Image.open(io.BytesIO(table.column("reconstruction")[3].as_py()))
    assert recon.size == (28, 28)
    nll = np.array(table.column("recon_nll").to_pylist())
    elbo = np.array(table.column("neg_elbo").to_pylist())
    assert (nll > 0).all() and (elbo > 0).all()


@pytest.mark.slow
def test_encode_parquet_input_uses_its_ids_and_png_images(ray_local, written_model, tmp_path):
    model_dir, written = written_model
    ids = [105, 7, 42, 3]
    pngs = [png_bytes(written.test_images[i][None]) for i in range(4)]
    pq.write_table(
        pa.table({"id": ids, "image": pngs, "label": [1, 2, 3, 4]}), tmp_path / "in.parquet"
    )
    rows = encode_images(
        str(model_dir),
        str(tmp_path / "e"),
        input_path=str(tmp_path / "in.parquet"),
        reconstruct=False,
    )
    assert rows == 4
    table = read_rows(tmp_path / "e")
    assert set(table.column_names) == {"id", "source", "label", "latent_mu", "latent_logvar"}
    assert set(table.column("source").to_pylist()) == {
        f"{tmp_path / 'in.parquet'}#{row}" for row in range(4)
    }
    by_id = dict(
        zip(table.column("id").to_pylist(), table.column("latent_mu").to_pylist(), strict=True)
    )
    model = load_model(model_dir)
    for i, row_id in enumerate(ids):
        x = torch.from_numpy(written.test_images[i]).float()[None, None] / 255
        np.testing.assert_allclose(
            by_id[row_id], model.encode(x)[0][0].detach().numpy(), rtol=1e-4, atol=1e-5
        )
    labels = dict(
        zip(table.column("id").to_pylist(), table.column("label").to_pylist(), strict=True)
    )
    assert labels == {105: 1, 7: 2, 42: 3, 3: 4}


def test_non_image_input_is_refused(written_model, tmp_path):
    model_dir, _ = written_model
    pq.write_table(pa.table({"image": [b"not a png"]}), tmp_path / "bad.parquet")
    with pytest.raises(UserError, match="not an image"):
        read_inputs(str(model_dir), "test", str(tmp_path / "bad.parquet"))
    small = png_bytes(np.zeros((1, 8, 8), np.uint8))
    pq.write_table(pa.table({"image": [small]}), tmp_path / "small.parquet")
    with pytest.raises(UserError, match="8x8"):
        read_inputs(str(model_dir), "test", str(tmp_path / "small.parquet"))
    pq.write_table(pa.table({"text": ["hello"]}), tmp_path / "text.parquet")
    with pytest.raises(UserError, match="image"):
        read_inputs(str(model_dir), "test", str(tmp_path / "text.parquet"))


def test_png_folder_input_reads_files_in_name_order(written_model, tmp_path):
    model_dir, written = written_model
    folder = tmp_path / "pngs"
    folder.mkdir()
    for name, i in (("b.png", 1), ("a.png", 0), ("c.png", 2)):
        (folder / name).write_bytes(png_bytes(written.test_images[i][None]))
    table = read_inputs(str(model_dir), "test", str(folder))
    assert table.column("id").to_pylist() == [0, 1, 2]
    pixels = np.array(table.column("pixels").to_pylist(), dtype=np.uint8)
    np.testing.assert_array_equal(pixels, written.test_images[:3].reshape(3, -1))
