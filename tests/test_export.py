"""Model export from a training checkpoint: files, pictures, load_model without pickle, atomic
replacement of an existing export, clear errors for bad model directories. No Ray."""

from __future__ import annotations

import json
import math
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import grid_pixels, make_idx_dataset, write_model_dir
from PIL import Image

import raytrain_vae.export as export
from raytrain_vae.config import (
    Config,
    DataSection,
    ExportSection,
    ModelSection,
    UserError,
    load_config,
)
from raytrain_vae.data import load_splits, to_model_input
from raytrain_vae.export import export_model, load_model
from raytrain_vae.images import reconstruction_grid, sample_grid
from raytrain_vae.model_io import ModelFileError, load_model_dir, save_weights
from raytrain_vae.models.conv import ConvVAE
from raytrain_vae.pictures import MIN_WIDTH, picture_title

IMAGE_SHAPE = (1, 28, 28)  # what the exported model is built for and the IDX files hold
N_TEST = 20
PAD = 2  # make_grid padding used by raytrain_vae.images
EXPORT_FILES = {
    "model.safetensors",
    "config.yaml",
    "metrics.json",
    "samples.png",
    "reconstructions.png",
    "README.md",
    ".raytrain_vae-output",  # the marker that lets a later export replace this one
}
METRICS = {
    "epoch": 3,
    "val_neg_elbo": 301.25,
    "val_recon": 280.5,
    "val_kl": 20.75,
    "val_bits_per_dim": 0.5543,
}

pytestmark = pytest.mark.usefixtures("no_system_copies")


@pytest.fixture
def data_root(tmp_path) -> Path:
    root = tmp_path / "data"
    make_idx_dataset(seed=3, n_train=24, n_test=N_TEST, height=28, width=28).write(root, gz=False)
    return root


def make_cfg(data_root: Path, binarize="none", num_samples=10, num_reconstructions=5, **model):
    model = {"channels": [8, 16], "latent_dim": 4, "hidden_dim": 32, **model}
    return Config(
        data=DataSection(source="mnist", root=str(data_root), download=False, binarize=binarize),
        model=ModelSection(**model),
        export=ExportSection(num_samples=num_samples, num_reconstructions=num_reconstructions),
    )


def make_checkpoint(folder: Path, cfg: Config, seed: int = 0) -> ConvVAE:
    """A training checkpoint dir as checkpoint.save_checkpoint writes it; returns its model."""
    model = write_model_dir(folder, cfg, IMAGE_SHAPE, seed, metrics=METRICS)
    optimizer = torch.optim.AdamW(model.parameters())
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    (folder / "state.json").write_text(json.dumps({"epoch": 3, "step": 9, "history": [METRICS]}))
    return model.eval()


def grid_size(n: int, nrow: int, h: int = 28, w: int = 28) -> tuple[int, int]:
    """(width, height) of torchvision's make_grid of n images, nrow per row, padding 2."""
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    return cols * (w + PAD) + PAD, rows * (h + PAD) + PAD


def tile(png: np.ndarray, row: int, col: int, h: int = 28, w: int = 28) -> np.ndarray:
    y, x = PAD + row * (h + PAD), PAD + col * (w + PAD)
    return png[y : y + h, x : x + w]


def to_u8(images: torch.Tensor) -> np.ndarray:
    """(N, 1, H, W) floats in [0, 1] -> (N, H, W) uint8 exactly as save_image quantises."""
    return images[:, 0].mul(255).add(0.5).clamp(0, 255).to(torch.uint8).numpy()


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"))
    # grey images: every channel the same
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all()
    return rgb[..., 0]


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key].cpu(), sb[key].cpu()), key


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


