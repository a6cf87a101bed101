"""MLflow runs written from one background thread: a tracking server that is down or failing
never fails or slows the caller; what it could not send is retried, then named at the end."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from raytrain_vae.config import shown_uri
from raytrain_vae.mlflow_runs import PARAM_LIMIT, RunSpec, open_run

RETRY_MAX_S = 30.0
DOWN_GRACE_S = 3.0  # at close, a server that is down gets this long, not the whole timeout


def quiet_mlflow() -> None:
    """MLflow's client defaults suited to a background sender: no internal retries (we retry,
    without holding anything up), a bounded wait per request, no progress bars or INFO lines."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # "View run at"
    # tracking.mlflow.uri may name a folder: MLflow 3 keeps that store (in maintenance mode)
    # only when asked to.
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


@dataclasses.dataclass
class Op:
    """One call to MLflow for one run, and how to name it if it is never sent."""

    run: RunHandle
    what: str
    send: Callable[[Any, str], object]  # (client, run_id) -> result
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    result: object = None


class MlflowSink:
    """Calls to MLflow queued in order and sent by one daemon thread: the caller never waits."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._ops: deque[Op] = deque()
        self._wake = threading.Condition()
        self._closing = False
        self._deadline = float("inf")
        self._warned = False
        quiet_mlflow()
        self._thread = threading.Thread(target=self._send_all, name="mlflow-sink", daemon=True)
        self._thread.start()

    def open_run(self, spec: RunSpec) -> RunHandle:
        """A run, found again by its key or created, before anything is sent to it."""
        run = RunHandle(self, spec)
        self.queue(run, "start", lambda c, r: None)
        return run

    def close(self, timeout_s: float) -> list[tuple[str, str]]:
        """Wait up to timeout_s for everything queued to be sent; what was not, as (run name,
        what), also named in one warning line."""
        with self._wake:
            self._closing = True
            if self._warned:  # down now: one more try, without holding the end of the run up
                timeout_s = min(timeout_s, DOWN_GRACE_S)
            self._deadline = time.monotonic() + timeout_s
            self._wake.notify_all()
        self._thread.join(timeout_s + 1.0)
        with self._wake:
            left = [(op.run.spec.name, op.what) for op in self._ops]
            self._ops.clear()
        if left:
            warn(
                f"MLflow at {shown_uri(self.uri)}: not sent after {timeout_s:g} s: "
                f"{summarize(left)} (the run's own files keep every metric)"
            )
        return left

    def queue(self, run: RunHandle, what: str, send: Callable[[Any, str], object]) -> Op:
        op = Op(run, what, send)
        with self._wake:
            self._ops.append(op)
            self._wake.notify_all()
        return op

    def _send_all(self) -> None:
        client = None
        backoff = 1.0
        while True:
            with self._wake:
                while not self._ops and not self._closing:
                    self._wake.wait()
                if not self._ops or time.monotonic() > self._deadline:
                    return
                op = self._ops[0]
            try:
                client = client or self._client()
                op.result = self._send(client, op)
            except Exception as exc:  # noqa: BLE001 - tracking is never fatal
                if refused(exc):  # the server said no: sending again would not help
                    what = f"{op.what} of run {op.run.spec.name}"
                    warn(f"MLflow at {shown_uri(self.uri)} refused {what}: {first_line(exc)}")
                else:
                    self._down(exc)
                    with self._wake:
                        self._wake.wait(min(backoff, max(0.0, self._deadline - time.monotonic())))
                    backoff = min(2 * backoff, RETRY_MAX_S)
                    continue
            self._up()
            backoff = 1.0
            with self._wake:
                self._ops.popleft()
            op.done.set()

    def _client(self) -> Any:
        from mlflow import MlflowClient

        for name in ("mlflow", "alembic"):  # INFO lines (database set-up); set on import
            logging.getLogger(name).setLevel(logging.WARNING)
        return MlflowClient(self.uri)

    def _send(self, client: Any, op: Op) -> object:
        if op.run.run_id is None:
            op.run.run_id = open_run(client, op.run.spec, self.uri)
        return op.send(client, op.run.run_id)

    def _down(self, exc: Exception) -> None:
        if not self._warned:
            self._warned = True
            warn(
                f"MLflow at {shown_uri(self.uri)} failed ({first_line(exc)}); training goes on, "
                "and what it could not send is retried"
            )

    def _up(self) -> None:
        if self._warned:
            self._warned = False
            warn(f"MLflow at {shown_uri(self.uri)} answers again")


class RunHandle:
    """One MLflow run of a sink: each call queues and returns at once."""

    def __init__(self, sink: MlflowSink, spec: RunSpec) -> None:
        self.sink, self.spec = sink, spec
        self.run_id: str | None = None

    # MLflow is imported by the sending thread only: the caller never waits for its import.
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        values = {k: float(v) for k, v in metrics.items()}

        def send(client: Any, run_id: str) -> None:
            from mlflow.entities import Metric

            items = [Metric(k, v, now, step) for k, v in values.items()]
            client.log_batch(run_id, metrics=items)

        self.sink.queue(self, f"metrics of epoch {step}", send)

    def set_tags(self, tags: dict[str, str]) -> None:
        values = {k: str(v)[:PARAM_LIMIT] for k, v in tags.items()}

        def send(client: Any, run_id: str) -> None:
            from mlflow.entities import RunTag

            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in values.items()])

        self.sink.queue(self, "tags", send)

    def log_artifacts(self, folder: str | Path, artifact_path: str) -> None:
        """Send a copy of folder (the caller may delete it at once) under artifact_path."""
        copy = Path(tempfile.mkdtemp(prefix="raytrain_vae-mlflow-")) / artifact_path
        shutil.copytree(folder, copy)

        def send(client: Any, run_id: str) -> None:
            client.log_artifacts(run_id, str(copy), artifact_path)
            shutil.rmtree(copy.parent, ignore_errors=True)

        self.sink.queue(self, f"artifacts {artifact_path}/", send)

    def log_artifact(self, file: str | Path, artifact_path: str) -> None:
        """Send a copy of one file under artifact_path."""
        copy = Path(tempfile.mkdtemp(prefix="raytrain_vae-mlflow-")) / Path(file).name
        shutil.copyfile(file, copy)

        def send(client: Any, run_id: str) -> None:
            client.log_artifact(run_id, str(copy), artifact_path)
            shutil.rmtree(copy.parent, ignore_errors=True)

        self.sink.queue(self, f"artifact {artifact_path}/{copy.name}", send)

    def register(self, name: str, artifact_path: str) -> Op:
        """A new version of registered model `name` from this run's artifact_path; the Op's
        result is the version once sent."""

        def send(client: Any, run_id: str) -> object:
            from mlflow.exceptions import MlflowException

            with contextlib.suppress(MlflowException):  # it exists already
                client.create_registered_model(name)
            source = f"{client.get_run(run_id).info.artifact_uri}/{artifact_path}"
            return client.create_model_version(name, source, run_id=run_id)

        return self.sink.queue(self, f"registration as {name}", send)

    def finish(self, status: str = "FINISHED") -> None:
        self.sink.queue(self, f"status {status}", lambda c, r: c.set_terminated(r, status))


def refused(exc: Exception) -> bool:
    """Whether MLflow answered with a client error (bad value, changed param): permanent."""
    status = getattr(exc, "get_http_status_code", lambda: None)()
    return status is not None and 400 <= status < 500 and status != 429


def first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:160] if text else type(exc).__name__


def summarize(left: list[tuple[str, str]]) -> str:
    """Unsent items per run, in order, epochs as ranges: 'a: start, metrics of epochs 1-3,
    status FINISHED'."""
    runs: dict[str, list[str | list[int]]] = {}
    for run, what in left:
        items = runs.setdefault(run, [])
        if what.startswith("metrics of epoch "):
            if not items or not isinstance(items[-1], list):
                items.append([])
            items[-1].append(int(what.removeprefix("metrics of epoch ")))
        else:
            items.append(what)
    shown = lambda item: item if isinstance(item, str) else f"metrics of epochs {ranges(item)}"  # noqa: E731
    return "; ".join(f"{run}: {', '.join(map(shown, items))}" for run, items in runs.items())


def ranges(numbers: list[int]) -> str:
    """1, 2, 3, 5 -> '1-3, 5'."""
    spans: list[list[int]] = []
    for n in sorted(set(numbers)):
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def warn(line: str) -> None:
    print(f"warning: {line}", file=sys.stderr, flush=True)
