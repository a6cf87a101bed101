"""Shared command-line plumbing: config path + key.sub=value overrides; user errors -> exit 2."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from raytrain_vae.config import UserError


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the examples' line breaks and shows every flag's default (none when a
    flag has no default)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


CONFIG_HELP = """config sections (every key, its default and meaning: raytrain-vae config --schema):
  data      where images come from and how they are read (source, path, size, splits, ingest)
  model     the VAE (type, channels, latent_dim, likelihood, ...)
  train     the optimisation (epochs, batch_size, lr, beta, KL warm-up, free bits, seed)
  scaling   Ray Train workers (num_workers, use_gpu, cpus/gpus per worker)
  run       run name, storage_path (local or s3://), checkpoints kept, retries
  search    the search (metric, num_samples, algorithm, ASHA, space); tune only
  export    where and what the best model is exported; tune only
  tracking  MLflow (uri, experiment, register_as) and TensorBoard"""


def config_parser(
    prog: str, description: str | None, examples: str = "", config_optional: bool = False
) -> argparse.ArgumentParser:
    """An argparse parser taking a YAML config (path or shipped name; optional: the defaults)
    and any number of overrides; --help lists the config sections and the examples."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(description or "").strip() or None,
        epilog=f"{CONFIG_HELP}\n\n{examples}".strip(),
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "config",
        nargs="?" if config_optional else None,
        help="YAML config file, or the name of a shipped one (quickstart, vae, search, cifar10, "
        "image_folder, ...)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help="override a config value, e.g. train.lr=3e-4 model.channels=[32,64] "
        "data.path=s3://bucket/images",
    )
    return parser


class Progress:
    """Long work shown on stderr: 'evaluate: 2000/10000 images (410/s, about 20 s left)', at
    most every every_s seconds, and once at the end."""

    def __init__(self, what: str, total: int, unit: str, every_s: float = 5.0) -> None:
        self.what, self.total, self.unit, self.every_s = what, total, unit, every_s
        self.start = self.last = time.perf_counter()

    def __call__(self, done: int) -> None:
        now = time.perf_counter()
        if now - self.last < self.every_s and done < self.total:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        left = (self.total - done) / rate if rate > 0 else float("inf")
        eta = f", about {left:.0f} s left" if done < self.total else ""
        print(
            f"{self.what}: {done}/{self.total} {self.unit} ({rate:.0f}/s{eta})",
            file=sys.stderr,
            flush=True,
        )


JSON_HELP = "print the results as JSON on stdout; every other line goes to stderr"
MODEL_HELP = (
    "model directory (an export or a training checkpoint): a local path or a URI (s3://, gs://)"
)


@contextlib.contextmanager
def stdout_to_stderr(active: bool = True) -> Iterator[None]:
    """While active, whatever would reach stdout (our lines, Ray Tune's table, the worker logs
    Ray forwards, C libraries) goes to stderr, so that stdout holds only the JSON printed
    after it. Ray is stopped before leaving, or its late log lines would follow the JSON."""
    if not active:
        yield
        return
    sys.stdout.flush()
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        fd = None  # stdout is no file (pytest's capture): the Python-level redirect suffices
    saved = None
    try:
        if fd is not None:
            saved = os.dup(fd)
            os.dup2(sys.stderr.fileno(), fd)
        with contextlib.redirect_stdout(sys.stderr):
            try:
                yield
            finally:  # on failure too: Ray's late lines must not reach the real stdout
                stop_embedded_ray()
    finally:
        sys.stderr.flush()
        if saved is not None:
            os.dup2(saved, fd)
            os.close(saved)


def print_json(value: Any) -> None:
    """value as JSON on stdout; NaN and infinities (not JSON) as null."""
    print(json.dumps(json_safe(value), indent=1))


def json_safe(value: Any) -> Any:
    """value with non-finite floats as None and numpy/pandas scalars as Python ones."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


MAX_LINE = 300


def check_flag(flag: str, value: float | None, low: float, high: float) -> None:
    """Refuse a flag's value outside [low, high], NaN and infinity included (None = not given)."""
    if value is None:
        return
    if not (isinstance(value, int) or math.isfinite(value)) or not low <= value <= high:
        raise UserError(f"{flag} must be a number in [{low}, {high}] (got {value})")


BUG_LINE = (
    "error: this is a bug in raytrain_vae, not a problem with your input: please report it on "
    "the raytrain_vae issue tracker with the command you ran and the traceback above"
)


def expected_error(exc: BaseException) -> Exception | None:
    """The UserError (or OSError: disk full, permissions) behind an exception, looking through
    exception chains and Ray's wrappers (task errors, Ray Train worker failures)."""
    stack: list[BaseException | None] = [exc]
    seen: set[int] = set()
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        # Ray re-raises a task's exception as a subclass of both RayTaskError and its class,
        # whose message is a whole remote traceback: the original is its `cause`.
        cause = getattr(e, "cause", None)
        if isinstance(e, UserError | OSError) and not isinstance(cause, BaseException):
            return e  # type: ignore[return-value]
        stack += [e.__context__, e.__cause__, cause if isinstance(cause, BaseException) else None]
        failures = getattr(e, "worker_failures", None)  # ray.train.TrainingFailedError
        if isinstance(failures, dict):
            stack += list(failures.values())
    return None


def one_line(exc: Exception) -> str:
    """The error as one line of at most MAX_LINE characters."""
    if isinstance(exc, OSError) and not isinstance(exc, UserError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        text = f"{where}{exc.strerror}"
    else:
        # Our messages are one line; Ray Data appends its retry advice on further lines.
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    line = f"error: {text}"
    return line if len(line) <= MAX_LINE else line[: MAX_LINE - 3] + "..."


def run_cli(main: Callable[[], int]) -> int:
    """Run a CLI entry point: an expected failure (a UserError, or an OSError such as a full
    disk, also when raised inside a Ray task) becomes one line on stderr and exit status 2; an
    unexpected one keeps its traceback, plus a line saying it is a bug."""
    try:
        return main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `... | head` stopped reading: not an error worth a line
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as exc:
        expected = expected_error(exc)
        if expected is None:
            traceback.print_exc()
            print(BUG_LINE, file=sys.stderr)
            return 1
        stop_embedded_ray()
        print(one_line(expected), file=sys.stderr)
        return 2


def stop_embedded_ray() -> None:
    """Shut down the Ray this process started, if any, before the error line is printed: its
    workers' log lines (a Ray Data task's traceback) are forwarded late and would otherwise
    print after it, burying the one line that says what is wrong."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
