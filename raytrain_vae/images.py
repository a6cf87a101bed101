"""PNG pictures of a model: sample grids and reconstruction grids (inputs above outputs)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from raytrain_vae.cli import MODEL_HELP, HelpFormatter, Progress, check_flag, run_cli
from raytrain_vae.config import SEED_LIMIT, UserError, child_path
from raytrain_vae.data import split_images, to_model_input
from raytrain_vae.model_io import METRICS_FILE, load_model_dir
from raytrain_vae.models import VAE
from raytrain_vae.outputs import check_output_dir, staged_dir
from raytrain_vae.pictures import grid, input_label, picture_title, sample_images, titled
from raytrain_vae.pictures import reconstruction_grid as draw_reconstructions
from raytrain_vae.storage import read_bytes

OUTPUT_KIND = "images"
MAX_GRID = 10_000  # images in one PNG grid


def save_grid(
    images: torch.Tensor,
    path: str | Path,
    nrow: int | None = None,
    title: str = "",
    row_labels: list[str] | None = None,
) -> None:
    """Save (N, C, H, W) images in [0, 1] as one titled PNG grid, nrow images per row."""
    nrow = nrow or max(1, math.ceil(math.sqrt(len(images))))
    rows = math.ceil(len(images) / nrow)
    titled(grid(images, nrow), title, row_labels, rows).save(path)


def sample_grid(model: VAE, path: str | Path, n: int = 64, seed: int = 0, title: str = "") -> None:
    """A grid of n new images E[x|z], z ~ N(0, I), reproducible by seed."""
    save_grid(sample_images(model, n, seed), path, title=title or "samples")


def reconstruction_grid(
    model: VAE, images: torch.Tensor, path: str | Path, title: str = "", inputs: str = "input"
) -> None:
    """Inputs (float in [0, 1]) on the rows labelled `inputs`, their reconstructions below."""
    rows = 2 * math.ceil(len(images) / 16)
    picture = draw_reconstructions(model, images)
    titled(picture, title or "reconstructions", [inputs, "reconstruction"], rows).save(path)


@torch.no_grad()
def interpolation_grid(
    model: VAE,
    pairs: list[tuple[torch.Tensor, torch.Tensor]],
    path: str | Path,
    steps: int = 10,
) -> None:
    """One row per pair of images: decodes of the straight line between their posterior means."""
    rows = []
    for a, b in pairs:
        mu, _ = model.encode(torch.stack([a, b]))
        t = torch.linspace(0, 1, steps, device=mu.device)[:, None]
        rows.append(model.mean_image(model.decode((1 - t) * mu[0] + t * mu[1])))
    save_grid(torch.cat(rows), path, nrow=steps, title="interpolations between test images")


@torch.no_grad()
def latent_map(model: VAE, path: str | Path, size: int = 20, span: float = 2.5) -> None:
    """For a 2-D latent space: decodes of a size x size grid over [-span, span]^2."""
    if model.cfg.latent_dim != 2:
        raise ValueError("a latent map needs latent_dim == 2")
    axis = torch.linspace(-span, span, size, device=next(model.parameters()).device)
    ys, xs = torch.meshgrid(axis.flip(0), axis, indexing="ij")  # y grows upwards
    z = torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=1)
    title = f"latent map: decodes of z over [-{span:g}, {span:g}]^2"
    save_grid(model.mean_image(model.decode(z)), path, nrow=size, title=title)


EXAMPLES = """example:
  raytrain-vae images --model exports/quickstart --output pictures"""


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """python -m raytrain_vae.images --model DIR --output DIR: every picture of a model."""
    parser = argparse.ArgumentParser(
        prog=prog or "python -m raytrain_vae.images",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--model", required=True, help=MODEL_HELP)
    parser.add_argument(
        "--output",
        required=True,
        help="folder for the PNGs: new, empty, or an earlier output of this command (replaced)",
    )
    parser.add_argument("--num-samples", type=int, default=64, help="images in samples.png")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampled z")
    args = parser.parse_args(argv)
    check_flag("--num-samples", args.num_samples, 1, MAX_GRID)
    check_flag("--seed", args.seed, 0, SEED_LIMIT - 1)
    out = check_output_dir(args.output, "--output", OUTPUT_KIND)
    model, cfg = load_model_dir(args.model)
    metrics = read_metrics(args.model)
    test = to_model_input(split_images(cfg.data, "test", 32)[0], False)
    written = {
        "samples.png": lambda p: sample_grid(
            model, p, args.num_samples, args.seed, picture_title(cfg, metrics, "samples")
        ),
        "reconstructions.png": lambda p: reconstruction_grid(
            model,
            test[:16],
            p,
            picture_title(cfg, metrics, "test reconstructions"),
            input_label(cfg),
        ),
    }
    # Up to 8 pairs of consecutive test images (a small test split gives fewer).
    pairs = [(test[i], test[i + 1]) for i in range(0, min(len(test), 16) - 1, 2)]
    if pairs:
        written["interpolations.png"] = lambda p: interpolation_grid(model, pairs, p)
    if cfg.model.latent_dim == 2:
        written["latent_map.png"] = lambda p: latent_map(model, p)
    progress = Progress("images", len(written), "pictures drawn", every_s=0.0)
    with staged_dir(out, "--output", OUTPUT_KIND) as tmp:
        for done, (name, draw) in enumerate(written.items(), 1):
            draw(tmp / name)
            progress(done)
    for name in written:
        print(f"wrote {out / name}")
    return 0


def read_metrics(model_dir: str) -> dict:
    """The model directory's metrics.json (the epoch it was saved at), or nothing; local or at
    a URI."""
    try:
        return json.loads(read_bytes(child_path(model_dir, METRICS_FILE)))
    except (UserError, ValueError):
        return {}


def cli() -> None:
    """Console-script entry point: user errors -> one line on stderr, exit status 2."""
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
