"""The pluggable pieces: likelihood classes, model families by model.type, data sources."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

import raytrain_vae.data as data
from raytrain_vae.config import ConfigError, DataSection, ModelSection
from raytrain_vae.data.source import DataSource, RawData
from raytrain_vae.likelihoods import LIKELIHOODS, Bernoulli, Gaussian, likelihood_for
from raytrain_vae.models import MODEL_FAMILIES, HierarchicalVAE, build_model
from raytrain_vae.models.conv import ConvVAE


class Holder(torch.nn.Module):
    """A module holding a likelihood's parameters, as a model does."""

    def __init__(self, likelihood) -> None:
        super().__init__()
        for name, p in likelihood.new_parameters().items():
            self.register_parameter(name, p)


def test_likelihoods_are_registered_by_their_config_names():
    assert set(LIKELIHOODS) == {
        "bernoulli",
        "gaussian",
        "discretized_logistic",
        "discretized_logistic_mixture",
    }
    assert set(LIKELIHOODS) == set(ModelSection.model_fields["likelihood"].annotation.__args__)
    assert isinstance(likelihood_for("gaussian"), Gaussian)


def test_bernoulli_nll_mean_and_samples():
    lik = Bernoulli()
    out = torch.tensor([[-2.0, 0.0, 3.0]])
    x = torch.tensor([[0.0, 1.0, 1.0]])
    expected = -torch.log(
        torch.tensor([1 - torch.sigmoid(torch.tensor(-2.0)), 0.5, 1 / (1 + math.exp(-3))])
    )
    assert torch.allclose(lik.nll(out, x, Holder(lik))[0], expected, atol=1e-6)
    assert torch.allclose(lik.mean(out), torch.sigmoid(out))
    g = torch.Generator().manual_seed(0)
    draws = lik.sample(out.expand(20_000, 3), Holder(lik), generator=g)
    assert set(draws.unique().tolist()) <= {0.0, 1.0}
    assert torch.allclose(draws.mean(0), torch.sigmoid(out[0]), atol=0.02)
    assert lik.decoder_channels(3) == 3 and lik.new_parameters() == {}


def test_gaussian_nll_is_the_normal_bin_mass_with_the_learned_sigma():
    """An interior level's probability is the Normal mass of its bin, +-0.5/255 around it."""
    lik = Gaussian()
    holder = Holder(lik)
    with torch.no_grad():
        holder.log_sigma.fill_(math.log(0.5))
    out, x = torch.tensor([[0.2, 0.7]]), torch.tensor([[128 / 255, 26 / 255]])
    normal = torch.distributions.Normal(out.double(), 0.5)
    half = 0.5 / 255
    mass = normal.cdf(x.double() + half) - normal.cdf(x.double() - half)
    assert torch.allclose(lik.nll(out, x, holder).double(), -mass.log(), atol=1e-4)
    assert torch.equal(lik.mean(torch.tensor([-0.5, 0.5, 1.5])), torch.tensor([0.0, 0.5, 1.0]))


def test_gaussian_samples_spread_by_sigma_and_stay_in_range():
    lik = Gaussian()
    holder = Holder(lik)
    with torch.no_grad():
        holder.log_sigma.fill_(math.log(0.1))
    out = torch.full((50_000,), 0.5)
    draws = lik.sample(out, holder, generator=torch.Generator().manual_seed(0))
    assert draws.min() >= 0 and draws.max() <= 1
    assert draws.mean().item() == pytest.approx(0.5, abs=0.005)
    assert draws.std().item() == pytest.approx(0.1, rel=0.03)


def test_the_model_registers_the_likelihoods_parameters_under_their_own_names():
    # Weight files written before likelihoods were classes name the parameter "log_sigma".
    model = build_model(tiny_config("model.likelihood=gaussian").model, (1, 28, 28))
    assert "log_sigma" in dict(model.named_parameters())
    plain = build_model(tiny_config().model, (1, 28, 28))
    assert "log_sigma" not in dict(plain.named_parameters())
    out = plain.decode(torch.zeros(2, plain.cfg.latent_dim))
    assert torch.allclose(plain.mean_image(out), F.sigmoid(out))


def test_model_type_chooses_the_family_and_unknown_families_are_refused():
    assert {"conv": ConvVAE, "hierarchical": HierarchicalVAE} == MODEL_FAMILIES
    deep = tiny_config("model.type=hierarchical", "model.levels=[{size: 7, channels: 2}]")
    assert type(build_model(deep.model, (1, 28, 28))) is HierarchicalVAE
    with pytest.raises(ConfigError, match="model.levels: only model.type hierarchical"):
        tiny_config("model.levels=[{size: 7, channels: 2}]")
    assert type(build_model(tiny_config("model.type=conv").model, (1, 28, 28))) is ConvVAE
    assert tiny_config().model.type == "conv"  # old config.yaml files without the key
    with pytest.raises(ConfigError, match="model.type"):
        tiny_config("model.type=mlp")


def test_a_registered_source_is_all_load_splits_needs(monkeypatch):
    """A source that is not IDX files at all: 3-channel 8x6 images made in memory."""
    gen = torch.Generator().manual_seed(0)
    train = torch.randint(0, 256, (40, 3, 8, 6), dtype=torch.uint8, generator=gen)
    test = torch.randint(0, 256, (10, 3, 8, 6), dtype=torch.uint8, generator=gen)
    seen = []

    def read(cfg: DataSection) -> RawData:
        seen.append(cfg.source)
        return RawData(train, torch.arange(40) % 10, test, torch.arange(10), where="memory")

    source = DataSource(image_shape=(3, 8, 6), train_split_images=40, ensure=seen.append, read=read)
    monkeypatch.setitem(data.SOURCES, "mnist", source)
    cfg = DataSection(source="mnist", binarize="none", val_fraction=0.25)
    assert data.image_shape(cfg) == (3, 8, 6)
    data.ensure_files(cfg)
    splits = data.load_splits(cfg)
    assert seen == [cfg, "mnist"]
    assert splits.image_shape == (3, 8, 6) and splits.source == "memory"
    assert (len(splits.train), len(splits.val), len(splits.test)) == (30, 10, 10)
    together = torch.cat([splits.train, splits.val]).reshape(40, -1)
    assert sorted(map(bytes, together.numpy())) == sorted(map(bytes, train.reshape(40, -1).numpy()))
    assert torch.equal(splits.test, test)
