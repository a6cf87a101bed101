"""Model variants side by side in one process (no Ray), each trained by the workers' own epoch
loop: test negative ELBO, KL per level and epoch time after a few short epochs. Used to choose
the hierarchical model's defaults.

    python benchmarks/model_variants.py                  # the variants below, 3 epochs, 20k images
    python benchmarks/model_variants.py --smoke          # 300 images, 1 epoch
    python benchmarks/model_variants.py --epochs 10 --limit 0 -- "model.residual_blocks=1"
    python benchmarks/model_variants.py --only --epochs 10 --limit 0 -- model.type=hierarchical

Each variant is a list of key.sub=value overrides of configs/vae.yaml; all see the same images,
dynamic binarization, batch size, seed, learning-rate schedule and test images (the first
--test-images of the test split, one seeded sample each). Times are this machine's, with
torch's default threads; compare the ratios within one run.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from raytrain_vae.checkpoint import TrainState
from raytrain_vae.cli import run_cli
from raytrain_vae.config import ConfigError, load_config
from raytrain_vae.data import load_splits
from raytrain_vae.diagnostics import group_sizes
from raytrain_vae.loop import RankRun, memory_format_for, train_epoch
from raytrain_vae.models import build_model
from raytrain_vae.objectives import reconstruction_nll
from raytrain_vae.optim import make_optimizer

LEVELS_2 = "model.levels=[{size: 7, channels: 16}, {size: 14, channels: 8}]"
VARIANTS = {
    "conv (default)": [],
    "conv, residual_blocks 1": ["model.residual_blocks=1"],
    "hierarchical, 16x7x7 + 8x14x14": ["model.type=hierarchical", LEVELS_2],
    "hierarchical, 8x7x7 + 4x14x14": [
        "model.type=hierarchical",
        "model.levels=[{size: 7, channels: 8}, {size: 14, channels: 4}]",
    ],
    "hierarchical, 16x7x7 x2 + 8x14x14": [
        "model.type=hierarchical",
        "model.levels=[{size: 7, channels: 16}, {size: 7, channels: 16}, {size: 14, channels: 8}]",
    ],
    "hierarchical, 2 levels, residual_blocks 1, hidden 512": [
        "model.type=hierarchical",
        LEVELS_2,
        "model.residual_blocks=1",
        "model.hidden_dim=512",
    ],  # fmt: skip
    "hierarchical, 2 levels, KL warm-up 1 epoch": [
        "model.type=hierarchical",
        LEVELS_2,
        "train.kl_warmup_epochs=1",
    ],  # fmt: skip
}


@torch.no_grad()
def score_on_test(model, test: torch.Tensor) -> tuple[float, list[float]]:
    """(negative ELBO, KL per level) per test image, one seeded sample of x and of z each.
    The training's random stream is left as it was: reseeding it here would give every later
    epoch the same shuffle, binarization and latent noise."""
    model.eval()
    g = torch.Generator().manual_seed(1)
    total, groups = 0.0, 0.0
    with torch.random.fork_rng():
        torch.manual_seed(123)
        for i in range(0, len(test), 500):
            x = torch.bernoulli(test[i : i + 500].float() / 255, generator=g)
            p = model(x)
            total += float((reconstruction_nll(model, p.out, x) + p.kl[0]).sum())
            groups = groups + p.kl_groups[0].sum(dim=0)
    model.train()
    per_level = (groups / len(test)).split(group_sizes(model))
    return total / len(test), [float(k.sum()) for k in per_level]


def train_variant(overrides: list[str], train: torch.Tensor, test: torch.Tensor, epochs: int):
    """The variant trained for `epochs` by the workers' own epoch loop (`train_epoch`: its
    seeded shuffle and binarization, and every train.* key: schedule, clipping, autocast), in
    one process with the whole batch; a line per epoch."""
    cfg = load_config("vae", [f"train.epochs={epochs}", *overrides])
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, tuple(train.shape[1:])).to(memory_format=memory_format_for(cfg))
    optimizer = make_optimizer(model, cfg, torch.device("cpu"))
    run = RankRun(cfg, model, model, optimizer, train, None, cfg.data.binarize == "dynamic")
    state, binarizer = TrainState(), torch.Generator()
    params = sum(p.numel() for p in model.parameters())
    for epoch in range(epochs):
        start = time.perf_counter()
        train_epoch(run, state, epoch, binarizer)
        seconds = time.perf_counter() - start
        score, kl = score_on_test(model, test)
        levels = " + ".join(f"{k:.1f}" for k in kl)
        print(
            f"  epoch {epoch + 1}: test neg ELBO {score:.2f}  KL per level {levels}  "
            f"{seconds:.1f} s  ({params / 1e6:.2f}M parameters)",
            flush=True,
        )
    return score, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--limit", type=int, default=20000, help="training images (0 = all)")
    parser.add_argument("--test-images", type=int, default=10000)
    parser.add_argument("--smoke", action="store_true", help="300 images, 1 epoch, 2 variants")
    parser.add_argument("--only", action="store_true", help="train the given variant alone")
    parser.add_argument("overrides", nargs="*", help="one more variant: key.sub=value ...")
    args = parser.parse_args()
    if args.only and not args.overrides:
        raise ConfigError("--only needs the variant's overrides: key.sub=value ...")
    variants = {} if args.only else dict(VARIANTS)
    if args.overrides:
        variants["given"] = args.overrides
    if args.smoke:
        args.epochs, args.limit, args.test_images = 1, 300, 200
        if not args.only:
            pair = ("conv (default)", "hierarchical, 16x7x7 + 8x14x14")
            variants = {k: variants[k] for k in pair}
    for overrides in variants.values():  # a bad key fails now, not after the other variants
        load_config("vae", [f"train.epochs={args.epochs}", *overrides])
    splits = load_splits(load_config("vae").data)
    train = splits.train[: args.limit or None]
    test = splits.test[: args.test_images]
    print(f"{len(train)} training images, {len(test)} test images, {args.epochs} epochs")
    results = {}
    for name, overrides in variants.items():
        print(f"{name}: {' '.join(overrides) or '(configs/vae.yaml)'}", flush=True)
        results[name] = train_variant(overrides, train, test, args.epochs)
    if args.only:  # no default to compare with
        return 0
    base_score, base_seconds = results["conv (default)"]
    print("\nvariant | test neg ELBO | vs default | epoch time vs default")
    for name, (score, seconds) in results.items():
        print(f"{name} | {score:.2f} | {score - base_score:+.2f} | {seconds / base_seconds:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))  # a config error: one line and exit status 2
