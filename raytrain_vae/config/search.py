"""Config sections of a search (metric, algorithm, scheduler, space) and of its export."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from raytrain_vae.config.base import OPTUNA_SEED_LIMIT, Section, local_or_uri_path

REPORTED_METRICS = ("val_neg_elbo", "val_recon", "val_kl", "val_bits_per_dim", "train_loss")


class AlgorithmSection(Section):
    type: Literal["optuna"] = Field("optuna", description="Search algorithm (Optuna).")
    sampler: Literal["tpe", "random"] = Field(
        "tpe", description="Optuna sampler: tpe (multivariate) or random; NSGA-II for 2 metrics."
    )
    seed: int = Field(
        0,
        ge=0,
        lt=OPTUNA_SEED_LIMIT,
        description="Sampler seed, in [0, 2**32): the same seed proposes the same trials.",
    )


class SchedulerSection(Section):
    type: Literal["asha", "none"] = Field("asha", description="Early stopping: asha or none.")
    grace_period: int = Field(
        2, gt=0, le=1_000_000, description="Epochs every trial runs before ASHA may stop it."
    )
    reduction_factor: float = Field(
        3.0, gt=1, le=1000, description="ASHA keeps 1/reduction_factor per rung."
    )


class SearchSection(Section):
    metric: str | list[str] = Field(
        "val_neg_elbo",
        description="Metric compared across trials (beta-independent); a list of two, e.g. "
        "[val_recon, val_kl], runs a multi-objective search and writes the Pareto front.",
    )
    mode: Literal["min", "max"] | list[Literal["min", "max"]] = Field(
        "min", description="min or max, one per metric."
    )
    num_samples: int = Field(8, gt=0, le=1_000_000, description="Number of trials.")
    max_concurrent_trials: int | None = Field(
        None,
        gt=0,
        le=100_000,
        description="Trials at once; null = as many as the cluster's CPUs/GPUs fit.",
    )
    local_trials: bool = Field(
        True,
        description="Run each single-worker trial in its Tune trial's own process, with no Ray "
        "Train worker group to start and stop (seconds less per trial); false runs every trial "
        "as a Ray Train run. Trials with several workers always run as Ray Train runs (DDP).",
    )
    algorithm: AlgorithmSection = Field(default_factory=AlgorithmSection)
    scheduler: SchedulerSection = Field(default_factory=SchedulerSection)
    space: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Dotted config path -> {choice: [...]} | {uniform: [lo, hi]} | "
        "{loguniform: [lo, hi]} | {randint: [lo, hi]} | {quniform: [lo, hi, q]} | "
        "{qloguniform: [lo, hi, q]}.",
    )

    @model_validator(mode="after")
    def _metric_mode(self) -> SearchSection:
        metrics = [self.metric] if isinstance(self.metric, str) else self.metric
        modes = [self.mode] if isinstance(self.mode, str) else self.mode
        for m in metrics:
            if m not in REPORTED_METRICS:
                raise ValueError(
                    f"search.metric: {m!r} is not one of {', '.join(REPORTED_METRICS)}"
                )
        if len(metrics) != len(modes) or isinstance(self.metric, str) != isinstance(self.mode, str):
            raise ValueError("search.mode must give one mode per search.metric")
        if len(metrics) > 2 or not metrics:
            raise ValueError("search.metric takes one metric, or two for a multi-objective search")
        if len(metrics) == 2 and self.scheduler.type != "none":
            raise ValueError(
                "a multi-objective search cannot stop trials early: set search.scheduler.type=none"
            )
        return self

    @property
    def multi_objective(self) -> bool:
        return not isinstance(self.metric, str)

    @property
    def selection(self) -> tuple[str, str]:
        """(metric, mode) that picks the best epoch, checkpoint and trial to export: the search
        metric, or the negative ELBO (recon + KL, a point on the front) in multi-objective mode."""
        if self.multi_objective:
            return "val_neg_elbo", "min"
        return self.metric, self.mode  # type: ignore[return-value]


class ExportSection(Section):
    dir: str | None = Field(
        None,
        description="Where the best model is exported; null = <storage_path>/<run.name>/export. "
        "It is replaced only if absent, empty or a previous export (it holds the "
        "`.raytrain_vae-output` marker); anything else is refused.",
    )
    num_samples: int = Field(64, gt=0, le=10_000, description="Images in the exported sample grid.")
    num_reconstructions: int = Field(
        16, gt=0, le=10_000, description="Test images in the exported reconstruction grid."
    )

    @field_validator("dir")
    @classmethod
    def _dir(cls, v: str | None) -> str | None:
        return None if v is None else local_or_uri_path(v)
