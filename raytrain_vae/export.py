"""A self-contained model directory from a checkpoint; load_model(dir) without unpickling."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from raytrain_vae.config import Config, UserError, dump_config, read_yaml_mapping, validate_config
from raytrain_vae.data import IMAGE_SHAPE, load_splits, to_model_input
from raytrain_vae.images import reconstruction_grid, sample_grid
from raytrain_vae.model import ConvVAE

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
SAMPLES_PNG = "samples.png"
RECONSTRUCTIONS_PNG = "reconstructions.png"
CARD_FILE = "README.md"
FORMAT = "raytrain_vae.convvae/1"


class ExportError(UserError):
    """A model directory that is missing, incomplete or inconsistent."""


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> ConvVAE:
    """The exported ConvVAE in eval mode (safetensors weights, config.yaml architecture)."""
    model, _ = load_export(directory, device)
    return model


def load_export(
    directory: str | Path, device: str | torch.device = "cpu"
) -> tuple[ConvVAE, Config]:
    """(model in eval mode, its resolved Config) from an export or a training checkpoint dir."""
    directory = Path(directory)
    weights = directory / MODEL_FILE
    if not directory.is_dir():
        raise ExportError(f"{directory}: no such model directory")
    if not weights.is_file() or not (directory / CONFIG_FILE).is_file():
        raise ExportError(
            f"{directory}: not a model directory (needs {MODEL_FILE} and {CONFIG_FILE})"
        )
    cfg = validate_config(read_yaml_mapping(directory / CONFIG_FILE), str(directory / CONFIG_FILE))
    state, meta = load_weights(weights, device)
    shape = tuple(
        int(d) for d in meta.get("image_shape", ",".join(map(str, IMAGE_SHAPE))).split(",")
    )
    model = ConvVAE(cfg.model, shape)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise ExportError(f"{weights}: weights do not match {CONFIG_FILE} ({detail})") from None
    return model.to(device).eval(), cfg


def load_weights(
    path: Path, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, header metadata) of a safetensors file, refused if unreadable or if its tensors
    do not match the checksum save_weights put in its header."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(path, device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ExportError(f"{path}: unreadable weights ({exc})") from None
    if "sha256" in meta and meta["sha256"] != weights_digest(state):
        raise ExportError(
            f"{path}: tensors do not match the checksum in the file's header (modified or "
            "corrupted after it was written)"
        )
    return state, meta


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_weights(model: ConvVAE, path: Path) -> None:
    """Weights as safetensors; the header's metadata holds the format, the image shape and a
    checksum of the tensors, so a file edited after it was written is refused on load."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {
        "format": FORMAT,
        "image_shape": ",".join(map(str, model.image_shape)),
        "sha256": weights_digest(state),
    }
    save_file(state, path, metadata=metadata)


def _model_card(cfg: Config, metrics: dict[str, Any]) -> str:
    m = cfg.model
    lines = [
        "# ConvVAE exported by raytrain_vae",
        "",
        f"Dataset: {cfg.data.dataset} ({cfg.data.binarize} binarization), "
        f"likelihood {m.likelihood}, latent_dim {m.latent_dim}, channels {m.channels}, "
        f"kernel {m.kernel_size}, hidden {m.hidden_dim}.",
        f"Trained {metrics.get('epoch', '?')} epochs, batch {cfg.train.batch_size}, "
        f"lr {cfg.train.lr:g}, beta {cfg.train.beta:g}.",
        "",
        "| metric (nats per image, beta = 1) | value |",
        "|---|---|",
    ]
    for key in ("val_neg_elbo", "val_recon", "val_kl", "val_bits_per_dim"):
        if key in metrics:
            lines.append(f"| {key} | {metrics[key]:.4f} |")
    lines += [
        "",
        "Files: `model.safetensors` (weights), `config.yaml` (the resolved training config), "
        "`metrics.json`, `samples.png`, `reconstructions.png` (test images above their "
        "reconstructions).",
        "",
        "```python",
        "from raytrain_vae.export import load_model",
        "model = load_model('.')          # no pickle is loaded",
        "images = model.sample(16)        # (16, 1, 28, 28) in [0, 1]",
        "```",
        "",
    ]
    return "\n".join(lines)


def export_model(
    checkpoint_dir: str | Path, export_dir: str | Path, extra_metrics: dict | None = None
) -> Path:
    """Write a model directory from a training checkpoint, replacing export_dir atomically.

    Everything is written into a temporary sibling first; an existing export is swapped out
    only once the new one is complete, so export_dir is never half-written."""
    model, cfg = load_export(checkpoint_dir)
    metrics = json.loads((Path(checkpoint_dir) / METRICS_FILE).read_text())
    metrics.update(extra_metrics or {})
    export_dir = Path(export_dir)
    try:
        export_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{export_dir.name}.tmp-", dir=export_dir.parent))
    except OSError as exc:
        raise ExportError(
            f"export.dir {export_dir}: not writable ({exc.strerror or exc})"
        ) from None
    try:
        save_weights(model, tmp / MODEL_FILE)
        (tmp / CONFIG_FILE).write_text(dump_config(cfg))
        (tmp / METRICS_FILE).write_text(json.dumps(metrics, indent=1))
        sample_grid(model, tmp / SAMPLES_PNG, n=cfg.export.num_samples)
        test = load_splits(cfg.data).test[: cfg.export.num_reconstructions]
        reconstruction_grid(model, to_model_input(test, False), tmp / RECONSTRUCTIONS_PNG)
        (tmp / CARD_FILE).write_text(_model_card(cfg, metrics))
        _apply_umask(tmp)
        _swap_in(tmp, export_dir)
    except OSError as exc:  # disk full, quota, permissions: the previous export is untouched
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(f"cannot write export to {export_dir}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return export_dir


def _apply_umask(folder: Path) -> None:
    # mkdtemp makes a private 0700 folder; an export is meant to be shared like any output.
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def _swap_in(new: Path, target: Path) -> None:
    if not target.exists():
        os.replace(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, old / target.name)
    try:
        os.replace(new, target)
    except OSError:
        os.replace(old / target.name, target)  # put the previous export back
        raise
    shutil.rmtree(old, ignore_errors=True)
