"""Batch jobs with Ray Data on an exported model: sample, reconstruct, encode -> Parquet."""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import ray

from raytrain_vae.batch_actors import Encoder, Sampler, input_dataset, job_context, split_dataset
from raytrain_vae.cli import MODEL_HELP, HelpFormatter, check_flag, run_cli
from raytrain_vae.config import SEED_LIMIT, UserError
from raytrain_vae.input_rows import read_input_unit
from raytrain_vae.inputs import input_units, read_inputs
from raytrain_vae.model_io import load_model_dir, model_files
from raytrain_vae.models.sizing import check_fits_memory, training_memory_bytes
from raytrain_vae.outputs import check_output_dir, staged_dir
from raytrain_vae.runtime import describe, init_ray, require_resources

MAX_BATCH = 2**20
MAX_ACTORS = 10_000
MAX_SAMPLES = 10**12
OUTPUT_KIND = "generate"


def actor_cpus(concurrency: int) -> float:
    """CPUs per actor that leave room for Ray Data's read tasks: with every CPU taken by actors,
    the job waits forever for a CPU to read the ids on."""
    total = ray.cluster_resources().get("CPU", 1)
    return max(0.25, min(1.0, (total - 1) / concurrency))


@dataclass(frozen=True)
class JobOptions:
    """How a batch job runs: rows per batch, model-holding actors, GPUs per actor, whether an
    earlier output of this command may be replaced, how long to wait for an autoscaler."""

    batch_size: int = 1024
    concurrency: int = 1
    num_gpus: float = 0
    overwrite: bool = False
    resource_wait_s: float = 300
    # Called once Ray is up and the actors' resources are granted: the rows' own time begins.
    started: Callable[[], None] | None = None

    def check(self) -> None:
        """One line on the first option out of range (NaN and infinity included)."""
        for flag, value, low, high in (
            ("--batch-size", self.batch_size, 1, MAX_BATCH),
            ("--concurrency", self.concurrency, 1, MAX_ACTORS),
            ("--num-gpus", self.num_gpus, 0, 64),
            ("--resource-wait-s", self.resource_wait_s, 0, 86_400),
        ):
            check_flag(flag, value, low, high)


def _check_job(output: str, options: JobOptions, seed: int) -> Path:
    """Options, seed and output folder checked before Ray starts; the resolved output."""
    options.check()
    check_flag("--seed", seed, 0, SEED_LIMIT - 1)
    return check_output_dir(output, "--output", OUTPUT_KIND, replace=options.overwrite)


def check_model_fits(model_dir: str, options: JobOptions) -> None:
    """The model loads, and a batch of it fits this machine's memory (within 10x)."""
    model, cfg = load_model_dir(model_dir)
    check_fits_memory(
        training_memory_bytes(cfg.model, model.image_shape, options.batch_size),
        f"--batch-size {options.batch_size}",
        "lower --batch-size",
    )


def _write_job(dataset_fn, actor: type, kwargs: dict, out: Path, options: JobOptions,
               batch_format: str = "numpy") -> int:  # fmt: skip
    """Run dataset -> map_batches(actor) -> Parquet in a temp dir, then move it to out."""
    init_ray()
    cpus = actor_cpus(options.concurrency)
    bundle = {"CPU": cpus, **({"GPU": options.num_gpus} if options.num_gpus else {})}
    require_resources(
        [bundle] * options.concurrency,
        f"{options.concurrency} actor(s) x {describe(bundle)}",
        "lower --concurrency or --num-gpus",
        options.resource_wait_s,
    )
    if options.started is not None:
        options.started()
    with (
        staged_dir(out, "--output", OUTPUT_KIND) as tmp,
        job_context(options.concurrency, options.resource_wait_s),
    ):
        dataset_fn().map_batches(
            actor,
            fn_constructor_kwargs=kwargs,
            batch_size=options.batch_size,
            batch_format=batch_format,
            # Ray 2.51 deprecated map_batches(concurrency=...) for a compute strategy.
            compute=ray.data.ActorPoolStrategy(size=options.concurrency),
            num_cpus=cpus,
            **({"num_gpus": options.num_gpus} if options.num_gpus else {}),
        ).write_parquet(str(tmp))
        rows = sum(pq.read_metadata(f).num_rows for f in tmp.glob("*.parquet"))
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
    resource_wait_s: float = 300,
    started: Callable[[], None] | None = None,
) -> int:
    """Write num_samples generated rows as Parquet into output; returns the row count.
    all_levels: also every lower level's posterior mean (hierarchical models), a column each.
    started: called when Ray is up and the job's resources are granted."""
    options = JobOptions(batch_size, concurrency, num_gpus, overwrite, resource_wait_s, started)
    check_flag("--num-samples", num_samples, 1, MAX_SAMPLES)
    if not (math.isfinite(temperature) and temperature > 0):
        raise UserError(f"--temperature must be a finite number > 0 (got {temperature})")
    out = _check_job(output, options, seed)
    check_model_fits(model_dir, options)  # a missing or corrupt model fails before any actor
    kwargs = {
        "model": model_files(model_dir),
        "seed": seed,
        "temperature": temperature,
        "pixels": pixels,
    }
    return _write_job(lambda: ray.data.range(num_samples), Sampler, kwargs, out, options)


