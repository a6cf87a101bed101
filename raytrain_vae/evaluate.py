"""Held-out metrics of an exported model: negative ELBO, IWAE NLL, bits/dim, recon error."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from raytrain_vae.cli import run_cli
from raytrain_vae.config import UserError
from raytrain_vae.data import load_splits, to_model_input
from raytrain_vae.export import load_export
from raytrain_vae.heap import retain_freed_memory
from raytrain_vae.model import ConvVAE
from raytrain_vae.objectives import bits_per_dim, elbo_terms, iwae_nll


@torch.no_grad()
def evaluate(
    model: ConvVAE,
    images: torch.Tensor,
    k: int = 1000,
    batch_size: int = 100,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Metrics per image in nats over uint8 images (N, C, H, W); k = 0 skips the IWAE bound."""
    torch.manual_seed(seed)
    model = model.to(device).eval()
    sums = {"recon": 0.0, "kl": 0.0, "iwae": 0.0, "mse": 0.0}
    for start in range(0, len(images), batch_size):
        x = to_model_input(images[start : start + batch_size].to(device), False)
        recon, kl = elbo_terms(model, x)
        sums["recon"] += recon.sum().item()
        sums["kl"] += kl.sum().item()
        sums["mse"] += (model.reconstruct(x) - x).pow(2).flatten(1).mean(1).sum().item()
        if k:
            sums["iwae"] += iwae_nll(model, x, k).sum().item()
    n, dims = len(images), model.num_pixels
    neg_elbo = (sums["recon"] + sums["kl"]) / n
    metrics = {
        "images": n,
        "neg_elbo": neg_elbo,
        "recon": sums["recon"] / n,
        "kl": sums["kl"] / n,
        "elbo_bits_per_dim": bits_per_dim(neg_elbo, dims),
        "reconstruction_mse": sums["mse"] / n,
    }
    if k:
        metrics |= {
            "iwae_k": k,
            "iwae_nll": sums["iwae"] / n,
            "bits_per_dim": bits_per_dim(sums["iwae"] / n, dims),
        }
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raytrain_vae.evaluate", description=__doc__)
    parser.add_argument("--model", required=True, help="exported model directory")
    parser.add_argument("--split", choices=["test", "val"], default="test")
    parser.add_argument("--k", type=int, default=1000, help="IWAE samples per image (0 = skip)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", help="also write the metrics here as JSON")
    args = parser.parse_args(argv)
    if args.k < 0:
        raise UserError(f"--k must be >= 0 (got {args.k})")
    for name in ("batch_size", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be > 0 (got {value})")

    model, cfg = load_export(args.model)
    if torch.device(args.device).type == "cpu" and cfg.scaling.retain_freed_memory:
        retain_freed_memory()
    splits = load_splits(cfg.data)
    images = splits.test if args.split == "test" else splits.val
    images = images[: args.limit] if args.limit else images
    start = time.perf_counter()
    metrics = evaluate(model, images, args.k, args.batch_size, args.seed, args.device)
    metrics |= {"split": args.split, "dataset": cfg.data.dataset, "binarize": cfg.data.binarize}
    metrics["seconds"] = time.perf_counter() - start
    text = json.dumps(metrics, indent=1)
    print(text)
    if args.output:
        _write_atomically(Path(args.output), text)
    return 0


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def cli() -> None:
    """Console-script entry point: user errors -> one line on stderr, exit status 2."""
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
