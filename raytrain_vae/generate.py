"""Batch generation with Ray Data: exported model -> new samples -> Parquet shards."""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from PIL import Image

from raytrain_vae.cli import run_cli
from raytrain_vae.config import UserError
from raytrain_vae.export import load_export, load_model
from raytrain_vae.train import init_ray


def latents_for(ids: np.ndarray, latent_dim: int, seed: int) -> torch.Tensor:
    """z ~ N(0, I) for each row id, drawn from a generator seeded by (seed, id) alone: the same
    seed and id give the same latent whatever the batching or the number of actors."""
    g = torch.Generator()
    z = torch.empty(len(ids), latent_dim)
    for row, i in enumerate(ids.tolist()):
        g.manual_seed((seed * 1_000_000_007 + i) % (2**63))
        z[row] = torch.randn(latent_dim, generator=g)
    return z


def png_bytes(image: np.ndarray) -> bytes:
    """(C, H, W) uint8 -> PNG file bytes (grey for 1 channel, RGB for 3)."""
    array = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def fixed_size_list(values: np.ndarray) -> pa.FixedSizeListArray:
    """(N, D) array -> Arrow fixed_size_list<D> column."""
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


class Sampler:
    """Ray Data actor: loads the model once, turns a batch of row ids into sample rows."""

    def __init__(self, model_dir: str, seed: int, temperature: float, pixels: bool) -> None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_model(model_dir, device)
        self.device, self.seed, self.temperature, self.pixels = device, seed, temperature, pixels

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        ids = batch["id"]
        z = latents_for(ids, self.model.cfg.latent_dim, self.seed) * self.temperature
        images = to_uint8(self.model.mean_image(self.model.decode(z.to(self.device))))
        columns = {
            "id": pa.array(ids, pa.int64()),
            "latent": fixed_size_list(z.numpy().astype(np.float32)),
            "image": pa.array([png_bytes(im) for im in images], pa.binary()),
        }
        if self.pixels:
            columns["pixels"] = fixed_size_list(images.reshape(len(images), -1))
        return pa.table(columns)


def actor_cpus(concurrency: int) -> float:
    """CPUs per actor that leave room for Ray Data's read tasks: with every CPU taken by actors,
    the job waits forever for a CPU to read the ids on."""
    total = ray.cluster_resources().get("CPU", 1)
    return max(0.25, min(1.0, (total - 1) / concurrency))


def sample(
    model_dir: str,
    num_samples: int,
    output: str,
    seed: int = 0,
    batch_size: int = 1024,
    concurrency: int = 1,
    num_gpus: float = 0,
    temperature: float = 1.0,
    pixels: bool = False,
    overwrite: bool = False,
) -> int:
    """Write num_samples generated rows as Parquet into output; returns the row count."""
    if num_samples <= 0:
        raise UserError(f"--num-samples must be > 0 (got {num_samples})")
    if batch_size <= 0 or concurrency <= 0 or temperature <= 0 or num_gpus < 0:
        raise UserError("--batch-size, --concurrency and --temperature must be > 0")
    out = Path(output).expanduser().resolve()
    if out.exists() and not overwrite:
        raise UserError(f"{out} exists: pass --overwrite to replace it")
    load_export(model_dir)  # a missing or corrupt model fails here, before any actor starts
    init_ray()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        resources = {"num_gpus": num_gpus} if num_gpus else {"num_cpus": actor_cpus(concurrency)}
        ray.data.range(num_samples).map_batches(
            Sampler,
            fn_constructor_kwargs={
                "model_dir": str(Path(model_dir).resolve()),
                "seed": seed,
                "temperature": temperature,
                "pixels": pixels,
            },
            batch_size=batch_size,
            concurrency=concurrency,
            **resources,
        ).write_parquet(str(tmp))
        rows = sum(pq.read_metadata(f).num_rows for f in tmp.glob("*.parquet"))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m raytrain_vae.generate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sample", help="generate new images from z ~ N(0, T^2 I)")
    s.add_argument("--model", required=True, help="exported model directory")
    s.add_argument("--num-samples", type=int, required=True)
    s.add_argument("--output", required=True, help="output directory of Parquet shards")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=int, default=1024)
    s.add_argument("--concurrency", type=int, default=1, help="model-holding actors")
    s.add_argument("--num-gpus", type=float, default=0, help="GPUs per actor")
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--pixels", action="store_true", help="also store uint8 pixels")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output dir")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = sample(
        args.model,
        args.num_samples,
        args.output,
        args.seed,
        args.batch_size,
        args.concurrency,
        args.num_gpus,
        args.temperature,
        args.pixels,
        args.overwrite,
    )
    seconds = time.perf_counter() - start
    print(
        f"wrote {rows} rows to {Path(args.output).resolve()} in {seconds:.1f} s "
        f"({rows / seconds:.0f} rows/s)"
    )
    return 0


def cli() -> None:
    """Console-script entry point: user errors -> one line on stderr, exit status 2."""
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
