"""The whole Config, its cross-section checks, validation with one-line errors, and YAML dump."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from raytrain_vae.config.base import ConfigError, Section, child_path, clip, is_uri, short
from raytrain_vae.config.data_section import DataSection
from raytrain_vae.config.search import ExportSection, SearchSection
from raytrain_vae.config.sections import (
    ModelSection,
    RunSection,
    ScalingSection,
    TrainSection,
)
from raytrain_vae.config.tracking import TrackingSection


class Config(Section):
    """Everything a run or a search needs, one section per concern."""

    data: DataSection = Field(default_factory=DataSection)
    model: ModelSection = Field(default_factory=ModelSection)
    train: TrainSection = Field(default_factory=TrainSection)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    run: RunSection = Field(default_factory=RunSection)
    search: SearchSection = Field(default_factory=SearchSection)
    export: ExportSection = Field(default_factory=ExportSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)

    @model_validator(mode="after")
    def _batch_fits_workers(self) -> Config:
        workers, batch = self.scaling.num_workers, self.train.batch_size
        if batch % workers:
            raise ValueError(
                f"train.batch_size={batch} must be a multiple of scaling.num_workers={workers}"
            )
        if self.data.limit is not None:
            n_train, _ = self.data.split_sizes(self.data.limit)
            if n_train < workers:
                raise ValueError(
                    f"data.limit={self.data.limit} leaves {n_train} training image(s) after "
                    f"data.val_fraction, fewer than scaling.num_workers={workers}"
                )
        if self.tracking.mlflow.register_as and self.tracking.mlflow.uri is None:
            raise ValueError(
                "tracking.mlflow.register_as needs a registry: set tracking.mlflow.uri"
            )
        return self

    @property
    def tracked(self) -> bool:
        """Whether anything is tracked (MLflow or TensorBoard)."""
        return self.tracking.mlflow.uri is not None or self.tracking.tensorboard

    def resolved_storage_path(self) -> str:
        """storage_path with ~ expanded and local paths made absolute; URIs unchanged."""
        path = self.run.storage_path
        if is_uri(path):
            return path
        return str(Path(path).expanduser().resolve())

    def run_folder(self) -> str:
        """<storage_path>/<run.name>: where Ray Train keeps a training run (its checkpoints, and
        our TensorBoard events), or Ray Tune a search."""
        return child_path(self.resolved_storage_path(), self.run.name)

    def resolved_export_dir(self) -> Path:
        """export.dir, or <storage_path>/<run.name>/export for local storage."""
        if self.export.dir is not None:
            return Path(self.export.dir).expanduser().resolve()
        storage = self.resolved_storage_path()
        if is_uri(storage):
            raise ConfigError(
                "export.dir must be set (a local path) when run.storage_path is a URI"
            )
        return Path(self.run_folder()) / "export"


def _format_loc(loc: tuple[Any, ...]) -> str:
    return clip(".".join(str(part) for part in loc)) or "''"


def _validation_message(err: ValidationError) -> str:
    errors = err.errors()
    # A misspelt key is also a missing one: name the unknown key, the cause, first.
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif first["type"] not in {"missing", "value_error"}:
        # Our own validators already quote the value; pydantic's built-in checks do not.
        msg = f"{msg} (got {short(first['input'])})"
    loc = _format_loc(first["loc"])
    if not first["loc"] or msg.startswith(f"{loc}."):  # the message already names its keys
        return msg
    return f"{loc}: {msg}"


def is_config_key(path: list[str]) -> bool:
    """Whether a dotted path (split on dots) names a config key or section."""
    model: type[BaseModel] | None = Config
    for part in path:
        if model is None or part not in model.model_fields:
            return False
        annotation = model.model_fields[part].annotation
        model = (
            annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel)
            else None
        )
    return True


def config_keys(model: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """Every leaf key as (dotted key, default as YAML, description), in the schema's order."""
    rows = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows += config_keys(annotation, f"{prefix}{name}.")
            continue
        default = field.get_default(call_default_factory=True)
        shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...")
        rows.append((prefix + name, shown.strip(), field.description or ""))
    return rows


def validate_config(raw: dict[str, Any], source: str = "config") -> Config:
    """Validate a raw mapping; errors name the source, the dotted key and the reason."""
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_validation_message(exc)}") from None


def dump_config(cfg: Config) -> str:
    """The fully resolved config as YAML, every key present."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
