"""Typed, validated run configuration: YAML file + dotted command-line overrides -> Config."""

from __future__ import annotations

import copy
import reprlib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class UserError(Exception):
    """Bad input from the user: reported as one line on stderr with exit status 2."""


class ConfigError(UserError):
    """A config file or override that cannot be turned into a valid Config."""


# Seeds go to torch.manual_seed, which takes 64-bit integers; derived seeds wrap at 2**63.
SEED_LIMIT = 2**63
# numpy's RandomState, under Optuna's samplers, takes seeds below 2**32.
OPTUNA_SEED_LIMIT = 2**32
# Layer widths and counts beyond this cannot be allocated anywhere; smaller ones that still do
# not fit are refused by the memory estimate before Ray starts.
WIDTH_LIMIT = 2**20
# A config document may expand (through YAML aliases) to at most this many values, this deep.
YAML_MAX_VALUES = 100_000
YAML_MAX_DEPTH = 50
CONFIG_MAX_BYTES = 2**20


def stream_seed(value: int) -> int:
    """A seed derived from others (seed * prime + epoch ...), wrapped to what torch accepts."""
    return value % SEED_LIMIT


class _Section(BaseModel):
    # NaN and infinity pass every numeric bound (nan > 0 is false, but so is nan <= 0): refuse
    # them outright; no key takes them.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _local_or_uri_path(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    if "\0" in value:
        raise ValueError("must not contain a NUL byte")
    if "://" not in value:
        try:
            Path(value).expanduser()
        except RuntimeError:  # ~someone who has no home here
            raise ValueError(f"cannot expand {value[:60]!r}: no such user") from None
    return value


class DataConfig(_Section):
    dataset: Literal["mnist", "fashion_mnist"] = Field(
        "fashion_mnist", description="Image dataset: mnist or fashion_mnist."
    )
    root: str = Field(
        "~/.cache/raytrain_vae/data",
        description="Where datasets are looked for and downloaded to (torchvision layout).",
    )
    _root = field_validator("root")(_local_or_uri_path)
    download: bool = Field(True, description="Download the dataset if no local copy is found.")
    binarize: Literal["none", "static", "dynamic"] = Field(
        "dynamic",
        description="none: grey levels in [0, 1]; static: one fixed Bernoulli sample per image; "
        "dynamic: a fresh Bernoulli sample every time an image is drawn for training.",
    )
    limit: int | None = Field(
        None,
        gt=0,
        le=2**40,
        description="Use only this many training-split images (quick runs); null = all.",
    )
    val_fraction: float = Field(
        1 / 12,
        gt=0,
        lt=1,
        description="Fraction of the training split held out for validation (model selection); "
        "the test split is never used during training.",
    )

    def split_sizes(self, available: int) -> tuple[int, int]:
        """(training, validation) image counts taken from `available` training-split images."""
        n = min(available, self.limit) if self.limit is not None else available
        n_val = max(1, round(n * self.val_fraction))
        return n - n_val, n_val


