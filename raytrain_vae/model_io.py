"""Model files at the bottom of the stack: checksummed safetensors weights and model directories.

A model directory (an export, or a training checkpoint) holds the weights and the resolved
config.yaml, and loads without unpickling anything, from a local path or a URI (s3://, gs://)."""

from __future__ import annotations

import hashlib
import json
import re
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file

from raytrain_vae.config import (
    Config,
    UserError,
    child_path,
    dump_config,
    is_uri,
    read_yaml_mapping,
    validate_config,
)
from raytrain_vae.models import VAE, build_model
from raytrain_vae.models.sizing import check_fits_memory, training_memory_bytes
from raytrain_vae.storage import file_names_under, read_bytes

# The files of a model directory, and of a training checkpoint (which adds the last three).
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"
FORMAT = "raytrain_vae.convvae/2"
# Format /1 (written until format /2 replaced it) checksums the tensors only; such files still
# load when that checksum matches and their metadata parses strictly. Relabelling a /2 file as
# /1 gains nothing: its stored checksum (over tensors and metadata) then fails the /1 check, and
# whoever can recompute a /1 checksum can recompute a /2 one as well.
FORMAT_V1 = "raytrain_vae.convvae/1"
_METADATA_KEYS = frozenset({"format", "image_shape", "sha256"})
_MAX_SIDE = 65536
_MAX_DETAIL = 120  # characters of a library message or header value quoted in an error


class ModelFileError(UserError):
    """A model directory or weights file that is missing, incomplete, inconsistent or altered."""


def load_model_dir(directory: str | Path, device: str | torch.device = "cpu") -> tuple[VAE, Config]:
    """(model in eval mode, its resolved Config) from an export or a training checkpoint dir,
    local or at a URI: weights checked against their checksum, the architecture from
    config.yaml, no pickle."""
    if "\0" in str(directory):
        raise ModelFileError("model directory: a path cannot contain a NUL byte")
    if is_uri(str(directory)):
        with model_dir_from_files(model_files(str(directory)), str(directory)) as local:
            return load_model_dir(local, device)
    directory = Path(directory)
    weights = directory / MODEL_FILE
    if not directory.is_dir():
        missing = (
            "a file, not a model directory" if directory.exists() else "no such model directory"
        )
        raise ModelFileError(f"{directory}: {missing}")
    if not weights.is_file() or not (directory / CONFIG_FILE).is_file():
        raise ModelFileError(f"{directory}: {not_a_model_reason(directory)}")
    cfg = validate_config(read_yaml_mapping(directory / CONFIG_FILE), str(directory / CONFIG_FILE))
    state, meta = load_weights(weights, device)
    shape = image_shape_of(meta)
    # Sized on the meta device first: a header may name any image size.
    check_fits_memory(training_memory_bytes(cfg.model, shape, 1), f"{weights}", "not a model")
    model = build_model(cfg.model, shape)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise ModelFileError(f"{weights}: weights do not match {CONFIG_FILE} ({detail})") from None
    return model.to(device).eval(), cfg


def not_a_model_reason(directory: Path) -> str:
    """Why a folder is no model, naming the newest checkpoint when it is a training run's folder
    (users pass the run folder, or glob checkpoint_* and catch Ray's snapshot file)."""
    checkpoints = sorted(p for p in directory.glob("checkpoint_*") if (p / MODEL_FILE).is_file())
    if checkpoints:  # Ray Train names them checkpoint_<timestamp>: by name is by age
        newest = checkpoints[-1]
        return f"a training run's folder; pass one of its checkpoints (the newest: {newest})"
    return f"not a model directory (needs {MODEL_FILE} and {CONFIG_FILE})"


def load_weights(
    path: Path, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, header metadata) of a weights file save_weights wrote, checked before use.

    Refused with one line (ModelFileError) unless the file reads as safetensors, its header holds
    exactly format, image_shape and sha256, the format is known, the checksum matches (format
    /2: tensors and metadata; /1: tensors only) and image_shape is C,H,W (see image_shape_of)."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
        if stat.S_ISDIR(mode):
            raise _refusal(path, "unreadable weights (a directory, not a file)")
        if not stat.S_ISREG(mode):  # e.g. a FIFO, whose read would block
            raise _refusal(path, "unreadable weights (not a regular file)")
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            names = f.keys()  # a safe_open handle is not iterable
            state = {name: f.get_tensor(name) for name in names}
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise _refusal(path, f"unreadable weights ({_clip(detail)})") from None
    if "sha256" not in meta:
        raise _refusal(path, "no checksum (sha256) in the weights header: refusing to load them")
    fmt = meta.get("format")
    if fmt not in (FORMAT, FORMAT_V1):
        raise _refusal(
            path,
            f"unknown weights format {_clip(repr(fmt))} (this version reads {FORMAT} and "
            f"{FORMAT_V1})",
        )
    try:  # format /1: the checksum covers the tensors only
        digest = weights_digest(state, meta if fmt == FORMAT else None)
    except (RuntimeError, TypeError, ValueError) as exc:  # a dtype torch cannot view as bytes
        raise _refusal(path, f"unreadable weights ({_clip(exc)})") from None
    if meta["sha256"] != digest:
        what = "tensors" if fmt == FORMAT_V1 else "tensors or header"
        raise _refusal(
            path,
            f"{what} do not match the checksum in the file's header (modified or corrupted "
            "after it was written)",
        )
    unknown = sorted(set(meta) - _METADATA_KEYS)
    if unknown:
        raise _refusal(path, f"unknown keys in the weights header: {_clip(', '.join(unknown))}")
    try:
        _parse_image_shape(meta.get("image_shape"))
    except ValueError as exc:
        raise _refusal(path, str(exc)) from None
    if torch.device(device) != torch.device("cpu"):
        state = {name: t.to(device) for name, t in state.items()}
    return state, meta


