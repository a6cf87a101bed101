"""Ray start-up, path preflight, and whether the cluster can hold a request (refuse or wait).

The private Ray names this package relies on are all here, each with a fallback and a test
(tests/test_runtime.py, tests/test_perf_fallbacks.py) that fails loudly when a Ray upgrade
removes it."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import ray
from ray.autoscaler.sdk import request_resources

from raytrain_vae.config import ConfigError, UserError, is_uri

POLL_S = 5.0
# Ray 2.60 logs every ray.train.report (with all its metrics) at INFO through a logger of this
# private module, named after its file, which LoggingConfig's "ray.train" level misses.
TRAIN_REPORT_MODULE = "ray.train.v2._internal.execution.context"
# Ray Data logs the traceback of an exception it does not wrap as a UserCodeException, through
# the loggers of these modules (named after them; the first is private); a batch job's CLI
# prints the error's one line instead.
RAY_DATA_ERROR_LOGGERS = (
    "ray.data._internal.execution.streaming_executor_state",
    "ray.data.exceptions",
)

# Ray Train logs the traceback of any exception from the training function, in the worker,
# through this private module's logger (named after it); for our UserError the driver prints
# the error's one line instead.
TRAIN_FN_ERROR_MODULE = "ray.train.v2._internal.util"

# Ray 2.60 warns on every start of an embedded cluster that it turned token authentication on
# (the README's security notes say it does, and to keep it on), through this private module's
# logger, named after it. A warning that authentication is off still shows.
AUTH_NOTICE_MODULE = "ray._private.authentication.authentication_token_setup"
AUTH_ON_NOTICE = "Token authentication is enabled for this Ray cluster"


class ResourceError(UserError):
    """A request for CPUs or GPUs the cluster does not hold and will not get."""


def init_ray() -> None:
    """Join the cluster named by RAY_ADDRESS, or start an embedded local Ray."""
    if not ray.is_initialized():
        if embedded():
            logging.getLogger(AUTH_NOTICE_MODULE).addFilter(skip_auth_on_notice)
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)


def skip_auth_on_notice(record: logging.LogRecord) -> bool:
    """A logging filter: False for Ray's notice that it turned token authentication on."""
    return not record.getMessage().startswith(AUTH_ON_NOTICE)


class UserErrorTraceback(logging.Filter):
    """Ray Train's log of a training function's traceback, while the exception being handled
    is our UserError (Ray logs it inside its except block): dropped, since the driver prints
    the error's one line; or, when Ray Train will restart the workers (run.max_failures),
    cut to one line, so that each attempt still says why it failed."""

    retried = False

    def filter(self, record: logging.LogRecord) -> bool:
        error = sys.exc_info()[1]
        if not isinstance(error, UserError):
            return True
        if not self.retried:
            return False
        record.msg, record.args, record.exc_info = f"Error in training function: {error}", (), None
        return True


USER_ERROR_TRACEBACK = UserErrorTraceback()


def quiet_user_error_tracebacks(retried: bool) -> None:
    """In a Ray Train worker: a UserError's traceback is left out (see UserErrorTraceback).
    Other exceptions keep theirs; if Ray renames the module, tracebacks just show."""
    USER_ERROR_TRACEBACK.retried = retried
    logger = logging.getLogger(TRAIN_FN_ERROR_MODULE)
    if USER_ERROR_TRACEBACK not in logger.filters:
        logger.addFilter(USER_ERROR_TRACEBACK)


def embedded() -> bool:
    """Whether this process runs its own local Ray (no RAY_ADDRESS): nothing can add nodes."""
    return not os.environ.get("RAY_ADDRESS")


def shortfall(need: dict[str, float], have: dict[str, float]) -> dict[str, float]:
    """The resources of `need` that `have` does not cover (a small tolerance for fractions)."""
    return {k: v for k, v in need.items() if v > 0 and v > have.get(k, 0.0) + 1e-9}


def describe(resources: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in sorted(resources.items())) or "nothing"