class ModelConfig(_Section):
    channels: list[int] = Field(
        [32, 64], description="Encoder conv channels, each layer stride 2; decoder mirrors them."
    )
    kernel_size: int = Field(4, ge=2, le=7, description="Conv kernel size (stride 2).")
    latent_dim: int = Field(16, gt=0, le=WIDTH_LIMIT, description="Dimension of the latent z.")
    hidden_dim: int = Field(
        256,
        ge=0,
        le=WIDTH_LIMIT,
        description="Width of the dense layer between conv features and z; 0 = none.",
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
        le=64,
        description="Residual blocks (3x3 conv, 1x1 conv, skip) after each encoder conv and "
        "before each decoder upsampling, at that resolution; 0 = plain stacks.",
    )
    decoder_head_channels: int = Field(
        0,
        ge=0,
        le=WIDTH_LIMIT,
        description="If > 0, the last upsampling outputs this many full-resolution feature maps "
        "and a 3x3 conv turns them into pixels; 0 = the last upsampling outputs pixels.",
    )

    @field_validator("channels")
    @classmethod
    def _channels(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("must list at least one conv layer")
        if any(c <= 0 or c > WIDTH_LIMIT for c in v):
            raise ValueError(f"every channel count must be > 0 and <= {WIDTH_LIMIT} (got {v})")
        return v


class TrainConfig(_Section):
    epochs: int = Field(
        10, gt=0, le=1_000_000, description="Number of passes over the training shard."
    )
    batch_size: int = Field(
        128,
        gt=0,
        le=2**24,
        description="Global batch size, split evenly across the Ray Train workers.",
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
        le=100_000,
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
    seed: int = Field(
        0,
        ge=0,
        lt=SEED_LIMIT,
        description="Seed for initialisation, shuffling and binarization, in [0, 2**63).",
    )

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
    num_workers: int = Field(1, gt=0, le=100_000, description="Ray Train workers (DDP ranks).")
    use_gpu: bool = Field(False, description="One GPU per worker, NCCL backend.")
    cpus_per_worker: float = Field(
        1.0, gt=0, le=4096, description="CPUs reserved per worker; also its torch thread count."
    )
    gpus_per_worker: float = Field(
        1.0, gt=0, le=64, description="GPUs per worker when use_gpu is true."
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="How workers are placed on nodes."
    )
    shared_memory_allreduce: bool = Field(
        True,
        description="CPU workers that all share one host average gradients through /dev/shm "
        "instead of Gloo's loopback TCP (x86-64; otherwise, and across hosts, Gloo).",
    )
    resource_wait_s: float = Field(
        300.0,
        ge=0,
        le=86_400,
        description="On a cluster that may grow (an autoscaler), how long to wait for it to hold "
        "one run's workers before failing; a local Ray, or a cluster without an autoscaler, "
        "that is too small fails at once.",
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
    checkpoints_to_keep: int = Field(
        2, gt=0, le=10_000, description="Most recent checkpoints kept."
    )
    max_failures: int = Field(
        0,
        ge=-1,
        le=1_000_000,
        description="Worker-group restarts from the last checkpoint (-1 = unlimited).",
    )

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "WARNING",
        description="Level of Ray Train's own log lines (per-epoch metrics always print).",
    )

    _storage_path = field_validator("storage_path")(_local_or_uri_path)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if "/" in v or "\0" in v or v in {".", ".."}:
            raise ValueError(f"must be a plain folder name (got {_short(v)})")
        return v


REPORTED_METRICS = ("val_neg_elbo", "val_recon", "val_kl", "val_bits_per_dim", "train_loss")


class AlgorithmSection(_Section):
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


class SchedulerSection(_Section):
    type: Literal["asha", "none"] = Field("asha", description="Early stopping: asha or none.")
    grace_period: int = Field(
        2, gt=0, le=1_000_000, description="Epochs every trial runs before ASHA may stop it."
    )
    reduction_factor: float = Field(
        3.0, gt=1, le=1000, description="ASHA keeps 1/reduction_factor per rung."
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
    num_samples: int = Field(8, gt=0, le=1_000_000, description="Number of trials.")
    max_concurrent_trials: int | None = Field(
        None,
        gt=0,
        le=100_000,
        description="Trials at once; null = as many as the cluster's CPUs/GPUs fit.",
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
        return None if v is None else _local_or_uri_path(v)


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
        if self.data.limit is not None:
            n_train, _ = self.data.split_sizes(self.data.limit)
            if n_train < workers:
                raise ValueError(
                    f"data.limit={self.data.limit} leaves {n_train} training image(s) after "
                    f"data.val_fraction, fewer than scaling.num_workers={workers}"
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


def _short(value: Any, limit: int = 60) -> str:
    """repr of a value cut to `limit` characters: an error line must stay one readable line."""
    shortener = reprlib.Repr()
    shortener.maxlevel, shortener.maxstring, shortener.maxother = 2, limit, limit
    text = shortener.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _clip(text: str, limit: int = 80) -> str:
    """Text cut to `limit` characters, control characters escaped: user input quoted in one
    error line."""
    if not text.isprintable():
        text = repr(text)[1:-1]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _format_loc(loc: tuple[Any, ...]) -> str:
    return _clip(".".join(str(part) for part in loc)) or "''"


def _validation_message(err: ValidationError) -> str:
    first = err.errors()[0]
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif first["type"] not in {"missing", "value_error"}:
        # Our own validators already quote the value; pydantic's built-in checks do not.
        msg = f"{msg} (got {_short(first['input'])})"
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
        raise ConfigError(f"override {_short(text)}: expected key.sub=value")
    path = key.strip().split(".")
    value = parse_yaml(raw, f"override {_clip(key.strip())}") if raw.strip() else None
    return path, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of the raw config mapping with each key.sub=value override set."""
    raw = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        if not is_config_key(path):
            raise ConfigError(f"override {_clip('.'.join(path))}: unknown key")
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
    if "\0" in str(path):
        raise ConfigError(f"{_short(str(path))}: a config path cannot contain a NUL byte")
    path = Path(path)
    try:
        # Checked before reading: a FIFO would block, /dev/zero would never end.
        if path.is_dir():
            raise ConfigError(f"{path}: is a folder, not a config file")
        if path.exists() and not path.is_file():
            raise ConfigError(f"{path}: not a regular file")
        if path.exists() and path.stat().st_size > CONFIG_MAX_BYTES:
            raise ConfigError(f"{path}: larger than {CONFIG_MAX_BYTES // 2**20} MiB")
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a YAML text file (byte {exc.start} is not UTF-8)") from None
    raw = parse_yaml(text, str(path))
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: top level must be a mapping of sections, not {type(raw).__name__}"
        )
    return raw


def parse_yaml(text: str, source: str) -> Any:
    """One YAML document, refused with one line if malformed, nested too deeply or expanding
    (through aliases) beyond YAML_MAX_VALUES values."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        problem = getattr(exc, "problem", None) or getattr(exc, "reason", None) or "syntax error"
        raise ConfigError(f"{source}: malformed YAML{line}: {_clip(str(problem))}") from None
    except RecursionError:
        raise ConfigError(f"{source}: YAML nested deeper than {YAML_MAX_DEPTH} levels") from None
    _check_size(value, source)
    return value


def _check_size(value: Any, source: str) -> None:
    # Walks the value as Python sees it, shared (aliased) parts counted each time they appear:
    # a small file of nested aliases otherwise expands to billions of values downstream.
    stack, seen = [(value, 1)], 0
    while stack:
        node, depth = stack.pop()
        seen += 1
        if seen > YAML_MAX_VALUES:
            raise ConfigError(
                f"{source}: YAML expands to more than {YAML_MAX_VALUES} values (aliases?)"
            )
        if depth > YAML_MAX_DEPTH:
            raise ConfigError(f"{source}: YAML nested deeper than {YAML_MAX_DEPTH} levels")
        if isinstance(node, dict):
            stack.extend((child, depth + 1) for pair in node.items() for child in pair)
        elif isinstance(node, list):
            stack.extend((child, depth + 1) for child in node)


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
