"""The Ray-free worker loop in one process: epochs, cross-rank sums, divergence, schedules,
seeding, fault injection and checkpoints, on a tiny model and tiny images."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from raytrain_vae.checkpoint import TrainState, load_checkpoint, read_state, save_checkpoint
from raytrain_vae.config import ConfigError, UserError, load_config
from raytrain_vae.faults import FAIL_ONCE_ENV, fault_injector
from raytrain_vae.loop import (
    EpochSums,
    RankRun,
    TrainingDiverged,
    autocast_for,
    check_finite,
    epoch_metrics,
    reduce_sums,
    run_epoch,
    seed_epoch,
    train_epoch,
    train_step,
)
from raytrain_vae.models import build_model
from raytrain_vae.optim import make_optimizer, set_learning_rate

TINY = [
    "model.channels=[4,8]",
    "model.hidden_dim=8",
    "model.latent_dim=2",
    "train.batch_size=8",
    "scaling.num_workers=1",
]
SHAPE = (1, 28, 28)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a busy machine, tiny ops on several threads mostly wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def cpu_reduce(t: torch.Tensor, op: str) -> torch.Tensor:
    """One rank: the sum (or max) over ranks is the rank's own tensor."""
    return t.cpu()


def tiny_cfg(*extra: str):
    return load_config(None, [*TINY, *extra])


def patterns(n: int, value: int = 255) -> torch.Tensor:
    """n uint8 images, each one of four fixed patterns (stripes both ways, two halves)."""
    base = torch.zeros(4, 1, 28, 28, dtype=torch.uint8)
    base[0, :, ::2, :] = value
    base[1, :, :, ::2] = value
    base[2, :, :14, :] = value
    base[3, :, :, 14:] = value
    return base[torch.arange(n) % 4].clone()


def make_run(cfg, n_train: int = 64, n_val: int = 16, dynamic: bool = False) -> RankRun:
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, SHAPE)
    return RankRun(
        cfg=cfg,
        model=model,
        trained=model,
        optimizer=make_optimizer(model, cfg, torch.device("cpu")),
        train_images=patterns(n_train),
        val_images=patterns(n_val),
        dynamic_binarize=dynamic,
    )


def grad_norm(model: torch.nn.Module) -> float:
    grads = [p.grad.detach().flatten() for p in model.parameters() if p.grad is not None]
    return torch.cat(grads).norm().item()


@pytest.mark.parametrize("dynamic", [False, True])
def test_epochs_lower_the_loss_and_advance_the_state(dynamic):
    epochs = 8
    cfg = tiny_cfg("train.lr=3e-2", f"train.epochs={epochs}")
    # Pixels of 200/255: dynamic binarization draws fresh samples, static uses the grey values.
    run = make_run(cfg, dynamic=dynamic)
    run.train_images, run.val_images = patterns(64, value=200), patterns(16, value=200)
    assert run.steps_per_epoch == 8
    state = TrainState()
    binarizer = torch.Generator()
    val_indices = torch.arange(len(run.val_images))
    history = []
    for epoch in range(epochs):
        metrics = run_epoch(run, state, epoch, binarizer, val_indices, reduce=cpu_reduce)
        history.append(metrics)
        assert state.epoch == epoch + 1
        assert state.step == (epoch + 1) * run.steps_per_epoch
        assert metrics["epoch"] == epoch + 1
    assert state.history == history
    first, last = history[0]["train_loss"], history[-1]["train_loss"]
    assert last < 0.75 * first, [h["train_loss"] for h in history]
    assert history[-1]["val_neg_elbo"] < history[0]["val_neg_elbo"]
    for m in history:
        assert m["val_neg_elbo"] == pytest.approx(m["val_recon"] + m["val_kl"])
        assert m["val_bits_per_dim"] == pytest.approx(m["val_neg_elbo"] / (784 * math.log(2)))


