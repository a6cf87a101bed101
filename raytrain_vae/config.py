"""Typed, validated run configuration: YAML file + dotted command-line overrides -> Config."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class UserError(Exception):
    """Bad input from the user: reported as one line on stderr with exit status 2."""


class ConfigError(UserError):
    """A config file or override that cannot be turned into a valid Config."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    dataset: Literal["mnist", "fashion_mnist"] = Field(
        "fashion_mnist", description="Image dataset: mnist or fashion_mnist."
    )
    root: str = Field(
        "~/.cache/raytrain_vae/data",
        description="Where datasets are looked for and downloaded to (torchvision layout).",
    )
    download: bool = Field(True, description="Download the dataset if no local copy is found.")
    binarize: Literal["none", "static", "dynamic"] = Field(
        "dynamic",
        description="none: grey levels in [0, 1]; static: one fixed Bernoulli sample per image; "
        "dynamic: a fresh Bernoulli sample every time an image is drawn for training.",
    )
    limit: int | None = Field(
        None, gt=0, description="Use only this many training-split images (quick runs); null = all."
    )
    val_fraction: float = Field(
        1 / 12,
        gt=0,
        lt=1,
        description="Fraction of the training split held out for validation (model selection); "
        "the test split is never used during training.",
    )


class ModelConfig(_Section):
    channels: list[int] = Field(
        [32, 64], description="Encoder conv channels, each layer stride 2; decoder mirrors them."
    )
    kernel_size: int = Field(4, ge=2, le=7, description="Conv kernel size (stride 2).")
    latent_dim: int = Field(16, gt=0, description="Dimension of the latent z.")
    hidden_dim: int = Field(
        256, ge=0, description="Width of the dense layer between conv features and z; 0 = none."
    )
    likelihood: Literal["bernoulli", "gaussian"] = Field(
        "bernoulli",
        description="p(x|z): bernoulli (BCE with logits) or gaussian (learned global sigma).",
    )
    activation: Literal["relu", "elu", "silu"] = Field(
        "elu", description="Nonlinearity after every conv and dense layer: relu, elu or silu."
    )
    residual_blocks: int = Field(
        0,
        ge=0,
        description="Residual blocks (3x3 conv, 1x1 conv, skip) after each encoder conv and "
        "before each decoder upsampling, at that resolution; 0 = plain stacks.",
    )
    decoder_head_channels: int = Field(
        0,
        ge=0,
        description="If > 0, the last upsampling outputs this many full-resolution feature maps "
        "and a 3x3 conv turns them into pixels; 0 = the last upsampling outputs pixels.",
    )

    @field_validator("channels")
    @classmethod
    def _channels(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("must list at least one conv layer")
        if any(c <= 0 for c in v):
            raise ValueError(f"every channel count must be > 0 (got {v})")
        return v


class TrainConfig(_Section):
    epochs: int = Field(10, gt=0, description="Number of passes over the training shard.")
    batch_size: int = Field(
        128, gt=0, description="Global batch size, split evenly across the Ray Train workers."
    )
    lr: float = Field(2e-3, gt=0, description="Learning rate (AdamW); the peak under cosine.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (0 = plain Adam).")
    beta: float = Field(1.0, ge=0, description="KL weight in the training loss (beta-VAE).")
    kl_warmup_epochs: float = Field(
        0.0, ge=0, description="Epochs over which the KL weight ramps linearly from 0 to beta."
    )
    lr_schedule: Literal["constant", "cosine"] = Field(
        "cosine",
        description="constant: lr throughout; cosine: lr decays per step to 0 at the last epoch.",
    )
    free_bits: float = Field(
        0.0,
        ge=0,
        description="Free bits (nats per latent dim): each dim's batch-mean KL enters the "
        "training loss as max(free_bits, KL_d); 0 = off. Validation is unaffected.",
    )
    iwae_k: int = Field(
        1,
        ge=1,
        description="Importance samples in the training bound: 1 = the ELBO, k > 1 = the IWAE "
        "bound (needs beta = 1, no KL warm-up, no free bits). Validation stays the ELBO.",
    )
    grad_clip: float | None = Field(None, gt=0, description="Max gradient norm; null = off.")
    amp: Literal["none", "bf16"] = Field(
        "none", description="bf16 autocast for the forward pass (meant for GPUs)."
    )
    channels_last: bool = Field(
        True, description="NHWC memory format for convs (measured faster on CPU; see benchmarks)."
    )
    seed: int = Field(0, description="Seed for initialisation, shuffling and binarization.")

    @model_validator(mode="after")
    def _iwae_alone(self) -> TrainConfig:
        if self.iwae_k > 1 and (self.beta != 1 or self.kl_warmup_epochs or self.free_bits):
            raise ValueError(
                f"train.iwae_k={self.iwae_k} trains the importance-weighted bound, which has no "
                "KL term to reweight: it needs train.beta=1, train.kl_warmup_epochs=0 and "
                "train.free_bits=0"
            )
        return self


class ScalingSection(_Section):
    num_workers: int = Field(1, gt=0, description="Ray Train workers (DDP ranks).")
    use_gpu: bool = Field(False, description="One GPU per worker, NCCL backend.")
    cpus_per_worker: float = Field(
        1.0, gt=0, description="CPUs reserved per worker; also its torch thread count."
    )
    gpus_per_worker: float = Field(1.0, gt=0, description="GPUs per worker when use_gpu is true.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="How workers are placed on nodes."
    )
    shared_memory_allreduce: bool = Field(
        True,
        description="CPU workers that all share one host average gradients through /dev/shm "
        "instead of Gloo's loopback TCP (x86-64; otherwise, and across hosts, Gloo).",
    )
    retain_freed_memory: bool = Field(
        True,
        description="CPU workers keep freed tensor memory in the heap (glibc malloc) for the "
        "next step instead of returning it to the kernel and page-faulting it back in; "
        "`raytrain_vae.evaluate` and `raytrain_vae.generate` on the CPU follow it too.",
    )


class RunSection(_Section):
    name: str = Field(
        "vae", min_length=1, description="Run name: the folder under storage_path; reuse resumes."
    )
    storage_path: str = Field(
        "~/ray_results/raytrain_vae",
        description="Local path or pyarrow URI (s3://, gs://) for checkpoints; shared on clusters.",
    )
    checkpoints_to_keep: int = Field(2, gt=0, description="Most recent checkpoints kept.")
    max_failures: int = Field(
        0, ge=-1, description="Worker-group restarts from the last checkpoint (-1 = unlimited)."
    )

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "WARNING",
        description="Level of Ray Train's own log lines (per-epoch metrics always print).",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if "/" in v or v in {".", ".."}:
            raise ValueError(f"must be a plain folder name (got {v!r})")
        return v


REPORTED_METRICS = ("val_neg_elbo", "val_recon", "val_kl", "val_bits_per_dim", "train_loss")


class AlgorithmSection(_Section):
    type: Literal["optuna"] = Field("optuna", description="Search algorithm (Optuna).")
    sampler: Literal["tpe", "random"] = Field(
        "tpe", description="Optuna sampler: tpe (multivariate) or random; NSGA-II for 2 metrics."
    )
    seed: int = Field(0, description="Sampler seed: the same seed proposes the same trials.")


class SchedulerSection(_Section):
    type: Literal["asha", "none"] = Field("asha", description="Early stopping: asha or none.")
    grace_period: int = Field(
        2, gt=0, description="Epochs every trial runs before ASHA may stop it."
    )
    reduction_factor: float = Field(
        3.0, gt=1, description="ASHA keeps 1/reduction_factor per rung."
    )


class SearchSection(_Section):
    metric: str | list[str] = Field(
        "val_neg_elbo",
        description="Metric compared across trials (beta-independent); a list of two, e.g. "
        "[val_recon, val_kl], runs a multi-objective search and writes the Pareto front.",
    )
    mode: Literal["min", "max"] | list[Literal["min", "max"]] = Field(
        "min", description="min or max, one per metric."
    )
    num_samples: int = Field(8, gt=0, description="Number of trials.")
    max_concurrent_trials: int | None = Field(
        None, gt=0, description="Trials at once; null = as many as the cluster's CPUs/GPUs fit."
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


class ExportSection(_Section):
    dir: str | None = Field(
        None,
        description="Where the best model is exported; null = <storage_path>/<run.name>/export.",
    )
    num_samples: int = Field(64, gt=0, description="Images in the exported sample grid.")
    num_reconstructions: int = Field(
        16, gt=0, description="Test images in the exported reconstruction grid."
    )


class Config(_Section):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    run: RunSection = Field(default_factory=RunSection)
    search: SearchSection = Field(default_factory=SearchSection)
    export: ExportSection = Field(default_factory=ExportSection)

    @model_validator(mode="after")
    def _batch_fits_workers(self) -> Config:
        workers, batch = self.scaling.num_workers, self.train.batch_size
        if batch % workers:
            raise ValueError(
                f"train.batch_size={batch} must be a multiple of scaling.num_workers={workers}"
            )
        return self

    def resolved_storage_path(self) -> str:
        """storage_path with ~ expanded and local paths made absolute; URIs unchanged."""
        path = self.run.storage_path
        if "://" in path:
            return path
        return str(Path(path).expanduser().resolve())

    def resolved_export_dir(self) -> Path:
        """export.dir, or <storage_path>/<run.name>/export for local storage."""
        if self.export.dir is not None:
            return Path(self.export.dir).expanduser().resolve()
        storage = self.resolved_storage_path()
        if "://" in storage:
            raise ConfigError(
                "export.dir must be set (a local path) when run.storage_path is a URI"
            )
        return Path(storage) / self.run.name / "export"


def _format_loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc)


def _validation_message(err: ValidationError) -> str:
    first = err.errors()[0]
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif first["type"] not in {"missing", "value_error"}:
        # Our own validators already quote the value; pydantic's built-in checks do not.
        msg = f"{msg} (got {first['input']!r})"
    loc = _format_loc(first["loc"])
    if not first["loc"] or msg.startswith(f"{loc}."):  # the message already names its keys
        return msg
    return f"{loc}: {msg}"


def is_config_key(path: list[str]) -> bool:
    """Whether a dotted path (split on dots) names a config key or section."""
    model: type[BaseModel] | None = Config
    for part in path:
        if model is None or part not in model.model_fields:
            return False
        annotation = model.model_fields[part].annotation
        model = (
            annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel)
            else None
        )
    return True


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=3e-4' -> (['train', 'lr'], 3e-4); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    path = key.strip().split(".")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc.problem})") from None
    return path, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of the raw config mapping with each key.sub=value override set."""
    raw = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        if not is_config_key(path):
            raise ConfigError(f"override {'.'.join(path)}: unknown key")
        set_dotted(raw, path, value)
    return raw


def set_dotted(raw: dict[str, Any], path: list[str], value: Any) -> None:
    """Set raw[a][b]... = value in place, creating missing sections."""
    node = raw
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[path[-1]] = value


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """Read a YAML file that must hold a mapping (an empty file is an empty mapping)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise ConfigError(f"{path}: malformed YAML{line}: {problem}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: top level must be a mapping of sections, not {type(raw).__name__}"
        )
    return raw


def validate_config(raw: dict[str, Any], source: str = "config") -> Config:
    """Validate a raw mapping; errors name the source, the dotted key and the reason."""
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_validation_message(exc)}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (None = all defaults) and apply key.sub=value overrides."""
    raw = read_yaml_mapping(path) if path is not None else {}
    raw = apply_overrides(raw, overrides or [])
    source = str(path) if path is not None else "defaults"
    if overrides:
        source += " (with overrides)"
    return validate_config(raw, source)


def dump_config(cfg: Config) -> str:
    """The fully resolved config as YAML, every key present."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
