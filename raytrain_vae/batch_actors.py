"""The Ray Data side of the batch jobs: input datasets (a split in memory, or the user's files
read by one task per unit), and the actors, which load a model once and turn batches of rows
into Arrow tables of latents, images (PNG) and scores."""

from __future__ import annotations

import dataclasses
import io
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import pyarrow as pa
import ray.data
import torch
from PIL import Image

from raytrain_vae.input_rows import InputPlan, InputUnit, fixed_size_list, read_input_unit
from raytrain_vae.model_io import load_model_dir, model_dir_from_files
from raytrain_vae.models import VAE
from raytrain_vae.objectives import reconstruction_nll
from raytrain_vae.perf.heap import retain_freed_memory
from raytrain_vae.runtime import RAY_DATA_ERROR_LOGGERS, ResourceError

# The input's read tasks: a fraction of a CPU, so that they fit beside the model actors,
# which take what the job leaves (generate.py: at least 0.25 CPU each; 0.75 CPU may be free).
INPUT_READ_CPUS = 0.25


def split_dataset(table: pa.Table, batch_size: int) -> Callable[[], ray.data.Dataset]:
    """The rows of a split held in memory, one block per batch (at most 200) so every actor
    gets work."""
    step = max(batch_size, -(-table.num_rows // 200))
    blocks = [table.slice(i, step) for i in range(0, table.num_rows, step)]
    return lambda: ray.data.from_arrow(blocks)


def input_dataset(units: list[InputUnit], plan: InputPlan) -> Callable[[], ray.data.Dataset]:
    """The user's input as a stream: one Ray Data task per unit reads and checks its rows (the
    driver only listed the files and Parquet footers)."""
    items = [dataclasses.asdict(u) for u in units]
    return lambda: ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        read_input_rows,
        fn_kwargs={"plan": plan},
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=INPUT_READ_CPUS,
    )


def read_input_rows(batch: pa.Table, plan: InputPlan) -> pa.Table:
    """A Ray Data task: the units in a batch -> their checked rows."""
    units = [InputUnit(**{**row, "files": tuple(row["files"])}) for row in batch.to_pylist()]
    return pa.concat_tables([read_input_unit(unit, plan) for unit in units])


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


def load_actor_model(files: dict[str, bytes]) -> tuple[VAE, str]:
    """(model, device) for one actor, from the model directory's files (model_io.model_files):
    the actor may run on a node that cannot see the driver's disk. The GPU when the actor has
    one; on the CPU the actor's heap keeps freed activations when the model's config says so
    (each batch page-faulted its decoder's activations in afresh: 63-74k faults per batch of
    1024)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with model_dir_from_files(files, "--model") as folder:
        model, cfg = load_model_dir(folder, device)
    if device == "cpu" and cfg.scaling.retain_freed_memory:
        retain_freed_memory()
    return model, device


def to_uint8(images: torch.Tensor) -> np.ndarray:
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


class Sampler:
    """Ray Data actor: loads the model once, turns a batch of row ids into sample rows."""

    def __init__(
        self, model: dict[str, bytes], seed: int, temperature: float, pixels: bool
    ) -> None:
        self.model, self.device = load_actor_model(model)
        self.seed, self.temperature, self.pixels = seed, temperature, pixels

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        ids = batch["id"]
        noise = latents_for(ids, self.model.noise_size, self.seed).to(self.device)
        out = self.model.generate(noise, self.temperature)
        images = to_uint8(self.model.mean_image(out))
        z = self.model.top_z(noise, self.temperature).cpu()  # the top level's z
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
    on batching; recon_nll is -log p(x|z) at the posterior means (every level); latent_mu and
    latent_logvar are the top level's."""

    def __init__(
        self, model: dict[str, bytes], seed: int, reconstruct: bool, all_levels: bool = False
    ) -> None:
        self.model, self.device = load_actor_model(model)
        self.seed, self.reconstruct, self.all_levels = seed, reconstruct, all_levels

    @torch.no_grad()
    def __call__(self, batch: pa.Table) -> pa.Table:
        ids = batch.column("id").to_numpy()
        flat = batch.column("pixels").combine_chunks().flatten().to_numpy()
        x = torch.from_numpy(flat.reshape(len(ids), *self.model.image_shape).copy())
        x = x.to(self.device).float() / 255
        up = self.model.bottom_up(x)
        mu, logvar = up[0], up[1]  # the top level's posterior
        columns = {"id": pa.array(ids, pa.int64())}
        for passed in ("source", "label"):  # where each row came from, and its label
            if passed in batch.column_names:
                columns[passed] = batch.column(passed)
        columns["latent_mu"] = fixed_size_list(mu.cpu().numpy().astype(np.float32))
        columns["latent_logvar"] = fixed_size_list(logvar.cpu().numpy().astype(np.float32))
        mean = self.model.mean_pass(x, up) if self.reconstruct or self.all_levels else None
        if self.all_levels:
            for name, means in zip(self.model.level_names[1:], mean.means[1:], strict=True):
                columns[f"latent_mu_{name}"] = fixed_size_list(
                    means.cpu().numpy().astype(np.float32)
                )
        if self.reconstruct:
            out = mean.out
            eps = latents_for(ids, self.model.noise_size, self.seed).to(self.device)
            sampled = self.model.top_down(up, 1, eps[None])
            neg_elbo = reconstruction_nll(self.model, sampled.out, x) + sampled.kl[0]
            images = to_uint8(self.model.mean_image(out))
            columns["reconstruction"] = pa.array([png_bytes(im) for im in images], pa.binary())
            columns["recon_nll"] = pa.array(reconstruction_nll(self.model, out, x).cpu().numpy())
            columns["neg_elbo"] = pa.array(neg_elbo.cpu().numpy())
        return pa.table(columns)


@contextmanager
def job_context(concurrency: int, resource_wait_s: float) -> Iterator[None]:
    """Ray Data settings for one job, restored afterwards: an actor's UserError reaches the CLI
    as itself (a UserCodeException would drop it on the way from the worker), and actors that
    cannot start fail after a bounded wait instead of never."""
    ctx = ray.data.DataContext.get_current()
    saved = ctx.raise_original_map_exception, ctx.wait_for_min_actors_s
    loggers = [logging.getLogger(name) for name in RAY_DATA_ERROR_LOGGERS]
    levels = [logger.level for logger in loggers]
    ctx.raise_original_map_exception = True
    ctx.wait_for_min_actors_s = max(60, int(resource_wait_s))
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    except ray.exceptions.GetTimeoutError:
        raise ResourceError(
            f"the {concurrency} actor(s) did not start within "
            f"{ctx.wait_for_min_actors_s} s; lower --concurrency or --num-gpus"
        ) from None
    finally:
        ctx.raise_original_map_exception, ctx.wait_for_min_actors_s = saved
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
