"""The p(x|z) families against exact sums and hand computations: each pmf sums to one over its
values, bin masses match plain-float formulas (edges and far tails included), means and samples
live on [0, 1] (and the 8-bit grid), and a ConvVAE trains a step with each. Pure torch, no Ray."""

from __future__ import annotations

import math

import pytest
import torch

from raytrain_vae.config import ModelSection
from raytrain_vae.likelihoods import (
    LIKELIHOODS,
    Bernoulli,
    DiscretizedLogistic,
    DiscretizedLogisticMixture,
    Gaussian,
    Likelihood,
    likelihood_for,
)
from raytrain_vae.models.conv import ConvVAE
from raytrain_vae.objectives import bits_per_dim, reconstruction_nll

LEVELS = torch.arange(256, dtype=torch.float64) / 255
EIGHT_BIT = ["gaussian", "discretized_logistic", "discretized_logistic_mixture"]
# float32 inputs are themselves rounded (k / 255, a mean): at the smallest scale, e^-7, that
# moves a pixel's log-mass by up to ~2e-5 nats, so float32 gets an absolute allowance.
TOLERANCE = {torch.float64: {"rel": 1e-9}, torch.float32: {"rel": 1e-5, "abs": 1e-4}}


class Holder(torch.nn.Module):
    """A module holding a likelihood's parameters, as a model does."""

    def __init__(self, likelihood: Likelihood, log_sigma: float = 0.0, dtype=torch.float32):
        super().__init__()
        for name, p in likelihood.new_parameters().items():
            self.register_parameter(name, p)
        self.to(dtype)  # before the fill, so a float64 log-sigma is not a rounded float32 one
        if hasattr(self, "log_sigma"):
            with torch.no_grad():
                self.log_sigma.fill_(log_sigma)


