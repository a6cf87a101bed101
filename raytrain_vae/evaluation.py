"""Held-out metrics of an exported model: negative ELBO, IWAE NLL, bits/dim, recon error."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from raytrain_vae.cli import (
    JSON_HELP,
    MODEL_HELP,
    HelpFormatter,
    Progress,
    check_flag,
    print_json,
    run_cli,
)
from raytrain_vae.config import SEED_LIMIT, UserError
from raytrain_vae.data import split_images, to_model_input
from raytrain_vae.diagnostics import UnitActivity, latent_diagnostics
from raytrain_vae.model_io import load_model_dir
from raytrain_vae.models import VAE
from raytrain_vae.models.sizing import check_fits_memory, training_memory_bytes
from raytrain_vae.objectives import bits_per_dim, iwae_nll, reconstruction_nll
from raytrain_vae.outputs import check_output_file, write_file_atomically
from raytrain_vae.perf.heap import retain_freed_memory

WRITTEN_BY = "raytrain_vae.evaluate"
MAX_K = 1_000_000
MAX_BATCH = 2**20


def evaluate(
    model: VAE,
    images: torch.Tensor,
    k: int = 1000,
    batch_size: int = 100,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Metrics per image in nats over uint8 images (N, C, H, W); k = 0 skips the IWAE bound.
    Also the KL per level and per latent group, and the active units of each level.
    device: where to score (the model is moved there); None = where the model is. The caller's
    random state and the model's train/eval mode are left as they were. progress, if given,
    hears the number of images scored after each batch."""
    device = next(model.parameters()).device if device is None else torch.device(device)
    was_training = model.training
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            return score_images(model.to(device).eval(), images, k, batch_size, seed, progress)
        finally:
            model.train(was_training)


@torch.no_grad()
def score_images(
    model: VAE,
    images: torch.Tensor,
    k: int,
    batch_size: int,
    seed: int,
    progress: Callable[[int], None] | None,
) -> dict[str, Any]:
    """evaluate()'s work, the model in eval mode on its device."""
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    sums = {"recon": 0.0, "kl": 0.0, "iwae": 0.0, "mse": 0.0}
    kl_groups, activity, shifts = 0.0, UnitActivity(), UnitActivity()
    for start in range(0, len(images), batch_size):
        x = to_model_input(images[start : start + batch_size].to(device), False)
        p = model(x)
        sums["recon"] += reconstruction_nll(model, p.out, x).sum().item()
        sums["kl"] += p.kl[0].sum().item()
        kl_groups = kl_groups + p.kl_groups[0].double().sum(dim=0)
        mean = model.mean_pass(x)
        activity.add(mean.means)
        shifts.add(mean.shifts)
        sums["mse"] += (model.mean_image(mean.out) - x).pow(2).flatten(1).mean(1).sum().item()
        if k:
            sums["iwae"] += iwae_nll(model, x, k).sum().item()
        if progress is not None:
            progress(start + len(x))
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
    metrics["bits_per_dim_means"] = model.likelihood.bits_per_dim_meaning
    return metrics | latent_diagnostics(model, kl_groups / n, activity, shifts)


def evaluate_export(
    directory: str | Path,
    split: str = "test",
    limit: int | None = None,
    k: int = 1000,
    batch_size: int = 100,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
) -> dict:
    """evaluate() of an exported model on its own data's split (test or val), the first `limit`
    images, with the data, shape and likelihood named in the metrics."""
    model, cfg = load_model_dir(directory)
    check_fits_memory(
        training_memory_bytes(cfg.model, model.image_shape, batch_size),
        f"batch size {batch_size}",
        "lower the batch size",
    )
    device = torch.device(device)
    if device.type == "cpu" and cfg.scaling.retain_freed_memory:
        retain_freed_memory()
    images, _ = split_images(cfg.data, split, limit)
    start = time.perf_counter()
    if progress is not None:
        progress.total = len(images)
    metrics = evaluate(model, images, k, batch_size, seed, device, progress)
    metrics |= {
        "split": split,
        "dataset": cfg.data.path or cfg.data.source,
        "image_shape": list(model.image_shape),
        "likelihood": cfg.model.likelihood,
        "binarize": cfg.data.binarize,
    }
    metrics["seconds"] = time.perf_counter() - start
    return metrics


