"""The config's foundations: user errors, numeric limits, the strict section base, path values."""

from __future__ import annotations

import reprlib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict


class UserError(Exception):
    """Bad input from the user: reported as one line on stderr with exit status 2."""


class ConfigError(UserError):
    """A config file or override that cannot be turned into a valid Config."""


# Seeds go to torch.manual_seed, which takes 64-bit integers; derived seeds wrap at 2**63.
SEED_LIMIT = 2**63
# numpy's RandomState, under Optuna's samplers, takes seeds below 2**32.
OPTUNA_SEED_LIMIT = 2**32
# Layer widths and counts beyond this cannot be allocated anywhere; smaller ones that still do
# not fit are refused by the memory estimate before Ray starts.
WIDTH_LIMIT = 2**20
# A config document may expand (through YAML aliases) to at most this many values, this deep.
YAML_MAX_VALUES = 100_000
YAML_MAX_DEPTH = 50
CONFIG_MAX_BYTES = 2**20


def stream_seed(value: int) -> int:
    """A seed derived from others (seed * prime + epoch ...), wrapped to what torch accepts."""
    return value % SEED_LIMIT


class Section(BaseModel):
    """A config section: unknown keys refused, values checked again on assignment."""

    # NaN and infinity pass every numeric bound (nan > 0 is false, but so is nan <= 0): refuse
    # them outright; no key takes them.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def is_uri(path: str) -> bool:
    """Whether a storage path is a URI for pyarrow (s3://, gs://, file://) rather than local."""
    return "://" in path


def child_path(base: str, *names: str) -> str:
    """`base/names...`, local or URI. A URI's query (`?endpoint_override=host`) stays at its end:
    the names go into its path."""
    if not is_uri(base):
        return base.rstrip("/") + "/" + "/".join(names)
    parts = urlsplit(base)
    return urlunsplit(parts._replace(path="/".join([parts.path.rstrip("/"), *names])))


def local_or_uri_path(value: str) -> str:
    """Validator of a path key: non-empty, no NUL byte, and ~user known when local."""
    if not value.strip():
        raise ValueError("must not be empty")
    if "\0" in value:
        raise ValueError("must not contain a NUL byte")
    if not is_uri(value):
        try:
            Path(value).expanduser()
        except RuntimeError:  # ~someone who has no home here
            raise ValueError(f"cannot expand {value[:60]!r}: no such user") from None
    return value


def short(value: Any, limit: int = 60) -> str:
    """repr of a value cut to `limit` characters: an error line must stay one readable line."""
    shortener = reprlib.Repr()
    shortener.maxlevel, shortener.maxstring, shortener.maxother = 2, limit, limit
    text = shortener.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def clip(text: str, limit: int = 80) -> str:
    """Text cut to `limit` characters, control characters escaped: user input quoted in one
    error line."""
    if not text.isprintable():
        text = repr(text)[1:-1]
    return text if len(text) <= limit else text[: limit - 3] + "..."