def random_out(lik: Likelihood, c: int, b: int = 2, h: int = 2, w: int = 2, seed: int = 0):
    """Decoder outputs spread wide: means beyond [0, 1] and log-scales from tiny to large."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, lik.decoder_channels(c), h, w, generator=g, dtype=torch.float64) * 2


def masses_over_levels(lik: Likelihood, out: torch.Tensor, holder, values, c: int):
    """exp(-nll) for each value, (len(values), *nll shape), with every sub-pixel set to it."""
    rows = []
    for v in values:
        x = torch.full((out.shape[0], c, *out.shape[2:]), float(v), dtype=out.dtype)
        rows.append(torch.exp(-lik.nll(out, x, holder)))
    return torch.stack(rows)


# --- every pmf sums to one ---------------------------------------------------------------------


def test_bernoulli_sums_to_one_over_its_two_values():
    lik = Bernoulli()
    out = random_out(lik, 3)
    total = masses_over_levels(lik, out, Holder(lik), torch.tensor([0.0, 1.0]), 3).sum(0)
    assert torch.allclose(total, torch.ones_like(total), atol=1e-6)


@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("log_sigma", [-7.0, -3.0, 0.0, 3.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gaussian_sums_to_one_over_256_levels(c, log_sigma, dtype):
    lik = Gaussian()
    total = masses_over_levels(
        lik, random_out(lik, c).to(dtype), Holder(lik, log_sigma, dtype), LEVELS, c
    )
    assert total.shape[1:] == (2, c, 2, 2)
    assert torch.allclose(total.sum(0), torch.ones(2, c, 2, 2, dtype=dtype), atol=1e-4)


@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_discretized_logistic_sums_to_one_over_256_levels(c, dtype):
    lik = DiscretizedLogistic()
    out = random_out(lik, c).to(dtype)
    out[:, c:] *= 3  # log-scales from below the -7 clamp to far above the data's range
    total = masses_over_levels(lik, out, None, LEVELS, c).sum(0)
    assert total.shape == (2, c, 2, 2)
    assert torch.allclose(total, torch.ones_like(total), atol=1e-4)


@pytest.mark.parametrize("components", [1, 3])
def test_mixture_of_one_channel_sums_to_one_over_256_levels(components):
    lik = DiscretizedLogisticMixture(components)
    total = masses_over_levels(lik, random_out(lik, 1), None, LEVELS, 1).sum(0)
    assert total.shape == (2, 4)  # per pixel: (B, H*W)
    assert torch.allclose(total, torch.ones_like(total), atol=1e-4)


def test_mixture_of_rgb_sums_to_one_over_all_256_cubed_colours_of_a_pixel():
    # Exact: every one of the 16.7M colours of one pixel, so the channel coefficients are
    # covered too. The colour cube is laid out as images of 16 red levels x 256 green x 256
    # blue, and the pixel's parameters broadcast over them.
    lik = DiscretizedLogisticMixture(2)
    out = torch.randn(1, 20, 1, 1, generator=torch.Generator().manual_seed(4))
    out[:, 2:8] *= 0.5  # means inside the data's range, so no level's mass is negligible
    out[:, 14:] *= 2  # strong channel coefficients
    grid = LEVELS.float()
    total = 0.0
    for start in range(0, 256, 16):
        red = grid[start : start + 16].view(-1, 1, 1)
        x = torch.stack(torch.broadcast_tensors(red, grid.view(1, -1, 1), grid.view(1, 1, -1)), 1)
        total += torch.exp(-lik.nll(out, x, None)).double().sum().item()
    assert total == pytest.approx(1.0, abs=1e-4)


# --- bin masses against plain-float computations -----------------------------------------------


def phi(t: float) -> float:
    return 0.5 * math.erfc(-t / math.sqrt(2))


def normal_bin(k: int, mean: float, sigma: float) -> float:
    lo, hi = (k - 0.5) / 255, (k + 0.5) / 255
    if k == 0:
        return phi((hi - mean) / sigma)
    if k == 255:
        return phi((mean - lo) / sigma)  # 1 - Phi, without the cancellation
    if lo > mean:  # the same mass mirrored into the accurate lower tail
        return phi((mean - lo) / sigma) - phi((mean - hi) / sigma)
    return phi((hi - mean) / sigma) - phi((lo - mean) / sigma)


def sigmoid(t: float) -> float:
    return 1 / (1 + math.exp(-t)) if t >= 0 else math.exp(t) / (1 + math.exp(t))


def logistic_bin(k: int, mean: float, log_scale: float) -> float:
    """Mass of level k under a logistic on the [-1, 1] scale, bins 2/255 wide."""
    x, s = 2 * k / 255 - 1, math.exp(max(log_scale, -7.0))
    hi, lo = (x + 1 / 255 - mean) / s, (x - 1 / 255 - mean) / s
    if k == 0:
        return sigmoid(hi)
    if k == 255:
        return sigmoid(-lo)
    return sigmoid(-lo) - sigmoid(-hi) if lo > 0 else sigmoid(hi) - sigmoid(lo)


# (level, mean, sigma): both edges, the middle, and tails where a plain CDF difference is 0 or 1
GAUSSIAN_PIXELS = [
    (0, 0.3, 0.2),
    (255, 0.7, 0.2),
    (128, 0.5, 0.05),
    (40, 0.9, 0.1),
    (250, 0.1, 0.1),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gaussian_bin_masses_match_the_normal_cdf(dtype):
    lik = Gaussian()
    for k, mean, sigma in GAUSSIAN_PIXELS:
        holder = Holder(lik, math.log(sigma), dtype)
        got = lik.nll(
            torch.tensor([mean], dtype=dtype), torch.tensor([k / 255], dtype=dtype), holder
        )
        expected = -math.log(normal_bin(k, mean, sigma))
        assert got.item() == pytest.approx(expected, **TOLERANCE[dtype]), (k, mean, sigma)


# (level, mean on [-1, 1], log-scale): edges, middle, a clamped scale, and both far tails
LOGISTIC_PIXELS = [(0, -0.4, -2.0), (255, 0.5, -1.5), (128, 0.0, -4.0), (3, 0.9, -3.0)]
LOGISTIC_PIXELS += [(250, -0.9, -3.0), (77, -0.4, -9.0), (200, 0.1, 1.0)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_discretized_logistic_bin_masses_match_the_sigmoid(dtype):
    lik = DiscretizedLogistic()
    out = torch.tensor([[m, s] for _, m, s in LOGISTIC_PIXELS], dtype=dtype).T[None]  # (1, 2, 7)
    x = torch.tensor([[k / 255 for k, _, _ in LOGISTIC_PIXELS]], dtype=dtype)[:, None]
    got = lik.nll(out, x, None)[0, 0]
    for i, (k, m, s) in enumerate(LOGISTIC_PIXELS):
        expected = -math.log(logistic_bin(k, m, s))
        assert got[i].item() == pytest.approx(expected, **TOLERANCE[dtype]), k


def mixture_pixel_mass(levels, logits, means, log_scales, coeffs) -> float:
    """sum_k pi_k prod_c p(x_c | k) by hand, with PixelCNN++'s channel coefficients."""
    z = [2 * k / 255 - 1 for k in levels]
    weights = [math.exp(v) for v in logits]
    total = 0.0
    for j, weight in enumerate(weights):
        shift = [0.0, 0.0, 0.0]
        if coeffs is not None:
            a, b, c = (math.tanh(coeffs[i][j]) for i in range(3))
            shift = [0.0, a * z[0], b * z[0] + c * z[1]]
        mass = 1.0
        for ch, k in enumerate(levels):
            mass *= logistic_bin(k, means[ch][j] + shift[ch], log_scales[ch][j])
        total += weight / sum(weights) * mass
    return total


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mixture_pixel_masses_match_a_hand_computation(channels, dtype):
    lik = DiscretizedLogisticMixture(2)
    out = random_out(lik, channels, b=1, h=1, w=4, seed=7).to(dtype)
    out[:, 2 : 2 + 4 * channels] *= 0.5  # means and log-scales of moderate size
    pixels = [(0, 128, 255), (255, 3, 0), (37, 200, 91), (128, 128, 128)]
    x = torch.tensor([p[:channels] for p in pixels], dtype=dtype).T[None, :, None] / 255
    got = lik.nll(out, x, None)
    assert got.shape == (1, 4)
    for w, levels in enumerate(pixels):
        p = out[0, :, 0, w].tolist()
        groups = 2 * channels + (3 if channels == 3 else 0)  # means, log-scales, coefficients
        cols = [p[2 + 2 * i : 4 + 2 * i] for i in range(groups)]
        means, scales = cols[:channels], cols[channels : 2 * channels]
        coeffs = cols[2 * channels :] if channels == 3 else None
        expected = -math.log(mixture_pixel_mass(levels[:channels], p[:2], means, scales, coeffs))
        assert got[0, w].item() == pytest.approx(expected, **TOLERANCE[dtype]), levels


