"""Shared test helpers: tiny MNIST-style IDX datasets on disk, tiny saved model directories, no
system dataset copies, and a module-wide local Ray."""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

import raytrain_vae.data.idx as idx_source
from raytrain_vae.config import Config, load_config
from raytrain_vae.data.idx import FILES
from raytrain_vae.model_io import save_model_dir
from raytrain_vae.models import VAE, build_model

# The smallest model the tests save and load: milliseconds to build and to run.
TINY_MODEL = ["model.channels=[4,8]", "model.hidden_dim=8", "model.latent_dim=2"]


def tiny_config(*overrides: str) -> Config:
    """The default config with TINY_MODEL, then overrides (a later key wins)."""
    return load_config(None, [*TINY_MODEL, *overrides])


def write_model_dir(
    folder: Path,
    cfg: Config,
    image_shape: tuple[int, int, int] = (1, 28, 28),
    seed: int = 0,
    metrics: dict | None = None,
) -> VAE:
    """A saved model directory in folder (created if need be), as an export or a checkpoint
    holds one: weights of a model built after torch.manual_seed(seed), config.yaml and
    metrics.json (default {"epoch": 1}). Returns the model, as built (training mode)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = build_model(cfg.model, image_shape)
    save_model_dir(model, cfg, folder, {"epoch": 1} if metrics is None else metrics)
    return model


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file as in MNIST: big-endian magic 0x0000080<ndim> (uint8 data), dims, pixels."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


@dataclass
class Written:
    """The four arrays of an MNIST-style dataset, and how to write them as IDX files."""

    train_images: np.ndarray  # (N, H, W) uint8
    train_labels: np.ndarray  # (N,) uint8
    test_images: np.ndarray
    test_labels: np.ndarray

    def write(self, folder: Path, gz: bool = True) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for key, stem in FILES.items():
            payload = idx_bytes(getattr(self, key))
            if gz:
                (folder / f"{stem}.gz").write_bytes(gzip.compress(payload))
            else:
                (folder / stem).write_bytes(payload)


def make_idx_dataset(
    *, seed: int = 0, n_train: int, n_test: int, height: int, width: int
) -> Written:
    """Random uint8 images (every training image distinct) and labels 0-9."""
    rng = np.random.default_rng(seed)
    written = Written(
        train_images=rng.integers(0, 256, size=(n_train, height, width), dtype=np.uint8),
        train_labels=rng.integers(0, 10, size=n_train, dtype=np.uint8),
        test_images=rng.integers(0, 256, size=(n_test, height, width), dtype=np.uint8),
        test_labels=rng.integers(0, 10, size=n_test, dtype=np.uint8),
    )
    # Every image distinct, so "same set of images" is a meaningful comparison.
    assert len({im.tobytes() for im in written.train_images}) == n_train
    return written


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A tiny saved model (tiny_config(), 1x28x28, seed 0) at tmp_path / "model"."""
    folder = tmp_path / "model"
    write_model_dir(folder, tiny_config())
    return folder


@pytest.fixture
def no_system_copies(monkeypatch, tmp_path):
    """Never find a dataset installed on this machine (e.g. /usr/share/datasets)."""
    for name in list(idx_source.SYSTEM_DIRS):
        monkeypatch.setitem(idx_source.SYSTEM_DIRS, name, [str(tmp_path / "no-system-copy" / name)])


@pytest.fixture(scope="module")
def ray_local():
    """One real local Ray (2 CPUs) per test module: starting one takes 3 to 5 s."""
    ray.init(num_cpus=2)
    yield
    ray.shutdown()
