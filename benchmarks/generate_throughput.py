"""Batch sampling throughput: the Ray Data job vs a plain single-process loop doing the same work.

Both draw the same per-id latents, decode with the same model and batch size, encode PNGs and
write Parquet. The Ray Data job is timed end to end (planning, actors, writing) at each
concurrency, with Ray already started, as a user's job on a running cluster would be.

    python benchmarks/generate_throughput.py               # N = 200,000, concurrency 1 and 2
    python benchmarks/generate_throughput.py --smoke       # N = 2,000
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from raytrain_vae.batch_actors import latents_for, png_bytes, to_uint8
from raytrain_vae.config import dump_config, load_config
from raytrain_vae.generate import sample
from raytrain_vae.inputs import fixed_size_list
from raytrain_vae.model_io import save_weights
from raytrain_vae.models.conv import ConvVAE


def plain_loop(model: ConvVAE, n: int, batch_size: int, out: Path) -> float:
    """samples/s of a for-loop over batches: latents, decode, PNG, one Parquet file per batch."""
    out.mkdir()
    start = time.perf_counter()
    with torch.no_grad():
        for first in range(0, n, batch_size):
            ids = np.arange(first, min(first + batch_size, n))
            z = latents_for(ids, model.cfg.latent_dim, seed=0)
            images = to_uint8(model.mean_image(model.decode(z)))
            table = pa.table(
                {
                    "id": pa.array(ids, pa.int64()),
                    "latent": fixed_size_list(z.numpy()),
                    "image": pa.array([png_bytes(im) for im in images], pa.binary()),
                }
            )
            pq.write_table(table, out / f"{first:09d}.parquet")
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=200_000)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--smoke", action="store_true", help="2,000 samples")
    args = parser.parse_args()
    n = 2_000 if args.smoke else args.num_samples

    work = Path(tempfile.mkdtemp(prefix="rtv-gen-bench-"))
    try:
        cfg = load_config("configs/vae.yaml")
        torch.manual_seed(0)
        model = ConvVAE(cfg.model, (1, 28, 28)).eval()
        save_weights(model, work / "model.safetensors")
        (work / "config.yaml").write_text(dump_config(cfg))
        print(
            f"model channels={cfg.model.channels} latent={cfg.model.latent_dim}  N={n}  "
            f"batch={args.batch_size}  torch threads={torch.get_num_threads()}"
        )

        plain = plain_loop(model, n, args.batch_size, work / "plain")
        print(f"plain single-process loop : {plain:9.0f} samples/s")
        ray.init()
        for k in args.concurrency:
            start = time.perf_counter()
            rows = sample(
                str(work), n, str(work / f"ray-{k}"), batch_size=args.batch_size, concurrency=k
            )
            rate = rows / (time.perf_counter() - start)
            print(
                f"Ray Data, concurrency {k:<3}: {rate:9.0f} samples/s   "
                f"ratio to plain {rate / plain:.2f}"
            )
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