# --- the exported directory -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("binarize", "num_samples", "num_reconstructions"),
    [("none", 10, 5), ("dynamic", 16, 18)],
)
def test_export_writes_a_complete_model_directory(
    tmp_path, data_root, binarize, num_samples, num_reconstructions, monkeypatch
):
    cfg = make_cfg(data_root, binarize, num_samples, num_reconstructions)
    original = make_checkpoint(tmp_path / "ckpt", cfg)
    out = tmp_path / "exports" / "best"
    extra = {"trial_id": "abc123", "experiment": "/somewhere/run"}

    assert export_model(tmp_path / "ckpt", out, extra) == out
    assert {p.name for p in out.iterdir()} == EXPORT_FILES
    assert leftovers(out.parent) == []

    # config.yaml: the checkpoint's resolved config, loadable on its own
    assert load_config(out / "config.yaml") == cfg

    # metrics.json: the checkpoint's metrics plus the extra ones
    assert json.loads((out / "metrics.json").read_text()) == {**METRICS, **extra}

    # README: the architecture and every validation metric
    card = (out / "README.md").read_text()
    for key in ("val_neg_elbo", "val_recon", "val_kl", "val_bits_per_dim"):
        assert f"| {key} | {METRICS[key]:.4f} |" in card
    assert "latent_dim 4" in card and "channels [8, 16]" in card
    assert f"Trained {METRICS['epoch']} epochs" in card
    code = card.split("```python\n")[1].split("```")[0]  # the card's example runs as written
    monkeypatch.chdir(out)
    namespace: dict = {}
    exec(code, namespace)
    assert namespace["images"].shape == (16, *original.image_shape)

    # samples.png: num_samples images, sqrt-ish grid, the same pictures sample_grid draws
    nrow = math.ceil(math.sqrt(num_samples))
    width = grid_size(num_samples, nrow)[0]
    samples = grid_pixels(out / "samples.png", width)
    assert samples.shape[::-1] == grid_size(num_samples, nrow)
    sample_grid(original, tmp_path / "expected.png", n=num_samples)
    assert np.array_equal(samples, grid_pixels(tmp_path / "expected.png", width))
    assert Image.open(out / "samples.png").width >= MIN_WIDTH

    # reconstructions.png: each row of (up to 16) test images above their reconstructions
    n = num_reconstructions
    nrow = min(n, 16)
    input_rows = math.ceil(n / nrow)
    size = grid_size(2 * input_rows * nrow, nrow)
    recon = grid_pixels(out / "reconstructions.png", size[0])
    assert recon.shape[::-1] == size
    test = load_splits(cfg.data).test[:n]
    expected_recon = to_u8(original.reconstruct(to_model_input(test, False)))
    for i in range(n):
        r, c = divmod(i, nrow)
        assert np.array_equal(tile(recon, 2 * r, c), test[i, 0].numpy()), f"input {i}"
        assert np.array_equal(tile(recon, 2 * r + 1, c), expected_recon[i]), f"recon {i}"
    for i in range(n, input_rows * nrow):  # blank tiles keep the columns aligned
        r, c = divmod(i, nrow)
        assert not tile(recon, 2 * r, c).any() and not tile(recon, 2 * r + 1, c).any()


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_load_model_round_trips_weights_and_reconstructions(tmp_path, data_root, likelihood):
    cfg = make_cfg(data_root, likelihood=likelihood)
    original = make_checkpoint(tmp_path / "ckpt", cfg, seed=5)
    if likelihood == "gaussian":  # a non-default value, so a missing log_sigma would show
        with torch.no_grad():
            original.log_sigma.fill_(-0.75)
        save_weights(original, tmp_path / "ckpt" / "model.safetensors")
    out = export_model(tmp_path / "ckpt", tmp_path / "export")

    loaded = load_model(out)
    assert isinstance(loaded, ConvVAE)
    assert not loaded.training
    assert all(not m.training for m in loaded.modules())
    assert loaded.image_shape == IMAGE_SHAPE
    assert loaded.cfg == cfg.model
    assert_same_weights(loaded, original)

    x = to_model_input(load_splits(cfg.data).test[:6], False)
    assert torch.equal(loaded.reconstruct(x), original.reconstruct(x))
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(loaded.sample(4, generator=g1), original.sample(4, generator=g2))

    model, loaded_cfg = load_model_dir(out)
    assert loaded_cfg == cfg
    assert_same_weights(model, original)


