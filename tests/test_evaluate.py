"""Held-out evaluation: the IWAE bound (k = 1, chunking, tightening with k, >= ELBO on a trained
model), evaluate()'s metrics, and the `python -m raytrain_vae.evaluate` command line. No Ray."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributions import Bernoulli, Normal

import raytrain_vae.evaluation as evaluate_mod
from raytrain_vae.cli import Progress, run_cli
from raytrain_vae.config import (
    ModelSection,
    UserError,
    load_config,
)
from raytrain_vae.data import load_splits
from raytrain_vae.evaluation import evaluate
from raytrain_vae.export import load_model
from raytrain_vae.model_io import load_model_dir
from raytrain_vae.models.base import log_normal
from raytrain_vae.models.conv import ConvVAE
from raytrain_vae.objectives import elbo_terms, iwae_nll
from raytrain_vae.perf.heap import MMAP_THRESHOLD_BYTES

REPO = Path(__file__).resolve().parents[1]
IMAGE_SHAPE = (1, 28, 28)
PIXELS = 28 * 28
ELBO_KEYS = {
    "images",
    "neg_elbo",
    "recon",
    "kl",
    "elbo_bits_per_dim",
    "reconstruction_mse",
    "bits_per_dim_means",
    "kl_per_level",
    "kl_per_group",
    "active_units",
    "conditional_active_units",
    "units",
}
IWAE_KEYS = {"iwae_k", "iwae_nll", "bits_per_dim"}
MC_TOL = 0.5  # nats per image, for means over a batch of images


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: these models are tiny, and two threads spinning at their barriers on a
    busy machine (other test sessions, Ray) are ten times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_model(likelihood: str = "bernoulli", seed: int = 0) -> ConvVAE:
    torch.manual_seed(seed)
    cfg = ModelSection(channels=[8, 16], latent_dim=4, hidden_dim=64, likelihood=likelihood)
    return ConvVAE(cfg, IMAGE_SHAPE).eval()


def blob_images(n: int, seed: int) -> torch.Tensor:
    """Binary (n, 1, 28, 28) float images: a Bernoulli sample of one soft disc of random centre
    and radius, so three numbers explain most of each image."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.rand(n, 2, 1, 1, generator=g) * 16 + 6
    radius = torch.rand(n, 1, 1, generator=g) * 4 + 3
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    dist2 = (yy - centre[:, 0]) ** 2 + (xx - centre[:, 1]) ** 2
    return torch.bernoulli(torch.sigmoid((radius**2 - dist2) / 4), generator=g).unsqueeze(1)


