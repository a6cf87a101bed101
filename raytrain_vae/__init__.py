"""raytrain_vae: convolutional VAEs trained with Ray Train, searched with Ray Tune + Optuna.

The Python API (raytrain_vae.api), imported on first use so that `import raytrain_vae` stays
light: load_config, train, search, load_model, evaluate. Importing it sets the regex of Ray's
notices our drivers skip (raytrain_vae.ray_notices), which Ray reads when it is first imported."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from raytrain_vae.ray_notices import skip_known_ray_notices
from raytrain_vae.version import __version__

skip_known_ray_notices()

__all__ = [
    "SearchResult",
    "__version__",
    "evaluate",
    "load_config",
    "load_model",
    "search",
    "train",
]
API = frozenset(__all__) - {"__version__"}

if TYPE_CHECKING:
    from raytrain_vae.api import SearchResult, evaluate, load_config, load_model, search, train


def __getattr__(name: str) -> Any:
    if name in API:
        from raytrain_vae import api

        value = getattr(api, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'raytrain_vae' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *API})
