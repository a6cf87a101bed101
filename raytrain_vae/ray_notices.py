"""The notices Ray forwards from its own actors in every healthy run, which our drivers skip.

Ray's driver prints each line its workers and actors write; `RAY_DEDUP_LOGS_SKIP_REGEX` (Ray's
documented way to skip lines, read once when `ray` is first imported) drops the lines it
matches. These are Ray's own, and say nothing is wrong with the run:
- Ray Train's controller starts a `PreemptionWatcher` actor (restartable, with actor handles
  among its arguments) on every run of 2 or more workers, and Ray core logs at error level that
  such an actor's restart could fail (ray-project/ray#53727);
- the `PlacementGroupCleaner` of a Train run whose controller exits with the driver (the last
  trial of a search) logs that it cleans the run's placement group up, after our last line.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

SKIP_REGEX_VAR = "RAY_DEDUP_LOGS_SKIP_REGEX"
KNOWN_NOTICES = (
    r"Actor with class name: 'PreemptionWatcher' and ID: '\w+' has constructor arguments in "
    r"the object store and max_restarts > 0",
    r"Detected that the Ray Train controller actor \(\w+\) is dead\. Cleaning up placement "
    r"group",
)


def skip_regex(existing: str | None) -> str:
    """Ours, or ours and the user's own regex, which keeps skipping what it skipped."""
    ours = "|".join(f"(?:{notice})" for notice in KNOWN_NOTICES)
    if not existing:
        return ours
    return existing if ours in existing else f"(?:{existing})|{ours}"


def skip_known_ray_notices(environ: MutableMapping[str, str] = os.environ) -> None:
    """Set the skip regex, before `ray` is first imported (the package's import does it)."""
    environ[SKIP_REGEX_VAR] = skip_regex(environ.get(SKIP_REGEX_VAR))