def neg_elbo(model: ConvVAE, x: torch.Tensor, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    recon, kl = elbo_terms(model, x)
    return (recon + kl).detach()


@pytest.fixture(scope="module")
def trained() -> dict:
    """A small ConvVAE trained in-process (plain Adam, no Ray) on binary blob images."""
    model = small_model(seed=1).train()
    data = blob_images(1024, seed=2)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(3)
    losses = []
    for _ in range(200):
        x = data[torch.randint(0, len(data), (64,), generator=g)]
        recon, kl = elbo_terms(model, x)
        loss = (recon + kl).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return {"model": model.eval(), "losses": losses, "test": blob_images(64, seed=4)}


# --- log_normal and iwae_nll against independent references ----------------------------------


def test_log_normal_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    z, mu, logvar = (torch.randn(5, 3, 6, generator=g) for _ in range(3))
    expected = Normal(mu, torch.exp(0.5 * logvar)).log_prob(z).sum(-1)
    assert log_normal(z, mu, logvar).shape == (5, 3)
    assert torch.allclose(log_normal(z, mu, logvar), expected, atol=1e-5)


class FixedNoise:
    """Stands in for torch.randn inside iwae_nll: hands out consecutive slices of `eps` (k, B, D)
    and records each chunk's shape, so chunked and unchunked runs see the very same samples."""

    def __init__(self, eps: torch.Tensor) -> None:
        self.eps, self.used, self.shapes = eps, 0, []

    def __call__(self, *shape, device=None, **kwargs):
        self.shapes.append(tuple(shape))
        out = self.eps[self.used : self.used + shape[0]]
        assert out.shape == shape, "iwae_nll asked for more samples than k"
        self.used += shape[0]
        return out.to(device)


def reference_iwae(model: ConvVAE, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """-log mean_i p(x|z_i) p(z_i) / q(z_i|x) with torch.distributions, z_i = mu + sigma eps_i."""
    mu, logvar = model.encode(x)
    q = Normal(mu, torch.exp(0.5 * logvar))
    z = q.loc + q.scale * eps  # (k, B, D)
    out = model.decode(z.flatten(0, 1)).view(len(eps), *x.shape)
    if model.cfg.likelihood == "bernoulli":
        log_px = Bernoulli(logits=out).log_prob(x.expand_as(out))
    else:  # the Gaussian discretised over the 256 levels, the edge levels taking the tails
        normal, x = Normal(out.double(), model.log_sigma.exp().double()), x.expand_as(out).double()
        upper = torch.where(x > 254.5 / 255, 1.0, normal.cdf(x + 0.5 / 255))
        lower = torch.where(x < 0.5 / 255, 0.0, normal.cdf(x - 0.5 / 255))
        log_px = torch.log(upper - lower).float()
    log_w = log_px.flatten(2).sum(-1) + Normal(0.0, 1.0).log_prob(z).sum(-1) - q.log_prob(z).sum(-1)
    return -(torch.logsumexp(log_w, dim=0) - math.log(len(eps)))


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
@pytest.mark.parametrize(("k", "max_decodes", "chunks"), [(7, 4096, [7]), (7, 12, [2, 2, 2, 1])])
def test_iwae_matches_a_reference_and_chunks_as_documented(
    monkeypatch, likelihood, k, max_decodes, chunks
):
    model = small_model(likelihood)
    if likelihood == "gaussian":
        with torch.no_grad():
            model.log_sigma.fill_(-1.0)
    x = torch.rand(6, *IMAGE_SHAPE, generator=torch.Generator().manual_seed(1))
    if likelihood == "bernoulli":
        x = x.bernoulli(generator=torch.Generator().manual_seed(2))
    else:  # 8-bit levels, the values a discretised likelihood is defined on
        x = (x * 255).round() / 255
    eps = torch.randn(k, 6, 4, generator=torch.Generator().manual_seed(3))
    noise = FixedNoise(eps)
    monkeypatch.setattr(torch, "randn", noise)
    got = iwae_nll(model, x, k, max_decodes=max_decodes)
    monkeypatch.undo()
    assert [s[0] for s in noise.shapes] == chunks  # at most max_decodes // B samples a chunk
    assert all(s[1:] == (6, 4) for s in noise.shapes)
    assert noise.used == k
    with torch.no_grad():
        assert torch.allclose(got, reference_iwae(model, x, eps), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_iwae_k1_is_the_one_sample_elbo_with_the_same_noise(likelihood):
    # iwae_nll(k=1) and elbo_terms draw the same eps under one seed, so their reconstruction
    # terms are identical. Their KL terms differ: elbo_terms uses the closed-form KL while the
    # importance weight uses the one-sample estimate log q(z|x) - log p(z). So
    #   iwae_nll(k=1) - (recon + KL) == [log q(z|x) - log p(z)] - KL   exactly, for that eps,
    # and the two agree in expectation (checked on the trained model below).
    model = small_model(likelihood)
    if likelihood == "gaussian":
        with torch.no_grad():
            model.log_sigma.fill_(-1.0)
    x = torch.rand(8, *IMAGE_SHAPE, generator=torch.Generator().manual_seed(1))
    if likelihood == "bernoulli":
        x = x.bernoulli(generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        mu, logvar = model.encode(x)
        torch.manual_seed(11)
        eps = torch.randn_like(mu)
        torch.manual_seed(11)
        recon, kl = elbo_terms(model, x)
        torch.manual_seed(11)
        one = iwae_nll(model, x, k=1)
    z = mu + eps * torch.exp(0.5 * logvar)
    sampled_kl = log_normal(z, mu, logvar) - log_normal(z, torch.zeros_like(z), torch.zeros_like(z))
    assert one.shape == (8,)
    assert torch.allclose(one, recon + sampled_kl, rtol=1e-6, atol=1e-3)
    assert torch.allclose(one - (recon + kl), sampled_kl - kl, atol=1e-3)


def test_iwae_k1_equals_the_negative_elbo_in_expectation(trained):
    model, x = trained["model"], trained["test"][:32]
    seeds = range(40)
    elbo = torch.stack([neg_elbo(model, x, s) for s in seeds]).mean()
    one = []
    for s in seeds:
        torch.manual_seed(s)
        one.append(iwae_nll(model, x, k=1))
    assert abs(torch.stack(one).mean().item() - elbo.item()) < MC_TOL


# --- a really trained model: the bound tightens with k ---------------------------------------


def test_training_loss_fell(trained):
    losses = trained["losses"]
    first, last = sum(losses[:10]) / 10, sum(losses[-20:]) / 20
    assert last < 0.6 * first, (first, last)
    assert all(math.isfinite(loss) for loss in losses)


def test_iwae_is_below_the_elbo_and_tightens_with_k(trained):
    model, x = trained["model"], trained["test"]
    elbo = torch.stack([neg_elbo(model, x, seed) for seed in range(20)]).mean().item()
    torch.manual_seed(100)
    k4 = iwae_nll(model, x, k=4).mean().item()
    torch.manual_seed(101)
    k64 = iwae_nll(model, x, k=64).mean().item()
    assert all(math.isfinite(v) for v in (elbo, k4, k64))
    assert k64 <= elbo + MC_TOL, (k64, elbo)
    assert k64 <= k4 + MC_TOL, (k64, k4)
    assert k4 <= elbo + MC_TOL, (k4, elbo)
    # a trained model is far better than uniform pixels (784 ln 2 = 543 nats)
    assert k64 < 0.6 * PIXELS * math.log(2)


def test_chunking_does_not_change_the_estimate(trained):
    model, x, k = trained["model"], trained["test"][:32], 200
    torch.manual_seed(5)
    whole = iwae_nll(model, x, k=k)  # chunks of 1024 // 32 = 32 samples: 6 x 32 + 8
    torch.manual_seed(6)
    chunked = iwae_nll(model, x, k=k, max_decodes=3 * len(x))  # 66 chunks of 3, then 2
    assert whole.shape == chunked.shape == (32,)
    assert abs(whole.mean().item() - chunked.mean().item()) < MC_TOL


# --- evaluate() ------------------------------------------------------------------------------


def as_u8(x: torch.Tensor) -> torch.Tensor:
    return (x * 255).round().to(torch.uint8)


def test_evaluate_metrics_keys_and_identities(trained):
    model, images = trained["model"], as_u8(trained["test"][:40])
    m = evaluate(model, images, k=8, batch_size=16, seed=0)
    assert set(m) == ELBO_KEYS | IWAE_KEYS
    assert m["images"] == 40 and m["iwae_k"] == 8
    assert m["neg_elbo"] == pytest.approx(m["recon"] + m["kl"], rel=1e-9)
    latent_dim = model.cfg.latent_dim  # the conv family: one level, "top"
    assert m["units"] == {"top": latent_dim} and 0 <= m["active_units"]["top"] <= latent_dim
    assert m["kl_per_level"]["top"] == pytest.approx(m["kl"], rel=1e-6)
    assert sum(m["kl_per_group"]["top"]) == pytest.approx(m["kl"], rel=1e-3)
    assert m["elbo_bits_per_dim"] == pytest.approx(m["neg_elbo"] / (PIXELS * math.log(2)))
    assert m["bits_per_dim"] == pytest.approx(m["iwae_nll"] / (PIXELS * math.log(2)))
    assert m["kl"] > 0 and m["recon"] > 0 and 0 <= m["reconstruction_mse"] <= 1
    assert m["iwae_nll"] <= m["neg_elbo"] + 2 * MC_TOL

    # the same numbers as doing it by hand with the same seed: per-image means over an uneven
    # last batch (40 = 16 + 16 + 8)
    torch.manual_seed(0)
    sums = dict.fromkeys(("recon", "kl", "iwae", "mse"), 0.0)
    for start in range(0, 40, 16):
        x = images[start : start + 16].float() / 255
        recon, kl = elbo_terms(model, x)
        sums["recon"] += recon.sum().item()
        sums["kl"] += kl.sum().item()
        sums["mse"] += (model.reconstruct(x) - x).pow(2).flatten(1).mean(1).sum().item()
        sums["iwae"] += iwae_nll(model, x, 8).sum().item()
    for key, total in (("recon", "recon"), ("kl", "kl"), ("iwae_nll", "iwae")):
        assert m[key] == pytest.approx(sums[total] / 40, rel=1e-5), key
    assert m["reconstruction_mse"] == pytest.approx(sums["mse"] / 40, rel=1e-5)


def test_evaluate_k0_seed_and_batch_size(trained):
    model, images = trained["model"], as_u8(trained["test"])
    without = evaluate(model, images, k=0, batch_size=64, seed=0)
    assert set(without) == ELBO_KEYS

    a = evaluate(model, images, k=8, batch_size=64, seed=3)
    assert evaluate(model, images, k=8, batch_size=64, seed=3) == a
    assert {key: without[key] for key in ELBO_KEYS} != {key: a[key] for key in ELBO_KEYS}
    # the deterministic parts do not depend on the seed or the batch size
    assert without["reconstruction_mse"] == pytest.approx(a["reconstruction_mse"], rel=1e-5)

    b = evaluate(model, images, k=8, batch_size=10, seed=3)  # other batches, other noise
    assert b["images"] == a["images"] == 64
    assert b["reconstruction_mse"] == pytest.approx(a["reconstruction_mse"], rel=1e-5)
    assert b["neg_elbo"] != a["neg_elbo"]
    # two independent one-sample means over 64 images differ by ~ sqrt(2) * sd / sqrt(64); the
    # per-image sd of the one-sample negative ELBO is measured, and 4 standard errors allowed
    x = images.float() / 255
    draws = torch.stack([neg_elbo(model, x, seed) for seed in range(10)])  # (10, 64)
    tol = 4 * math.sqrt(2) * draws.std(dim=0).mean().item() / math.sqrt(len(x))
    assert 0 < tol < 5
    assert abs(b["neg_elbo"] - a["neg_elbo"]) < tol, tol
    assert abs(b["iwae_nll"] - a["iwae_nll"]) < tol, tol


# --- the command line ------------------------------------------------------------------------


def run_module(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "raytrain_vae.evaluate", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def assert_one_error_line(stderr: str, *fragments: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], stderr


def test_cli_evaluates_an_exported_model(exported, tmp_path):
    out = tmp_path / "metrics" / "out.json"
    # all three interpreters start at once: each spends seconds importing torch
    good = run_module(
        "--model",
        str(exported),
        "--k",
        "4",
        "--limit",
        "8",
        "--device",
        "cpu",
        "--output",
        str(out),
        "--json",
    )
    human = run_module("--model", str(exported), "--k", "4", "--limit", "8")
    missing = run_module("--model", str(tmp_path / "nowhere"), "--k", "4")
    negative = run_module("--model", str(exported), "--k", "-1")
    results = {
        name: (p, *p.communicate(timeout=120))
        for name, p in (
            ("good", good), ("human", human), ("missing", missing), ("negative", negative)
        )
    }  # fmt: skip

    proc, stdout, stderr = results["good"]
    assert proc.returncode == 0, stderr
    metrics = json.loads(stdout)
    info = {"split", "dataset", "image_shape", "likelihood", "binarize", "seconds", "written_by"}
    assert set(metrics) == ELBO_KEYS | IWAE_KEYS | info
    assert metrics["images"] == 8 and metrics["iwae_k"] == 4
    assert metrics["split"] == "test" and metrics["dataset"] == "mnist"
    assert metrics["binarize"] == "static" and metrics["seconds"] >= 0
    assert metrics["neg_elbo"] == pytest.approx(metrics["recon"] + metrics["kl"])
    assert metrics["bits_per_dim"] == pytest.approx(metrics["iwae_nll"] / (PIXELS * math.log(2)))
    assert json.loads(out.read_text()) == metrics
    assert "evaluate: 8/8 images scored (" in stderr  # the progress line, at the end at least
    # the first 8 (statically binarized) test images, seed 0, as evaluate() computes them
    model = load_model(exported)
    test = load_splits(load_config(exported / "config.yaml").data).test[:8]
    expected = evaluate(model, test, k=4, batch_size=100, seed=0)
    for key in ELBO_KEYS | IWAE_KEYS:
        if isinstance(expected[key], float | int):
            assert metrics[key] == pytest.approx(expected[key], rel=1e-4), key
    for key in ("bits_per_dim_means", "active_units", "units"):
        assert metrics[key] == expected[key], key
    assert metrics["kl_per_group"]["top"] == pytest.approx(
        expected["kl_per_group"]["top"], abs=2e-4
    )
    assert f"negative ELBO  {metrics['neg_elbo']:10.3f} nats/image" in stderr  # with --json

    proc, stdout, stderr = results["human"]  # without --json: lines for people on stdout
    assert proc.returncode == 0, stderr
    assert stdout.startswith(f"{exported}: test split of mnist, 8 images (1x28x28, bernoulli")
    assert f"negative ELBO  {metrics['neg_elbo']:10.3f} nats/image" in stdout
    assert f"IWAE NLL       {metrics['iwae_nll']:10.3f} nats/image" in stdout
    assert "{" not in stdout and "evaluate: 8/8 images scored" in stderr

    proc, stdout, stderr = results["missing"]
    assert proc.returncode == 2 and stdout == ""
    assert_one_error_line(stderr, "nowhere", "no such model directory")

    proc, stdout, stderr = results["negative"]
    assert proc.returncode == 2 and stdout == ""
    assert_one_error_line(stderr, "--k", "-1")


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--limit", "0"], ["--limit", "0"]),
        (["--batch-size", "0"], ["--batch-size", "0"]),
        (["--k", "-3"], ["--k", "-3"]),
    ],
)
def test_bad_numbers_are_user_errors(exported, capsys, args, fragments):
    argv = ["--model", str(exported), *args]
    with pytest.raises(UserError):
        evaluate_mod.main(argv)
    capsys.readouterr()
    assert run_cli(lambda: evaluate_mod.main(argv)) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert_one_error_line(captured.err, *fragments)


def test_missing_model_directory_is_a_user_error(tmp_path, capsys):
    argv = ["--model", str(tmp_path / "nowhere")]
    assert run_cli(lambda: evaluate_mod.main(argv)) == 2
    assert_one_error_line(capsys.readouterr().err, "no such model directory")


def test_the_default_iwae_chunk_fits_under_glibcs_mmap_cap():
    # A chunk's activations larger than the cap are mapped and page-faulted in afresh each chunk
    # even with the heap retained (iwae_nll's docstring): in a real call with its default chunk,
    # no activation of the default model may reach the cap.
    cfg = load_config(REPO / "configs" / "vae.yaml")
    torch.manual_seed(0)
    model = ConvVAE(cfg.model, IMAGE_SHAPE).eval()
    largest = 0

    def record(module, inputs, out):
        nonlocal largest
        largest = max(largest, out.numel() * out.itemsize)

    for module in model.modules():
        module.register_forward_hook(record)
    decodes = []
    decode = model.decode
    model.decode = lambda z: decodes.append(len(z)) or decode(z)
    x = torch.rand(2, *IMAGE_SHAPE)
    k = 1024
    with torch.no_grad():
        nll = iwae_nll(model, x, k)
    assert torch.isfinite(nll).all()
    assert sum(decodes) == len(x) * k
    assert largest < MMAP_THRESHOLD_BYTES, (largest, decodes)
    # Decoded in one go, these samples would cross the cap: the chunking is what keeps it under.
    assert largest / max(decodes) * sum(decodes) >= MMAP_THRESHOLD_BYTES, (largest, decodes)


@pytest.mark.parametrize("retain", [True, False])
def test_cpu_evaluation_retains_freed_memory_as_configured(exported, monkeypatch, retain):
    model, cfg = load_model_dir(exported)
    cfg = cfg.model_copy(
        update={"scaling": cfg.scaling.model_copy(update={"retain_freed_memory": retain})}
    )
    monkeypatch.setattr(evaluate_mod, "load_model_dir", lambda path: (model, cfg))
    calls = []
    monkeypatch.setattr(evaluate_mod, "retain_freed_memory", lambda: calls.append(1) or True)
    assert (
        evaluate_mod.main(["--model", str(exported), "--k", "2", "--limit", "4", "--device", "cpu"])
        == 0
    )
    assert calls == ([1] if retain else [])


def test_progress_counts_up_with_a_rate_and_a_time_left(capsys):
    progress = Progress("evaluate", 300, "images scored", every_s=0.0)
    for done in (100, 200, 300):
        progress(done)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" (")[0] for line in lines] == [
        f"evaluate: {n}/300 images scored" for n in (100, 200, 300)
    ]
    assert "s left)" in lines[0] and "left" not in lines[-1]


def test_evaluate_reports_progress_after_each_batch(trained):
    model, images = trained["model"], (trained["test"][:25] * 255).to(torch.uint8)
    seen = []
    evaluate(model, images, k=0, batch_size=10, progress=seen.append)
    assert seen == [10, 20, 25]
