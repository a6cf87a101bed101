"""Ray Train end to end on CPU: 2 DDP workers learn, checkpoint, and resume where they stopped."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from raytrain_vae.config import load_config
from raytrain_vae.data.idx import SYSTEM_DIRS
from raytrain_vae.model_io import MODEL_FILE
from raytrain_vae.training import fit, history_of

pytestmark = pytest.mark.slow


def tiny_config(tmp_path: Path, name: str, epochs: int, *extra: str):
    fmnist = Path(SYSTEM_DIRS["fashion_mnist"][0])
    assert fmnist.is_dir(), (
        f"integration tests need Fashion-MNIST in {fmnist} (apt-get install dataset-fashion-mnist)"
    )
    return load_config(
        None,
        [
            "data.source=fashion_mnist",
            f"data.root={tmp_path / 'data'}",
            "data.download=false",
            "data.limit=640",
            "data.val_fraction=0.25",
            "model.channels=[8,16]",
            "model.hidden_dim=64",
            "model.latent_dim=8",
            "train.batch_size=32",
            "train.lr=3e-3",
            # The resume test extends a 2-epoch run to 3 epochs; a cosine schedule depends on
            # train.epochs, so only a constant rate makes that equal an uninterrupted run.
            "train.lr_schedule=constant",
            f"train.epochs={epochs}",
            "scaling.num_workers=2",
            f"run.name={name}",
            f"run.storage_path={tmp_path / 'runs'}",
            "run.checkpoints_to_keep=2",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def runs(ray_local, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    full = fit(tiny_config(tmp, "full", epochs=3))
    first = fit(tiny_config(tmp, "split", epochs=2))
    first_history = history_of(first)
    resumed = fit(tiny_config(tmp, "split", epochs=3))  # same run name: Ray Train resumes it
    return tmp, full, first_history, resumed


def test_shared_memory_all_reduce_trains_exactly_like_gloo(runs):
    tmp, full, _, _ = runs
    gloo = fit(tiny_config(tmp, "gloo", 3, "scaling.shared_memory_allreduce=false"))
    # Both sum the two ranks' gradients once (a + b is exact either way round) and halve them.
    for ours, theirs in zip(history_of(full), history_of(gloo), strict=True):
        for key in ("train_loss", "val_neg_elbo", "val_kl"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-6), key


def test_two_workers_learn_and_keep_checkpoints(runs):
    tmp, full, _, _ = runs
    history = history_of(full)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[1]["val_neg_elbo"] < history[0]["val_neg_elbo"] - 5
    assert history[2]["val_neg_elbo"] < history[0]["val_neg_elbo"]
    for h in history:
        assert h["val_neg_elbo"] == pytest.approx(h["val_recon"] + h["val_kl"])
        assert h["val_bits_per_dim"] == pytest.approx(
            h["val_neg_elbo"] / (784 * 0.6931471805599453)
        )
        assert h["images_per_s"] > 0 and h["epoch_s"] > 0
    assert full.metrics["epoch"] == 3
    run_dir = tmp / "runs" / "full"

    # Ray deletes checkpoints beyond num_to_keep in the background, just after fit() returns.
    def checkpoint_dirs():
        return sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())

    deadline = time.monotonic() + 20
    while len(checkpoint_dirs()) > 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    checkpoints = checkpoint_dirs()
    assert len(checkpoints) == 2  # run.checkpoints_to_keep
    assert Path(full.checkpoint.path) == checkpoints[-1]
    for ckpt in checkpoints:
        assert (ckpt / MODEL_FILE).stat().st_size > 0
        assert {"config.yaml", "metrics.json", "optimizer.pt", "state.json"} <= {
            p.name for p in ckpt.iterdir()
        }


def test_resumed_run_continues_at_next_epoch(runs):
    _, full, first_history, resumed = runs
    assert [h["epoch"] for h in first_history] == [1, 2]
    history = history_of(resumed)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[:2] == first_history  # the first two epochs were not run again
    # Every random stream is a function of (seed, epoch, rank): resuming changes nothing.
    expected = history_of(full)[2]
    for key in ("train_loss", "val_neg_elbo", "val_recon", "val_kl"):
        assert history[2][key] == pytest.approx(expected[key], rel=1e-5), key


def test_a_finished_run_run_again_reports_its_history_and_final_checkpoint(runs):
    # What a restored search does to a trial that finished before its driver died.
    tmp, full, _, _ = runs
    again = fit(tiny_config(tmp, "full", epochs=3))
    assert again.metrics is not None and again.metrics["epoch"] == 3
    assert again.metrics["val_neg_elbo"] == history_of(full)[-1]["val_neg_elbo"]
    assert history_of(again) == history_of(full)
    assert Path(again.checkpoint.path) != Path(full.checkpoint.path)
