"""Model quality: the classic MLP VAE against the project's default config, trained in one run.

Both see the same training split (validation held out), dynamic binarization, batch size and
epochs. The reference is Kingma & Welling's / pytorch/examples' MLP VAE (784-400-20, Adam 1e-3)
in a plain loop; the project trains through its real path (Ray Train, `configs/vae.yaml`). After
every epoch both are scored on the test split (negative ELBO, one seeded sample); at the end the
IWAE bound with k importance samples is computed on the first --iwae-images test images.

    python benchmarks/quality.py                  # full Fashion-MNIST, 10 epochs (~15 min, 2 cores)
    python benchmarks/quality.py --smoke          # a few hundred images, seconds of work
    python benchmarks/quality.py --parquet-stream # also: the same images as Parquet, streamed
    python benchmarks/quality.py --hierarchical configs/hierarchical.yaml   # and that model

With --hierarchical CONFIG, a second project model (model.type: hierarchical) is trained in the
same run on the same data, epochs and batch size, and scored the same way; its row adds the
mean epoch time against the default's (the slowest rank's training and validation seconds,
Ray's start-up excluded), the same two models' training steps timed in turn in one process
(benchmarks/step_time.py: a check of that ratio that a drifting machine cannot swing), and the
KL of each of its levels on the test split.

With --parquet-stream, the project's model is trained a second time from the same training-split
images written as Parquet and streamed by Ray Data (data.ingest: stream; validation held out by
hash instead of by a seeded permutation), and scored on the same test images.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from step_time import compare_step_times
from torch import nn

from raytrain_vae.checkpoint import read_state
from raytrain_vae.cli import run_cli
from raytrain_vae.config import load_config
from raytrain_vae.data import load_splits, to_model_input
from raytrain_vae.evaluation import evaluate
from raytrain_vae.model_io import load_model_dir
from raytrain_vae.objectives import bits_per_dim, kl_to_standard_normal

ENTROPY_NOTE = "floor: the binarization's own entropy"


class MLPVAE(nn.Module):
    """The reference: 784-400-20 MLP encoder and decoder, Bernoulli likelihood."""

    def __init__(self, pixels: int = 784, hidden: int = 400, latent: int = 20) -> None:
        super().__init__()
        self.fc1, self.fc21, self.fc22 = (
            nn.Linear(pixels, hidden),
            nn.Linear(hidden, latent),
            nn.Linear(hidden, latent),
        )
        self.fc3, self.fc4 = nn.Linear(latent, hidden), nn.Linear(hidden, pixels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = F.relu(self.fc1(x.flatten(1)))
        mu, logvar = self.fc21(h), self.fc22(h)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.fc4(F.relu(self.fc3(z))), mu, logvar


def mlp_negative_elbo(model: MLPVAE, x: torch.Tensor) -> torch.Tensor:
    """Per-image negative ELBO in nats: BCE summed over pixels plus the closed-form KL."""
    logits, mu, logvar = model(x)
    bce = F.binary_cross_entropy_with_logits(logits, x.flatten(1), reduction="none").sum(1)
    return bce + kl_to_standard_normal(mu, logvar)


@torch.no_grad()
def mlp_test_score(model: MLPVAE, test: torch.Tensor) -> float:
    model.eval()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        total = sum(
            float(mlp_negative_elbo(model, to_model_input(test[i : i + 1000], False)).sum())
            for i in range(0, len(test), 1000)
        )
    model.train()
    return total / len(test)


@torch.no_grad()
def mlp_iwae(model: MLPVAE, images: torch.Tensor, k: int) -> float:
    """IWAE bound of the reference, k samples per image, in nats."""
    model.eval()
    torch.manual_seed(0)
    total = 0.0
    for i in range(0, len(images), 100):
        x = to_model_input(images[i : i + 100], False).flatten(1)
        h = F.relu(model.fc1(x))
        mu, logvar = model.fc21(h), model.fc22(h)
        std = torch.exp(0.5 * logvar)
        z = mu + torch.randn(k, *mu.shape) * std
        logits = model.fc4(F.relu(model.fc3(z)))
        log_px = -F.binary_cross_entropy_with_logits(
            logits, x.expand_as(logits), reduction="none"
        ).sum(-1)
        log_pz = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
        log_qz = torch.distributions.Normal(mu, std).log_prob(z).sum(-1)
        log_w = log_px + log_pz - log_qz
        total += float(-(torch.logsumexp(log_w, 0) - torch.log(torch.tensor(float(k)))).sum())
    return total / len(images)


def train_reference(splits, epochs: int, batch: int, seed: int) -> tuple[MLPVAE, list, float]:
    """The pytorch/examples loop: Adam 1e-3, loss summed over the batch / batch size."""
    torch.manual_seed(seed)
    model = MLPVAE(pixels=splits.train[0].numel())
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    curve, start = [], time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(len(splits.train))
        for i in range(0, len(perm), batch):
            x = torch.bernoulli(splits.train[perm[i : i + batch]].float() / 255)
            loss = mlp_negative_elbo(model, x).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        curve.append(mlp_test_score(model, splits.test))
        print(f"  reference epoch {len(curve)}: test neg ELBO {curve[-1]:.2f}", flush=True)
    return model, curve, time.perf_counter() - start


def train_project(cfg) -> tuple[list[Path], float]:
    """Checkpoint folders of every epoch (in order) of the project's Ray Train run, and the wall
    time of the whole fit (Ray start-up included)."""
    import ray

    from raytrain_vae.training import fit

    start = time.perf_counter()
    ray.init(num_cpus=os.cpu_count())
    try:
        result = fit(cfg)
    finally:
        ray.shutdown()
    wall = time.perf_counter() - start
    by_epoch = sorted((m["epoch"], Path(c.path)) for c, m in result.best_checkpoints)
    return [path for _, path in by_epoch], wall


def curve_on_test(checkpoints: list[Path], test: torch.Tensor) -> list[float]:
    """Test negative ELBO of each epoch's checkpoint."""
    return [
        evaluate(load_model_dir(c)[0], test, k=0, batch_size=1000)["neg_elbo"] for c in checkpoints
    ]


