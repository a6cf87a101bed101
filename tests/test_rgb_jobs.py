"""The jobs speak the new data without Ray: an RGB model at its trained size samples RGB PNGs,
draws RGB grids, exports a card that states its data, and reads inputs shaped as in training."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import tiny_config, write_model_dir
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from raytrain_vae import images
from raytrain_vae.batch_actors import Sampler
from raytrain_vae.evaluation import evaluate
from raytrain_vae.export import export_model
from raytrain_vae.inputs import read_inputs
from raytrain_vae.likelihoods import LIKELIHOODS
from raytrain_vae.model_io import model_files

RGB = [
    "data.channels=3",
    "data.image_size=[32,40]",
    "data.binarize=none",
    "model.likelihood=discretized_logistic",
]


@pytest.fixture
def rgb_model(tmp_path) -> Path:
    """An untrained RGB model of 3x32x40 (Fashion-MNIST made RGB and resized), as exported."""
    folder = tmp_path / "model"
    write_model_dir(folder, tiny_config(*RGB), (3, 32, 40), metrics={"epoch": 1})
    return folder


def decoded(png: bytes) -> Image.Image:
    return Image.open(io.BytesIO(png))


def test_samples_are_rgb_pngs_at_the_trained_size(rgb_model):
    sampler = Sampler(model_files(rgb_model), seed=0, temperature=1.0, pixels=True)
    table = sampler({"id": np.arange(5)})
    image = decoded(table.column("image")[0].as_py())
    assert image.mode == "RGB" and image.size == (40, 32)
    assert len(table.column("pixels")[0]) == 3 * 32 * 40


def test_images_draws_rgb_grids_from_the_trained_data(rgb_model, tmp_path):
    assert images.main(["--model", str(rgb_model), "--output", str(tmp_path / "png")]) == 0
    for name in ("samples.png", "reconstructions.png", "interpolations.png"):
        grid = Image.open(tmp_path / "png" / name)
        assert grid.mode == "RGB", name
        colours = np.asarray(grid).reshape(-1, 3)
        assert (colours[:, 0] != colours[:, 1]).any(), f"{name} is grey"


def test_export_card_states_the_data_and_the_likelihood(rgb_model, tmp_path):
    (rgb_model / "metrics.json").write_text(json.dumps({"epoch": 1, "val_neg_elbo": 1.0}))
    out = export_model(rgb_model, tmp_path / "export")
    card = (out / "README.md").read_text()
    assert "3x32x40 (RGB)" in card and "resized to 40x32" in card
    assert "discretized_logistic" in card and "8-bit" in card
    assert Image.open(out / "samples.png").mode == "RGB"


def test_inputs_are_resized_as_in_training(rgb_model, tmp_path):
    """A model trained with data.image_size takes inputs of any size: they are resized alike."""
    photo = np.random.default_rng(0).integers(0, 256, (64, 80, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, format="PNG")
    pq.write_table(pa.table({"image": [buffer.getvalue()]}), tmp_path / "in.parquet")
    table = read_inputs(str(rgb_model), "test", str(tmp_path / "in.parquet"))
    pixels = np.array(table.column("pixels").to_pylist()[0], np.uint8).reshape(3, 32, 40)
    want = TF.resize(torch.from_numpy(photo).permute(2, 0, 1), [32, 40], antialias=True)
    np.testing.assert_array_equal(pixels, want.numpy())


@pytest.mark.parametrize("likelihood", sorted(LIKELIHOODS))
def test_evaluate_gives_bits_per_dim_and_iwae_for_every_likelihood(likelihood, tmp_path):
    cfg = tiny_config(*RGB, f"model.likelihood={likelihood}")
    model = write_model_dir(tmp_path / "m", cfg, (3, 8, 8)).eval()
    pixels = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    if likelihood == "bernoulli":
        pixels = (pixels > 127).to(torch.uint8) * 255
    metrics = evaluate(model, pixels, k=4, batch_size=3)
    assert metrics["bits_per_dim"] == pytest.approx(metrics["iwae_nll"] / (192 * np.log(2)))
    assert np.isfinite(metrics["elbo_bits_per_dim"]) and metrics["bits_per_dim"] > 0
    assert metrics["bits_per_dim_means"] == model.likelihood.bits_per_dim_meaning
