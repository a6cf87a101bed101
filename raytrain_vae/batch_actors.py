"""The Ray Data actors of the batch jobs: a model loaded once per actor, batches of rows in,
Arrow tables of latents, images (PNG) and scores out."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from raytrain_vae.inputs import fixed_size_list
from raytrain_vae.model_io import load_model_dir
from raytrain_vae.models import VAE
from raytrain_vae.objectives import kl_to_standard_normal, reconstruction_nll
from raytrain_vae.perf.heap import retain_freed_memory


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


def load_actor_model(model_dir: str) -> tuple[VAE, str]:
    """(model, device) for one actor: the GPU when the actor has one; on the CPU the actor's heap
    keeps freed activations when the model's config says so (each batch page-faulted its
    decoder's activations in afresh: 63-74k faults per batch of 1024)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, cfg = load_model_dir(model_dir, device)
    if device == "cpu" and cfg.scaling.retain_freed_memory:
        retain_freed_memory()
    return model, device


def to_uint8(images: torch.Tensor) -> np.ndarray:
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


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
