"""Batch jobs with Ray Data on an exported model: sample, reconstruct, encode -> Parquet."""

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
from raytrain_vae.data import load_splits
from raytrain_vae.export import load_export
from raytrain_vae.heap import retain_freed_memory
from raytrain_vae.model import ConvVAE
from raytrain_vae.objectives import kl_to_standard_normal, reconstruction_nll
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


def load_actor_model(model_dir: str) -> tuple[ConvVAE, str]:
    """(model, device) for one actor: the GPU when the actor has one; on the CPU the actor's heap
    keeps freed activations when the model's config says so (each batch page-faulted its
    decoder's activations in afresh: 63-74k faults per batch of 1024)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, cfg = load_export(model_dir, device)
    if device == "cpu" and cfg.scaling.retain_freed_memory:
        retain_freed_memory()
    return model, device


def to_uint8(images: torch.Tensor) -> np.ndarray:
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def fixed_size_list(values: np.ndarray) -> pa.FixedSizeListArray:
    """(N, D) array -> Arrow fixed_size_list<D> column."""
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


class Sampler:
    """Ray Data actor: loads the model once, turns a batch of row ids into sample rows."""

    def __init__(self, model_dir: str, seed: int, temperature: float, pixels: bool) -> None:
        self.model, self.device = load_actor_model(model_dir)
        self.seed, self.temperature, self.pixels = seed, temperature, pixels

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


class Encoder:
    """Ray Data actor: encodes image rows; with reconstruct=True also decodes and scores them.

    neg_elbo is a one-sample estimate whose noise is seeded by (seed, id), so it does not depend
    on batching; recon_nll is -log p(x|z) at the posterior mean z = mu."""

    def __init__(self, model_dir: str, seed: int, reconstruct: bool) -> None:
        self.model, self.device = load_actor_model(model_dir)
        self.seed, self.reconstruct = seed, reconstruct

    @torch.no_grad()
    def __call__(self, batch: pa.Table) -> pa.Table:
        ids = batch.column("id").to_numpy()
        flat = batch.column("pixels").combine_chunks().flatten().to_numpy()
        x = torch.from_numpy(flat.reshape(len(ids), *self.model.image_shape).copy())
        x = x.to(self.device).float() / 255
        mu, logvar = self.model.encode(x)
        columns = {"id": pa.array(ids, pa.int64())}
        if "label" in batch.column_names:
            columns["label"] = batch.column("label")
        columns["latent_mu"] = fixed_size_list(mu.cpu().numpy().astype(np.float32))
        columns["latent_logvar"] = fixed_size_list(logvar.cpu().numpy().astype(np.float32))
        if self.reconstruct:
            out = self.model.decode(mu)
            eps = latents_for(ids, mu.shape[1], self.seed).to(self.device)
            sampled = self.model.decode(mu + eps * torch.exp(0.5 * logvar))
            kl = kl_to_standard_normal(mu, logvar)
            neg_elbo = reconstruction_nll(self.model, sampled, x) + kl
            images = to_uint8(self.model.mean_image(out))
            columns["reconstruction"] = pa.array([png_bytes(im) for im in images], pa.binary())
            columns["recon_nll"] = pa.array(reconstruction_nll(self.model, out, x).cpu().numpy())
            columns["neg_elbo"] = pa.array(neg_elbo.cpu().numpy())
        return pa.table(columns)


def actor_cpus(concurrency: int) -> float:
    """CPUs per actor that leave room for Ray Data's read tasks: with every CPU taken by actors,
    the job waits forever for a CPU to read the ids on."""
    total = ray.cluster_resources().get("CPU", 1)
    return max(0.25, min(1.0, (total - 1) / concurrency))


def _check_job(output: str, batch_size: int, concurrency: int, num_gpus: float, overwrite: bool):
    if batch_size <= 0 or concurrency <= 0 or num_gpus < 0:
        raise UserError("--batch-size and --concurrency must be > 0, --num-gpus >= 0")
    out = Path(output).expanduser().resolve()
    if out.exists() and not overwrite:
        raise UserError(f"{out} exists: pass --overwrite to replace it")
    return out


def _write_job(
    dataset_fn,
    actor: type,
    kwargs: dict,
    out: Path,
    batch_size: int,
    concurrency: int,
    num_gpus: float,
    batch_format: str = "numpy",
) -> int:
    """Run dataset -> map_batches(actor) -> Parquet in a temp dir, then move it to out."""
    init_ray()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        resources = {"num_gpus": num_gpus} if num_gpus else {"num_cpus": actor_cpus(concurrency)}
        dataset_fn().map_batches(
            actor,
            fn_constructor_kwargs=kwargs,
            batch_size=batch_size,
            batch_format=batch_format,
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
    if temperature <= 0:
        raise UserError(f"--temperature must be > 0 (got {temperature})")
    out = _check_job(output, batch_size, concurrency, num_gpus, overwrite)
    load_export(model_dir)  # a missing or corrupt model fails here, before any actor starts
    kwargs = {
        "model_dir": str(Path(model_dir).resolve()),
        "seed": seed,
        "temperature": temperature,
        "pixels": pixels,
    }
    return _write_job(
        lambda: ray.data.range(num_samples), Sampler, kwargs, out, batch_size, concurrency,
        num_gpus,
    )  # fmt: skip


def read_inputs(model_dir: str, split: str, input_path: str | None) -> pa.Table:
    """Rows id, label (when known), pixels (fixed_size_list<uint8>) from the model's dataset
    split, or from Parquet (an `image` PNG column or a `pixels` column) or a folder of PNGs."""
    model, cfg = load_export(model_dir)
    c, h, w = model.image_shape
    if input_path is None:
        splits = load_splits(cfg.data)
        images, labels = {
            "test": (splits.test, splits.test_labels),
            "val": (splits.val, splits.val_labels),
            "train": (splits.train, splits.train_labels),
        }[split]
        return pa.table(
            {
                "id": pa.array(np.arange(len(images)), pa.int64()),
                "label": pa.array(labels.numpy(), pa.int64()),
                "pixels": fixed_size_list(images.reshape(len(images), -1).numpy()),
            }
        )
    path = Path(input_path).expanduser()
    if path.is_dir() and not list(path.glob("*.parquet")):
        files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".png")
        if not files:
            raise UserError(f"{path}: no .png or .parquet files to read")
        pngs = [f.read_bytes() for f in files]
        table = pa.table({"path": [str(f) for f in files], "image": pa.array(pngs, pa.binary())})
    else:
        try:
            table = pq.read_table(path)
        except (OSError, pa.ArrowInvalid) as exc:
            raise UserError(f"{path}: not readable as Parquet ({exc})") from None
    if "id" not in table.column_names:
        table = table.append_column("id", pa.array(np.arange(table.num_rows), pa.int64()))
    if "pixels" in table.column_names:
        pixels = np.asarray(table.column("pixels").to_pylist(), dtype=np.uint8)
    elif "image" in table.column_names:
        pixels = np.stack([_decode_png(b, (c, h, w)) for b in table.column("image").to_pylist()])
    else:
        raise UserError(f"{path}: needs an `image` (PNG bytes) or `pixels` column")
    if pixels.ndim != 2 or pixels.shape[1] != c * h * w:
        raise UserError(f"{path}: pixels must hold {c * h * w} values per image ({c}x{h}x{w})")
    columns = {"id": table.column("id").cast(pa.int64()), "pixels": fixed_size_list(pixels)}
    if "label" in table.column_names:
        columns["label"] = table.column("label").cast(pa.int64())
    return pa.table(columns)


def _decode_png(data: bytes, shape: tuple[int, int, int]) -> np.ndarray:
    c, h, w = shape
    try:
        image = Image.open(io.BytesIO(data))
        image = image.convert("L" if c == 1 else "RGB")
    except Exception:  # PIL raises many types for bytes that are not an image
        raise UserError("input holds data that is not an image (PNG expected)") from None
    if image.size != (w, h):
        raise UserError(f"input image is {image.size[0]}x{image.size[1]}, the model takes {w}x{h}")
    array = np.asarray(image)
    return (array if c == 1 else array.transpose(2, 0, 1)).reshape(-1)


def encode_images(
    model_dir: str,
    output: str,
    split: str = "test",
    input_path: str | None = None,
    reconstruct: bool = True,
    seed: int = 0,
    batch_size: int = 1024,
    concurrency: int = 1,
    num_gpus: float = 0,
    overwrite: bool = False,
) -> int:
    """Encode (and, with reconstruct, decode and score) images into Parquet; the row count."""
    out = _check_job(output, batch_size, concurrency, num_gpus, overwrite)
    table = read_inputs(model_dir, split, input_path)
    kwargs = {"model_dir": str(Path(model_dir).resolve()), "seed": seed, "reconstruct": reconstruct}
    # One block per batch (at most 200) so every actor gets work.
    step = max(batch_size, -(-table.num_rows // 200))
    blocks = [table.slice(i, step) for i in range(0, table.num_rows, step)]
    return _write_job(
        lambda: ray.data.from_arrow(blocks), Encoder, kwargs, out, batch_size, concurrency,
        num_gpus, batch_format="pyarrow",
    )  # fmt: skip


def _job_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="exported model directory")
    parser.add_argument("--output", required=True, help="output directory of Parquet shards")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--concurrency", type=int, default=1, help="model-holding actors")
    parser.add_argument("--num-gpus", type=float, default=0, help="GPUs per actor")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")


def build_parser() -> argparse.ArgumentParser:
    """The generate CLI: sample, reconstruct, encode."""
    parser = argparse.ArgumentParser(prog="python -m raytrain_vae.generate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sample", help="generate new images from z ~ N(0, T^2 I)")
    _job_args(s)
    s.add_argument("--num-samples", type=int, required=True)
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--pixels", action="store_true", help="also store uint8 pixels")
    for name, text in (
        ("reconstruct", "encode and decode images; score each"),
        ("encode", "latents only (embeddings)"),
    ):
        p = sub.add_parser(name, help=text)
        _job_args(p)
        p.add_argument("--split", choices=["test", "val", "train"], default="test")
        p.add_argument("--input", help="Parquet file/dir (image or pixels column) or PNG folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    common = (args.seed, args.batch_size, args.concurrency, args.num_gpus)
    if args.command == "sample":
        rows = sample(
            args.model, args.num_samples, args.output, *common, args.temperature, args.pixels,
            args.overwrite,
        )  # fmt: skip
    else:
        rows = encode_images(
            args.model, args.output, args.split, args.input, args.command == "reconstruct",
            *common, args.overwrite,
        )  # fmt: skip
    seconds = time.perf_counter() - start
    where = Path(args.output).expanduser().resolve()
    print(f"wrote {rows} rows to {where} in {seconds:.1f} s ({rows / seconds:.0f} rows/s)")
    return 0


def cli() -> None:
    """Console-script entry point: user errors -> one line on stderr, exit status 2."""
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
