"""Config section of experiment tracking: MLflow (store or server, registry) and TensorBoard."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from raytrain_vae.config.base import Section, clip

MLFLOW_SCHEMES = ("sqlite", "http", "https", "file")
# A registered model's name: MLflow accepts more, but a name with '/' or ':' breaks models:/ URIs.
REGISTERED_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,199}$")


def check_mlflow_uri(uri: str) -> str:
    """A tracking URI we can use: sqlite:///path, file:///path or a plain folder, or an
    http(s)://host[:port][/path] server. The reason names what is wrong (never the secret)."""
    if not uri.strip() or "\0" in uri or not uri.isprintable():
        raise ValueError("must be a printable, non-empty URI")
    if "://" not in uri:
        return uri  # a local folder: MLflow's file store
    parts = urlsplit(uri)
    if parts.scheme not in MLFLOW_SCHEMES:
        raise ValueError(
            f"scheme {clip(parts.scheme, 20)!r} is not one of "
            "sqlite:///path, file:///path, http://host:port, https://host (or a local folder)"
        )
    if parts.scheme in ("http", "https"):
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"bad port in {shown_uri(uri)}") from None
        if not parts.hostname or (port is not None and not 0 < port < 65536):
            raise ValueError(f"no host in {shown_uri(uri)}")
        if parts.username or parts.password or parts.query:
            # The config is saved with every checkpoint and export: no secret belongs in it.
            raise ValueError(
                f"{shown_uri(uri)}: put credentials in MLFLOW_TRACKING_TOKEN or "
                "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD, not in the URI"
            )
    elif not parts.path or parts.path == "/":
        raise ValueError(f"{parts.scheme}: needs a path, as in {parts.scheme}:///mlflow.db")
    return uri


def shown_uri(uri: str) -> str:
    """The URI without user, password or query (where tokens hide): safe to print and log."""
    if "://" not in uri:
        return uri
    parts = urlsplit(uri)
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}"


def absolute_mlflow_uri(uri: str) -> str:
    """Local stores made absolute (sqlite:///mlflow.db, ./mlruns): Ray workers run in another
    working directory than the driver, where those would name other files."""
    if "://" not in uri:
        return Path(uri).expanduser().resolve().as_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).expanduser().resolve())
    return uri


class MlflowSection(Section):
    uri: str | None = Field(
        None,
        description="MLflow tracking URI: null (off), a local store (sqlite:///mlflow.db, or a "
        "folder), or a tracking server (http://host:5000, https://...). Credentials come from "
        "MLflow's own variables (MLFLOW_TRACKING_TOKEN, ...), never from here.",
    )
    experiment: str | None = Field(
        None, min_length=1, max_length=500, description="MLflow experiment; null = run.name."
    )
    register_as: str | None = Field(
        None,
        description="After a search, register the export as a new version of this model name "
        "(letters, digits, _ . -); null = no registration.",
    )

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str | None) -> str | None:
        # Absolute here, on the driver: Ray workers run in another working directory.
        return None if v is None else absolute_mlflow_uri(check_mlflow_uri(v))

    @field_validator("register_as")
    @classmethod
    def _register_as(cls, v: str | None) -> str | None:
        if v is not None and not REGISTERED_NAME.match(v):
            raise ValueError(
                f"{clip(v, 40)!r}: a model name is 1-200 letters, digits, '_', '.' or '-'"
            )
        return v


class TrackingSection(Section):
    mlflow: MlflowSection = Field(default_factory=MlflowSection)
    tensorboard: bool = Field(
        False,
        description="Write TensorBoard events under <storage_path>/<run.name>/tensorboard: "
        "per-epoch scalars, sample and reconstruction grids every epoch, the model graph.",
    )
