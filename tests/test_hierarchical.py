"""The hierarchical family (model.type: hierarchical): closed-form KL per level against Monte
Carlo, the IWAE bound, its reduction to the conv model, sampling, export, active units, and a
2-worker DDP run."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import make_idx_dataset, negative_elbo_steps, tiny_config

from raytrain_vae.batch_actors import Encoder, Sampler
from raytrain_vae.config import ConfigError, load_config
from raytrain_vae.diagnostics import UnitActivity
from raytrain_vae.evaluation import evaluate
from raytrain_vae.input_rows import fixed_size_list
from raytrain_vae.model_io import load_model_dir, model_files, save_model_dir
from raytrain_vae.models import ConvVAE, HierarchicalVAE, build_model
from raytrain_vae.models.hierarchical import level_terms, standard_normal_like
from raytrain_vae.objectives import elbo_terms, iwae_nll

SHAPE = (1, 16, 16)
LEVELS = "model.levels=[{size: 4, channels: 3}, {size: 8, channels: 2}]"


MODEL = ["model.type=hierarchical", "model.channels=[6,8]", "model.hidden_dim=16",
         "model.latent_dim=4", LEVELS]  # fmt: skip


def make_model(*overrides: str, seed: int = 0) -> HierarchicalVAE:
    cfg = load_config(None, [*MODEL, *overrides]).model
    torch.manual_seed(seed)
    return build_model(cfg, SHAPE).eval()


def images(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.bernoulli(
        torch.full((n, *SHAPE), 0.4), generator=torch.Generator().manual_seed(seed)
    )


def shake(model: torch.nn.Module, scale: float = 0.1, seed: int = 2) -> None:
    """Move every weight off its initialisation (a fresh level starts as its prior: KL 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def test_levels_have_their_shapes_and_noise_sizes():
    model = make_model()
    assert model.level_names == ("top", "l1_3x4x4", "l2_2x8x8")  # numbered: shapes may repeat
    assert model.noise_size == 4 + 3 * 16 + 2 * 64
    p = model(images(), samples=5)
    assert p.out.shape == (30, *SHAPE)
    assert p.kl.shape == p.log_prior.shape == p.log_posterior.shape == (5, 6)
    assert p.kl_groups.shape == (5, 6, 4 + 3 + 2)
    torch.testing.assert_close(p.kl_groups.sum(dim=2), p.kl)


def test_a_pass_of_s_draws_is_s_passes_of_one_draw_with_the_same_noise():
    model = make_model()
    shake(model)
    x = images(n=3)
    noise = torch.randn(4, 3, model.noise_size, generator=torch.Generator().manual_seed(0))
    many = model.top_down(model.bottom_up(x), 4, noise)
    for s in range(4):
        one = model.top_down(model.bottom_up(x), 1, noise[s : s + 1])
        torch.testing.assert_close(many.out[3 * s : 3 * s + 3], one.out)
        for field in ("kl", "kl_groups", "log_prior", "log_posterior"):
            torch.testing.assert_close(getattr(many, field)[s], getattr(one, field)[0])


def test_levels_of_one_shape_keep_apart_in_names_and_diagnostics():
    model = make_model("model.levels=[{size: 4, channels: 3}, {size: 4, channels: 3}]")
    shake(model)
    assert model.level_names == ("top", "l1_3x4x4", "l2_3x4x4")
    metrics = evaluate(model, (images(n=8) * 255).to(torch.uint8), k=0)
    assert metrics["units"] == {"top": 4, "l1_3x4x4": 48, "l2_3x4x4": 48}
    assert metrics["kl"] == pytest.approx(sum(metrics["kl_per_level"].values()), rel=1e-6)


def test_a_level_at_a_missing_resolution_or_out_of_order_is_refused():
    with pytest.raises(ConfigError, match="no decoder stage of side 5.*sides: 4, 8"):
        make_model("model.levels=[{size: 5, channels: 2}]")
    with pytest.raises(ConfigError, match="top .smallest side. to bottom"):
        make_model("model.levels=[{size: 8, channels: 2}, {size: 4, channels: 2}]")


def test_a_levels_closed_form_kl_matches_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mu_q, mu_p = torch.randn(1, 3, 2, 2, generator=g), torch.randn(1, 3, 2, 2, generator=g)
    logvar_q = torch.randn(1, 3, 2, 2, generator=g) * 0.5
    logvar_p = torch.randn(1, 3, 2, 2, generator=g) * 0.5
    draws = 200_000
    z = mu_q + torch.randn(draws, 3, 2, 2, generator=g) * torch.exp(0.5 * logvar_q)
    expand = [t.expand(draws, -1, -1, -1) for t in (mu_q, logvar_q, mu_p, logvar_p)]
    kl, log_p, log_q = level_terms(z, *expand)
    assert kl.shape == (draws, 3) and log_p.shape == (draws,)
    assert float((log_q - log_p).mean()) == pytest.approx(float(kl[0].sum()), abs=0.05)


def test_the_models_kl_matches_monte_carlo_over_all_levels():
    """E_q[log q(z|x) - log p(z)] over draws of every level is the KL the pass reports (closed
    form per level given the levels above, averaged over their draws)."""
    model = make_model()
    shake(model)
    torch.manual_seed(3)
    p = model(images(n=3), samples=20_000)
    mc = (p.log_posterior - p.log_prior).mean(dim=0)
    closed = p.kl.mean(dim=0)
    assert float(p.kl_groups[..., 4:].sum(dim=2).mean()) > 1  # the lower levels' share
    torch.testing.assert_close(mc, closed, rtol=0.02, atol=0.3)


def test_the_iwae_bound_with_k1_is_the_elbo_and_k8_is_tighter():
    model = make_model()
    shake(model)
    x = images(n=4).repeat(500, 1, 1, 1)
    torch.manual_seed(5)
    k1 = iwae_nll(model, x, 1).view(500, 4).mean(dim=0)
    recon, kl = elbo_terms(model, x)
    neg_elbo = (recon + kl).view(500, 4).mean(dim=0)
    torch.testing.assert_close(k1, neg_elbo, rtol=0.01, atol=0.5)  # both estimate -ELBO
    k8 = iwae_nll(model, x, 8).view(500, 4).mean(dim=0)
    assert (k8 < k1 - 0.1).all(), (k8, k1)


def test_a_levels_posterior_is_the_correction_of_the_concatenated_features_for_every_draw():
    # prior_and_posterior splits the correction's first conv and broadcasts the bottom-up share
    # over the draws: the same maps as the nets applied as written, draw by draw.
    model = make_model()
    shake(model, scale=0.3)
    level, width = model.levels[1], model.levels[1].merge.out_channels
    g = torch.Generator().manual_seed(3)
    h = torch.randn(5 * 3, width, 8, 8, generator=g).to(memory_format=torch.channels_last)
    up = torch.randn(3, width, 8, 8, generator=g).to(memory_format=torch.channels_last)
    with torch.no_grad():
        got = level.prior_and_posterior(h, level.bottom_up_term(up))
        mu_p, logvar_p = level.prior(h).chunk(2, dim=1)
        d_mu, d_logvar = level.correction(torch.cat([h, up.repeat(5, 1, 1, 1)], dim=1)).chunk(2, 1)
    for a, b in zip(got, (mu_p, logvar_p, mu_p + d_mu, logvar_p + d_logvar), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert (d_mu.abs() > 0.01).any()  # the correction is not trivially zero


def test_standard_normal_noise_keeps_the_layout_and_the_moments():
    for t in (torch.zeros(64, 8, 14, 14).to(memory_format=torch.channels_last),
              torch.zeros(64, 8, 14, 14), torch.zeros(20000, 4)):  # fmt: skip
        torch.manual_seed(0)
        e = standard_normal_like(t)
        assert e.shape == t.shape and e.stride() == t.stride()
        assert abs(float(e.mean())) < 0.01 and abs(float(e.std()) - 1) < 0.01
        torch.manual_seed(0)
        assert torch.equal(standard_normal_like(t), e)  # seeded


def switch_off_levels(model: HierarchicalVAE) -> None:
    """Every level below the top: posterior = prior, z not mixed in, the residual block empty."""
    with torch.no_grad():
        for level in model.levels:
            for conv in (level.correction[-1], level.merge, level.block.body[3]):
                conv.weight.zero_()
                conv.bias.zero_()


def test_with_the_lower_levels_switched_off_it_is_the_flat_vae_of_the_same_top():
    deep = make_model()
    shake(deep)
    switch_off_levels(deep)
    flat = ConvVAE(load_config(None, ["model.channels=[6,8]", "model.hidden_dim=16",
                                      "model.latent_dim=4"]).model, SHAPE).eval()  # fmt: skip
    flat.load_state_dict(
        {k: v for k, v in deep.state_dict().items() if not k.startswith("levels.")}
    )
    x = images()
    torch.manual_seed(7)
    a = deep(x, samples=3)
    torch.manual_seed(7)
    b = flat(x, samples=3)
    torch.testing.assert_close(a.out, b.out)  # same top z draws, same decoder
    torch.testing.assert_close(a.kl, b.kl)  # the lower levels add no KL ...
    ratio_a, ratio_b = a.log_posterior - a.log_prior, b.log_posterior - b.log_prior
    torch.testing.assert_close(ratio_a, ratio_b, rtol=1e-5, atol=1e-4)  # sums of ~300 nats
    torch.testing.assert_close(deep.reconstruct(x), flat.reconstruct(x))  # ... nor weight
    torch.manual_seed(8)
    nll_deep = iwae_nll(deep, x, 16)
    torch.manual_seed(8)
    torch.testing.assert_close(nll_deep, iwae_nll(flat, x, 16), rtol=1e-4, atol=1e-3)


def test_no_levels_is_the_conv_model_parameter_for_parameter():
    cfg = tiny_config("model.type=hierarchical").model
    torch.manual_seed(0)
    deep = build_model(cfg, (1, 28, 28))
    torch.manual_seed(0)
    flat = build_model(tiny_config().model, (1, 28, 28))
    assert deep.state_dict().keys() == flat.state_dict().keys()
    for key, value in deep.state_dict().items():
        torch.testing.assert_close(value, flat.state_dict()[key])


def test_samples_have_the_image_shape_and_repeat_under_a_seed():
    model = make_model()
    shake(model, 0.1)
    draw = lambda seed, t=1.0: model.sample(5, t, torch.Generator().manual_seed(seed))  # noqa: E731
    a = draw(0)
    assert a.shape == (5, *SHAPE) and a.min() >= 0 and a.max() <= 1
    torch.testing.assert_close(a, draw(0))
    assert not torch.allclose(a, draw(1))
    # Temperature 0 below the top: the lower levels at their prior means, as decode() does.
    noise = torch.randn(5, model.noise_size, generator=torch.Generator().manual_seed(0))
    cold = model.generate(noise, [1.0, 0.0, 0.0])
    torch.testing.assert_close(cold, model.decode(noise[:, :4]))
    torch.testing.assert_close(draw(0, [1.0, 1.0, 1.0]), a)
    with pytest.raises(ValueError, match="3 levels need 3 values"):
        model.sample(2, [1.0, 1.0])


@pytest.fixture
def exported_deep(tmp_path) -> Path:
    """make_model(), shaken, saved as a model directory."""
    model = make_model()
    shake(model, 0.1)
    (tmp_path / "m").mkdir()
    save_model_dir(model, load_config(None, MODEL), tmp_path / "m", {"epoch": 1})
    return tmp_path / "m"


def test_export_round_trip(exported_deep):
    model = make_model()
    shake(model, 0.1)  # the exported model, made again
    loaded, loaded_cfg = load_model_dir(exported_deep)
    assert isinstance(loaded, HierarchicalVAE)
    assert loaded_cfg.model.levels == load_config(None, MODEL).model.levels
    x = images()
    torch.testing.assert_close(loaded.reconstruct(x), model.reconstruct(x))
    g = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    torch.testing.assert_close(loaded.sample(3, generator=g()), model.sample(3, generator=g()))


def test_active_units_are_none_when_the_top_is_forced_to_the_prior():
    model = make_model()
    shake(model)
    x = images(n=64)
    activity = UnitActivity()
    activity.add(model.mean_pass(x).means)
    assert activity.active()[0] > 0  # the top's means vary with x
    with torch.no_grad():
        head = model.encoder[-1]  # the top's mean and log-variance: 0 whatever x
        head.weight.zero_()
        head.bias.zero_()
    forced = UnitActivity()
    forced.add(model.mean_pass(x).means)
    assert forced.active()[0] == 0 and forced.variances()[0].max() == 0
    metrics = evaluate(model, (x * 255).to(torch.uint8), k=2, batch_size=16)
    assert metrics["active_units"]["top"] == 0 and metrics["kl_per_level"]["top"] == 0
    assert set(metrics["kl_per_level"]) == {"top", "l1_3x4x4", "l2_2x8x8"}
    assert metrics["units"] == {"top": 4, "l1_3x4x4": 48, "l2_2x8x8": 128}
    assert metrics["kl"] == pytest.approx(sum(metrics["kl_per_level"].values()), rel=1e-6)


def test_conditional_active_units_count_only_what_the_image_adds_below_the_top():
    model = make_model()
    shake(model, scale=0.3)
    x = (images(n=64) * 255).to(torch.uint8)
    shaken = evaluate(model, x, k=0, batch_size=16)
    assert all(shaken["conditional_active_units"][name] > 0 for name in model.level_names)
    with torch.no_grad():
        for level in model.levels:  # each posterior is its prior: x adds nothing below the top
            level.correction[-1].weight.zero_()
            level.correction[-1].bias.zero_()
    m = evaluate(model, x, k=0, batch_size=16)
    for name in model.level_names[1:]:
        assert m["active_units"][name] > 0  # the means still follow the levels above
        assert m["conditional_active_units"][name] == 0
    top = m["active_units"]["top"]
    assert m["conditional_active_units"]["top"] == top > 0  # the top's prior mean is 0


def test_training_lowers_the_loss():
    model = make_model().train()
    losses = negative_elbo_steps(model, images(n=64, seed=3), 60)
    assert losses[-1] < losses[0] - 5
    assert math.isfinite(losses[-1])


@pytest.mark.slow
def test_a_two_worker_ddp_run_of_two_epochs_lowers_the_loss(ray_local, tmp_path):
    from raytrain_vae.training import fit, history_of

    make_idx_dataset(seed=4, n_train=600, n_test=50, height=28, width=28).write(tmp_path / "d")
    cfg = tiny_config(
        "data.source=mnist", f"data.root={tmp_path / 'd'}", "data.download=false",
        "model.type=hierarchical", "model.levels=[{size: 7, channels: 2}, {size: 14, channels: 1}]",
        "train.epochs=2", "train.batch_size=64", "scaling.num_workers=2",
        f"run.storage_path={tmp_path / 'runs'}", "run.name=deep",
    )  # fmt: skip
    history = history_of(fit(cfg))
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[1]["train_loss"] < history[0]["train_loss"]
    assert history[1]["val_neg_elbo"] < history[0]["val_neg_elbo"]
    loaded, _ = load_model_dir(sorted((tmp_path / "runs" / "deep").glob("checkpoint_*/"))[-1])
    assert isinstance(loaded, HierarchicalVAE) and len(loaded.levels) == 2


def test_the_batch_jobs_actors_sample_and_encode_every_level(exported_deep):
    """Ray Data's actors, called directly: a sample row depends on (seed, id) only, and encode
    gives the top level's latent plus, with all_levels, each lower level's posterior mean."""
    sampler = Sampler(model_files(exported_deep), seed=3, temperature=1.0, pixels=True)
    rows = sampler({"id": np.arange(5)})
    alone = sampler({"id": np.array([3])})
    assert rows.column("pixels")[3] == alone.column("pixels")[0]
    assert len(rows.column("latent")[0]) == 4  # the top z
    assert len(set(rows.column("image").to_pylist())) == 5

    x = images(n=4)
    batch = pa.table({
        "id": pa.array(np.arange(4), pa.int64()),
        "pixels": fixed_size_list((x * 255).to(torch.uint8).flatten(1).numpy()),
    })  # fmt: skip
    encoded = Encoder(model_files(exported_deep), seed=0, reconstruct=True, all_levels=True)(batch)
    assert encoded.column("latent_mu_l1_3x4x4").type.list_size == 48
    assert encoded.column("latent_mu_l2_2x8x8").type.list_size == 128
    model, _ = load_model_dir(exported_deep)
    with torch.no_grad():
        means = model.mean_pass(x).means
    assert np.allclose(encoded.column("latent_mu_l2_2x8x8")[1].values.to_numpy(), means[2][1])
    assert np.allclose(encoded.column("latent_mu")[1].values.to_numpy(), means[0][1], atol=1e-6)
    one = Encoder(model_files(exported_deep), seed=0, reconstruct=True)(batch.slice(2, 1))
    assert one.column("neg_elbo")[0].as_py() == pytest.approx(encoded.column("neg_elbo")[2].as_py())
    assert "latent_mu_l1_3x4x4" not in one.column_names