def mean_epoch_seconds(checkpoint: Path) -> float:
    """Mean over the run's epochs of the slowest rank's epoch time (training + validation)."""
    history = read_state(checkpoint).history
    return sum(h["epoch_s"] for h in history) / len(history)


def hierarchical_config(cfg, args):
    """The --hierarchical config with the default's data, epochs, batch size and seed."""
    return load_config(args.hierarchical, [
        f"train.epochs={args.epochs}", f"train.batch_size={cfg.train.batch_size}",
        f"train.seed={cfg.train.seed}", f"run.storage_path={cfg.run.storage_path}",
        f"run.name={cfg.run.name}-hierarchical", f"run.checkpoints_to_keep={args.epochs}",
        *(["data.limit=600"] if args.smoke else []),
    ])  # fmt: skip


def hierarchical_row(cfg, deep, args, splits, iwae_images, conv_epoch_s: float) -> dict:
    """Train and score the hierarchical config `deep` beside the default `cfg`."""
    print(f"training {args.hierarchical} through Ray Train ...", flush=True)
    checkpoints, wall = train_project(deep)
    curve = curve_on_test(checkpoints, splits.test)
    model = load_model_dir(checkpoints[-1])[0]
    scored = evaluate(model, splits.test, k=0, batch_size=1000)
    iwae = evaluate(model, iwae_images, k=args.iwae_k, batch_size=10)["iwae_nll"]
    epoch_s = mean_epoch_seconds(checkpoints[-1])
    print("timing both models' training steps, interleaved in one process ...", flush=True)
    rounds, per_round = (1, 2) if args.smoke else (5, 10)
    step_ms = compare_step_times({"default": cfg, "hierarchical": deep}, rounds, per_round)
    return {
        "config": deep.model_dump(mode="json"),
        "curve": curve,
        "iwae_nll": iwae,
        "seconds": wall,
        "epoch_s": epoch_s,
        "epoch_time_ratio": epoch_s / conv_epoch_s,
        "step_ms": step_ms,
        "step_time_ratio": step_ms["hierarchical"] / step_ms["default"],
        "kl_per_level": scored["kl_per_level"],
        "active_units": scored["active_units"],
        "conditional_active_units": scored["conditional_active_units"],
        "units": scored["units"],
    }


def write_parquet(images: torch.Tensor, path: Path, rows_per_group: int = 2048) -> None:
    """uint8 (N, 1, 28, 28) images as a Parquet `pixels` list column in row groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    flat = images.reshape(len(images), -1).numpy()
    column = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])
    pq.write_table(pa.table({"pixels": column}), path, row_group_size=rows_per_group)


def train_from_parquet_stream(cfg, test: torch.Tensor, folder: Path) -> tuple[list[float], float]:
    """The project's model trained on the same training-split images written as Parquet and
    streamed: test negative ELBO per epoch, and the fit's wall time."""
    raw = load_splits(cfg.data.model_copy(update={"binarize": "none"}))
    write_parquet(torch.cat([raw.train, raw.val]), folder / "train.parquet")
    write_parquet(raw.test, folder / "test.parquet")
    streamed = cfg.model_copy(
        update={
            "data": cfg.data.model_copy(
                update={
                    "source": "parquet",
                    "path": str(folder / "train.parquet"),
                    "test_path": str(folder / "test.parquet"),
                    "image_column": "pixels",
                    "pixels_shape": [1, 28, 28],
                    "channels": 1,
                    "ingest": "stream",
                    "limit": None,
                }
            ),
            "run": cfg.run.model_copy(update={"name": f"{cfg.run.name}-parquet"}),
            # Streaming keeps a whole CPU free for Ray Data's read tasks; a worker still runs
            # one torch thread (int(0.5) rounds up to 1), as in the memory run.
            "scaling": cfg.scaling.model_copy(update={"cpus_per_worker": 0.5}),
        }
    )
    checkpoints, wall = train_project(streamed)
    curve = curve_on_test(checkpoints, test)
    return curve, wall