def test_load_model_never_unpickles(tmp_path, data_root, monkeypatch):
    cfg = make_cfg(data_root)
    original = make_checkpoint(tmp_path / "ckpt", cfg)
    out = export_model(tmp_path / "ckpt", tmp_path / "export")

    def no_pickle(*args, **kwargs):
        raise AssertionError("load_model must not unpickle anything")

    monkeypatch.setattr(torch, "load", no_pickle)
    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(pickle, "Unpickler", no_pickle)
    # the export, and the training checkpoint (which holds a pickled optimizer.pt)
    for folder in (out, tmp_path / "ckpt"):
        assert_same_weights(load_model(folder), original)


# --- atomic replacement ---------------------------------------------------------------------


def test_second_export_replaces_the_first(tmp_path, data_root):
    first = make_checkpoint(tmp_path / "ckpt1", make_cfg(data_root), seed=1)
    second = make_checkpoint(tmp_path / "ckpt2", make_cfg(data_root, latent_dim=6), seed=2)
    out = tmp_path / "exports" / "best"

    export_model(tmp_path / "ckpt1", out)
    assert_same_weights(load_model(out), first)
    export_model(tmp_path / "ckpt2", out, {"trial_id": "second"})

    assert {p.name for p in out.iterdir()} == EXPORT_FILES
    loaded = load_model(out)
    assert loaded.cfg.latent_dim == 6
    assert_same_weights(loaded, second)
    assert json.loads((out / "metrics.json").read_text())["trial_id"] == "second"
    assert sorted(p.name for p in out.parent.iterdir()) == ["best"]


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failed_export_leaves_the_previous_one_intact(tmp_path, data_root, monkeypatch, error):
    first = make_checkpoint(tmp_path / "ckpt1", make_cfg(data_root), seed=1)
    make_checkpoint(tmp_path / "ckpt2", make_cfg(data_root, latent_dim=6), seed=2)
    out = tmp_path / "exports" / "best"
    export_model(tmp_path / "ckpt1", out)
    before = snapshot(out)

    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(export, "sample_grid", broken)
    with pytest.raises(type(error)):
        export_model(tmp_path / "ckpt2", out)

    assert snapshot(out) == before
    assert_same_weights(load_model(out), first)
    assert sorted(p.name for p in out.parent.iterdir()) == ["best"]


def test_failed_first_export_leaves_nothing(tmp_path, data_root, monkeypatch):
    make_checkpoint(tmp_path / "ckpt", make_cfg(data_root))
    out = tmp_path / "exports" / "best"

    def broken(*args, **kwargs):
        raise RuntimeError("no space left")

    monkeypatch.setattr(export, "reconstruction_grid", broken)
    with pytest.raises(RuntimeError, match="no space left"):
        export_model(tmp_path / "ckpt", out)
    assert list(out.parent.iterdir()) == []


def test_grid_helpers_match_the_export(tmp_path, data_root):
    # The pictures are exactly what images.py draws for the loaded model.
    cfg = make_cfg(data_root)
    make_checkpoint(tmp_path / "ckpt", cfg)
    out = export_model(tmp_path / "ckpt", tmp_path / "export")
    model = load_model(out)
    test = load_splits(cfg.data).test[: cfg.export.num_reconstructions]
    metrics = json.loads((out / "metrics.json").read_text())
    title = picture_title(cfg, metrics, "test reconstructions")
    reconstruction_grid(model, to_model_input(test, False), tmp_path / "r.png", title, "input")
    assert np.array_equal(read_png(tmp_path / "r.png"), read_png(out / "reconstructions.png"))


# --- bad model directories ------------------------------------------------------------------


def _export_error(folder: Path) -> str:
    with pytest.raises(ModelFileError) as info:
        load_model(folder)
    assert isinstance(info.value, UserError)
    msg = str(info.value)
    assert msg and "\n" not in msg, f"message must be one line: {msg!r}"
    assert str(folder) in msg
    return msg


@pytest.fixture
def exported(tmp_path, data_root) -> Path:
    make_checkpoint(tmp_path / "ckpt", make_cfg(data_root))
    return export_model(tmp_path / "ckpt", tmp_path / "export")


def test_missing_directory(tmp_path):
    assert "no such model directory" in _export_error(tmp_path / "nope")


@pytest.mark.parametrize("missing", ["model.safetensors", "config.yaml"])
def test_directory_without_weights_or_config(exported, missing):
    (exported / missing).unlink()
    msg = _export_error(exported)
    assert "not a model directory" in msg
    assert "model.safetensors" in msg and "config.yaml" in msg