def test_train_epoch_sums_every_image_of_the_shard_once():
    cfg = tiny_cfg()
    run = make_run(cfg, n_train=20)  # 20 images, batches of 8: 8 + 8 + 4
    state = TrainState()
    sums, weight = train_epoch(run, state, 0, torch.Generator())
    assert state.step == run.steps_per_epoch == 3
    assert sums.dtype == torch.float64
    assert sums[0].item() == 20
    assert weight == cfg.train.beta
    # Loss = recon + KL per image (beta 1, no free bits): the sums agree.
    assert sums[1].item() == pytest.approx(sums[2].item() + sums[3].item(), rel=1e-5)


def test_rank_sums_reduce_to_count_weighted_means():
    # Rank A: 10 training images, 4 validation images; rank B: 30 and 12.
    train_a = torch.tensor([10.0, 1000.0, 900.0, 50.0], dtype=torch.float64)
    val_a = torch.tensor([4.0, 400.0, 20.0], dtype=torch.float64)
    train_b = torch.tensor([30.0, 1500.0, 1200.0, 240.0], dtype=torch.float64)
    val_b = torch.tensor([12.0, 360.0, 84.0], dtype=torch.float64)
    seen = []

    def reduce(t: torch.Tensor) -> torch.Tensor:
        seen.append(t.clone())
        return t + torch.cat([train_b, val_b])  # what a sum over the two ranks returns

    totals = reduce_sums(train_a, val_a, reduce)
    assert len(seen) == 1 and torch.equal(seen[0], torch.cat([train_a, val_a]))  # one message
    assert totals == EpochSums(40.0, 2500.0, 2100.0, 290.0, 16.0, 760.0, 104.0)
    m = epoch_metrics(totals, epoch=2, weight=0.5, seconds=(4.0, 5.0), num_pixels=784)
    assert m["epoch"] == 3
    assert m["train_loss"] == pytest.approx(2500 / 40)  # 62.5; mean of rank means: 75
    assert m["train_recon"] == pytest.approx(2100 / 40)
    assert m["train_kl"] == pytest.approx(290 / 40)
    assert m["val_recon"] == pytest.approx(760 / 16)
    assert m["val_kl"] == pytest.approx(104 / 16)
    # (400 + 360 + 20 + 84) / 16 = 54; the mean of the ranks' means would be (105 + 37) / 2 = 71.
    assert m["val_neg_elbo"] == pytest.approx(54.0)
    assert m["val_bits_per_dim"] == pytest.approx(54.0 / (784 * math.log(2)))
    assert m["kl_weight"] == 0.5
    assert m["images_per_s"] == pytest.approx(40 / 4.0)
    assert m["epoch_s"] == 5.0


def test_epoch_sums_round_trip_through_a_tensor():
    sums = EpochSums(1, 2, 3, 4, 5, 6, 7)
    t = sums.to_tensor()
    assert t.dtype == torch.float64 and t.tolist() == [1, 2, 3, 4, 5, 6, 7]
    assert EpochSums.from_tensor(t) == sums


FINITE = EpochSums(8.0, 800.0, 700.0, 100.0, 4.0, 300.0, 20.0)