def test_a_one_component_mixture_of_grey_pixels_is_the_discretized_logistic():
    mix, single = DiscretizedLogisticMixture(1), DiscretizedLogistic()
    out = random_out(mix, 1)  # logit, mean, log-scale
    x = torch.randint(0, 256, (2, 1, 2, 2), generator=torch.Generator().manual_seed(0)) / 255
    got = mix.nll(out, x.double(), None)
    assert torch.allclose(got, single.nll(out[:, 1:], x.double(), None).flatten(1))


@pytest.mark.parametrize("name", EIGHT_BIT)
def test_extreme_outputs_give_finite_nll_and_gradients(name):
    lik = likelihood_for(name, components=2)
    out = (random_out(lik, 3).float() * 40).requires_grad_()
    holder = Holder(lik, 6.0)
    x = torch.randint(0, 256, (2, 3, 2, 2), generator=torch.Generator().manual_seed(1)) / 255
    nll = lik.nll(out, x, holder)
    nll.sum().backward()
    assert torch.isfinite(nll).all() and (nll >= 0).all() and torch.isfinite(out.grad).all()


# --- means, samples, channel counts, bits per dim ----------------------------------------------


@pytest.mark.parametrize("name", list(LIKELIHOODS))
@pytest.mark.parametrize("c", [1, 3])
def test_mean_and_sample_are_images_in_range_and_samples_reproducible(name, c):
    lik = likelihood_for(name, components=3)
    holder = Holder(lik, -2.0)
    out = random_out(lik, c, b=4, h=5, w=3).float()
    mean = lik.mean(out)
    draws = [lik.sample(out, holder, torch.Generator().manual_seed(s)) for s in (5, 5, 6)]
    for image in (mean, *draws):
        assert image.shape == (4, c, 5, 3)
        assert image.min() >= 0 and image.max() <= 1
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    grid = draws[0] * 255
    if name == "bernoulli":
        assert set(draws[0].unique().tolist()) <= {0.0, 1.0}
    else:
        assert torch.allclose(grid, grid.round(), atol=1e-4)


@pytest.mark.parametrize("name", EIGHT_BIT)
def test_grey_samples_follow_the_pmf(name):
    lik = likelihood_for(name, components=3)
    holder = Holder(lik, math.log(0.1))
    exact = Holder(lik, math.log(0.1), torch.float64)
    out = random_out(lik, 1, b=1, h=1, w=1, seed=2).float()
    pmf = masses_over_levels(lik, out.double(), exact, LEVELS, 1).flatten()
    draws = lik.sample(out.expand(40_000, -1, -1, -1), holder, torch.Generator().manual_seed(0))
    counts = torch.bincount((draws.flatten() * 255).round().long(), minlength=256).double()
    # Kolmogorov-Smirnov: 0.012 is about 2.4 times the 1% critical distance for 40,000 draws
    assert (counts.cumsum(0) / counts.sum() - pmf.cumsum(0)).abs().max() < 0.012
    assert draws.mean().item() == pytest.approx((pmf * LEVELS).sum().item(), abs=0.005)


