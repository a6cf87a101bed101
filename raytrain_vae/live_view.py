"""The search's live trial table: each trial's status, epoch, search metric(s) and sampled
parameters, the best trial first."""

from __future__ import annotations

import math
import time
from collections import Counter
from typing import TYPE_CHECKING

import pandas as pd
from ray.tune import ProgressReporter

if TYPE_CHECKING:
    from ray.tune.experiment import Trial

MAX_ROWS = 20  # the best trials; a search of hundreds would scroll the rest away anyway


class TrialTable(ProgressReporter):
    """Tune's progress reporter for a search: the table every `every_s` seconds and at the end,
    when it changed. Tune's own CLIReporter always adds each trial's node and process (`loc`),
    which tells a user nothing about the search."""

    def __init__(
        self,
        metrics: list[str],
        params: list[str],
        sort_by: tuple[str, str],
        total: int,
        every_s: float = 30.0,
    ) -> None:
        # The metric that ranks trials is shown too (a multi-objective search ranks by the
        # negative ELBO, a point on its front).
        self.metrics = metrics if sort_by[0] in metrics else [*metrics, sort_by[0]]
        self.params, self.sort_by, self.total, self.every_s = params, sort_by, total, every_s
        self._last_time = -math.inf
        self._last_text = ""

    def should_report(self, trials: list[Trial], done: bool = False) -> bool:
        return bool(trials) and (done or time.monotonic() - self._last_time >= self.every_s)

    def report(self, trials: list[Trial], done: bool, *sys_info: str) -> None:
        self._last_time = time.monotonic()
        text = self.text(trials)
        if text != self._last_text:  # a table as it was is not printed again
            self._last_text = text
            print(text, flush=True)

    def text(self, trials: list[Trial]) -> str:
        counts = Counter(t.status for t in trials)
        states = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        header = f"== trials: {len(trials)} of {self.total} ({states}) =="
        frame = self.frame(trials)
        lines = [header, frame.head(MAX_ROWS).to_string(index=False)]
        if len(frame) > MAX_ROWS:
            lines.append(f"... and {len(frame) - MAX_ROWS} more trials")
        return "\n".join(lines)

    def frame(self, trials: list[Trial]) -> pd.DataFrame:
        """One row per trial, best first (trials without a result last), values formatted."""
        columns = ["trial", "status", "epoch", *self.metrics, *self.params]
        # object columns: a parameter some trials lack must not turn the others' ints to floats
        frame = pd.DataFrame([self.row(t) for t in trials], columns=columns, dtype=object)
        metric, mode = self.sort_by
        rank = pd.to_numeric(frame[metric], errors="coerce")  # NaN (and no result) last
        frame = frame.loc[
            rank.sort_values(ascending=mode == "min", na_position="last", kind="stable").index
        ]
        for column in self.metrics:
            frame[column] = frame[column].map(_metric_text)
        for column in self.params:
            frame[column] = frame[column].map(_param_text)
        frame["epoch"] = frame["epoch"].map(lambda v: "-" if v is None else str(int(v)))
        return frame

    def row(self, trial: Trial) -> dict:
        result = trial.last_result or {}
        return {
            "trial": trial.trial_id,
            "status": trial.status,
            "epoch": result.get("epoch"),
            **{m: result.get(m) for m in self.metrics},
            **{p: trial.config.get(p) for p in self.params},
        }


def _metric_text(value: object) -> str:
    return "-" if value is None else f"{value:.3f}"  # a NaN shows as nan


def _param_text(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