def test_a_training_run_folder_names_its_newest_checkpoint(tmp_path, exported):
    run = tmp_path / "run"
    for stamp in ("2026-12-03_06-12-52.092171", "2026-12-03_06-35-16.676450"):
        shutil.copytree(exported, run / f"checkpoint_{stamp}")
    (run / "checkpoint_manager_snapshot.json").write_text("{}")
    msg = _export_error(run)
    assert "a training run's folder" in msg
    assert msg.endswith(f"(the newest: {run / 'checkpoint_2026-12-03_06-35-16.676450'})")
    load_model_dir(run / "checkpoint_2026-12-03_06-35-16.676450")  # the one named loads


def test_truncated_weights(exported):
    weights = exported / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    msg = _export_error(exported)
    assert "unreadable weights" in msg
    assert str(weights) in msg


def tamper_tensors(weights: Path) -> None:
    """Change bytes of the tensor data, leaving the header (and so the file's validity) alone."""
    data = bytearray(weights.read_bytes())
    header_len = 8 + int.from_bytes(data[:8], "little")
    for i in range(header_len + 16, header_len + 32):
        data[i] ^= 0x55
    weights.write_bytes(bytes(data))


def test_tampered_weights_with_a_valid_header_are_refused(exported):
    weights = exported / "model.safetensors"
    tamper_tensors(weights)
    from safetensors.torch import load_file

    assert load_file(weights)  # still a well-formed safetensors file
    msg = _export_error(exported)
    assert "do not match the checksum" in msg and str(weights) in msg


def test_tampered_export_is_refused_by_the_clis(exported, tmp_path):
    tamper_tensors(exported / "model.safetensors")
    for cmd in (
        ["raytrain_vae.evaluate", "--model", str(exported)],
        ["raytrain_vae.generate", "sample", "--model", str(exported), "--num-samples", "4",
         "--output", str(tmp_path / "out")],
    ):  # fmt: skip
        proc = subprocess.run(
            [sys.executable, "-m", *cmd], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and "checksum" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_weights_file_that_is_not_safetensors(exported):
    (exported / "model.safetensors").write_bytes(b"<html>404</html>")
    assert "unreadable weights" in _export_error(exported)


def test_config_that_does_not_match_the_weights(exported):
    raw = yaml.safe_load((exported / "config.yaml").read_text())
    raw["model"]["latent_dim"] = 8  # the weights are for latent_dim 4
    (exported / "config.yaml").write_text(yaml.safe_dump(raw))
    msg = _export_error(exported)
    assert "do not match config.yaml" in msg
    assert "size mismatch" in msg


def test_export_from_a_bad_checkpoint_writes_nothing(tmp_path):
    out = tmp_path / "exports" / "best"
    with pytest.raises(ModelFileError, match="no such model directory"):
        export_model(tmp_path / "missing-ckpt", out)
    assert not out.exists()
    assert not (out.parent.exists() and leftovers(out.parent))


def test_export_of_a_copied_directory_loads(exported, tmp_path):
    # An export is self-contained: it loads from anywhere, with nothing else around it.
    moved = tmp_path / "elsewhere" / "model"
    shutil.copytree(exported, moved)
    shutil.rmtree(tmp_path / "ckpt")
    assert_same_weights(load_model(moved), load_model(exported))


def test_disk_full_during_export_leaves_the_previous_export_intact(
    tmp_path, data_root, monkeypatch
):
    import errno

    import raytrain_vae.export as export_module

    ckpt = tmp_path / "ckpt"
    make_checkpoint(ckpt, make_cfg(data_root))
    out = tmp_path / "export"
    export_model(ckpt, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export_module, "save_model_dir", full)
    with pytest.raises(UserError, match="No space left on device"):
        export_model(ckpt, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name] == []


def test_unwritable_export_dir_is_a_clear_error(tmp_path, data_root):
    ckpt = tmp_path / "ckpt"
    make_checkpoint(ckpt, make_cfg(data_root))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match="not writable"):
        export_model(ckpt, blocker / "export")