def autoscaler_limits() -> dict[str, float] | None:
    """What an autoscaler could grow the cluster to: {} when the cluster cannot grow (plain
    `ray start` nodes), the most it can hold when the autoscaler published that, None when it
    cannot be told (then we wait, bounded).

    Ray has no public API for this; both private reads live here, and tests/test_runtime.py
    fails loudly if a Ray upgrade removes them."""
    try:
        from ray._private.state import state
        from ray.experimental.internal_kv import _internal_kv_get
    except ImportError:
        return None
    try:
        limits = state.get_max_resources_from_cluster_config()  # autoscaler v2 (KubeRay ...)
        if limits:
            return {k: float(v) for k, v in limits.items()}
        status = _internal_kv_get("__autoscaling_status")  # written by the v1 monitor
        report = json.loads(status)["autoscaler_report"] if status else None
    except Exception:  # a private format that changed: fall back to the bounded wait
        return None
    mapping = (report or {}).get("node_type_mapping") or {}
    # Without an autoscaling config the monitor mirrors each node as its own type "node_<id>".
    if mapping and all(kind == f"node_{node}" for node, kind in mapping.items()):
        return {}
    return None


def total(bundles: list[dict[str, float]]) -> dict[str, float]:
    """The sum of resource bundles, e.g. one per worker."""
    summed: dict[str, float] = {}
    for bundle in bundles:
        for k, v in bundle.items():
            summed[k] = summed.get(k, 0.0) + v
    return summed


def require_resources(bundles: list[dict[str, float]], what: str, fix: str, wait_s: float) -> None:
    """Return once the cluster holds these bundles (e.g. one per worker: {"CPU": 1, "GPU": 1});
    otherwise fail at once where nothing can add nodes, or ask the autoscaler and wait up to
    wait_s seconds."""
    need = total(bundles)
    if not shortfall(need, ray.cluster_resources()):
        return
    _refuse_if_cannot_grow(need, what, fix)
    print(f"waiting up to {wait_s:g} s for the autoscaler: {what} needs {describe(need)}")
    request_resources(bundles=bundles)
    try:
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))
            if not shortfall(need, ray.cluster_resources()):
                return
            # A monitor that just started may not have said yet that it cannot scale.
            _refuse_if_cannot_grow(need, what, fix)
    finally:
        request_resources(bundles=[])  # withdraw the request either way
    have = _only(ray.cluster_resources(), need)
    raise ResourceError(
        f"waited {wait_s:g} s for the autoscaler to add {describe(need)} for {what}; "
        f"the cluster still has {describe(have)}; {fix}"
    )


def _refuse_if_cannot_grow(need: dict[str, float], what: str, fix: str) -> None:
    missing = shortfall(need, ray.cluster_resources())
    have = describe(_only(ray.cluster_resources(), need))
    line = f"{what} needs {describe(missing)}, but the cluster has {have}"
    limits = {} if embedded() else autoscaler_limits()
    if limits == {}:
        place = "this machine's Ray" if embedded() else "a cluster without an autoscaler"
        raise ResourceError(f"{line} ({place}); {fix}")
    if limits and shortfall(need, limits):
        raise ResourceError(f"{line}, and its autoscaler can add at most {describe(limits)}; {fix}")


def _only(have: dict[str, float], need: dict[str, float]) -> dict[str, float]:
    return {k: have.get(k, 0.0) for k in need if need[k] > 0}


def train_report_logger_name() -> str | None:
    """The name of the logger Ray Train reports through (its module's file), None if that
    module is gone (then its lines just show)."""
    try:
        spec = importlib.util.find_spec(TRAIN_REPORT_MODULE)
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None else None


def quiet_train_report_log(level: str) -> None:
    """Show Ray Train's per-report log lines only at run.log_level."""
    name = train_report_logger_name()
    if name:
        logging.getLogger(name).setLevel(level)


def check_writable(path: str, key: str) -> None:
    """A local folder we can write in, or create in the nearest existing folder above it; nothing
    is created here (URIs are left to pyarrow)."""
    if is_uri(path):
        return
    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ConfigError(f"{key} {path}: not writable ({folder} is not a folder)")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise ConfigError(f"{key} {path}: not writable ({exc.strerror or exc})") from None
