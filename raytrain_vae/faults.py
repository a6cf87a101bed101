"""Test-only fault injection: make rank 0 die once, so tests see Ray Train restart a run."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

# "<epoch>:<marker file>" makes rank 0 die (os._exit) once, at the start of that epoch, so
# tests can check that Ray Train restarts from the last checkpoint.
FAIL_ONCE_ENV = "RAYTRAIN_VAE_FAIL_ONCE_AT_EPOCH"


def fault_injector(rank: int) -> Callable[[int], None] | None:
    """Read FAIL_ONCE_ENV once, at start-up: None (the production path) unless a test set it."""
    spec = os.environ.get(FAIL_ONCE_ENV)
    if not spec or rank != 0:
        return None
    at, marker = spec.split(":", 1)

    def fail_once(epoch: int) -> None:
        if epoch == int(at) and not os.path.exists(marker):
            Path(marker).touch()
            os._exit(1)

    return fail_once