@pytest.mark.parametrize("field", ["train_loss", "val_recon", "val_kl"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_check_finite_raises_on_a_nan_or_infinite_sum(field, bad):
    totals = EpochSums(**{**FINITE.__dict__, field: bad})
    with pytest.raises(TrainingDiverged, match="training diverged in epoch 3") as info:
        check_finite(totals, epoch=2)
    assert isinstance(info.value, UserError)


def test_check_finite_is_quiet_for_finite_sums():
    check_finite(FINITE, epoch=0)


def test_a_diverged_epoch_raises_and_records_nothing():
    cfg = tiny_cfg()
    run = make_run(cfg, n_train=16, n_val=8)
    with torch.no_grad():
        for p in run.model.parameters():
            p.fill_(math.nan)
    earlier = {"epoch": 1, "train_loss": 500.0}
    state = TrainState(epoch=1, step=2, history=[dict(earlier)])
    with pytest.raises(TrainingDiverged):
        run_epoch(run, state, 1, torch.Generator(), torch.arange(8), reduce=cpu_reduce)
    assert state.epoch == 1
    assert state.history == [earlier]


def test_bf16_autocast_step_runs_on_cpu_and_updates_the_parameters():
    cfg = tiny_cfg("train.amp=bf16")
    run = make_run(cfg, n_train=8)
    before = [p.detach().clone() for p in run.model.parameters()]
    x = patterns(8).float().div(255)
    loss, recon, kl, weight = train_step(run, TrainState(), x)
    assert torch.isfinite(loss) and recon.shape == kl.shape == (8,)
    assert all(p.dtype == torch.float32 for p in run.model.parameters())
    changed = [not torch.equal(b, p) for b, p in zip(before, run.model.parameters(), strict=True)]
    assert all(changed), changed
    with autocast_for(cfg, torch.device("cpu")):  # what train_step ran the forward pass under
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast_for(tiny_cfg(), torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")


def test_grad_clip_bounds_the_gradient_norm_of_a_step():
    x = patterns(8).float().div(255)
    norms = {}
    for clip in (None, 1e-6):
        cfg = tiny_cfg(*([f"train.grad_clip={clip}"] if clip else []))
        run = make_run(cfg, n_train=8)
        state = TrainState()
        torch.manual_seed(1)
        train_step(run, state, x)
        assert state.step == 1
        norms[clip] = grad_norm(run.model)  # train_step leaves the (clipped) grads in place
    assert norms[None] > 1.0
    assert norms[1e-6] <= 1e-6 * (1 + 1e-3)
    assert norms[1e-6] > 0.5e-6  # clipped to the bound, not zeroed


def test_cosine_learning_rate_falls_from_lr_to_zero_and_constant_stays():
    cfg = tiny_cfg("train.lr=0.01", "train.epochs=5")
    run = make_run(cfg, n_train=16)
    opt, spe = run.optimizer, 4
    total = 5 * spe

    def lr_at(step: int, config=cfg) -> float:
        set_learning_rate(opt, config, step, spe)
        lrs = {g["lr"] for g in opt.param_groups}
        assert len(lrs) == 1
        return lrs.pop()

    assert lr_at(0) == pytest.approx(0.01)
    assert lr_at(total // 2) == pytest.approx(0.005)
    assert lr_at(total - 1) == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * 19 / 20)))
    assert lr_at(total - 1) < 0.01 * 0.01
    assert lr_at(total) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(total + 7) == pytest.approx(0.0, abs=1e-12)  # clamped past the end
    lrs = [lr_at(s) for s in range(total + 1)]
    assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False))
    constant = tiny_cfg("train.lr=0.01", "train.epochs=5", "train.lr_schedule=constant")
    assert {lr_at(s, constant) for s in (0, 7, total - 1, total)} == {0.01}


def _draws(cfg, epoch: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    binarizer = torch.Generator()
    seed_epoch(cfg, epoch, rank, binarizer)
    return torch.rand(6), torch.rand(6, generator=binarizer)


def test_seed_epoch_replays_the_same_draws_and_ranks_differ():
    cfg = tiny_cfg("train.seed=3")
    with torch.random.fork_rng(devices=[]):
        first = _draws(cfg, 2, 0)
        torch.rand(100)  # whatever ran in between
        again = _draws(cfg, 2, 0)
        other_rank = _draws(cfg, 2, 1)
        other_epoch = _draws(cfg, 3, 0)
        other_seed = _draws(tiny_cfg("train.seed=4"), 2, 0)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    for other in (other_rank, other_epoch, other_seed):
        for a, b in zip(first, other, strict=True):
            assert not torch.equal(a, b)
    # The global stream and the binarizer's stream are not the same stream.
    assert not torch.equal(first[0], first[1])


def test_a_replayed_epoch_trains_identically():
    cfg = tiny_cfg("train.lr=1e-2")
    results = []
    for _ in range(2):
        run = make_run(cfg, n_train=16, dynamic=True)
        run.train_images = patterns(16, value=128)
        sums, _ = train_epoch(run, TrainState(), 1, torch.Generator())
        results.append((sums, [p.detach().clone() for p in run.model.parameters()]))
    assert torch.equal(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1], strict=True):
        assert torch.equal(a, b)


