"""Reading config YAML safely, and key.sub=value overrides; load_config puts them together."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from raytrain_vae.config.base import (
    CONFIG_MAX_BYTES,
    YAML_MAX_DEPTH,
    YAML_MAX_VALUES,
    ConfigError,
    clip,
    short,
)
from raytrain_vae.config.schema import Config, is_config_key, validate_config


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=3e-4' -> (['train', 'lr'], 3e-4); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {short(text)}: expected key.sub=value")
    path = key.strip().split(".")
    value = parse_yaml(raw, f"override {clip(key.strip())}") if raw.strip() else None
    return path, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of the raw config mapping with each key.sub=value override set."""
    raw = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        if not is_config_key(path):
            raise ConfigError(f"override {clip('.'.join(path))}: unknown key")
        set_dotted(raw, path, value)
    return raw


def set_dotted(raw: dict[str, Any], path: list[str], value: Any) -> None:
    """Set raw[a][b]... = value in place, creating missing sections."""
    node = raw
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[path[-1]] = value


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML file that must hold a mapping (an empty file is an empty mapping)."""
    if "\0" in str(path):
        raise ConfigError(f"{short(str(path))}: a config path cannot contain a NUL byte")
    path = Path(path)
    try:
        # Checked before reading: a FIFO would block, /dev/zero would never end.
        if path.is_dir():
            raise ConfigError(f"{path}: is a folder, not a config file")
        if path.exists() and not path.is_file():
            raise ConfigError(f"{path}: not a regular file")
        if path.exists() and path.stat().st_size > CONFIG_MAX_BYTES:
            raise ConfigError(f"{path}: larger than {CONFIG_MAX_BYTES // 2**20} MiB")
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a YAML text file (byte {exc.start} is not UTF-8)") from None
    raw = parse_yaml(text, str(path))
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: top level must be a mapping of sections, not {type(raw).__name__}"
        )
    return raw


def parse_yaml(text: str, source: str) -> Any:
    """One YAML document, refused with one line if malformed, nested too deeply or expanding
    (through aliases) beyond YAML_MAX_VALUES values."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        problem = getattr(exc, "problem", None) or getattr(exc, "reason", None) or "syntax error"
        raise ConfigError(f"{source}: malformed YAML{line}: {clip(str(problem))}") from None
    except RecursionError:
        raise ConfigError(f"{source}: YAML nested deeper than {YAML_MAX_DEPTH} levels") from None
    _check_size(value, source)
    return value


def _check_size(value: Any, source: str) -> None:
    # Walks the value as Python sees it, shared (aliased) parts counted each time they appear:
    # a small file of nested aliases otherwise expands to billions of values downstream.
    stack, seen = [(value, 1)], 0
    while stack:
        node, depth = stack.pop()
        seen += 1
        if seen > YAML_MAX_VALUES:
            raise ConfigError(
                f"{source}: YAML expands to more than {YAML_MAX_VALUES} values (aliases?)"
            )
        if depth > YAML_MAX_DEPTH:
            raise ConfigError(f"{source}: YAML nested deeper than {YAML_MAX_DEPTH} levels")
        if isinstance(node, dict):
            stack.extend((child, depth + 1) for pair in node.items() for child in pair)
        elif isinstance(node, list):
            stack.extend((child, depth + 1) for child in node)


def shipped_configs() -> dict[str, Path]:
    """The configs shipped in the package (configs/*.yaml), by name: quickstart, vae, ..."""
    folder = Path(__file__).resolve().parents[1] / "configs"
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def config_path(name: str | Path) -> Path:
    """A config file: the path given, or, for a bare name that is no file here (`quickstart`),
    the shipped config of that name."""
    path = Path(name)
    shipped = shipped_configs()
    if not path.exists() and str(name) in shipped:
        return shipped[str(name)]
    if not path.exists() and path.suffix not in (".yaml", ".yml") and len(path.parts) == 1:
        raise ConfigError(
            f"{short(str(name))}: no such config file, and no shipped config of that name "
            f"(shipped: {', '.join(shipped)})"
        )
    return path


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (a path, or the name of a shipped one; None = all defaults) and apply
    key.sub=value overrides."""
    if path is not None:
        path = config_path(path)
    raw = read_yaml_mapping(path) if path is not None else {}
    raw = apply_overrides(raw, overrides or [])
    source = str(path) if path is not None else "defaults"
    if overrides:
        source += " (with overrides)"
    return validate_config(raw, source)
