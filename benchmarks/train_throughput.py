"""Training throughput: a plain single-process PyTorch loop vs the project's Ray Train run.

Both train the same ConvVAE on the same uint8 data tensors with the same batch size and thread
count. The plain loop runs before and after the Ray run, so drift in a shared machine's speed
hits both sides; steady state is the median images/s over epochs after each side's first.

    python benchmarks/train_throughput.py                 # full Fashion-MNIST, 3 epochs each
    python benchmarks/train_throughput.py --smoke         # a few hundred images, seconds of work
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from raytrain_vae.config import load_config
from raytrain_vae.data import load_splits
from raytrain_vae.model import ConvVAE


def plain_loop(cfg, train: torch.Tensor, epochs: int) -> list[float]:
    """images/s per epoch of a textbook loop: shuffle, binarize, forward, ELBO, backward, step."""
    torch.manual_seed(cfg.train.seed)
    model = ConvVAE(cfg.model, tuple(train.shape[1:]))
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


def ray_train(cfg, epochs: int, storage: str) -> list[float]:
    """images/s per epoch reported by the project's Ray Train run (1 worker, all threads)."""
    import ray

    from raytrain_vae.train import fit, history_of

    ray.init(num_cpus=os.cpu_count())
    try:
        result = fit(cfg)
    finally:
        ray.shutdown()
    return [h["images_per_s"] for h in history_of(result)]


def report(label: str, warm: list[float]) -> float:
    """Print and return the median of the warm epochs' images/s (first epoch of a run dropped)."""
    rate = statistics.median(warm)
    print(f"{label:<20}: {rate:8.0f} img/s  (warm epochs: {', '.join(f'{r:.0f}' for r in warm)})")
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/vae.yaml")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="a few hundred images, 2 epochs")
    parser.add_argument("--storage", default="/tmp/raytrain_vae_bench")
    args = parser.parse_args()

    threads = torch.get_num_threads()
    epochs = 2 if args.smoke else args.epochs
    overrides = [
        f"train.epochs={epochs}",
        "scaling.num_workers=1",
        f"scaling.cpus_per_worker={threads}",
        f"run.storage_path={args.storage}",
        f"run.name=throughput-{int(time.time())}",
        "data.binarize=dynamic",
    ]
    if args.smoke:
        overrides.append("data.limit=600")
    cfg = load_config(args.config, overrides)
    splits = load_splits(cfg.data)
    print(
        f"model channels={cfg.model.channels} latent={cfg.model.latent_dim} "
        f"batch={cfg.train.batch_size}  train images={len(splits.train)}  threads={threads}"
    )

    plain_epochs = max(2, epochs // 2 + 1)
    plain = plain_loop(cfg, splits.train, plain_epochs)[1:]
    ray_rates = ray_train(cfg, epochs, args.storage)[1:]
    plain += plain_loop(cfg, splits.train, plain_epochs)[1:]
    plain_rate = report("plain PyTorch loop", plain)
    ray_rate = report("Ray Train, 1 worker", ray_rates)
    print(f"ratio Ray Train / plain: {ray_rate / plain_rate:.3f}")


if __name__ == "__main__":
    main()
