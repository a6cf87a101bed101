"""Training throughput: a plain single-process PyTorch loop vs the project's Ray Train run.

Both train the same ConvVAE on the same uint8 data tensors with the same batch size and thread
count. The paths take turns over --rounds rounds (plain, Ray 1 worker, Ray 2 workers twice,
..., plain), so drift in a shared machine's speed hits every side; steady state is the median
images/s over each run's epochs after its first.
It also prints the model's training FLOPs per image (FlopCounterMode), the machine's fp32 matmul
rate (2048x2048, same threads) and the fraction of it each path reaches, the gradient bytes DDP
all-reduces per step, and the images/s of a 2-worker DDP run (one thread each) against the
1-worker run, with gradients averaged through shared memory (the default) and through Gloo.

    python benchmarks/train_throughput.py                 # full Fashion-MNIST, 3 epochs, 2 rounds
    python benchmarks/train_throughput.py --smoke         # a few hundred images, no Gloo run
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from raytrain_vae.cli import run_cli
from raytrain_vae.config import apply_overrides, load_config, validate_config
from raytrain_vae.data import load_splits
from raytrain_vae.models.conv import ConvVAE
from raytrain_vae.objectives import training_loss
from raytrain_vae.perf.elu import ELU


def textbook_model(cfg, image_shape: tuple[int, ...]) -> ConvVAE:
    """The project's architecture as a user would write it: stock nn.ELU, not the project's
    faster CPU ELU (same function, same parameters)."""
    model = ConvVAE(cfg.model, image_shape)
    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) is ELU:
                setattr(module, name, nn.ELU())
    return model


def plain_loop(cfg, train: torch.Tensor, epochs: int) -> list[float]:
    """images/s per epoch of a textbook loop: shuffle, binarize, forward, ELBO, backward, step
    (NCHW, AdamW's default per-parameter loop on CPU, stock modules)."""
    torch.manual_seed(cfg.train.seed)
    model = textbook_model(cfg, tuple(train.shape[1:]))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=0.0)
    b = cfg.train.batch_size
    rates = []
    for _ in range(epochs):
        start = time.perf_counter()
        perm = torch.randperm(len(train))
        for i in range(0, len(train), b):
            x = torch.bernoulli(train[perm[i : i + b]].float() / 255)
            mu, logvar = model.encode(x)
            logits = model.decode(mu + torch.randn_like(mu) * (0.5 * logvar).exp())
            recon = F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
            kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum()
            loss = (recon + kl) / len(x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        rates.append(len(train) / (time.perf_counter() - start))
    return rates


def ray_train(cfg, overrides: list[str]) -> list[float]:
    """images/s per epoch reported by the project's Ray Train run."""
    import ray

    from raytrain_vae.training import fit, history_of

    raw = apply_overrides(cfg.model_dump(mode="json"), overrides)
    cfg = validate_config(raw, "benchmark config")
    cfg.run.name = f"throughput-{time.time_ns()}"
    ray.init(num_cpus=os.cpu_count())
    try:
        result = fit(cfg)
    finally:
        ray.shutdown()
    return [h["images_per_s"] for h in history_of(result)]


def training_flops_per_image(cfg, image_shape: tuple[int, ...]) -> float:
    """Forward + backward FLOPs of one training step of the project's loss, per image."""
    model = ConvVAE(cfg.model, image_shape)
    x = torch.bernoulli(torch.full((cfg.train.batch_size, *image_shape), 0.5))
    with FlopCounterMode(display=False) as counter:
        loss, _, _ = training_loss(model, x, 1.0, cfg.train.free_bits, cfg.train.iwae_k)
        loss.backward()
    return counter.get_total_flops() / len(x)


def matmul_rate(n: int = 2048, repeats: int = 10) -> float:
    """Best-of fp32 FLOP/s of an n x n matmul on this process's threads."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def report(label: str, warm: list[float], flops: float, peak: float) -> float:
    """Print and return the median of the warm epochs' images/s (first epoch of a run dropped)."""
    rate = statistics.median(warm)
    epochs = ", ".join(f"{r:.0f}" for r in warm)
    print(
        f"{label:<22}: {rate:8.0f} img/s  {rate * flops / 1e9:6.1f} GFLOP/s  "
        f"{rate * flops / peak:5.1%} of matmul  (warm epochs: {epochs})"
    )
    return rate


def print_ratios(one_runs: list, two_runs: list, gloo_runs: list, plain_runs: list) -> None:
    """Each round's ratios, taken within the round (against the plain runs around it)."""
    per_round = [
        (
            statistics.median(one) / statistics.median(before + after),
            statistics.median(two) / statistics.median(one),
            statistics.median(two_gloo) / statistics.median(one) if two_gloo else math.nan,
        )
        for one, two, two_gloo, before, after in zip(
            one_runs, two_runs, gloo_runs, plain_runs[:-1], plain_runs[1:], strict=True
        )
    ]
    for i, (r1, r2, r3) in enumerate(per_round, 1):
        print(
            f"round {i}: Ray 1 worker / plain {r1:.3f}   Ray 2 workers / 1 worker {r2:.3f}"
            f"   (Gloo {ratio_text(r3)})"
        )


def ratio_text(ratio: float) -> str:
    """A ratio, or why there is none (a path the smoke leaves out)."""
    return "not run (--smoke)" if math.isnan(ratio) else f"{ratio:.3f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/vae.yaml")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="turns each path takes")
    parser.add_argument("--smoke", action="store_true", help="a few hundred images, 2 epochs")
    parser.add_argument("--storage", default="/tmp/raytrain_vae_bench")
    parser.add_argument("overrides", nargs="*", help="key.sub=value for the project's config")
    args = parser.parse_args()

    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1 (got {args.rounds})")
    threads = torch.get_num_threads()
    epochs = 2 if args.smoke else args.epochs
    rounds = 1 if args.smoke else args.rounds
    overrides = [
        f"train.epochs={epochs}",
        f"run.storage_path={args.storage}",
        "data.binarize=dynamic",
        *(["data.limit=600"] if args.smoke else []),
        *args.overrides,
    ]
    cfg = load_config(args.config, overrides)
    splits = load_splits(cfg.data)
    image_shape = tuple(splits.train.shape[1:])
    flops = training_flops_per_image(cfg, image_shape)
    peak = matmul_rate()
    print(
        f"model channels={cfg.model.channels} latent={cfg.model.latent_dim} "
        f"residual_blocks={cfg.model.residual_blocks} batch={cfg.train.batch_size}  "
        f"train images={len(splits.train)}  threads={threads}"
    )
    print(f"training FLOPs per image (forward + backward): {flops / 1e6:.1f} MFLOP")
    params = sum(p.numel() for p in ConvVAE(cfg.model, image_shape).parameters())
    print(
        f"DDP all-reduce per step: {params * 4 / 1e6:.1f} MB of fp32 gradients "
        f"({params / 1e6:.2f}M parameters) per {cfg.train.batch_size} images"
    )
    print(f"fp32 matmul rate (2048x2048, {threads} threads), before: {peak / 1e9:.1f} GFLOP/s")

    # A shared machine's speed drifts by 10-20% over minutes, so the paths take turns: each
    # round runs the plain loop, then Ray with 1 worker, then with 2 (gradients through shared
    # memory, then through Gloo), and a last plain run closes the final round. Each ratio is taken
    # within a round, against the plain runs around it.
    one_w = ["scaling.num_workers=1", f"scaling.cpus_per_worker={threads}"]
    two_w = ["scaling.num_workers=2", f"scaling.cpus_per_worker={max(1, threads // 2)}"]
    gloo = [*two_w, "scaling.shared_memory_allreduce=false"]
    plain_epochs = max(2, epochs // 2 + 1)
    plain_runs = [plain_loop(cfg, splits.train, plain_epochs)[1:]]
    one_runs, two_runs, gloo_runs = [], [], []
    for _ in range(rounds):
        one_runs.append(ray_train(cfg, one_w)[1:])
        two_runs.append(ray_train(cfg, two_w)[1:])
        # The smoke leaves Gloo out: the same run with one flag (tests/test_train.py trains
        # both ways and compares them).
        gloo_runs.append([] if args.smoke else ray_train(cfg, gloo)[1:])
        plain_runs.append(plain_loop(cfg, splits.train, plain_epochs)[1:])
    peak = (peak + matmul_rate()) / 2
    print(f"fp32 matmul rate, mean of before and after: {peak / 1e9:.1f} GFLOP/s")

    plain_rate = report("plain PyTorch loop", sum(plain_runs, []), flops, peak)
    one_rate = report("Ray Train, 1 worker", sum(one_runs, []), flops, peak)
    two_rate = report("Ray Train, 2 workers", sum(two_runs, []), flops, peak)
    gloo_rate = (
        report("Ray 2 workers, Gloo", sum(gloo_runs, []), flops, peak)
        if not args.smoke
        else math.nan
    )
    print_ratios(one_runs, two_runs, gloo_runs, plain_runs)
    print(f"ratio Ray Train 1 worker / plain: {one_rate / plain_rate:.3f}")
    print(f"ratio Ray Train 2 workers / 1 worker: {two_rate / one_rate:.3f}")
    print(f"ratio Ray Train 2 workers with Gloo / 1 worker: {ratio_text(gloo_rate / one_rate)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))  # a config error: one line and exit status 2