EXAMPLES = """examples:
  raytrain-vae evaluate --model exports/quickstart --k 100 --limit 1000
  raytrain-vae evaluate --model exports/quickstart --output metrics.json
  raytrain-vae evaluate --model exports/quickstart --json | jq .iwae_nll
  raytrain-vae evaluate --model s3://bucket/runs/vae/checkpoint_2026-12-03_21-42-38.808723"""


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog or "python -m raytrain_vae.evaluate",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--model", required=True, help=MODEL_HELP)
    parser.add_argument(
        "--split", choices=["test", "val"], default="test", help="the model's data split"
    )
    parser.add_argument("--k", type=int, default=1000, help="IWAE samples per image (0 = skip)")
    parser.add_argument("--batch-size", type=int, default=100, help="images per model call")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N images")
    parser.add_argument("--seed", type=int, default=0, help="seed of the importance samples")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device (cpu, cuda, cuda:1)",
    )
    parser.add_argument("--output", help="also write the metrics here as JSON")
    parser.add_argument("--json", action="store_true", help=JSON_HELP)
    args = parser.parse_args(argv)
    check_args(args)
    device = parse_device(args.device)
    output = None if args.output is None else check_output_file(args.output, "--output", WRITTEN_BY)

    progress = Progress("evaluate", 0, "images scored")
    metrics = evaluate_export(
        args.model, args.split, args.limit, args.k, args.batch_size, args.seed, device, progress
    )
    metrics["written_by"] = WRITTEN_BY  # lets a later run replace this file, and nothing else
    if output is not None:
        write_file_atomically(output, json.dumps(metrics, indent=1) + "\n", "--output")
    print("\n".join(metric_lines(args.model, metrics)), file=sys.stderr if args.json else None)
    if args.json:
        print_json(metrics)
    return 0


def metric_lines(model: str, m: dict) -> list[str]:
    """The metrics as a person reads them."""
    c, h, w = m["image_shape"]
    lines = [
        f"{model}: {m['split']} split of {m['dataset']}, {m['images']} images "
        f"({c}x{h}x{w}, {m['likelihood']} likelihood), in {m['seconds']:.1f} s",
        f"  negative ELBO  {m['neg_elbo']:10.3f} nats/image  {m['elbo_bits_per_dim']:.4f} bits/dim"
        f"  (reconstruction {m['recon']:.3f} + KL {m['kl']:.3f})",
    ]
    if "iwae_nll" in m:
        lines.append(
            f"  IWAE NLL       {m['iwae_nll']:10.3f} nats/image  {m['bits_per_dim']:.4f} bits/dim"
            f"  (k = {m['iwae_k']}, an upper bound on the true NLL)"
        )
    lines.append(f"  reconstruction MSE {m['reconstruction_mse']:.5f} (pixels in [0, 1])")
    lines.append(f"  bits/dim: {m['bits_per_dim_means']}")
    for name, kl in m["kl_per_level"].items():
        lines.append(
            f"  level {name:<10} KL {kl:8.3f} nats  active units {m['active_units'][name]}/"
            f"{m['units'][name]}, conditional {m['conditional_active_units'][name]}"
        )
    lines.append(
        "  (active: posterior mean variance over the images > 0.01; conditional: of the "
        "posterior mean less the prior mean given the levels above)"
    )
    return lines


def check_args(args: argparse.Namespace) -> None:
    """One line on the first flag out of the range the code can use."""
    for flag, value, low, high in (
        ("--k", args.k, 0, MAX_K),
        ("--batch-size", args.batch_size, 1, MAX_BATCH),
        ("--limit", args.limit, 1, 2**40),
        ("--seed", args.seed, 0, SEED_LIMIT - 1),
    ):
        check_flag(flag, value, low, high)


def parse_device(text: str) -> torch.device:
    """--device as a torch device this machine has."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {text[:40]!r}: not a torch device (cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {text}: this machine has no CUDA GPU; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {text}: this machine has {torch.cuda.device_count()} GPU(s)")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {text}: only cpu and cuda devices are supported")
    return device


def cli() -> None:
    """Console-script entry point: user errors -> one line on stderr, exit status 2."""
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
