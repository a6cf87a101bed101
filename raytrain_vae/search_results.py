"""A finished search as tables: one row per trial, the best trial, the Pareto front, and files."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from raytrain_vae.config import Config, ConfigError, child_path
from raytrain_vae.search_space import Param
from raytrain_vae.storage import filesystem_for


def trial_table(cfg: Config, params: list[Param], results: Iterable[Any]) -> pd.DataFrame:
    """One row per trial of a ray.tune.ResultGrid: status, epochs run, best metric and its
    checkpoint, decoded params."""
    metric, mode = cfg.search.selection
    rows = []
    for result in results:
        history = result.metrics_dataframe
        row = {"trial_id": (result.metrics or {}).get("trial_id") or Path(result.path).name}
        for p in params:
            value = p.decode(result.config[p.path])
            row[p.path] = json.dumps(value) if isinstance(value, list | dict) else value
        epochs = 0 if history is None or history.empty else int(history["epoch"].max())
        row["epochs"] = epochs
        if result.error:
            row["status"] = "ERROR"
        else:
            row["status"] = "done" if epochs >= cfg.train.epochs else "stopped early"
        if epochs:
            values = history[metric].astype(float)
            finite = values[values.map(math.isfinite)]
            if len(finite):
                best_idx = finite.idxmin() if mode == "min" else finite.idxmax()
                best = history.loc[best_idx]
                row[f"best_{metric}"] = float(best[metric])
                row["best_epoch"] = int(best["epoch"])
                row["best_checkpoint"] = checkpoint_of(result, best)
            last = history.iloc[-1]
            for key in ("val_neg_elbo", "val_recon", "val_kl"):
                row[key] = float(last[key])
            row["seconds"] = float(last.get("time_total_s", float("nan")))
            row["train_seconds"] = float(history["epoch_s"].sum())
        row["error"] = str(result.error).strip().splitlines()[-1][:200] if result.error else ""
        rows.append(row)
    return pd.DataFrame(rows)


def checkpoint_of(result: Any, epoch_row: pd.Series) -> str | None:
    """The checkpoint an epoch reported: a Ray Train run's path (forwarded to Tune as
    checkpoint_path), or the trial's own Tune checkpoint folder."""
    if isinstance(epoch_row.get("checkpoint_path"), str):
        return epoch_row["checkpoint_path"]
    if isinstance(epoch_row.get("checkpoint_dir_name"), str):
        return f"{result.path}/{epoch_row['checkpoint_dir_name']}"
    return None


def pareto_front(table: pd.DataFrame, metrics: list[str], modes: list[str]) -> pd.DataFrame:
    """Trials no other trial beats on every metric (and strictly on one): the trade-off curve."""
    signs = [1 if m == "min" else -1 for m in modes]
    points = table.dropna(subset=metrics)
    keep = []
    for i, a in points.iterrows():
        dominated = False
        for j, b in points.iterrows():
            not_worse = all(s * b[m] <= s * a[m] for m, s in zip(metrics, signs, strict=True))
            better = any(s * b[m] < s * a[m] for m, s in zip(metrics, signs, strict=True))
            if j != i and not_worse and better:
                dominated = True
                break
        if not dominated:
            keep.append(i)
    return points.loc[keep].sort_values(metrics[0])


def plot_pareto(
    table: pd.DataFrame,
    front: pd.DataFrame,
    metrics: list[str],
    path: Path,
    exported: str | None = None,
) -> None:
    """Rate against distortion: every trial named by its id, the front joined, the exported
    trial starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y = metrics
    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    ax.scatter(table[x], table[y], c="0.6", label="trials")
    ax.plot(front[x], front[y], "o-", c="C3", label="Pareto front")
    for _, row in table.dropna(subset=[x, y]).iterrows():
        ax.annotate(str(row["trial_id"]), (row[x], row[y]), xytext=(4, 4),
                    textcoords="offset points", fontsize=7, color="0.3")  # fmt: skip
    chosen = table[table["trial_id"] == exported].dropna(subset=[x, y])
    if len(chosen):
        ax.scatter(chosen[x], chosen[y], marker="*", s=260, c="C2", zorder=3,
                   label=f"exported: {exported}")  # fmt: skip
    ax.set_xlabel(f"{x} (nats)")
    ax.set_ylabel(f"{y} (nats)")
    ax.set_title("Rate vs distortion")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_table(table: pd.DataFrame, folder: str, stem: str) -> list[str]:
    """CSV and Parquet next to the experiment (local path or pyarrow URI)."""
    fs, base = filesystem_for(folder)
    fs.create_dir(base, recursive=True)
    written = []
    for ext in ("csv", "parquet"):
        path = f"{base}/{stem}.{ext}"
        with fs.open_output_stream(path) as out:
            if ext == "csv":
                out.write(table.to_csv(index=False).encode())
            else:
                table.to_parquet(out, index=False)
        written.append(child_path(folder, f"{stem}.{ext}"))
    return written


def best_trial(cfg: Config, table: pd.DataFrame) -> pd.Series:
    metric, mode = cfg.search.selection
    column = f"best_{metric}"
    if column not in table or "best_checkpoint" not in table:  # no trial finished an epoch
        raise ConfigError(f"no trial reported a finite {metric}: nothing to export")
    candidates = table.dropna(subset=[column])
    candidates = candidates[candidates["best_checkpoint"].notna()]
    if candidates.empty:
        raise ConfigError(f"no trial reported a finite {metric}: nothing to export")
    return candidates.sort_values(column, ascending=mode == "min").iloc[0]


def search_summary(
    cfg: Config, table: pd.DataFrame, export: Path, experiment: str, summary_file: str
) -> dict[str, Any]:
    """What a program reads of a finished search (`tune --json`): the metric, the best trial,
    where the export and the experiment are, and every trial's row."""
    metric, mode = cfg.search.selection
    rows = table.drop(columns=["best_checkpoint"], errors="ignore").to_dict(orient="records")
    best = best_trial(cfg, table)
    return {
        "metric": metric,
        "mode": mode,
        "best_trial": str(best["trial_id"]),
        f"best_{metric}": float(best[f"best_{metric}"]),
        "best_epoch": int(best["best_epoch"]),
        "export": str(export),
        "experiment": experiment,
        "summary": summary_file,
        "trials": rows,
    }


def print_summary(cfg: Config, table: pd.DataFrame) -> None:
    shown = [c for c in table.columns if c not in {"best_checkpoint", "error"}]
    with pd.option_context("display.width", 200, "display.max_columns", 50):
        print("\nTrials (losses in nats per image, beta = 1):")
        print(table[shown].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    errors = table[table["error"] != ""]
    for _, row in errors.iterrows():
        print(f"trial {row['trial_id']} failed: {row['error']}")
    if "seconds" in table and table["seconds"].notna().any():
        overhead = (table["seconds"] - table["train_seconds"]).dropna()
        print(
            f"per-trial time outside epochs (start-up, data, checkpoints, teardown): "
            f"{overhead.mean():.1f} s on average over {len(overhead)} trials"
        )
