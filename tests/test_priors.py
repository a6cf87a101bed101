"""The top z's learned mixture prior (model.prior_components): its density against
torch.distributions, its draws, the one-draw KL it gives both families, its reduction to N(0, I),
and everything downstream of the model: IWAE, diagnostics, export and the sampling job."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import negative_elbo_steps, tiny_config
from torch import distributions as D

from raytrain_vae.batch_actors import Sampler
from raytrain_vae.config import load_config
from raytrain_vae.evaluation import evaluate
from raytrain_vae.model_io import load_model_dir, model_files, save_model_dir
from raytrain_vae.models import build_model
from raytrain_vae.models.priors import MixturePrior
from raytrain_vae.objectives import elbo_terms, iwae_nll, reconstruction_nll

SHAPE = (1, 16, 16)
DEEP = ["model.type=hierarchical", "model.levels=[{size: 4, channels: 3}, {size: 8, channels: 2}]"]
SMALL = ["model.channels=[6,8]", "model.hidden_dim=16", "model.latent_dim=4"]


def make_model(*overrides: str, seed: int = 0):
    cfg = load_config(None, [*SMALL, *overrides]).model
    torch.manual_seed(seed)
    return build_model(cfg, SHAPE).eval()


def images(n: int = 6, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((n, *SHAPE), 0.4), generator=g)


def set_mixture(prior: MixturePrior, weights, means, logvars) -> None:
    with torch.no_grad():
        prior.logits.copy_(torch.tensor(weights).log())
        prior.means.copy_(torch.tensor(means))
        prior.logvars.copy_(torch.tensor(logvars))


def test_the_log_density_is_torch_distributions_mixture():
    torch.manual_seed(0)
    prior = MixturePrior(5, 3)
    with torch.no_grad():
        prior.logits.normal_()
        prior.logvars.normal_(0, 0.5)
    z = torch.randn(2, 7, 3) * 2
    reference = D.MixtureSameFamily(
        D.Categorical(logits=prior.logits),
        D.Independent(D.Normal(prior.means, torch.exp(0.5 * prior.logvars)), 1),
    )
    torch.testing.assert_close(prior.log_prob(z), reference.log_prob(z).detach())


def test_draws_pick_components_by_weight_and_spread_by_temperature():
    prior = MixturePrior(3, 2)
    means = [[-20.0, 0.0], [0.0, 5.0], [20.0, 0.0]]
    set_mixture(prior, [0.2, 0.3, 0.5], means, [[0.0, 0.0], [math.log(4), 0.0], [-2.0, -2.0]])
    g = torch.Generator().manual_seed(0)
    noise, picks = torch.randn(40_000, 2, generator=g), torch.randn(40_000, generator=g)
    with torch.no_grad():
        z = prior.draw(noise, picks, 1.0)
        cold = prior.draw(noise, picks, 0.0)
    component = torch.bucketize(z[:, 0].contiguous(), torch.tensor([-10.0, 10.0]))
    shares = torch.bincount(component, minlength=3).float() / len(z)
    torch.testing.assert_close(shares, torch.tensor([0.2, 0.3, 0.5]), atol=0.01, rtol=0)
    assert float(z[component == 1, 0].std()) == pytest.approx(2.0, rel=0.03)  # variance 4
    assert float(z[component == 2, 1].std()) == pytest.approx(math.exp(-1), rel=0.03)
    assert {tuple(row) for row in cold.tolist()} == {tuple(m) for m in means}


@pytest.mark.parametrize("family", [[], DEEP], ids=["conv", "hierarchical"])
def test_the_kl_is_the_draws_log_ratio_and_averages_to_the_true_kl(family):
    """Under a mixture the pass's KL is log q(z|x) - log p(z) of its draws; for a conv model its
    mean over draws is KL(q || p), computed here by brute-force integration on a grid in 1-D."""
    model = make_model(*family, "model.prior_components=3")
    p = model(images(), samples=4)
    levels = p.kl_groups.shape[-1] - 1
    assert p.kl_groups.shape == (4, 6, 1 + levels) and levels == (5 if family else 0)
    top = p.kl_groups[..., 0]
    if not family:
        torch.testing.assert_close(top, p.log_posterior - p.log_prior)
    torch.testing.assert_close(p.kl_groups.sum(dim=-1), p.kl)

    one_d = make_model("model.latent_dim=1", "model.prior_components=2")
    set_mixture(one_d.top_prior, [0.3, 0.7], [[-1.0], [2.0]], [[0.0], [-1.0]])
    x = images(n=1)
    grid = torch.linspace(-12, 12, 200_001)[:, None]  # steps of 1.2e-4
    with torch.no_grad():
        mu, logvar = one_d.encode(x)
        q = torch.exp(-0.5 * ((grid - mu) ** 2 / logvar.exp() + logvar + math.log(2 * math.pi)))
        exact = float((q[:, 0] * (q[:, 0].log() - one_d.top_prior.log_prob(grid))).sum() * 1.2e-4)
        torch.manual_seed(0)
        estimate = float(one_d(x, samples=200_000).kl.mean())
    assert estimate == pytest.approx(exact, abs=0.01)


def test_one_component_at_the_origin_is_the_standard_normal_prior():
    plain, mixed = make_model(*DEEP), make_model(*DEEP, "model.prior_components=1")
    set_mixture(mixed.top_prior, [1.0], [[0.0] * 4], [[0.0] * 4])
    mixed.load_state_dict(plain.state_dict(), strict=False)  # the same weights elsewhere
    x = images()
    noise = torch.randn(3, 6, plain.noise_size, generator=torch.Generator().manual_seed(0))
    picks = torch.randn(3, 6, 1)
    a = plain.top_down(plain.bottom_up(x), 3, noise)
    b = mixed.top_down(mixed.bottom_up(x), 3, torch.cat([noise, picks], dim=-1))
    torch.testing.assert_close(b.out, a.out)
    torch.testing.assert_close(b.log_prior, a.log_prior)
    torch.testing.assert_close(b.log_posterior, a.log_posterior)
    torch.testing.assert_close(b.kl_groups[..., 1:], a.kl_groups[..., 4:])  # lower levels
    flat = torch.randn(5, plain.noise_size)
    with torch.no_grad():
        torch.testing.assert_close(
            mixed.generate(torch.cat([flat, torch.randn(5, 1)], dim=1), 0.7),
            plain.generate(flat, 0.7),
        )


def test_the_iwae_bound_with_k1_is_the_elbo_and_k8_is_tighter():
    """For a conv model under a mixture, k = 1 is the ELBO draw for draw (both are log q - log p
    of the same z); the hierarchy's lower levels keep their closed-form KL, so there the two
    agree on average."""
    conv = make_model("model.prior_components=4")
    x = images(n=8)
    with torch.no_grad():
        torch.manual_seed(5)
        p = conv(x)
        torch.manual_seed(5)
        k1 = iwae_nll(conv, x, 1)
    torch.testing.assert_close(k1, reconstruction_nll(conv, p.out, x) + p.kl[0])

    deep = make_model(*DEEP, "model.prior_components=4")
    many = images(n=4).repeat(500, 1, 1, 1)
    with torch.no_grad():
        k1 = iwae_nll(deep, many, 1).view(500, 4).mean(dim=0)
        recon, kl = elbo_terms(deep, many)
        k8 = iwae_nll(deep, many, 8).view(500, 4).mean(dim=0)
    torch.testing.assert_close(k1, (recon + kl).view(500, 4).mean(dim=0), rtol=0.01, atol=0.5)
    assert (k8 < k1 - 0.1).all(), (k8, k1)


def test_training_fits_the_prior_and_lowers_the_loss():
    model = make_model("model.prior_components=8").train()
    x = images(n=64, seed=3)
    start = model.top_prior.means.detach().clone()
    losses = negative_elbo_steps(model, x, 60)
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 5
    assert not torch.allclose(model.top_prior.means, start)


def test_evaluate_reports_the_top_as_one_group():
    model = make_model(*DEEP, "model.prior_components=3")
    metrics = evaluate(model, (images(n=16) * 255).to(torch.uint8), k=2, batch_size=8)
    assert len(metrics["kl_per_group"]["top"]) == 1
    assert len(metrics["kl_per_group"]["l1_3x4x4"]) == 3
    assert metrics["units"]["top"] == 4
    assert metrics["kl"] == pytest.approx(sum(metrics["kl_per_level"].values()), rel=1e-6)


def test_export_round_trip_and_the_sampling_jobs_latent(tmp_path):
    model = make_model(*DEEP, "model.prior_components=3")
    with torch.no_grad():
        model.top_prior.means.mul_(4)
    cfg = load_config(None, [*SMALL, *DEEP, "model.prior_components=3"])
    save_model_dir(model, cfg, tmp_path, {"epoch": 1})
    loaded, loaded_cfg = load_model_dir(tmp_path)
    assert loaded_cfg.model.prior_components == 3
    g = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    torch.testing.assert_close(loaded.sample(3, generator=g()), model.sample(3, generator=g()))

    sampler = Sampler(model_files(tmp_path), seed=3, temperature=0.0, pixels=False)
    rows = sampler({"id": np.arange(6)})
    latents = np.stack([np.asarray(v) for v in rows.column("latent").to_pylist()])
    means = model.top_prior.means.detach().numpy()
    distances = np.abs(latents[:, None, :] - means[None]).max(axis=2)  # (rows, components)
    assert (distances.min(axis=1) < 1e-5).all()  # temperature 0: each z a component's mean


def test_the_key_defaults_to_the_standard_normal():
    cfg = tiny_config().model
    assert cfg.prior_components == 0
    assert build_model(cfg, (1, 28, 28)).top_prior is None
