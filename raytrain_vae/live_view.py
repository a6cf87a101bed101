"""The search's live trial table: each trial's status, epoch, search metric(s) and sampled
parameters, the best trial first."""

from __future__ import annotations

import math
import time
from collections import Counter

import pandas as pd
from ray.tune import ProgressReporter
from ray.tune.experiment import Trial


class TrialTable(ProgressReporter):
    """Tune's progress reporter for a search: the table every `every_s` seconds and at the end,
    when it changed. Tune's own CLIReporter always adds each trial's node and
    process (`loc`), which tells a user nothing about the search."""

    def __init__(
        self,
        metrics: list[str],
        params: list[str],
        sort_by: tuple[str, str],
        total: int,
        every_s: float = 30.0,
    ) -> None:
        self.metrics, self.params, self.sort_by, self.total = metrics, params, sort_by, total
        self.every_s = every_s
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
        return f"{header}\n{self.frame(trials).to_string(index=False, na_rep='-')}"

    def frame(self, trials: list[Trial]) -> pd.DataFrame:
        """One row per trial, best first (trials without a result last), values formatted."""
        columns = ["trial", "status", "epoch", *self.metrics, *self.params]
        frame = pd.DataFrame([self.row(t) for t in trials], columns=columns)
        metric, mode = self.sort_by
        if metric in frame:
            frame = frame.sort_values(
                metric, ascending=mode == "min", na_position="last", kind="stable"
            )
        for column in self.metrics:
            frame[column] = frame[column].map(lambda v: "-" if _missing(v) else f"{v:.3f}")
        for column in self.params:
            frame[column] = frame[column].map(_param_text)
        frame["epoch"] = frame["epoch"].map(lambda v: "-" if _missing(v) else str(int(v)))
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


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _param_text(value: object) -> str:
    if _missing(value):
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
