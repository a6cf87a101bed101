"""What a run tracks and where: MLflow params, tags and metrics, TensorBoard pictures, from
rank 0 only; never fatal, and nothing secret in params or tags."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import torch

from raytrain_vae.config import Config, ConfigError, shown_uri
from raytrain_vae.data import to_model_input
from raytrain_vae.loop import RankRun
from raytrain_vae.mlflow_runs import RunSpec
from raytrain_vae.mlflow_sink import MlflowSink, first_line
from raytrain_vae.model_io import save_model_dir
from raytrain_vae.tensorboard_log import Board
from raytrain_vae.version import __version__

PICTURED = 16  # validation images in the reconstruction grid
CLOSE_TIMEOUT_S = 30.0  # what MLflow has not taken by then is named, and the run ends
MODEL_ARTIFACTS = "model"


def check_tracking(cfg: Config) -> None:
    """Refuse, before Ray starts, tracking this process cannot do: a missing extra, a local
    store in a folder that does not exist."""
    uri = cfg.tracking.mlflow.uri
    needs = (["mlflow"] if uri else []) + (["tensorboard"] if cfg.tracking.tensorboard else [])
    for module in needs:
        try:
            __import__(module)
        except ImportError:
            raise ConfigError(
                f"tracking: {module} is not installed: pip install -e '.[tracking]'"
            ) from None
    if uri and not uri.startswith(("http://", "https://")):
        is_sqlite = uri.startswith("sqlite:")
        path = Path(uri.removeprefix("sqlite:///") if is_sqlite else urlsplit(uri).path)
        if not path.parent.is_dir():
            raise ConfigError(f"tracking.mlflow.uri: folder {path.parent} does not exist")


def experiment_name(cfg: Config) -> str:
    return cfg.tracking.mlflow.experiment or cfg.run.name


def flat_params(cfg: Config, prefix: str = "") -> dict[str, str]:
    """The resolved config as MLflow params (`train.lr` -> '0.001'), the tracking URI shown
    without user, password or query."""
    raw = cfg.model_dump(mode="json")
    if cfg.tracking.mlflow.uri:
        raw["tracking"]["mlflow"]["uri"] = shown_uri(cfg.tracking.mlflow.uri)
    return dict(flatten(raw, prefix))


def flatten(value: object, prefix: str) -> Iterator[tuple[str, str]]:
    if isinstance(value, dict) and value:
        for key, inner in value.items():
            yield from flatten(inner, f"{prefix}{key}.")
    else:
        yield prefix.rstrip("."), str(value)


def run_tags(ray_address: str | None) -> dict[str, str]:
    """Tags of a run or search: the project version, its git commit when it has one, and the
    Ray cluster it ran on."""
    tags = {"raytrain_vae.version": __version__}
    commit = git_commit(Path(__file__).parent)
    if commit:
        tags["mlflow.source.git.commit"] = commit
    if ray_address:
        tags["ray.address"] = ray_address
    return tags


def git_commit(folder: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def tracking_spec(cfg: Config, key: str, tags: dict, tensorboard: str, mlflow: bool) -> dict:
    """What a rank tracks, passed to it in its loop config: the MLflow run (found again by
    key when resumed) unless the search tracks it, and where its TensorBoard events go."""
    return {
        "mlflow": mlflow and cfg.tracking.mlflow.uri is not None,
        "key": key,
        "tags": tags,
        "tensorboard": tensorboard if cfg.tracking.tensorboard else None,
    }


class KeptValidation:
    """A stream that keeps the first validation images it yields (for the reconstruction
    grid: a stream has no images at hand to show)."""

    def __init__(self, stream: object, keep: int) -> None:
        self.stream, self.keep, self.kept = stream, keep, None
        self.n_train = stream.n_train

    def train_batches(self, epoch: int, batch_size: int) -> Iterable[torch.Tensor]:
        return self.stream.train_batches(epoch, batch_size)

    def val_batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        for batch in self.stream.val_batches(batch_size):
            if self.kept is None:
                self.kept = batch[: self.keep].clone()
            yield batch


class RankTracker:
    """Rank 0's tracking of a run: its MLflow run (a training run's; a search's trials are
    tracked by the search) and its TensorBoard events."""

    def __init__(self, cfg: Config, spec: dict, run: RankRun, resumed: bool) -> None:
        self.sink = None
        self.mlflow = None
        if spec["mlflow"]:
            self.sink = MlflowSink(cfg.tracking.mlflow.uri)
            self.mlflow = self.sink.open_run(
                RunSpec(
                    experiment=experiment_name(cfg),
                    key=spec["key"],
                    name=cfg.run.name,
                    tags=spec["tags"],
                    params=flat_params(cfg),
                    resume=resumed,  # a new run under a reused key starts a new MLflow run
                )
            )
        self.board = Board(spec["tensorboard"]) if spec["tensorboard"] else None
        if self.board is not None and run.stream is not None:
            run.stream = KeptValidation(run.stream, PICTURED)

    def epoch(self, run: RankRun, metrics: dict[str, float]) -> None:
        """An epoch's metrics (step = epoch) and pictures."""
        if self.mlflow is not None:
            step = int(metrics["epoch"])
            self.mlflow.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step)
        if self.board is not None:
            self.board.epoch(metrics, run.model, pictured_inputs(run))

    def finished(self, run: RankRun, metrics: dict[str, float]) -> None:
        """The final model directory as artifacts, and the run marked finished."""
        if self.mlflow is None:
            return
        with tempfile.TemporaryDirectory() as tmp:
            save_model_dir(run.model, run.cfg, Path(tmp), metrics)
            self.mlflow.log_artifacts(tmp, MODEL_ARTIFACTS)
        self.mlflow.finish()

    def failed(self, exc: BaseException) -> None:
        if self.mlflow is not None:
            self.mlflow.set_tags({"failure_reason": first_line(exc)})
            self.mlflow.finish("FAILED")

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close(CLOSE_TIMEOUT_S)
        if self.board is not None:
            self.board.close()


def pictured_inputs(run: RankRun) -> torch.Tensor | None:
    """The validation images whose reconstructions are shown, in [0, 1] on the device."""
    if isinstance(run.stream, KeptValidation):
        images = run.stream.kept
    else:
        images = None if run.val_images is None else run.val_images[:PICTURED]
    return None if images is None else to_model_input(images.to(run.device), False)