def image_shape_of(meta: dict[str, str]) -> tuple[int, int, int]:
    """(C, H, W) of the image_shape in metadata load_weights returned (and so already checked)."""
    try:
        return _parse_image_shape(meta.get("image_shape"))
    except ValueError as exc:
        raise ModelFileError(str(exc)) from None


def _parse_image_shape(value: object) -> tuple[int, int, int]:
    # Exactly as save_weights writes it: ASCII digits, no sign, space or leading zero.
    if isinstance(value, str) and re.fullmatch(r"[1-9][0-9]{0,5}(,[1-9][0-9]{0,5}){2}", value):
        c, h, w = (int(d) for d in value.split(","))
        if c in (1, 3) and h <= _MAX_SIDE and w <= _MAX_SIDE:
            return c, h, w
    raise ValueError(
        f"image_shape {_clip(repr(value))} in the weights header is not C,H,W (C 1 or 3, "
        f"H and W 1 to {_MAX_SIDE})"
    )


def weights_digest(state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """SHA-256 of a weights file's contents, as hex: with metadata (format /2), first the metadata
    less sha256 as canonical JSON (sorted keys, ASCII) and a newline; then (and, without metadata,
    only: format /1) every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    if metadata is not None:
        covered = {k: v for k, v in metadata.items() if k != "sha256"}
        text = json.dumps(covered, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
        h.update(text.encode("ascii") + b"\n")
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_weights(model: VAE, path: Path) -> None:
    """Weights as safetensors; the header's metadata holds the format, the image shape and a
    checksum of the tensors and that metadata, so a file edited after it was written (without
    recomputing the checksum) is refused on load."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {"format": FORMAT, "image_shape": ",".join(map(str, model.image_shape))}
    metadata["sha256"] = weights_digest(state, metadata)
    save_file(state, path, metadata=metadata)


def _clip(detail: object) -> str:
    """A library message or header value, cut short and printable (_refusal makes it one line)."""
    text = str(detail).encode("utf-8", "backslashreplace").decode("utf-8")  # lone surrogates
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 3] + "..."


def _refusal(path: Path, what: str) -> ModelFileError:
    """The one-line error for weights at path (line breaks in a quoted value become spaces)."""
    return ModelFileError(" ".join(f"{path}: {what}".splitlines()))


def save_model_dir(model: VAE, cfg: Config, folder: Path, metrics: dict[str, Any]) -> None:
    """Write weights, the resolved config and metrics into folder (a staged or temporary one:
    the caller makes it appear atomically)."""
    save_weights(model, folder / MODEL_FILE)
    (folder / CONFIG_FILE).write_text(dump_config(cfg))
    (folder / METRICS_FILE).write_text(json.dumps(metrics, indent=1))


# The files a model directory needs to load (the first two) or describe itself (the last).
MODEL_DIR_FILES = (MODEL_FILE, CONFIG_FILE, METRICS_FILE)


def model_files(location: str | Path) -> dict[str, bytes]:
    """The model directory's weights, config and (when present) metrics, read from a local path
    or a URI: what a Ray actor on any node needs to load the model (the optimizer state and
    history of a training checkpoint are left). Raises ModelFileError naming the location."""
    location = str(location)
    if not is_uri(location):
        folder = Path(location)
        if not folder.is_dir() or not all((folder / n).is_file() for n in MODEL_DIR_FILES[:2]):
            load_model_dir(folder)  # raises the local loader's error line
        return {n: (folder / n).read_bytes() for n in MODEL_DIR_FILES if (folder / n).is_file()}
    names = file_names_under(location)
    if names is None:
        raise ModelFileError(f"{location}: no such model directory")
    if not set(MODEL_DIR_FILES[:2]) <= set(names):
        raise ModelFileError(f"{location}: {_remote_not_a_model_reason(location, names)}")
    return {n: read_bytes(child_path(location, n)) for n in MODEL_DIR_FILES if n in names}


def _remote_not_a_model_reason(location: str, names: list[str]) -> str:
    """not_a_model_reason for a folder at a URI, from the names of the files below it."""
    runs = sorted(
        {n.split("/")[0] for n in names if re.fullmatch(rf"checkpoint_[^/]+/{MODEL_FILE}", n)}
    )
    if runs:
        newest = child_path(location, runs[-1])
        return f"a training run's folder; pass one of its checkpoints (the newest: {newest})"
    return f"not a model directory (needs {MODEL_FILE} and {CONFIG_FILE})"


@contextmanager
def model_dir_from_files(files: dict[str, bytes], shown_as: str) -> Iterator[Path]:
    """A temporary local model directory holding `files` (model_files' result), removed after.
    Errors raised inside name `shown_as` (where the files came from), not the temporary copy."""
    with tempfile.TemporaryDirectory(prefix="raytrain_vae-model-") as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        try:
            yield Path(tmp)
        except UserError as exc:
            raise type(exc)(str(exc).replace(tmp, shown_as.rstrip("/"))) from None