def machine() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{torch.backends.cpu.get_cpu_capability()} kernels"
    )


def plot_curves(curves: dict[str, list[float]], floor: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, curve in curves.items():
        ax.plot(range(1, len(curve) + 1), curve, marker="o", label=label)
    ax.axhline(floor, color="grey", linestyle="--", label=f"{floor:.1f} nats: {ENTROPY_NOTE}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test negative ELBO (nats per image)")
    ax.set_title("Fashion-MNIST, dynamically binarized")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def binarization_entropy(images: torch.Tensor) -> float:
    """Mean over images of sum over pixels of H(p / 255) in nats: no model can beat it."""
    p = images.double().flatten(1) / 255
    h = -(p * p.clamp_min(1e-12).log() + (1 - p) * (1 - p).clamp_min(1e-12).log())
    return float(h.sum(1).mean())


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/vae.yaml")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--iwae-k", type=int, default=1000)
    parser.add_argument("--iwae-images", type=int, default=1000)
    parser.add_argument("--smoke", action="store_true", help="600 images, 2 epochs, k=10")
    parser.add_argument("--out", default="benchmarks/results/quality")
    parser.add_argument(
        "--parquet-stream", action="store_true", help="also train from a Parquet stream"
    )
    parser.add_argument(
        "--hierarchical", help="also train and score this config (model.type: hierarchical)"
    )
    parser.add_argument("overrides", nargs="*", help="key.sub=value for the project's config")
    args = parser.parse_args()
    if args.smoke:
        args.epochs, args.iwae_k, args.iwae_images = 2, 10, 50
    return args


def print_rows(rows: list[tuple], args: argparse.Namespace, iwae_images: int, dims: int) -> None:
    """The results table: (name, test neg ELBO, IWAE NLL, seconds) per model."""
    print(
        f"\nmodel | epochs | test neg ELBO | IWAE NLL (k={args.iwae_k}, first "
        f"{iwae_images} test images) | bits/dim (IWAE) | wall time"
    )
    for name, elbo, iwae, seconds in rows:
        print(
            f"{name} | {args.epochs} | {elbo:.2f} | {iwae:.2f} | "
            f"{bits_per_dim(iwae, dims):.4f} | {seconds:.0f} s"
        )


def report_hierarchical(
    deep: dict, args: argparse.Namespace, conv_elbo: float, conv_epoch_s: float, dims: int
) -> None:
    """The hierarchical row, its epoch time against the default's, and its KL per level."""
    print(
        f"raytrain_vae {Path(args.hierarchical).name} (Ray Train) | {args.epochs} | "
        f"{deep['curve'][-1]:.2f} | {deep['iwae_nll']:.2f} | "
        f"{bits_per_dim(deep['iwae_nll'], dims):.4f} | {deep['seconds']:.0f} s"
    )
    print(
        f"hierarchical epoch time {deep['epoch_s']:.1f} s = {deep['epoch_time_ratio']:.2f}x "
        f"the default's {conv_epoch_s:.1f} s (limit 3x); test neg ELBO "
        f"{deep['curve'][-1] - conv_elbo:+.2f} nats against the default (line: 230)"
    )
    print(
        f"hierarchical training step {deep['step_ms']['hierarchical']:.1f} ms = "
        f"{deep['step_time_ratio']:.2f}x the default's {deep['step_ms']['default']:.1f} ms "
        "(one worker's step, the two interleaved in one process: the machine's drift cancels)"
    )
    kl = ", ".join(
        f"{name} {value:.2f} ({deep['active_units'][name]}/{deep['units'][name]} active, "
        f"{deep['conditional_active_units'][name]} conditionally)"
        for name, value in deep["kl_per_level"].items()
    )
    print(f"hierarchical KL per level (nats, test split): {kl}")


def write_results(results: dict, out: Path) -> None:
    """quality.json and the curves' plot (each model's test negative ELBO per epoch)."""
    out.mkdir(parents=True, exist_ok=True)
    curves = {
        "MLP VAE (reference)": results["reference"]["curve"],
        "raytrain_vae default": results["raytrain_vae"]["curve"],
    }
    if results["hierarchical"] is not None:
        curves["raytrain_vae hierarchical"] = results["hierarchical"]["curve"]
    plot_curves(curves, results["entropy_floor"], out / "curves.png")
    (out / "quality.json").write_text(json.dumps(results, indent=1))
    print(f"curves: {out / 'curves.png'}  results: {out / 'quality.json'}")


