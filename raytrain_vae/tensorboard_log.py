"""TensorBoard events of one run: per-epoch scalars, its sample and reconstruction grids every
epoch, and the model graph once; a failure to write warns once and never stops training."""

from __future__ import annotations

import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from raytrain_vae.config import is_uri
from raytrain_vae.models import VAE
from raytrain_vae.pictures import grid, reconstruction_grid, sample_images
from raytrain_vae.storage import filesystem_for

SAMPLES = 64
SAMPLE_SEED = 0  # the same z every epoch: a person watches the same samples get sharper


class Board:
    """A run's TensorBoard folder: local, or a URI written locally and copied after each epoch
    (TensorBoard's writer only writes local files)."""

    def __init__(self, target: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.target = target
        self.local = Path(tempfile.mkdtemp(prefix="raytrain_vae-tb-")) if is_uri(target) else None
        self.writer = SummaryWriter(str(self.local or target))
        self._failed = False
        self._graphed = False

    def epoch(self, metrics: dict[str, float], model: VAE, inputs: torch.Tensor | None) -> None:
        """An epoch's scalars (step = epoch), samples and, given inputs in [0, 1], their
        reconstructions; the model graph with the first epoch written."""
        step = int(metrics["epoch"])
        try:
            for name, value in metrics.items():
                if name != "epoch":
                    self.writer.add_scalar(name, value, step)
            with eval_mode(model):
                self.writer.add_image(
                    "samples", grid(sample_images(model, SAMPLES, SAMPLE_SEED)), step
                )
                if inputs is not None:
                    self.writer.add_image(
                        "reconstructions", reconstruction_grid(model, inputs), step
                    )
                if not self._graphed and inputs is not None:
                    self._graph(model, inputs[:1])
            self.writer.flush()
            self._upload()
        except Exception as exc:  # noqa: BLE001 - pictures are never worth a failed run
            self._warn(exc)

    def close(self) -> None:
        try:
            self.writer.close()
            self._upload()
        except Exception as exc:  # noqa: BLE001
            self._warn(exc)
        if self.local is not None:
            shutil.rmtree(self.local, ignore_errors=True)

    def _graph(self, model: VAE, example: torch.Tensor) -> None:
        self._graphed = True
        try:
            with warnings.catch_warnings():  # torch.jit.trace: deprecation and tracer notices
                warnings.simplefilter("ignore")
                self.writer.add_graph(GraphPass(model), example)
        except Exception as exc:  # noqa: BLE001 - a model torch.jit cannot trace has no graph
            self._warn(exc, "the model graph")

    def _upload(self) -> None:
        if self.local is None:
            return
        import pyarrow.fs as pafs

        filesystem, inner = filesystem_for(self.target)
        filesystem.create_dir(inner, recursive=True)
        pafs.copy_files(str(self.local), inner, destination_filesystem=filesystem)

    def _warn(self, exc: Exception, what: str = "events") -> None:
        if not self._failed:
            self._failed = True
            print(
                f"warning: TensorBoard {what} at {self.target} not written "
                f"({type(exc).__name__}: {str(exc)[:160]}); training goes on",
                file=sys.stderr,
                flush=True,
            )


class GraphPass(torch.nn.Module):
    """The model's deterministic path for its graph: encode, decode the posterior means."""

    def __init__(self, model: VAE) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.mean_image(self.model.mean_pass(x).out)


class eval_mode:  # noqa: N801 - used as a context manager, like torch.no_grad
    """The model in eval mode for the pictures, then back in the mode it was in."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.was_training = model, model.training

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)
