"""The YAML search space: parsed and checked before Ray starts, mapped to Optuna distributions."""

from __future__ import annotations

import copy
import itertools
import json
import math
from dataclasses import dataclass
from typing import Any

import optuna

from raytrain_vae.config import Config, ConfigError, is_config_key, set_dotted, validate_config
from raytrain_vae.data import check_split_fits, image_shape
from raytrain_vae.models.sizing import check_trainable

KINDS = ("choice", "uniform", "loguniform", "randint", "quniform", "qloguniform")
SEARCHABLE_SECTIONS = ("data", "model", "train", "scaling")
_SCALARS = (bool, int, float, str, type(None))
# Spaces with more combinations of their parameters' extremes than this are checked one
# parameter at a time (each combination builds a model on the meta device: about 2 ms).
MAX_COMBINATIONS = 256


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


def _parse_param(path: str, spec: Any) -> Param:
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
    return Param(path, kind, _check_args(path, kind, args))


def checked_config(raw: dict, values: dict[str, Any]) -> Config:
    """The config a trial with these values gets, put through every check a base config gets
    before Ray starts (schema, sizes, divisibility, the model's shape and memory)."""
    raw = copy.deepcopy(raw)
    for path, value in values.items():
        set_dotted(raw, path.split("."), value)
    cfg = validate_config(raw, "search.space")
    check_trainable(cfg, image_shape(cfg.data))
    check_split_fits(cfg)
    return cfg


def parse_space(cfg: Config) -> list[Param]:
    """Check cfg.search.space against the config schema; every error names the key and reason.

    Every choice and both ends of every range are checked alone; when the space is small enough,
    every combination of them too (batch 64 with 3 workers fails only together)."""
    params = []
    base = cfg.model_dump(mode="json")
    for path, spec in cfg.search.space.items():
        param = _parse_param(path, spec)
        checked = []
        for value in _samples(param):
            try:
                cfg_with_value = checked_config(base, {path: value})
            except ConfigError as exc:
                reason = str(exc).removeprefix("search.space: ")
                raise ConfigError(
                    f"search.space.{path}: {param.kind} value {value!r}: {reason}"
                ) from None
            checked.append(get_dotted(cfg_with_value.model_dump(mode="json"), path))
        if param.kind == "choice":
            # Choices as the config types them ("1e-3" -> 0.001), so every trial row agrees.
            param = Param(path, param.kind, _check_args(path, param.kind, checked))
        params.append(param)
    _check_combinations(base, params)
    return params


def sample_combinations(params: list[Param]) -> list[dict[str, Any]] | None:
    """Every combination of the values that stand for each parameter, or None when there are
    more than MAX_COMBINATIONS of them."""
    grids = [[(p.path, v) for v in _samples(p)] for p in params]
    if math.prod(len(g) for g in grids) > MAX_COMBINATIONS:
        return None
    return [dict(combo) for combo in itertools.product(*grids)]


def _check_combinations(base: dict, params: list[Param]) -> None:
    for values in sample_combinations(params) or []:
        try:
            checked_config(base, values)
        except ConfigError as exc:
            reason = str(exc).removeprefix("search.space: ")
            where = ", ".join(f"{k}={v!r}" for k, v in values.items())
            raise ConfigError(f"search.space: the trial {where}: {reason}") from None


def trial_configs(cfg: Config, params: list[Param]) -> list[Config]:
    """Configs that stand for the trials the space can propose: every combination of each
    parameter's extremes when that is small, else each parameter's extremes alone."""
    base = cfg.model_dump(mode="json")
    combos = sample_combinations(params)
    if combos is None:
        combos = [{p.path: v} for p in params for v in _samples(p)]
    return [checked_config(base, values) for values in combos] or [cfg]


def get_dotted(raw: dict, path: str) -> Any:
    for part in path.split("."):
        raw = raw[part]
    return raw


def trial_config(base: Config, params: list[Param], sampled: dict[str, Any]) -> Config:
    """The config of one trial: the base config with every sampled value decoded and applied."""
    raw = base.model_dump(mode="json")
    for param in params:
        set_dotted(raw, param.path.split("."), param.decode(sampled[param.path]))
    return validate_config(raw, "trial config")