def main() -> int:
    args = parse_args()
    # Named, not made: Ray Train creates it, so a config error leaves nothing behind.
    storage = Path(tempfile.gettempdir()) / f"quality-{os.getpid()}-{time.time_ns()}"
    overrides = [
        f"train.epochs={args.epochs}",
        f"run.storage_path={storage}",
        f"run.name=quality-{int(time.time())}",
        f"run.checkpoints_to_keep={args.epochs}",
        *(["data.limit=600"] if args.smoke else []),
        *args.overrides,
    ]
    cfg = load_config(args.config, overrides)
    # Both configs are checked before hours of training, not after the first half of them.
    deep_cfg = hierarchical_config(cfg, args) if args.hierarchical else None
    splits = load_splits(cfg.data)
    if args.smoke:
        splits = dataclasses.replace(splits, test=splits.test[:500])
    raw = load_splits(cfg.data.model_copy(update={"binarize": "none"}))
    floor = binarization_entropy(raw.test[: len(splits.test)])
    print(f"machine: {machine()}")
    print(
        f"data: {cfg.data.source}, {len(splits.train)} training images, "
        f"{len(splits.test)} test images, batch {cfg.train.batch_size}, {args.epochs} epochs"
    )
    print(f"binarization entropy of the test images ({ENTROPY_NOTE}): {floor:.2f} nats")

    print("training the reference MLP VAE (784-400-20) ...", flush=True)
    ref, ref_curve, ref_seconds = train_reference(
        splits, args.epochs, cfg.train.batch_size, cfg.train.seed
    )
    print("training the project's model through Ray Train ...", flush=True)
    checkpoints, ours_wall = train_project(cfg)
    ours_curve = curve_on_test(checkpoints, splits.test)

    print("\nepoch  reference  raytrain_vae    gap  (test negative ELBO, nats per image)")
    for epoch, (r, o) in enumerate(zip(ref_curve, ours_curve, strict=True), start=1):
        print(f"{epoch:5d}  {r:9.2f}  {o:12.2f}  {o - r:+6.2f}")

    iwae_images = splits.test[: args.iwae_images]
    ours_model = load_model_dir(checkpoints[-1])[0]
    ours_iwae = evaluate(ours_model, iwae_images, k=args.iwae_k, batch_size=10)["iwae_nll"]
    ref_iwae = mlp_iwae(ref, iwae_images, args.iwae_k)
    dims = splits.test[0].numel()
    rows = [
        ("MLP VAE 784-400-20 (plain loop)", ref_curve[-1], ref_iwae, ref_seconds),
        (f"raytrain_vae {Path(args.config).name} (Ray Train)", ours_curve[-1], ours_iwae,
         ours_wall),
    ]  # fmt: skip
    print_rows(rows, args, len(iwae_images), dims)
    gap = ours_curve[-1] - ref_curve[-1]
    print(f"gap after {args.epochs} epochs (raytrain_vae - reference): {gap:+.2f} nats")
    deep = None
    if args.hierarchical:
        conv_epoch_s = mean_epoch_seconds(checkpoints[-1])
        deep = hierarchical_row(cfg, deep_cfg, args, splits, iwae_images, conv_epoch_s)
        report_hierarchical(deep, args, ours_curve[-1], conv_epoch_s, dims)
    if args.parquet_stream:
        stream_curve, stream_wall = train_from_parquet_stream(
            cfg, splits.test, Path(tempfile.mkdtemp(prefix="quality-parquet-"))
        )
        print(
            f"raytrain_vae {Path(args.config).name} from a Parquet stream | {args.epochs} | "
            f"{stream_curve[-1]:.2f} | - | - | {stream_wall:.0f} s"
        )
        print(
            f"Parquet stream - memory after {args.epochs} epochs: "
            f"{stream_curve[-1] - ours_curve[-1]:+.2f} nats (target: within 1 nat)"
        )

    results = {
        "machine": machine(),
        "epochs": args.epochs,
        "entropy_floor": floor,
        "reference": {"curve": ref_curve, "iwae_nll": ref_iwae, "seconds": ref_seconds},
        "raytrain_vae": {"curve": ours_curve, "iwae_nll": ours_iwae, "seconds": ours_wall},
        "iwae": {"k": args.iwae_k, "images": len(iwae_images)},
        "gap": gap,
        "config": cfg.model_dump(mode="json"),
        "hierarchical": deep,
    }
    write_results(results, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))  # a config error: one line and exit status 2