def test_rgb_mixture_samples_and_mean_agree_with_the_channel_coefficients():
    # Narrow components well inside [-1, 1]: the discretised mean is the continuous one, so the
    # average sample (coefficients on sampled red and green) must match mean() (on the means).
    lik = DiscretizedLogisticMixture(2)
    out = random_out(lik, 3, b=1, h=1, w=1, seed=3).float()
    out[:, 2:8] = out[:, 2:8].clamp(-1, 1) * 0.3
    out[:, 8:14] = -3.5
    draws = lik.sample(out.expand(40_000, -1, -1, -1), None, torch.Generator().manual_seed(1))
    mean = lik.mean(out)[0, :, 0, 0]
    assert torch.allclose(draws.mean(0)[:, 0, 0], mean, atol=0.004), (draws.mean(0), mean)
    independent = out.clone()
    independent[:, 14:] = 0  # tanh(0) = 0: no channel dependence
    assert not torch.allclose(lik.mean(independent), lik.mean(out), atol=0.01)


def test_rgb_mixture_samples_condition_on_the_sampled_earlier_channels():
    # One dominant component: green = mu_g + a * red + noise, so the regression slope of the
    # sampled green on the sampled red is a = tanh(coefficient); conditioning on red's mean
    # instead would give the right average but a slope of zero.
    lik = DiscretizedLogisticMixture(2)
    out = torch.zeros(1, 20, 1, 1)
    out[:, 0], out[:, 1] = 20.0, -20.0  # logits
    out[:, 8:14] = -2.5  # log-scales
    out[:, 14], out[:, 16], out[:, 18] = 0.8, -0.5, 0.6  # component 0's coefficients a, b, c
    draws = lik.sample(out.expand(40_000, -1, -1, -1), None, torch.Generator().manual_seed(2))
    r, g, b = draws[:, :, 0, 0].T
    design = torch.stack([torch.ones_like(r), r], 1)
    slope_g = torch.linalg.lstsq(design, g[:, None]).solution[1].item()
    assert slope_g == pytest.approx(math.tanh(0.8), abs=0.03)
    design = torch.stack([torch.ones_like(r), r, g], 1)
    slopes_b = torch.linalg.lstsq(design, b[:, None]).solution[1:, 0].tolist()
    assert slopes_b == pytest.approx([math.tanh(-0.5), math.tanh(0.6)], abs=0.03)


def test_decoder_channels_and_registry():
    assert set(LIKELIHOODS) == {"bernoulli", *EIGHT_BIT}
    for name, cls in LIKELIHOODS.items():
        assert cls.name == name and type(likelihood_for(name)) is cls
    assert [Bernoulli().decoder_channels(c) for c in (1, 3)] == [1, 3]
    assert [Gaussian().decoder_channels(c) for c in (1, 3)] == [1, 3]
    assert [DiscretizedLogistic().decoder_channels(c) for c in (1, 3)] == [2, 6]
    assert [likelihood_for(EIGHT_BIT[2]).decoder_channels(c) for c in (1, 3)] == [15, 50]
    assert [DiscretizedLogisticMixture(2).decoder_channels(c) for c in (1, 2, 3)] == [6, 10, 20]
    assert likelihood_for(EIGHT_BIT[2], components=4).components == 4
    with pytest.raises(ValueError, match="component"):
        DiscretizedLogisticMixture(0)
    # old weight files name the Gaussian's one parameter log_sigma, a scalar
    (name, p), *rest = Gaussian().new_parameters().items()
    assert name == "log_sigma" and p.shape == () and not rest


def test_bits_per_dim_and_what_it_means():
    for name in LIKELIHOODS:
        lik = likelihood_for(name)
        assert lik.bits_per_dim(1000.0, 784) == pytest.approx(bits_per_dim(1000.0, 784))
        assert lik.bits_per_dim(784 * math.log(2), 784) == pytest.approx(1.0)
    assert "binar" in Bernoulli.bits_per_dim_meaning
    assert all("8-bit" in LIKELIHOODS[n].bits_per_dim_meaning for n in EIGHT_BIT)


# --- a ConvVAE with each likelihood ------------------------------------------------------------


@pytest.mark.parametrize("name", list(LIKELIHOODS))
@pytest.mark.parametrize("image_shape", [(1, 28, 28), (3, 32, 32)])
def test_conv_vae_trains_a_step_with_each_likelihood(name, image_shape):
    torch.manual_seed(0)
    # model_construct: the config schema may not list the new likelihood names yet
    cfg = ModelSection.model_construct(channels=[4, 8], hidden_dim=8, latent_dim=2, likelihood=name)
    model = ConvVAE(cfg, image_shape)
    x = torch.randint(0, 256, (3, *image_shape), generator=torch.Generator().manual_seed(0)) / 255
    if name == "bernoulli":
        x = x.round()
    p = model(x)
    out = p.out
    assert out.shape == (3, model.likelihood.decoder_channels(image_shape[0]), *image_shape[1:])
    recon = reconstruction_nll(model, out, x)
    assert recon.shape == (3,) and torch.isfinite(recon).all()
    (recon + p.kl[0]).mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    for image in (model.sample(2), model.reconstruct(x)):
        assert image.shape[1:] == image_shape and image.min() >= 0 and image.max() <= 1
