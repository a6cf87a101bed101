"""The quality options each do what their config key documents: activation, residual blocks,
decoder head, cosine schedule, free bits and the IWAE-k training bound."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from raytrain_vae.config import Config, ConfigError, ModelSection, load_config
from raytrain_vae.models.conv import ConvVAE, ResidualBlock
from raytrain_vae.objectives import (
    elbo_terms,
    free_bits_kl,
    iwae_nll,
    kl_to_standard_normal,
    log_importance_weights,
    training_loss,
)
from raytrain_vae.optim import set_learning_rate
from raytrain_vae.perf.elu import ELU

SHAPE = (1, 12, 12)


def make_model(seed=0, **kw) -> ConvVAE:
    torch.manual_seed(seed)
    base = {"channels": [4, 8], "hidden_dim": 16, "latent_dim": 3}
    return ConvVAE(ModelSection(**{**base, **kw}), SHAPE)


def binary_batch(n=5, seed=1) -> torch.Tensor:
    return torch.bernoulli(torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed)))


# --- architecture ---------------------------------------------------------------------------


@pytest.mark.parametrize("name, cls", [("relu", nn.ReLU), ("elu", ELU), ("silu", nn.SiLU)])
def test_activation_is_used_everywhere(name, cls):
    model = make_model(activation=name, residual_blocks=1)
    acts = [m for m in model.modules() if isinstance(m, (nn.ReLU, nn.ELU, nn.SiLU))]
    assert acts and all(type(m) is cls for m in acts)


def test_fast_elu_equals_torch_elu_in_value_and_gradient():
    torch.manual_seed(0)
    # Both signs, values near 0 (where exp(x) - 1 and expm1 differ most), and channels_last.
    x = torch.cat([torch.randn(2, 4, 6, 6) * 3, torch.randn(2, 4, 6, 6) * 1e-4])
    x = x.contiguous(memory_format=torch.channels_last)
    ours, ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, y_ref = ELU()(ours), nn.functional.elu(ref)
    assert type(y.grad_fn).__name__ == "_ELUFromExpBackward"  # the fast path, not nn.ELU's
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=2e-7)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-6, atol=1e-7)
    x64 = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ELU(), (x64,))
    assert torch.autograd.gradgradcheck(ELU(), (x64,))


@pytest.mark.parametrize(
    "act, x",
    [
        (ELU(), torch.randn(100, 100).bfloat16()),  # torch's kernel rounds once, exp() - 1 twice
        (ELU(alpha=0.5), torch.randn(4, 6)),
        (ELU(inplace=True), torch.randn(4, 6)),
    ],
)
def test_fast_elu_leaves_other_cases_to_torch(act, x):
    expected = nn.functional.elu(x, alpha=act.alpha)
    y = act(x.clone())
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


def test_fast_elu_leaves_a_residual_input_intact():
    # A residual block applies ELU to x and adds x back: the activation must not write into x.
    x = torch.randn(2, 4, 5, 5)
    kept = x.clone()
    block = ResidualBlock(4, ELU)
    block(x).sum().backward()
    assert torch.equal(x, kept)


def test_residual_blocks_add_depth_and_start_as_identity_when_zeroed():
    plain = make_model(residual_blocks=0)
    deep = make_model(residual_blocks=2)
    blocks = [m for m in deep.modules() if isinstance(m, ResidualBlock)]
    # Two per resolution, encoder and decoder, two resolutions.
    assert len(blocks) == 2 * 2 * 2
    assert sum(p.numel() for p in deep.parameters()) > sum(p.numel() for p in plain.parameters())

    # A block whose last conv is zero is the identity, so with every block zeroed the deep model
    # computes exactly what the plain model computes with the same remaining weights.
    for block in blocks:
        nn.init.zeros_(block.body[-1].weight)
        nn.init.zeros_(block.body[-1].bias)
    # Blocks are inserted into the Sequentials, so the remaining weights are matched by order.
    outer = [k for k in deep.state_dict() if ".body." not in k]
    assert len(outer) == len(plain.state_dict())
    renamed = dict(zip(outer, plain.state_dict().values(), strict=True))
    missing, unexpected = deep.load_state_dict(renamed, strict=False)
    assert not unexpected and all(".body." in k for k in missing)
    x = binary_batch()
    torch.testing.assert_close(deep.encode(x), plain.encode(x))
    z = torch.randn(4, 3)
    torch.testing.assert_close(deep.decode(z), plain.decode(z))


def test_decoder_head_outputs_pixels_from_full_resolution_maps():
    plain = make_model()
    head = make_model(decoder_head_channels=6)
    assert plain.decoder_head is None and plain.decoder_convs[-1].out_channels == SHAPE[0]
    assert head.decoder_convs[-1].out_channels == 6
    assert isinstance(head.decoder_head, nn.Conv2d)
    assert head.decoder_head.in_channels == 6 and head.decoder_head.out_channels == SHAPE[0]
    assert head.decoder_head.kernel_size == (3, 3)
    assert head.decode(torch.randn(2, 3)).shape == (2, *SHAPE)


def test_old_exports_still_load_into_the_default_architecture():
    # Keys of a model saved before the options existed are the keys of today's default model.
    assert set(make_model().state_dict()) == {
        *(f"encoder.{i}.{p}" for i in (0, 2, 5, 7) for p in ("weight", "bias")),
        *(f"decoder_dense.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")),
        *(f"decoder_convs.{i}.{p}" for i in (0, 1) for p in ("weight", "bias")),
    }


def test_forward_draws_samples_sample_major():
    model = make_model()
    x = binary_batch(n=4)
    mu, logvar = model.encode(x)
    noise = torch.randn(3, 4, 3)
    p = model.top_down(model.bottom_up(x), samples=3, noise=noise)
    assert p.out.shape == (12, *SHAPE) and p.kl.shape == p.log_prior.shape == (3, 4)
    z = mu + noise * torch.exp(0.5 * logvar)
    torch.testing.assert_close(p.out[4:8], model.decode(z[1]))
    # The draws of a fresh pass are torch.randn(samples, B, latent_dim), in that order: seeded
    # results (the quality table's) depend on it.
    torch.manual_seed(0)
    fresh = model(x, samples=3)
    torch.manual_seed(0)
    given = model.top_down(model.bottom_up(x), 3, torch.randn(3, 4, 3))
    torch.testing.assert_close(fresh.out, given.out)


# --- learning-rate schedule ----------------------------------------------------------------


@pytest.mark.parametrize(
    "schedule, step, expected",
    [
        ("constant", 0, 1.0),
        ("constant", 35, 1.0),
        ("cosine", 0, 1.0),
        ("cosine", 10, 0.5),
        ("cosine", 5, 0.5 * (1 + math.cos(math.pi / 4))),
        ("cosine", 20, 0.0),
        ("cosine", 25, 0.0),
    ],
)
def test_learning_rate_schedule(schedule, step, expected):
    cfg = load_config(None, ["train.epochs=4", "train.lr=0.002", f"train.lr_schedule={schedule}"])
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=123.0)
    set_learning_rate(opt, cfg, step, steps_per_epoch=5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.002 * expected, abs=1e-12)


# --- free bits ------------------------------------------------------------------------------


def test_free_bits_floor_each_latent_dims_kl():
    lam = 0.5
    # dim 0: KL 0 (below the floor); dim 1: KL well above it.
    mu = torch.tensor([[0.0, 2.0], [0.0, -2.0]], requires_grad=True)
    logvar = torch.zeros(2, 2, requires_grad=True)
    term = free_bits_kl(0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar), lam)
    per_dim = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).mean(0)
    assert float(term.detach()) == pytest.approx(lam + float(per_dim[1].detach()))
    term.backward()
    assert torch.all(mu.grad[:, 0] == 0) and torch.all(logvar.grad[:, 0] == 0)
    assert torch.all(mu.grad[:, 1] != 0)


def test_free_bits_kl_term_never_below_lambda_per_dim():
    torch.manual_seed(0)
    lam, d = 0.25, 6
    for _ in range(20):
        mu, logvar = torch.randn(8, d) * torch.rand(1), torch.randn(8, d) * 0.1
        per_dim = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar)
        assert float(free_bits_kl(per_dim, lam)) >= d * lam - 1e-6
        # With the floor at 0 it is the batch-mean closed-form KL.
        assert float(free_bits_kl(per_dim, 0.0)) == pytest.approx(
            float(kl_to_standard_normal(mu, logvar).mean()), rel=1e-5
        )


def test_free_bits_enters_the_training_loss():
    model = make_model()
    x = binary_batch()
    torch.manual_seed(3)
    plain, recon, kl = training_loss(model, x, 1.0, free_bits=0.0)
    torch.manual_seed(3)
    floored, recon2, _ = training_loss(model, x, 1.0, free_bits=100.0)
    torch.testing.assert_close(recon, recon2)
    assert float(plain) == pytest.approx(float(recon.mean() + kl.mean()), rel=1e-6)
    assert float(floored) == pytest.approx(float(recon.mean()) + 3 * 100.0, rel=1e-6)


# --- IWAE-k training bound ------------------------------------------------------------------


def test_iwae_bound_with_k1_is_the_elbo():
    model = make_model()
    x = binary_batch()
    torch.manual_seed(4)
    loss, recon, kl = training_loss(model, x, 1.0, iwae_k=1)
    torch.manual_seed(4)
    recon_ref, kl_ref = elbo_terms(model, x)
    torch.testing.assert_close(recon, recon_ref)
    assert float(loss) == pytest.approx(float((recon_ref + kl_ref).mean()), rel=1e-6)

    # The importance-weight form with one draw is the same ELBO with a one-draw KL estimate,
    # whose mean over many draws is the closed-form KL.
    torch.manual_seed(5)
    mu, logvar = model.encode(x)
    noise = torch.randn(4000, *mu.shape)
    z = mu + noise * torch.exp(0.5 * logvar)
    log_w = log_importance_weights(model, model.top_down((mu, logvar), 4000, noise), x)
    neg_elbo = -log_w.mean(0)
    recon_mc = -(log_w + kl_mc_terms(z, mu, logvar)).mean(0)
    torch.testing.assert_close(
        neg_elbo - recon_mc, kl_to_standard_normal(mu, logvar), rtol=0.05, atol=0.05
    )


def kl_mc_terms(z, mu, logvar):
    """log q(z|x) - log p(z) per draw: what log_w subtracts besides the reconstruction."""
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp()).log_prob(z).sum(-1)
    p = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    return q - p


def test_iwae_training_bound_matches_the_evaluation_estimator_and_tightens():
    model = make_model().eval()
    x = binary_batch()
    torch.manual_seed(6)
    loss, recon, kl = training_loss(model, x, 1.0, iwae_k=8)
    torch.manual_seed(6)
    assert float(loss) == pytest.approx(float(iwae_nll(model, x, 8).mean()), rel=1e-5)
    assert recon.shape == kl.shape == (len(x),)

    losses = {}
    for k in (1, 8):
        torch.manual_seed(7)
        losses[k] = sum(float(training_loss(model, x, 1.0, iwae_k=k)[0]) for _ in range(200))
    assert losses[8] < losses[1]


def test_iwae_training_gradients_flow_to_encoder_and_decoder():
    model = make_model()
    loss, _, _ = training_loss(model, binary_batch(), 1.0, iwae_k=4)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize(
    "extra", ["train.beta=0.5", "train.kl_warmup_epochs=1", "train.free_bits=0.1"]
)
def test_iwae_k_refuses_kl_reweighting(extra):
    with pytest.raises(ConfigError, match="train.iwae_k=4"):
        load_config(None, ["train.iwae_k=4", extra])
    assert isinstance(load_config(None, ["train.iwae_k=4"]), Config)