def encode_images(
    model_dir: str,
    output: str,
    split: str = "test",
    input_path: str | None = None,
    reconstruct: bool = True,
    all_levels: bool = False,
    seed: int = 0,
    batch_size: int = 1024,
    concurrency: int = 1,
    num_gpus: float = 0,
    overwrite: bool = False,
    resource_wait_s: float = 300,
    started: Callable[[], None] | None = None,
) -> int:
    """Encode (and, with reconstruct, decode and score) images into Parquet; the row count.
    started: called when Ray is up and the job's resources are granted."""
    options = JobOptions(batch_size, concurrency, num_gpus, overwrite, resource_wait_s, started)
    out = _check_job(output, options, seed)
    check_model_fits(model_dir, options)
    kwargs = {
        "model": model_files(model_dir),
        "seed": seed,
        "reconstruct": reconstruct,
        "all_levels": all_levels,
    }
    if input_path is None:
        dataset_fn = split_dataset(read_inputs(model_dir, split, None), batch_size)
    else:
        units, plan = input_units(model_dir, input_path)
        # The first unit is read here too: most bad input shows in it, and fails before Ray
        # starts; the rest is checked unit by unit in the tasks.
        read_input_unit(units[0], plan)
        dataset_fn = input_dataset(units, plan)
    return _write_job(dataset_fn, Encoder, kwargs, out, options, batch_format="pyarrow")


EXAMPLES = """examples:
  raytrain-vae generate sample --model exports/quickstart --num-samples 200000 --output samples
  raytrain-vae generate reconstruct --model exports/quickstart --output recon --split test
  raytrain-vae generate encode --model exports/quickstart --input s3://bucket/images --output z"""


def _job_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help=MODEL_HELP)
    parser.add_argument("--output", required=True, help="output directory of Parquet shards")
    parser.add_argument(
        "--seed", type=int, default=0, help="the same seed gives the same rows, at any scale"
    )
    parser.add_argument("--batch-size", type=int, default=1024, help="rows per model call")
    parser.add_argument("--concurrency", type=int, default=1, help="model-holding actors")
    parser.add_argument("--num-gpus", type=float, default=0, help="GPUs per actor")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier output of this command (never a folder it did not write)",
    )
    parser.add_argument(
        "--resource-wait-s",
        type=float,
        default=300,
        help="on an autoscaling cluster, how long to wait for room for the actors",
    )


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The generate CLI: sample, reconstruct, encode."""
    parser = argparse.ArgumentParser(
        prog=prog or "python -m raytrain_vae.generate",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=HelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser(
        "sample",
        help="generate new images from z ~ N(0, T^2 I)",
        description="New images from z ~ N(0, T^2 I): id, latent, image (PNG bytes), [pixels].",
        formatter_class=HelpFormatter,
    )
    _job_args(s)
    s.add_argument("--num-samples", type=int, required=True, help="rows to write")
    s.add_argument("--temperature", type=float, default=1.0, help="T: z ~ N(0, T^2 I)")
    s.add_argument("--pixels", action="store_true", help="also store uint8 pixels")
    for name, text in (
        ("reconstruct", "encode and decode images; score each"),
        ("encode", "latents only (embeddings)"),
    ):
        p = sub.add_parser(name, help=text, description=text, formatter_class=HelpFormatter)
        _job_args(p)
        p.add_argument(
            "--split",
            choices=["test", "val", "train"],
            default="test",
            help="the model's own data split (when no --input)",
        )
        p.add_argument("--input", help="Parquet file/dir (image or pixels column) or PNG folder")
        p.add_argument(
            "--all-levels",
            action="store_true",
            help="hierarchical models: also each lower level's posterior mean, as a column "
            "latent_mu_l<i>_<channels>x<height>x<width> (latent_mu is the top level's)",
        )
    return parser


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    start = time.perf_counter()
    clock = {"rows": start}  # when the rows' own time begins (Ray up, resources granted)
    common = {
        "seed": args.seed,
        "batch_size": args.batch_size,
        "concurrency": args.concurrency,
        "num_gpus": args.num_gpus,
        "overwrite": args.overwrite,
        "resource_wait_s": args.resource_wait_s,
        "started": lambda: clock.update(rows=time.perf_counter()),
    }
    if args.command == "sample":
        rows = sample(
            args.model, args.num_samples, args.output, temperature=args.temperature,
            pixels=args.pixels, **common,
        )  # fmt: skip
    else:
        rows = encode_images(
            args.model, args.output, args.split, args.input, args.command == "reconstruct",
            args.all_levels, **common,
        )  # fmt: skip
    end = time.perf_counter()
    where = Path(args.output).expanduser().resolve()
    rate = rows / max(end - clock["rows"], 1e-9)
    print(
        f"wrote {rows} rows to {where} in {end - start:.1f} s: {rate:.0f} rows/s over the "
        f"{end - clock['rows']:.1f} s of the job itself (Ray's start-up and checks: "
        f"{clock['rows'] - start:.1f} s)"
    )
    return 0


def cli() -> None:
    """Console-script entry point: user errors -> one line on stderr, exit status 2."""
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
