"""The benchmarks: the reference MLP VAE's loss is the textbook negative ELBO, and both benchmark
scripts run in smoke mode and print every figure they print in full mode."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from conftest import load_benchmark

from raytrain_vae.cli import run_cli
from raytrain_vae.config import load_config
from raytrain_vae.models import build_model

REPO = Path(__file__).resolve().parents[1]


quality = load_benchmark("quality")
step_time = load_benchmark("step_time")


def test_reference_mlp_loss_is_bce_summed_plus_closed_form_kl():
    torch.manual_seed(0)
    model = quality.MLPVAE(pixels=6, hidden=5, latent=2)
    x = torch.bernoulli(torch.full((3, 1, 2, 3), 0.5))

    torch.manual_seed(1)
    loss = quality.mlp_negative_elbo(model, x)

    # By hand: the same draws, then -sum log Bernoulli and 1/2 sum(mu^2 + s^2 - 1 - log s^2).
    torch.manual_seed(1)
    flat = x.flatten(1)
    h = torch.relu(flat @ model.fc1.weight.T + model.fc1.bias)
    mu = h @ model.fc21.weight.T + model.fc21.bias
    logvar = h @ model.fc22.weight.T + model.fc22.bias
    z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
    p = torch.sigmoid(torch.relu(z @ model.fc3.weight.T + model.fc3.bias) @ model.fc4.weight.T
                      + model.fc4.bias)  # fmt: skip
    expected = []
    for i in range(3):
        bce = -sum(
            math.log(p[i, j]) if flat[i, j] == 1 else math.log(1 - p[i, j]) for j in range(6)
        )
        kl = 0.5 * sum(mu[i, d] ** 2 + math.exp(logvar[i, d]) - 1 - logvar[i, d] for d in range(2))
        expected.append(float(bce + kl))
    assert loss.tolist() == pytest.approx(expected, rel=1e-5)


def test_throughput_reference_is_the_same_model_with_stock_elu():
    from torch import nn

    from raytrain_vae.models.conv import ConvVAE
    from raytrain_vae.perf.elu import ELU

    throughput = load_benchmark("train_throughput")
    cfg = load_config(REPO / "configs" / "vae.yaml", ["model.residual_blocks=1"])
    torch.manual_seed(0)
    ours = ConvVAE(cfg.model, (1, 28, 28))
    torch.manual_seed(0)
    textbook = throughput.textbook_model(cfg, (1, 28, 28))
    acts = [m for m in textbook.modules() if isinstance(m, nn.ELU)]
    assert acts and all(type(m) is nn.ELU for m in acts)
    assert sum(isinstance(m, ELU) for m in ours.modules()) == len(acts)
    torch.testing.assert_close(textbook.state_dict(), ours.state_dict(), rtol=0, atol=0)
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(textbook.encode(x), ours.encode(x), rtol=1e-5, atol=1e-6)


def test_reference_iwae_with_one_sample_is_about_the_elbo():
    torch.manual_seed(0)
    model = quality.MLPVAE(pixels=784, hidden=16, latent=3)
    images = (torch.rand(20, 1, 28, 28) > 0.5).to(torch.uint8) * 255
    elbo = quality.mlp_test_score(model, images)
    k1 = quality.mlp_iwae(model, images, 1)
    k50 = quality.mlp_iwae(model, images, 50)
    assert k1 == pytest.approx(elbo, rel=0.02)
    assert k50 < k1


def test_binarization_entropy_closed_form():
    images = torch.tensor([[[[0, 255], [128, 64]]]], dtype=torch.uint8)
    h = 0.0
    for v in (128, 64):
        p = v / 255
        h -= p * math.log(p) + (1 - p) * math.log(1 - p)
    assert quality.binarization_entropy(images) == pytest.approx(h)


def test_interleaved_step_times_take_turns_and_keep_each_fastest_round():
    calls, clock = [], iter([0.04, 0.01, 0.02, 0.03, 0.015, 0.06])

    def step(name):
        def run():
            calls.append((name, torch.get_num_threads()))
            time.sleep(next(clock) if len(calls) > 4 else 0)  # 2 warm-up calls each, untimed

        return run

    steps = {"a": step("a"), "b": step("b")}
    best = step_time.interleaved_step_ms(steps, {"a": 1, "b": 2}, rounds=3, per_round=1)
    assert [name for name, _ in calls] == ["a", "a", "b", "b", "a", "b", "a", "b", "a", "b"]
    assert all(threads == {"a": 1, "b": 2}[name] for name, threads in calls)
    # Each keeps its fastest round, whichever round that was (a: the 3rd, b: the 1st).
    assert 15 <= best["a"] < 20 and 10 <= best["b"] < 15


def test_a_timed_step_is_the_workers_training_step():
    cfg = load_config("vae", ["model.channels=[4]", "model.hidden_dim=8", "train.batch_size=16"])
    step = step_time.step_function(cfg, (1, 8, 8))
    losses = [step()[0].item() for _ in range(30)]
    assert sum(losses[-5:]) < sum(losses[:5])  # the optimizer steps: the loss falls
    assert (
        step_time.worker_threads(
            cfg.model_copy(
                update={"scaling": cfg.scaling.model_copy(update={"cpus_per_worker": 3.0})}
            )
        )
        == 3
    )


MISSING = "error: no-such.yaml: no such config file"
UNKNOWN = "error: override model.levelz: unknown key"
NOTHING_GIVEN = "error: --only needs the variant's overrides: key.sub=value ..."


BAD_CONFIGS = [
    ("step_time", ["configs/vae.yaml", "no-such.yaml"], MISSING),
    ("train_throughput", ["--config", "no-such.yaml"], MISSING),
    ("quality", ["--hierarchical", "no-such.yaml"], MISSING),
    ("model_variants", ["model.levelz=1"], UNKNOWN),
    ("model_variants", ["--only"], NOTHING_GIVEN),
    ("ingest_throughput", ["model.levelz=1"], UNKNOWN),
]


@pytest.mark.parametrize("script, args, line", BAD_CONFIGS, ids=[s for s, _, _ in BAD_CONFIGS])
def test_a_benchmark_names_a_bad_config_in_one_line_before_any_work(
    script, args, line, monkeypatch, capsys, tmp_path
):
    """One line, exit status 2, nothing on stdout, and no work first (quality.py once trained
    two models for minutes before it read --hierarchical)."""
    module = load_benchmark(script)

    def work(*_args, **_kwargs):
        raise AssertionError("the benchmark began work before it checked its config")

    for name in ("load_splits", "init_ray", "compare_step_times"):
        if hasattr(module, name):
            monkeypatch.setattr(module, name, work)
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(sys, "argv", [f"benchmarks/{script}.py", *args])
    assert run_cli(module.main) == 2
    out, err = capsys.readouterr()
    assert err.strip().splitlines() == [line]
    assert out == ""
    assert list(tmp_path.iterdir()) == []  # no scratch folder left behind either


def test_a_benchmark_script_exits_with_the_cli_status():
    proc = subprocess.run(
        [sys.executable, "benchmarks/quality.py", "--hierarchical", "no-such.yaml"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [MISSING]


def test_model_variants_only_trains_the_given_variant(monkeypatch, capsys):
    """--only: the given overrides alone (no built-in variant, no table against the default)."""
    module = load_benchmark("model_variants")
    given = ["model.channels=[4]", "model.hidden_dim=8", "model.latent_dim=2"]
    monkeypatch.setattr(sys, "argv", ["model_variants.py", "--only", "--smoke", *given])
    assert run_cli(module.main) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[:2] == [
        "300 training images, 200 test images, 1 epochs",
        f"given: {' '.join(given)}",
    ]
    assert re.search(r"\n  epoch 1: test neg ELBO \d+\.\d\d  KL per level \d+\.\d  ", out), out
    assert "conv (default)" not in out and "variant |" not in out


def test_scoring_a_variant_leaves_the_training_random_stream_alone():
    """The screen scores after every epoch; if scoring reseeded torch's stream, every later
    epoch would see the same shuffle, binarization and latent noise (it once did)."""
    variants = load_benchmark("model_variants")
    cfg = load_config("vae", ["model.channels=[4]", "model.hidden_dim=8"])
    model = build_model(cfg.model, (1, 8, 8))
    test = (torch.rand(20, 1, 8, 8) > 0.5).to(torch.uint8) * 255
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    first = variants.score_on_test(model, test)
    assert torch.equal(torch.rand(3), expected)
    assert variants.score_on_test(model, test) == first  # still one seeded sample


def run_smoke(script: str, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, f"benchmarks/{script}", "--smoke", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_quality_smoke_prints_every_figure(tmp_path):
    out = run_smoke("quality.py", "--out", str(tmp_path), "--hierarchical", "hierarchical")
    for pattern in (
        r"binarization entropy of the test images .*: \d+\.\d+ nats",
        r"\n\s+1\s+\d+\.\d+\s+\d+\.\d+\s+[+-]\d+\.\d+",  # epoch 1: reference, ours, gap
        r"\n\s+2\s+\d+\.\d+\s+\d+\.\d+\s+[+-]\d+\.\d+",
        r"MLP VAE 784-400-20 \(plain loop\) \| 2 \| \d+\.\d+ \| \d+\.\d+ \| 0\.\d+ \| \d+ s",
        r"raytrain_vae vae\.yaml \(Ray Train\) \| 2 \| \d+\.\d+ \| \d+\.\d+ \| 0\.\d+ \| \d+ s",
        r"gap after 2 epochs \(raytrain_vae - reference\): [+-]\d+\.\d+ nats",
        r"raytrain_vae hierarchical \(Ray Train\) \| 2 \| \d+\.\d+ \| \d+\.\d+ \| 0\.\d+ \| \d+ s",
        r"hierarchical epoch time \d+\.\d s = \d+\.\d\dx the default's \d+\.\d s \(limit 3x\)",
        r"hierarchical training step \d+\.\d ms = \d+\.\d\dx the default.s \d+\.\d ms ",
        r"hierarchical KL per level \(nats, test split\): top \d+\.\d\d \(\d+/\d+ active, "
        r"\d+ conditionally\), ",
    ):
        assert re.search(pattern, out), (pattern, out[-3000:])
    assert (tmp_path / "curves.png").stat().st_size > 0
    results = json.loads((tmp_path / "quality.json").read_text())
    assert results["epochs"] == 2 and len(results["hierarchical"]["curve"]) == 2


@pytest.mark.slow
def test_model_variants_smoke_prints_every_figure():
    out = run_smoke("model_variants.py")
    for pattern in (
        r"hierarchical, 16x7x7 \+ 8x14x14: model.type=hierarchical",
        r"epoch 1: test neg ELBO \d+\.\d\d  KL per level \d+\.\d \+ \d+\.\d \+ \d+\.\d  ",
        r"conv \(default\) \| \d+\.\d\d \| \+0\.00 \| 1\.00x",
        r"hierarchical, 16x7x7 \+ 8x14x14 \| \d+\.\d\d \| [+-]\d+\.\d\d \| \d+\.\d\dx",
    ):
        assert re.search(pattern, out), (pattern, out[-3000:])


@pytest.mark.slow
def test_train_throughput_smoke_prints_every_figure(tmp_path):
    out = run_smoke("train_throughput.py", "--storage", str(tmp_path))
    for pattern in (
        r"training FLOPs per image \(forward \+ backward\): \d+\.\d MFLOP",
        r"DDP all-reduce per step: \d+\.\d MB of fp32 gradients "
        r"\(\d\.\d\dM parameters\) per \d+ images",
        r"fp32 matmul rate \(2048x2048, \d+ threads\), before: \d+\.\d GFLOP/s",
        r"fp32 matmul rate, mean of before and after: \d+\.\d GFLOP/s",
        r"plain PyTorch loop\s+:\s+\d+ img/s\s+\d+\.\d GFLOP/s\s+\d+\.\d% of matmul",
        r"Ray Train, 1 worker\s+:\s+\d+ img/s\s+\d+\.\d GFLOP/s\s+\d+\.\d% of matmul",
        r"Ray Train, 2 workers\s+:\s+\d+ img/s\s+\d+\.\d GFLOP/s\s+\d+\.\d% of matmul",
        # ratios: any size (a loaded machine gives 12.101 as readily as 0.978); the smoke
        # leaves the Gloo run out and says so
        r"round 1: Ray 1 worker / plain \d+\.\d{3}   Ray 2 workers / 1 worker \d+\.\d{3}"
        r"   \(Gloo not run \(--smoke\)\)",
        r"ratio Ray Train 1 worker / plain: \d+\.\d{3}",
        r"ratio Ray Train 2 workers / 1 worker: \d+\.\d{3}",
        r"ratio Ray Train 2 workers with Gloo / 1 worker: not run \(--smoke\)",
    ):
        assert re.search(pattern, out), (pattern, out[-3000:])


INGEST_SUMMARY_FULL = (
    "stream/memory 1 worker",
    "stream/memory 2 workers",
    "PNG stream/memory 1 worker",
    "RGB 32x32 stream/memory",
    "RGB 64x64 stream/memory",
    "RGB 64x64/32x32 memory img/s",
)
INGEST_SUMMARY = ("stream/memory 1 worker",)  # the smoke's one pair (and an RGB stream)


def test_ingest_summary_prints_every_ratio_of_a_full_run(capsys):
    """The full run's summary (the smoke has one pair: FMNIST memory and stream): every pair, its
    ratio of steady-state rates, and whether a stream pair meets the target."""
    bench = load_benchmark("ingest_throughput")
    rates = [
        {"FMNIST memory, 1 worker": 1000, "FMNIST stream, 1 worker": 950,
         "FMNIST PNG stream, 1 worker": 500},
        {"FMNIST memory, 2 workers": 1000, "FMNIST stream, 2 workers": 950},
        {"RGB 32x32 memory, 1 worker": 1000, "RGB 32x32 stream, 1 worker": 950},
        {"RGB 64x64 memory, 1 worker": 250, "RGB 64x64 stream, 1 worker": 237.5},
    ]  # fmt: skip
    groups = [[bench.Case(label, []) for label in group] for group in rates]
    for group, group_rates in zip(groups, rates, strict=True):
        for case in group:
            case.warm.append([group_rates[case.label]] * 2)
    bench.summary(groups, rounds=1)
    out = capsys.readouterr().out
    ratios = ("0.95", "0.95", "0.50", "0.95", "0.95", "0.25")
    for label, ratio in zip(INGEST_SUMMARY_FULL, ratios, strict=True):
        assert f"\n{label}: {ratio}x" in out, out
    assert "stream/memory 1 worker: 0.95x  (met)" in out
    assert "PNG stream/memory 1 worker: 0.50x  (BELOW target)" in out
    assert "RGB 64x64/32x32 memory img/s: 0.25x\n" in out


@pytest.mark.slow
def test_ingest_throughput_smoke_prints_every_ratio(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "ingest_throughput.py"), "--smoke"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(r"machine: \d+ CPUs \(\d+(\.\d+)? for Ray\), torch threads \d+", out), out
    for label in (
        "FMNIST memory, 1 worker",
        "FMNIST stream, 1 worker",
        "RGB 32x32 stream, 1 worker",
    ):
        assert re.search(rf"\n{re.escape(label)}\s*: +\d+ img/s  \(warm epochs: \d+;", out), (
            label, out[-3000:],
        )  # fmt: skip
    assert re.search(r"round 1: stream/memory 1 worker \d+\.\d\dx", out), out[-3000:]
    summary = out[out.index("\nsummary (target: stream >= 0.9x memory") :]
    for label in INGEST_SUMMARY:
        match = re.search(rf"\n{re.escape(label)}: (\d+\.\d+)x", summary)
        assert match, (label, summary)
        assert math.isfinite(float(match.group(1))) and float(match.group(1)) > 0
    work = re.search(r"work folder: (\S+) \(deleted at the end\)", out).group(1)
    assert not os.path.exists(work)


@pytest.mark.slow
def test_search_overhead_smoke_prints_every_figure():
    out = run_smoke("search_overhead.py")
    assert re.search(r"machine: \d+ CPUs; Ray start-up \d+\.\d s", out), out[-3000:]
    for label in (
        "1 worker, in the trial's process",
        "1 worker, Ray Train run",
        r"\d workers \(DDP\), Ray Train run",
        "1 worker, in the trial's process, 3 trials",
    ):
        assert re.search(
            rf"\n{label}\s*: \d+ trials, per-trial overhead \(median\)\s+\d+\.\d\d s, "
            r"search\s+\d+\.\d s for\s+\d+\.\d s of epochs = \d+\.\d\dx",
            out,
        ), (label, out[-3000:])
    summary = out[out.index("\nsummary (targets: overhead <= 2 s") :]
    for pattern in (
        r"one-worker per-trial overhead: \d+\.\d\d s",
        r"one-worker search / its epochs: \d+\.\d\dx",
        r"one-worker search of 2 trials after Ray start-up \(\d+\.\d s\): \d+\.\d s against "
        r"1\.2 x epochs = \d+\.\d s \((met|not met)\)",
        r"one-worker search of 3 trials after Ray start-up \(\d+\.\d s\): \d+\.\d s against "
        r"1\.2 x epochs = \d+\.\d s \((met|not met)\)",
        r"one-worker first trial's overhead \(Tune's start, the trial process\): \d+\.\d\d s",
        r"overhead in-process / Ray Train run: \d+\.\d\dx",
        r"search wall in-process / Ray Train run: \d+\.\d\dx",
        r"\d-worker DDP trial overhead: \d+\.\d\d s",
    ):
        assert re.search(pattern, summary), (pattern, summary)


def test_stream_memory_writes_distinct_images_the_project_reads(tmp_path):
    # The benchmark's full run trains for minutes (not in CI); its data writer is checked here.
    import pyarrow.parquet as pq

    stream_memory = load_benchmark("stream_memory")
    stream_memory.write_images(tmp_path / "set", 50, 16)
    table = pq.read_table(tmp_path / "set" / "part-0.parquet")
    pixels = table["pixels"].combine_chunks().flatten().to_numpy().reshape(50, 3, 16, 16)
    assert len({p.tobytes() for p in pixels}) == 50
    assert pq.ParquetFile(tmp_path / "set" / "part-0.parquet").num_row_groups == 1
    from raytrain_vae.config import load_config
    from raytrain_vae.data import split_images

    cfg = load_config("vae", [*stream_memory.TRAIN, f"data.path={tmp_path / 'set'}",
                              "data.pixels_shape=[3,16,16]", "data.binarize=none"])  # fmt: skip
    images, _ = split_images(cfg.data, "train")
    assert images.shape[1:] == (3, 16, 16) and len(images) > 40