def test_fault_injector_is_off_unless_set_and_only_on_rank_zero(monkeypatch, tmp_path):
    marker = tmp_path / "died"
    monkeypatch.delenv(FAIL_ONCE_ENV, raising=False)
    assert fault_injector(0) is None
    monkeypatch.setenv(FAIL_ONCE_ENV, "")
    assert fault_injector(0) is None
    monkeypatch.setenv(FAIL_ONCE_ENV, f"3:{marker}")
    assert fault_injector(1) is None
    fail_once = fault_injector(0)
    assert callable(fail_once)
    for epoch in (1, 2, 4):  # not the failing epoch: nothing happens
        assert fail_once(epoch) is None
    assert not marker.exists()


def test_train_state_json_round_trip():
    state = TrainState(epoch=3, step=24, history=[{"epoch": 1, "val_neg_elbo": 123.5}, {"x": 2}])
    back = TrainState.from_json(state.to_json())
    assert back == state
    assert back is not state and back.history is not state.history
    assert TrainState.from_json(TrainState().to_json()) == TrainState()


def test_checkpoint_restores_weights_optimizer_and_state(tmp_path: Path):
    cfg = tiny_cfg("train.lr=1e-2", "train.epochs=2")
    run = make_run(cfg, n_train=16, n_val=8)
    state = TrainState()
    metrics = run_epoch(run, state, 0, torch.Generator(), torch.arange(8), reduce=cpu_reduce)
    save_checkpoint(tmp_path, run.model, run.optimizer, state, cfg)

    torch.manual_seed(123)  # a different initialisation to overwrite
    fresh = make_run(cfg, n_train=16, n_val=8)
    with torch.no_grad():
        for p in fresh.model.parameters():
            p.add_(1.0)
    restored = load_checkpoint(tmp_path, fresh.model, fresh.optimizer, cfg, torch.device("cpu"))

    assert restored == state == read_state(tmp_path)
    assert restored.epoch == 1 and restored.step == fresh.steps_per_epoch == 2
    assert restored.history == [metrics]
    want, got = run.model.state_dict(), fresh.model.state_dict()
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    saved_opt, loaded_opt = run.optimizer.state_dict(), fresh.optimizer.state_dict()
    assert saved_opt["param_groups"] == loaded_opt["param_groups"]
    assert saved_opt["state"].keys() == loaded_opt["state"].keys() and saved_opt["state"]
    for key, entry in saved_opt["state"].items():
        for name, value in entry.items():
            assert torch.equal(value, loaded_opt["state"][key][name]), (key, name)

    # Both continue with the same next epoch.
    for r, s in ((run, state), (fresh, restored)):
        run_epoch(r, s, 1, torch.Generator(), torch.arange(8), reduce=cpu_reduce)
    for a, b in zip(run.model.parameters(), fresh.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_checkpoint_of_another_model_is_refused(tmp_path: Path):
    cfg = tiny_cfg()
    run = make_run(cfg, n_train=8)
    state = TrainState(epoch=1, step=1, history=[{"epoch": 1}])
    save_checkpoint(tmp_path, run.model, run.optimizer, state, cfg)
    other = tiny_cfg("model.latent_dim=3")
    other_run = make_run(other, n_train=8)
    with pytest.raises(ConfigError, match="another model"):
        load_checkpoint(tmp_path, other_run.model, other_run.optimizer, other, torch.device("cpu"))
