"""The YAML search space: parsed and checked before Ray starts, mapped to Optuna distributions."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from typing import Any

import optuna

from raytrain_vae.config import Config, ConfigError, is_config_key, set_dotted, validate_config
from raytrain_vae.data import IMAGE_SHAPE
from raytrain_vae.model import ConvVAE

KINDS = ("choice", "uniform", "loguniform", "randint", "quniform", "qloguniform")
SEARCHABLE_SECTIONS = ("data", "model", "train", "scaling")
_SCALARS = (bool, int, float, str, type(None))


@dataclass(frozen=True)
class Param:
    """One searched config key: its distribution, and how a sampled value maps back."""

    path: str
    kind: str
    args: tuple

    def distribution(self) -> optuna.distributions.BaseDistribution:
        if self.kind == "choice":
            return optuna.distributions.CategoricalDistribution(
                [v if isinstance(v, _SCALARS) else _label(v) for v in self.args]
            )
        if self.kind == "randint":
            low, high = self.args
            return optuna.distributions.IntDistribution(low, high - 1)  # high exclusive, as Tune
        low, high = self.args[:2]
        if self.kind == "quniform":
            return optuna.distributions.FloatDistribution(low, high, step=self.args[2])
        # Optuna has no quantised log scale: qloguniform samples log-uniformly, then rounds.
        return optuna.distributions.FloatDistribution(low, high, log=self.kind != "uniform")

    def decode(self, value: Any) -> Any:
        """Optuna's value -> the config value (labels back to lists, q-rounding applied)."""
        if self.kind == "choice":
            labels = {(v if isinstance(v, _SCALARS) else _label(v)): v for v in self.args}
            return labels[value]
        if self.kind == "qloguniform":
            q = self.args[2]
            return min(max(round(value / q) * q, self.args[0]), self.args[1])
        return value


def _label(value: Any) -> str:
    return json.dumps(value)


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _yaml_number(x: Any) -> Any:
    # PyYAML reads 1e-4 or 3.0e10 (no dot, or no exponent sign) as strings, not floats.
    if isinstance(x, str):
        try:
            return float(x)
        except ValueError:
            return x
    return x


def _check_args(path: str, kind: str, args: Any) -> tuple:
    where = f"search.space.{path}: {kind}"
    if kind != "choice" and isinstance(args, list):
        args = [_yaml_number(a) for a in args]
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where} needs a non-empty list of values")
        labels = [_label(v) for v in args]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"{where} lists a value twice")
        return tuple(args)
    n = 3 if kind.startswith("q") else 2
    names = "[low, high, q]" if n == 3 else "[low, high]"
    if not isinstance(args, list) or len(args) != n or not all(_number(a) for a in args):
        raise ConfigError(f"{where} needs {names} as numbers (got {args!r})")
    low, high = args[:2]
    if low >= high:
        raise ConfigError(f"{where}: low must be < high (got low={low}, high={high})")
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        raise ConfigError(f"{where} needs integer bounds (got {args!r})")
    if "log" in kind and low <= 0:
        raise ConfigError(f"{where}: low must be > 0 for a log scale (got {low})")
    if n == 3 and args[2] <= 0:
        raise ConfigError(f"{where}: q must be > 0 (got {args[2]})")
    return tuple(args)


def _samples(param: Param) -> list[Any]:
    """Values that stand for the whole range when checking them against the config schema: the
    ends, and one value off any grid (a float range on an integer key must fail here)."""
    if param.kind == "choice":
        return list(param.args)
    low, high = param.args[:2]
    if param.kind == "randint":
        return [low, high - 1]
    if param.kind == "quniform":
        q = param.args[2]
        return [low, low + q, low + math.floor((high - low) / q) * q]
    inner = low + 0.37 * (high - low)
    return [low, high, param.decode(inner)]


def parse_space(cfg: Config) -> list[Param]:
    """Check cfg.search.space against the config schema; every error names the key and reason."""
    params = []
    base = cfg.model_dump(mode="json")
    for path, spec in cfg.search.space.items():
        section = path.split(".")[0]
        if section not in SEARCHABLE_SECTIONS:
            raise ConfigError(
                f"search.space.{path}: only {', '.join(SEARCHABLE_SECTIONS)} keys can be searched"
            )
        if not is_config_key(path.split(".")):
            raise ConfigError(f"search.space.{path}: no such config key")
        if not isinstance(spec, dict) or len(spec) != 1:
            raise ConfigError(f"search.space.{path}: expected one of {{{', '.join(KINDS)}: ...}}")
        ((kind, args),) = spec.items()
        if kind not in KINDS:
            raise ConfigError(
                f"search.space.{path}: unknown type {kind!r}; use one of {', '.join(KINDS)}"
            )
        param = Param(path, kind, _check_args(path, kind, args))
        checked = []
        for value in _samples(param):
            try:
                cfg_with_value = with_override(base, path, value)
                if section == "model":
                    ConvVAE(cfg_with_value.model, IMAGE_SHAPE)  # e.g. too many layers for 28x28
            except ConfigError as exc:
                reason = str(exc).split(": ", 2)[-1]
                raise ConfigError(
                    f"search.space.{path}: {kind} value {value!r}: {reason}"
                ) from None
            checked.append(get_dotted(cfg_with_value.model_dump(mode="json"), path))
        if kind == "choice":
            # Choices as the config types them ("1e-3" -> 0.001), so every trial row agrees.
            param = Param(path, kind, _check_args(path, kind, checked))
        params.append(param)
    return params


def get_dotted(raw: dict, path: str) -> Any:
    for part in path.split("."):
        raw = raw[part]
    return raw


def with_override(raw: dict, path: str, value: Any) -> Config:
    """A validated Config: a copy of raw with one dotted key set to value."""
    raw = copy.deepcopy(raw)
    set_dotted(raw, path.split("."), value)
    return validate_config(raw, f"search.space.{path}")


def trial_config(base: Config, params: list[Param], sampled: dict[str, Any]) -> Config:
    """The config of one trial: the base config with every sampled value decoded and applied."""
    raw = base.model_dump(mode="json")
    for param in params:
        set_dotted(raw, param.path.split("."), param.decode(sampled[param.path]))
    return validate_config(raw, "trial config")
