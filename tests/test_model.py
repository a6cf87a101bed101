"""ConvVAE shapes, the objective's closed forms, the beta-free validation metric, KL warm-up."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal

from raytrain_vae.config import ConfigError, ModelSection
from raytrain_vae.loop import EVAL_BATCH, eval_batch_size, negative_elbo_sums
from raytrain_vae.models.conv import ConvVAE
from raytrain_vae.objectives import (
    bits_per_dim,
    elbo_terms,
    kl_to_standard_normal,
    kl_weight,
    reconstruction_nll,
    training_loss,
)

CPU = torch.device("cpu")


def make_model(image_shape=(1, 28, 28), seed=0, **kw) -> ConvVAE:
    torch.manual_seed(seed)
    return ConvVAE(ModelSection(**kw), image_shape)


# --- shapes -------------------------------------------------------------------------------


@pytest.mark.parametrize("image_shape", [(1, 28, 28), (3, 32, 32), (1, 27, 19)])
@pytest.mark.parametrize("kernel_size", [4, 3])
@pytest.mark.parametrize("channels", [[32, 64], [16, 32, 64]])
def test_conv_vae_shapes(channels, kernel_size, image_shape):
    latent, batch = 5, 3
    model = make_model(
        image_shape, channels=channels, kernel_size=kernel_size, latent_dim=latent, hidden_dim=32
    )
    assert model.num_pixels == math.prod(image_shape)
    x = torch.rand(batch, *image_shape)

    mu, logvar = model.encode(x)
    assert mu.shape == (batch, latent) and logvar.shape == (batch, latent)

    out = model.decode(mu)
    assert out.shape == (batch, *image_shape)

    p = model(x)
    assert p.out.shape == (batch, *image_shape) and p.kl.shape == (1, batch)
    torch.testing.assert_close(p.kl[0], kl_to_standard_normal(mu, logvar))
    assert p.kl_groups.shape == (1, batch, latent)

    samples = model.sample(7, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (7, *image_shape)
    assert float(samples.min()) >= 0.0 and float(samples.max()) <= 1.0

    rec = model.reconstruct(x)
    assert rec.shape == x.shape
    assert float(rec.min()) >= 0.0 and float(rec.max()) <= 1.0


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("hidden_dim", [0, 16])
def test_likelihoods_and_no_hidden_layer(likelihood, hidden_dim):
    model = make_model((1, 12, 10), channels=[4, 8], hidden_dim=hidden_dim, likelihood=likelihood)
    assert hasattr(model, "log_sigma") == (likelihood == "gaussian")
    x = torch.rand(2, 1, 12, 10)
    out = model(x).out
    assert out.shape == x.shape and model.encode(x)[0].shape == (2, 16)
    samples = model.sample(4, temperature=3.0)
    assert samples.shape == (4, 1, 12, 10)
    assert float(samples.min()) >= 0.0 and float(samples.max()) <= 1.0


def test_sample_is_reproducible_with_a_generator_and_reconstruct_is_deterministic():
    model = make_model((1, 8, 8), channels=[4, 8], hidden_dim=8)
    a = model.sample(3, generator=torch.Generator().manual_seed(1))
    b = model.sample(3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(model.reconstruct(x), model.reconstruct(x))


def test_gradients_reach_every_parameter():
    model = make_model((1, 12, 10), channels=[4, 8], hidden_dim=8, likelihood="gaussian")
    recon, kl = elbo_terms(model, torch.rand(3, 1, 12, 10))
    (recon + kl).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize(
    "channels, image_shape",
    [([8] * 5, (1, 28, 28)), ([8, 8, 8], (1, 4, 4)), ([8, 8], (1, 28, 2))],
)
def test_too_many_layers_for_a_tiny_image(channels, image_shape):
    with pytest.raises(ConfigError, match="model.channels"):
        ConvVAE(ModelSection(channels=channels, kernel_size=4), image_shape)


# --- the objective ------------------------------------------------------------------------


def test_closed_form_kl_matches_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(3, 4, generator=g, dtype=torch.float64)
    logvar = torch.randn(3, 4, generator=g, dtype=torch.float64) * 0.7
    closed = kl_to_standard_normal(mu, logvar)
    assert closed.shape == (3,)

    torch.manual_seed(0)
    q = Normal(mu, torch.exp(0.5 * logvar))
    p = Normal(torch.zeros_like(mu), torch.ones_like(mu))
    z = q.sample((200_000,))
    mc = (q.log_prob(z) - p.log_prob(z)).sum(-1).mean(0)
    assert torch.allclose(closed, mc, rtol=0.02, atol=0.02), (closed, mc)
    # and the analytic value torch.distributions gives
    exact = torch.distributions.kl_divergence(q, p).sum(-1)
    assert torch.allclose(closed, exact, rtol=1e-10, atol=1e-12)


def test_kl_is_zero_for_the_prior():
    assert torch.equal(kl_to_standard_normal(torch.zeros(2, 5), torch.zeros(2, 5)), torch.zeros(2))


def test_bernoulli_nll_of_perfect_reconstruction_is_zero():
    model = make_model((1, 28, 28), channels=[4, 8], hidden_dim=8)
    x = (torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    logits = torch.where(x > 0, 30.0, -30.0)
    nll = reconstruction_nll(model, logits, x)
    assert nll.shape == (4,)
    assert bool((nll >= 0).all()) and bool((nll < 1e-6).all()), nll
    # the wrong answer everywhere costs 30 nats per pixel
    wrong = reconstruction_nll(model, -logits, x)
    assert torch.allclose(wrong, torch.full((4,), 30.0 * 784), rtol=1e-5)


@pytest.mark.parametrize("log_sigma", [0.0, 0.3, -1.2])
def test_gaussian_nll_of_perfect_reconstruction_is_the_central_bin_mass(log_sigma):
    # The Gaussian is discretised over the 256 levels: an inner level k/255 costs -log of the
    # mass of [(k - 0.5)/255, (k + 0.5)/255], here Phi(h/sigma) - Phi(-h/sigma) = erf(h/(sigma
    # sqrt 2)) with h = 0.5/255 (no longer the density's log(sigma) + log(2 pi)/2).
    shape = (3, 2, 7, 5)
    model = make_model(shape[1:], channels=[4], hidden_dim=0, likelihood="gaussian")
    with torch.no_grad():
        model.log_sigma.fill_(log_sigma)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 255, shape, generator=g) / 255  # inner levels; the edges take tails
    d, sigma, h = math.prod(shape[1:]), math.exp(log_sigma), 0.5 / 255
    nll = reconstruction_nll(model, x.clone(), x)
    expected = -d * math.log(math.erf(h / (sigma * math.sqrt(2))))
    assert nll.shape == (3,)
    assert torch.allclose(nll, torch.full((3,), expected), rtol=1e-5, atol=1e-4)
    # a mean off by e on every pixel costs the mass of the bin e away from it
    off = reconstruction_nll(model, x + 0.1, x)

    def phi(t: float) -> float:
        return 0.5 * math.erfc(-t / math.sqrt(2))

    expected_off = -d * math.log(phi((0.1 + h) / sigma) - phi((0.1 - h) / sigma))
    assert torch.allclose(off, torch.full((3,), expected_off), rtol=1e-5)
    # For bins this narrow that is still the density's d e^2 / (2 sigma^2) more (checked on the
    # exact values: float32 NLLs of ~450 nats do not resolve their 0.35-nat difference to 1e-3).
    assert expected_off - expected == pytest.approx(d * 0.01 / (2 * sigma**2), rel=1e-3)


# --- validation ELBO does not depend on beta ----------------------------------------------


@pytest.fixture
def val_setup():
    model = make_model((1, 8, 8), channels=[4, 8], hidden_dim=16, latent_dim=4)
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8, generator=g)
    indices = torch.tensor([3, 0, 7, 8, 21, 22, 39, 15])
    return model, images, indices


def test_negative_elbo_sums_is_deterministic_and_matches_elbo_terms(val_setup):
    model, images, indices = val_setup
    first = negative_elbo_sums(model, images, indices, CPU)
    second = negative_elbo_sums(model, images, indices, CPU)
    assert first.dtype == torch.float64 and first.shape == (3,)
    assert torch.equal(first, second)
    count, recon_sum, kl_sum = first.tolist()
    assert count == len(indices)
    assert kl_sum > 0

    torch.manual_seed(0)
    x = images[indices].float() / 255
    recon, kl = elbo_terms(model, x)
    assert recon_sum == pytest.approx(recon.sum().item(), rel=1e-6)
    assert kl_sum == pytest.approx(kl.sum().item(), rel=1e-6)
    assert (recon_sum + kl_sum) / count == pytest.approx((recon + kl).mean().item(), rel=1e-6)


def test_negative_elbo_sums_uses_posterior_samples():
    # One sample z ~ q(z|x), not the posterior mean: a wider posterior changes the score.
    model = make_model((1, 8, 8), channels=[4, 8], hidden_dim=16, latent_dim=4)
    images = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    idx = torch.arange(6)
    narrow = negative_elbo_sums(model, images, idx, CPU)
    with torch.no_grad():
        model.encoder[-1].bias[4:] += 3.0  # raise every logvar
    wide = negative_elbo_sums(model, images, idx, CPU)
    assert wide[1] != narrow[1] and wide[2] != narrow[2]


def test_negative_elbo_sums_leaves_rng_and_mode_alone(val_setup):
    model, images, indices = val_setup
    model.train()
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    negative_elbo_sums(model, images, indices, CPU)
    assert torch.equal(torch.rand(4), expected)
    assert model.training
    model.eval()
    negative_elbo_sums(model, images, indices, CPU)
    assert not model.training


@pytest.mark.parametrize(
    "shape, size",
    [((1, 28, 28), EVAL_BATCH), ((1, 4, 4), EVAL_BATCH), ((3, 32, 32), 261), ((3, 64, 64), 65),
     ((3, 256, 256), 4), ((3, 2048, 2048), 1)],
)  # fmt: skip
def test_eval_batches_hold_at_most_a_28x28_batch_of_pixels(shape, size):
    assert eval_batch_size(shape) == size


def test_large_images_are_scored_in_smaller_batches():
    model = make_model((3, 64, 64), channels=[2], hidden_dim=0, latent_dim=2)
    images = torch.randint(0, 256, (150, 3, 64, 64), dtype=torch.uint8)
    batches = []
    encode = model.encode
    model.encode = lambda x: batches.append(len(x)) or encode(x)
    negative_elbo_sums(model, images, torch.arange(150), CPU)
    assert batches == [65, 65, 20]


def test_negative_elbo_sums_over_several_eval_batches():
    model = make_model((1, 4, 4), channels=[2], hidden_dim=0, latent_dim=2)
    n = EVAL_BATCH + 300
    images = torch.randint(0, 256, (n, 1, 4, 4), dtype=torch.uint8)
    indices = torch.randperm(n)
    batches = []
    encode = model.encode
    model.encode = lambda x: batches.append(len(x)) or encode(x)
    whole = negative_elbo_sums(model, images, indices, CPU)
    assert batches == [EVAL_BATCH, 300]
    model.encode = encode
    count, recon_sum, kl_sum = whole.tolist()
    assert count == n
    # the KL term needs no noise: it must match a single full pass exactly (up to rounding)
    with torch.no_grad():
        mu, logvar = model.encode(images[indices].float() / 255)
        assert kl_sum == pytest.approx(kl_to_standard_normal(mu, logvar).sum().item(), rel=1e-5)
    assert recon_sum > 0
    # Sums add up over any split of the indices: count and KL exactly (up to rounding), the
    # reconstruction term up to its noise (each call draws its own, 0.1% here).
    for cut in (1, 517, EVAL_BATCH, n - 1):
        first = negative_elbo_sums(model, images, indices[:cut], CPU)
        parts = first + negative_elbo_sums(model, images, indices[cut:], CPU)
        assert parts[0] == n
        assert parts[2].item() == pytest.approx(kl_sum, rel=1e-6)
        assert parts[1].item() == pytest.approx(recon_sum, rel=1e-2)


def test_beta_changes_the_training_loss_but_not_the_validation_metric(val_setup):
    model, images, indices = val_setup
    x = images[indices].float() / 255
    losses = {}
    for beta in (1.0, 4.0):
        torch.manual_seed(0)
        loss, recon, kl = training_loss(model, x, beta)
        losses[beta] = loss.item()
    kl_mean = kl.mean().item()
    assert kl_mean > 0
    assert losses[4.0] - losses[1.0] == pytest.approx(
        3 * kl_mean, abs=1e-4
    )  # float32 sums of ~500 nats
    # The validation metric (which takes no beta) is the negative ELBO, i.e. the beta = 1
    # training loss on the same noise.
    count, recon_sum, kl_sum = negative_elbo_sums(model, images, indices, CPU).tolist()
    assert (recon_sum + kl_sum) / count == pytest.approx(losses[1.0], rel=1e-6)


# --- KL warm-up and bits/dim --------------------------------------------------------------


def test_kl_weight_without_warmup_is_beta():
    for step in (0, 1, 10, 10_000):
        assert kl_weight(step, steps_per_epoch=10, beta=2.5, warmup_epochs=0) == 2.5


def test_kl_weight_ramps_linearly():
    beta, spe, warm = 4.0, 10, 2.0  # 20 warm-up steps
    weights = [kl_weight(s, spe, beta, warm) for s in range(40)]
    assert 0 < weights[0] <= beta / 10
    assert weights[9] == pytest.approx(beta / 2)  # halfway through the ramp
    assert weights[19] == pytest.approx(beta)
    assert all(w == beta for w in weights[19:])
    ramp = weights[:20]
    steps = [b - a for a, b in zip(ramp, ramp[1:], strict=False)]
    assert all(s == pytest.approx(beta / 20) for s in steps)  # linear
    assert max(weights) == beta


def test_kl_weight_fractional_warmup():
    # half an epoch of 10 steps: full weight from the 5th step on
    assert kl_weight(4, 10, 1.0, 0.5) == pytest.approx(1.0)
    assert kl_weight(1, 10, 1.0, 0.5) == pytest.approx(0.4)


def test_bits_per_dim():
    assert bits_per_dim(100.0, 784) == pytest.approx(100.0 / (784 * math.log(2)), rel=1e-12)
    assert bits_per_dim(784 * math.log(2), 784) == pytest.approx(1.0)
    assert bits_per_dim(0.0, 3072) == 0.0
