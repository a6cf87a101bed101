"""Typed, validated run configuration: YAML file + dotted command-line overrides -> Config."""

from raytrain_vae.config.base import (
    CONFIG_MAX_BYTES,
    OPTUNA_SEED_LIMIT,
    SEED_LIMIT,
    WIDTH_LIMIT,
    YAML_MAX_DEPTH,
    YAML_MAX_VALUES,
    ConfigError,
    Section,
    UserError,
    child_path,
    is_uri,
    stream_seed,
)
from raytrain_vae.config.data_section import FILE_SOURCES, DataSection
from raytrain_vae.config.loading import (
    apply_overrides,
    load_config,
    parse_override,
    parse_yaml,
    read_yaml_mapping,
    set_dotted,
)
from raytrain_vae.config.schema import (
    Config,
    config_keys,
    dump_config,
    is_config_key,
    validate_config,
)
from raytrain_vae.config.search import (
    REPORTED_METRICS,
    AlgorithmSection,
    ExportSection,
    SchedulerSection,
    SearchSection,
)
from raytrain_vae.config.sections import (
    ModelSection,
    RunSection,
    ScalingSection,
    TrainSection,
)
from raytrain_vae.config.tracking import MlflowSection, TrackingSection, shown_uri

__all__ = [
    "CONFIG_MAX_BYTES",
    "FILE_SOURCES",
    "OPTUNA_SEED_LIMIT",
    "REPORTED_METRICS",
    "SEED_LIMIT",
    "WIDTH_LIMIT",
    "YAML_MAX_DEPTH",
    "YAML_MAX_VALUES",
    "AlgorithmSection",
    "Config",
    "ConfigError",
    "DataSection",
    "ExportSection",
    "MlflowSection",
    "ModelSection",
    "RunSection",
    "ScalingSection",
    "SchedulerSection",
    "SearchSection",
    "Section",
    "TrackingSection",
    "TrainSection",
    "UserError",
    "apply_overrides",
    "config_keys",
    "dump_config",
    "is_config_key",
    "child_path",
    "is_uri",
    "load_config",
    "parse_override",
    "parse_yaml",
    "read_yaml_mapping",
    "set_dotted",
    "shown_uri",
    "stream_seed",
    "validate_config",
]
