"""Training checkpoints: the loop's state, save and load, and the same-model and resume checks."""

from __future__ import annotations

import json
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from raytrain_vae.config import (
    Config,
    ConfigError,
    is_uri,
    read_yaml_mapping,
    validate_config,
)
from raytrain_vae.model_io import (
    CONFIG_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    STATE_FILE,
    ModelFileError,
    load_weights,
    save_model_dir,
)
from raytrain_vae.models import VAE


class CheckpointError(ModelFileError):
    """A training checkpoint that cannot be resumed from."""


@dataclass
class TrainState:
    """Where a run is: epochs done, optimizer steps taken, and every finished epoch's metrics."""

    epoch: int = 0
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> TrainState:
        raw = json.loads(text)
        return cls(epoch=int(raw["epoch"]), step=int(raw["step"]), history=list(raw["history"]))


def save_checkpoint(
    folder: Path, model: VAE, optimizer: torch.optim.Optimizer, state: TrainState, cfg: Config
) -> None:
    """Model dir (weights, config, last epoch's metrics) plus optimizer and loop state."""
    save_model_dir(model, cfg, folder, state.history[-1])
    torch.save(optimizer.state_dict(), folder / OPTIMIZER_FILE)
    (folder / STATE_FILE).write_text(state.to_json())


def load_checkpoint(
    folder: Path,
    model: VAE,
    optimizer: torch.optim.Optimizer,
    cfg: Config,
    device: torch.device,
) -> TrainState:
    """Restore model and optimizer in place from folder; the state to continue from."""
    check_same_model(folder, cfg)
    model.load_state_dict(load_weights(folder / MODEL_FILE, device)[0])
    # weights_only: a checkpoint is data, never code to unpickle.
    try:
        optimizer_state = torch.load(
            folder / OPTIMIZER_FILE, map_location=device, weights_only=True
        )
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{folder / OPTIMIZER_FILE}: refused, not a plain tensor state ({first})"
        ) from None
    optimizer.load_state_dict(optimizer_state)
    return read_state(folder)


def read_state(folder: Path) -> TrainState:
    """The loop state a checkpoint folder holds."""
    return TrainState.from_json((folder / STATE_FILE).read_text())


def check_same_model(folder: Path, cfg: Config) -> None:
    """Refuse to continue a checkpoint of another model under the same run.name."""
    saved = validate_config(read_yaml_mapping(folder / CONFIG_FILE), f"{folder / CONFIG_FILE}")
    if saved.model != cfg.model:
        raise ConfigError(
            f"run.name={cfg.run.name!r} already holds a checkpoint of another model "
            f"({saved.model.model_dump()}); choose a new run.name"
        )


def check_resumable(cfg: Config) -> None:
    """Refuse, before Ray starts, to resume run.name from local checkpoints of another model or
    with weights that fail their checksum (workers check again, e.g. on URI storage)."""
    if is_uri(cfg.resolved_storage_path()):
        return
    for folder in sorted(Path(cfg.run_folder()).glob("checkpoint_*")):
        if (folder / CONFIG_FILE).is_file():
            check_same_model(folder, cfg)
            load_weights(folder / MODEL_FILE)
