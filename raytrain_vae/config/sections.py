"""Config sections of one training run: model, train, scaling and run (data: data_section.py)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from raytrain_vae.config.base import (
    SEED_LIMIT,
    WIDTH_LIMIT,
    Section,
    local_or_uri_path,
    short,
)


class LevelSection(Section):
    size: int = Field(
        gt=1,
        le=WIDTH_LIMIT,
        description="Side (height) of the level's latent maps: one of the decoder's resolutions "
        "below the image's (28x28 with two conv layers: 7 or 14).",
    )
    channels: int = Field(gt=0, le=WIDTH_LIMIT, description="Latent channels at that level.")


class ModelSection(Section):
    type: Literal["conv", "hierarchical"] = Field(
        "conv",
        description="Model family: `conv` (one dense latent z) or `hierarchical` (that z on "
        "top, and the spatial latent levels of model.levels below it).",
    )
    levels: list[LevelSection] = Field(
        [],
        max_length=64,
        description="hierarchical: the stochastic levels below the top z, top to bottom, each "
        "{size, channels}: a prior from the layers above, a posterior that corrects it from the "
        "encoder's features at that resolution. [] = the conv model.",
    )
    channels: list[int] = Field(
        [32, 64], description="Encoder conv channels, each layer stride 2; decoder mirrors them."
    )
    kernel_size: int = Field(4, ge=2, le=7, description="Conv kernel size (stride 2).")
    latent_dim: int = Field(16, gt=0, le=WIDTH_LIMIT, description="Dimension of the latent z.")
    prior_components: int = Field(
        0,
        ge=0,
        le=WIDTH_LIMIT,
        description="The top z's prior: 0 = N(0, I); K > 0 = a learned mixture of K diagonal "
        "Gaussians. Its KL is then the one-draw estimate log q(z|x) - log p(z), and "
        "train.free_bits and `evaluate` treat the top z as one group.",
    )
    hidden_dim: int = Field(
        256,
        ge=0,
        le=WIDTH_LIMIT,
        description="Width of the dense layer between conv features and z; 0 = none.",
    )
    likelihood: Literal[
        "bernoulli", "gaussian", "discretized_logistic", "discretized_logistic_mixture"
    ] = Field(
        "bernoulli",
        description="p(x|z): bernoulli (binarised pixels, BCE with logits); gaussian (a "
        "discretised Gaussian over the 256 levels, one learned sigma); discretized_logistic "
        "(a mean and scale per sub-pixel, as in the literature's bits/dim); "
        "discretized_logistic_mixture (PixelCNN++'s mixture of model.mixture_components).",
    )
    mixture_components: int = Field(
        5, ge=1, le=64, description="Components of discretized_logistic_mixture."
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

    @model_validator(mode="after")
    def _levels_need_hierarchical(self) -> ModelSection:
        if self.levels and self.type != "hierarchical":
            raise ValueError("model.levels: only model.type hierarchical has levels")
        return self

    @field_validator("channels")
    @classmethod
    def _channels(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("must list at least one conv layer")
        if any(c <= 0 or c > WIDTH_LIMIT for c in v):
            raise ValueError(f"every channel count must be > 0 and <= {WIDTH_LIMIT} (got {v})")
        return v


class TrainSection(Section):
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
    def _iwae_alone(self) -> TrainSection:
        if self.iwae_k > 1 and (self.beta != 1 or self.kl_warmup_epochs or self.free_bits):
            raise ValueError(
                f"train.iwae_k={self.iwae_k} trains the importance-weighted bound, which has no "
                "KL term to reweight: it needs train.beta=1, train.kl_warmup_epochs=0 and "
                "train.free_bits=0"
            )
        return self


class ScalingSection(Section):
    num_workers: int = Field(1, gt=0, le=100_000, description="Ray Train workers (DDP ranks).")
    use_gpu: bool = Field(False, description="One GPU per worker, NCCL backend.")
    cpus_per_worker: float = Field(
        1.0,
        gt=0,
        le=4096,
        description="CPUs reserved per worker; also its torch thread count (rounded down, at "
        "least 1).",
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


class RunSection(Section):
    name: str = Field(
        "vae", min_length=1, description="Run name: the folder under storage_path; reuse resumes."
    )
    storage_path: str = Field(
        "~/ray_results/raytrain_vae",
        description="Local path or pyarrow URI (s3://, gs://) for checkpoints; shared on clusters.",
    )
    checkpoints_to_keep: int = Field(
        2,
        gt=0,
        le=10_000,
        description="Checkpoints kept per run: the best N by the selection metric "
        "(val_neg_elbo, or the search metric), plus always the latest.",
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

    _storage_path = field_validator("storage_path")(local_or_uri_path)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if "/" in v or "\0" in v or v in {".", ".."}:
            raise ValueError(f"must be a plain folder name (got {short(v)})")
        return v
