"""The YAML search space: parsing, Optuna distributions, decoding sampled values into trial
configs, one-line errors for bad specs, the search section's metric/mode/scheduler checks, and the
tune CLI failing before Ray starts. No Ray is started here."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from raytrain_vae.config import Config, ConfigError, load_config, validate_config
from raytrain_vae.models.conv import ConvVAE
from raytrain_vae.search_space import Param, parse_space, trial_config

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "configs"

optuna.logging.set_verbosity(optuna.logging.WARNING)


def space_config(space: dict, **search) -> Config:
    return validate_config({"search": {"space": space, **search}}, "test config")


def parse(space: dict) -> list[Param]:
    return parse_space(space_config(space))


def sample(params: list[Param], n: int = 20, seed: int = 0) -> list[dict]:
    """n trials' parameters drawn by Optuna's RandomSampler from the params' distributions."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    distributions = {p.path: p.distribution() for p in params}
    drawn = []
    for _ in range(n):
        trial = study.ask(distributions)
        drawn.append(dict(trial.params))
        study.tell(trial, 0.0)
    return drawn


# --- the shipped configs ------------------------------------------------------------------


def test_quickstart_space_parses():
    cfg = load_config(CONFIGS / "quickstart.yaml")
    params = parse_space(cfg)
    assert [(p.path, p.kind) for p in params] == [
        ("model.latent_dim", "choice"),
        ("model.channels", "choice"),
        ("train.beta", "loguniform"),
        ("train.lr", "loguniform"),
    ]
    dists = {p.path: p.distribution() for p in params}
    assert dists["model.latent_dim"] == CategoricalDistribution([8, 16, 32])
    assert dists["model.channels"] == CategoricalDistribution(["[16, 32]", "[32, 64]"])
    assert dists["train.beta"] == FloatDistribution(0.5, 2.0, log=True)
    assert dists["train.lr"] == FloatDistribution(5.0e-4, 3.0e-3, log=True)
    for trial_params in sample(params, n=5):
        trial = trial_config(cfg, params, trial_params)
        assert trial.model.channels in ([16, 32], [32, 64])
        assert trial.run == cfg.run and trial.export == cfg.export  # untouched sections


def test_search_space_parses():
    cfg = load_config(CONFIGS / "search.yaml")
    params = parse_space(cfg)
    assert [(p.path, p.kind) for p in params] == [
        ("model.latent_dim", "choice"),
        ("model.channels", "choice"),
        ("model.hidden_dim", "choice"),
        ("train.beta", "loguniform"),
        ("train.lr", "loguniform"),
        ("train.kl_warmup_epochs", "quniform"),
    ]
    dists = {p.path: p.distribution() for p in params}
    assert dists["model.channels"] == CategoricalDistribution(
        ["[32, 64]", "[64, 128]", "[32, 64, 128]"]
    )
    assert dists["train.kl_warmup_epochs"] == FloatDistribution(0, 4, step=1)
    for trial_params in sample(params, n=5):
        trial_config(cfg, params, trial_params)


# --- distributions --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "spec", "expected"),
    [
        ("model.latent_dim", {"choice": [8, 16, 32]}, CategoricalDistribution([8, 16, 32])),
        (
            "data.binarize",
            {"choice": ["none", "dynamic"]},
            CategoricalDistribution(["none", "dynamic"]),
        ),
        ("train.beta", {"uniform": [0.5, 2.0]}, FloatDistribution(0.5, 2.0, log=False)),
        ("train.lr", {"loguniform": [1e-4, 1e-2]}, FloatDistribution(1e-4, 1e-2, log=True)),
        ("model.latent_dim", {"randint": [4, 65]}, IntDistribution(4, 64)),
        ("train.kl_warmup_epochs", {"quniform": [0, 4, 0.5]}, FloatDistribution(0, 4, step=0.5)),
        ("train.beta", {"qloguniform": [0.1, 4.0, 0.1]}, FloatDistribution(0.1, 4.0, log=True)),
    ],
)
def test_each_kind_maps_to_its_optuna_distribution(path, spec, expected):
    (param,) = parse({path: spec})
    assert param.path == path
    assert param.kind == next(iter(spec))
    dist = param.distribution()
    assert type(dist) is type(expected)
    assert dist == expected  # optuna compares every attribute: bounds, log, step, choices
    if isinstance(dist, FloatDistribution):
        assert dist.log == expected.log and dist.step == expected.step


def test_randint_high_is_exclusive():
    (param,) = parse({"model.latent_dim": {"randint": [4, 8]}})
    values = {p["model.latent_dim"] for p in sample([param], n=60)}
    assert values == {4, 5, 6, 7}


def test_quniform_values_are_multiples_of_q():
    (param,) = parse({"train.kl_warmup_epochs": {"quniform": [0, 2, 0.5]}})
    values = {p["train.kl_warmup_epochs"] for p in sample([param], n=40)}
    assert values <= {0.0, 0.5, 1.0, 1.5, 2.0}
    assert len(values) >= 3


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (3.4, 5),  # rounds to the nearest multiple of q
        (7.4, 5),
        (7.9, 9),  # 10 is above high: clamped
        (1.2, 1),  # 0 is below low: clamped
        (6.0, 5),
    ],
)
def test_qloguniform_decode_rounds_to_q_and_clamps(value, expected):
    (param,) = parse({"model.latent_dim": {"qloguniform": [1, 9, 5]}})
    assert param.distribution() == FloatDistribution(1, 9, log=True)
    assert param.decode(value) == expected


def test_qloguniform_sampled_values_decode_into_range():
    low, high, q = 0.01, 0.3, 0.02
    (param,) = parse({"train.weight_decay": {"qloguniform": [low, high, q]}})
    decoded = [param.decode(p["train.weight_decay"]) for p in sample([param], n=30)]
    for v in decoded:
        assert low <= v <= high
        on_grid = math.isclose(v / q, round(v / q), abs_tol=1e-9)
        assert on_grid or v in (low, high), v
    assert len(set(decoded)) > 3


# --- list choices and trial configs ---------------------------------------------------------


CHANNELS = [[16, 32], [32, 64, 128]]


def test_list_choices_are_labels_that_decode_to_the_lists():
    (param,) = parse({"model.channels": {"choice": CHANNELS}})
    dist = param.distribution()
    assert dist.choices == ("[16, 32]", "[32, 64, 128]")
    assert all(isinstance(c, str) for c in dist.choices)
    for label, value in zip(dist.choices, CHANNELS, strict=True):
        decoded = param.decode(label)
        assert decoded == value and type(decoded) is list
    assert json.loads(dist.choices[1]) == CHANNELS[1]


def test_scalar_choices_stay_scalars():
    (limit,) = parse({"data.limit": {"choice": [None, 100]}})
    assert limit.distribution().choices == (None, 100)
    assert limit.decode(None) is None and limit.decode(100) == 100
    (flag,) = parse({"train.channels_last": {"choice": [True, False]}})
    assert flag.distribution().choices == (True, False)


def test_trial_config_applies_decoded_values():
    base = space_config(
        {
            "model.channels": {"choice": CHANNELS},
            "train.lr": {"loguniform": [1e-4, 1e-2]},
            "model.latent_dim": {"randint": [4, 33]},
        }
    )
    params = parse_space(base)
    before = base.model_dump()
    cfg = trial_config(
        base,
        params,
        {"model.channels": "[32, 64, 128]", "train.lr": 0.0025, "model.latent_dim": 12},
    )
    assert isinstance(cfg, Config)
    assert cfg.model.channels == [32, 64, 128]
    assert cfg.train.lr == 0.0025 and isinstance(cfg.train.lr, float)
    assert cfg.model.latent_dim == 12 and isinstance(cfg.model.latent_dim, int)
    # everything not searched is the base config's
    assert cfg.train.epochs == base.train.epochs and cfg.model.hidden_dim == base.model.hidden_dim
    assert cfg.data == base.data and cfg.search == base.search
    assert base.model_dump() == before  # the base config is not modified


def test_optuna_samples_give_valid_trial_configs():
    base = space_config(
        {
            "model.channels": {"choice": CHANNELS},
            "model.latent_dim": {"randint": [4, 9]},
            "model.hidden_dim": {"choice": [0, 64]},
            "train.lr": {"loguniform": [1e-4, 1e-2]},
            "train.beta": {"uniform": [0.5, 2.0]},
            "train.kl_warmup_epochs": {"quniform": [0, 2, 0.5]},
            "train.weight_decay": {"qloguniform": [1e-4, 1e-1, 1e-4]},
            "data.binarize": {"choice": ["none", "static", "dynamic"]},
        }
    )
    params = parse_space(base)
    drawn = sample(params, n=20, seed=0)
    seen_channels = set()
    for trial_params in drawn:
        assert set(trial_params) == {p.path for p in params}
        assert isinstance(trial_params["model.channels"], str)  # optuna holds the label
        cfg = trial_config(base, params, trial_params)
        assert cfg.model.channels in CHANNELS
        seen_channels.add(tuple(cfg.model.channels))
        assert cfg.model.latent_dim in range(4, 9)
        assert cfg.model.hidden_dim in (0, 64)
        assert 1e-4 <= cfg.train.lr <= 1e-2
        assert 0.5 <= cfg.train.beta <= 2.0
        assert cfg.train.kl_warmup_epochs in (0, 0.5, 1, 1.5, 2)
        assert 1e-4 <= cfg.train.weight_decay <= 1e-1
        assert cfg.data.binarize in ("none", "static", "dynamic")
    assert seen_channels == {tuple(c) for c in CHANNELS}
    # the same seed proposes the same trials
    assert sample(params, n=20, seed=0) == drawn


@pytest.mark.parametrize(
    "spec",
    [{"uniform": [4, 64]}, {"loguniform": [4, 64]}, {"quniform": [4, 64, 0.5]}],
    ids=["uniform", "loguniform", "quniform-q0.5"],
)
def test_float_range_on_an_integer_key_is_rejected_or_always_valid(spec):
    # model.latent_dim is an int. parse_space promises the space is checked before Ray starts,
    # so what it accepts must give a valid trial config for every value Optuna can propose;
    # otherwise every trial fails inside Ray with "Input should be a valid integer".
    try:
        params = parse({"model.latent_dim": spec})
    except ConfigError as exc:
        assert str(exc).startswith("search.space.model.latent_dim: ")
        return
    base = space_config({"model.latent_dim": spec})
    for trial_params in sample(params, n=20):
        cfg = trial_config(base, params, trial_params)
        assert isinstance(cfg.model.latent_dim, int) and 4 <= cfg.model.latent_dim <= 64


# --- bad specs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "spec", "reasons"),
    [
        ("model.nope", {"choice": [1, 2]}, ["no such config key"]),
        ("run.name", {"choice": ["a", "b"]}, ["only data, model, train, scaling"]),
        ("search.num_samples", {"choice": [1, 2]}, ["only data, model, train, scaling"]),
        ("train.lr", {"uniform": [0.1, 0.01]}, ["low must be < high", "low=0.1, high=0.01"]),
        ("train.lr", {"uniform": [0.1, 0.1]}, ["low must be < high"]),
        ("model.latent_dim", {"choice": []}, ["choice needs a non-empty list"]),
        ("model.latent_dim", {"choice": 8}, ["choice needs a non-empty list"]),
        ("model.latent_dim", {"choice": [8, 8]}, ["lists a value twice"]),
        ("train.lr", {"loguniform": [0, 1]}, ["loguniform", "low must be > 0 for a log scale"]),
        ("train.lr", {"loguniform": [-1, 1]}, ["low must be > 0 for a log scale"]),
        ("train.lr", {"qloguniform": [0, 1, 0.1]}, ["qloguniform", "low must be > 0"]),
        ("train.lr", {"normal": [0, 1]}, ["unknown type 'normal'", "loguniform"]),
        ("train.lr", {"uniform": [0.1, 1], "choice": [0.1]}, ["expected one of {choice"]),
        ("train.lr", {}, ["expected one of {choice"]),
        ("train.lr", {"uniform": [1]}, ["uniform needs [low, high] as numbers", "[1]"]),
        ("train.lr", {"uniform": [1, 2, 3]}, ["uniform needs [low, high]", "[1, 2, 3]"]),
        ("train.lr", {"uniform": ["a", 1]}, ["needs [low, high] as numbers", "'a'"]),
        ("train.lr", {"uniform": [True, 2]}, ["needs [low, high] as numbers"]),
        ("train.lr", {"uniform": [0.1, float("inf")]}, ["needs [low, high] as numbers"]),
        ("train.lr", {"quniform": [0.1, 1]}, ["quniform needs [low, high, q] as numbers"]),
        ("model.latent_dim", {"randint": [1.0, 5.0]}, ["randint needs integer bounds"]),
        ("model.latent_dim", {"randint": [1, 5.5]}, ["randint needs integer bounds"]),
        ("train.beta", {"quniform": [0, 1, 0]}, ["q must be > 0 (got 0)"]),
        ("train.beta", {"quniform": [0, 1, -0.5]}, ["q must be > 0 (got -0.5)"]),
        ("train.beta", {"qloguniform": [0.1, 1, 0]}, ["q must be > 0"]),
        ("model.latent_dim", {"choice": [0, 8]}, ["choice value 0", "greater than 0"]),
        ("train.lr", {"uniform": [-1, 1]}, ["uniform value -1", "greater than 0"]),
        ("data.binarize", {"choice": ["none", "sometimes"]}, ["value 'sometimes'", "'static'"]),
        ("model.channels", {"choice": [[16, 32], []]}, ["value []", "at least one conv layer"]),
        (
            "scaling.num_workers",
            {"choice": [1, 3]},
            ["choice value 3", "train.batch_size=128 must be a multiple of"],
        ),
    ],
)
def test_bad_spec_is_one_line_naming_the_key(path, spec, reasons):
    with pytest.raises(ConfigError) as info:
        parse({path: spec})
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"search.space.{path}: "), msg
    for reason in reasons:
        assert reason in msg, f"{reason!r} not in {msg!r}"


def test_spec_that_is_not_a_mapping_names_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("search:\n  space:\n    train.lr: 0.001\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: search.space.train.lr: ")


def test_yaml_exponents_without_dot_or_sign_are_numbers(tmp_path):
    # YAML 1.1 reads 1e-4 and 1.0e10 as strings; the space takes them as the numbers meant.
    path = tmp_path / "s.yaml"
    path.write_text(
        "search:\n  space:\n    train.lr: {loguniform: [1e-4, 1.0e-2]}\n"
        "    train.beta: {choice: [1.0e1, 2]}\n"
    )
    lr, beta = parse_space(load_config(path))
    assert lr.args == (1e-4, 1e-2)
    assert beta.args == (10.0, 2.0)  # as the config types train.beta: floats


# --- the search section ---------------------------------------------------------------------


def _search_error(**search) -> str:
    with pytest.raises(ConfigError) as info:
        validate_config({"search": search}, "cfg.yaml")
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("cfg.yaml: ")
    return msg


def test_metric_must_be_a_reported_metric():
    msg = _search_error(metric="val_loss")
    assert "search.metric" in msg and "'val_loss'" in msg
    assert "val_neg_elbo" in msg and "val_bits_per_dim" in msg
    assert "'train_recn'" in _search_error(metric=["val_recon", "train_recn"], mode=["min", "min"])


def test_list_metric_needs_a_list_of_modes():
    assert "one mode per search.metric" in _search_error(metric=["val_recon", "val_kl"], mode="min")
    assert "one mode per search.metric" in _search_error(metric="val_recon", mode=["min"])
    assert "one mode per search.metric" in _search_error(
        metric=["val_recon", "val_kl"], mode=["min"], scheduler={"type": "none"}
    )


def test_more_than_two_metrics_rejected():
    msg = _search_error(
        metric=["val_recon", "val_kl", "val_neg_elbo"],
        mode=["min", "min", "min"],
        scheduler={"type": "none"},
    )
    assert "two for a multi-objective search" in msg


def test_multi_objective_with_asha_rejected():
    msg = _search_error(metric=["val_recon", "val_kl"], mode=["min", "min"])
    assert "multi-objective" in msg
    assert "set search.scheduler.type=none" in msg


def test_multi_objective_without_scheduler_accepted(tmp_path):
    path = tmp_path / "pareto.yaml"
    path.write_text("search:\n  metric: [val_recon, val_kl]\n  mode: [min, min]\n")
    with pytest.raises(ConfigError, match="search.scheduler.type=none"):
        load_config(path)
    cfg = load_config(path, ["search.scheduler.type=none"])  # the fix the error suggests
    assert cfg.search.multi_objective is True
    assert cfg.search.metric == ["val_recon", "val_kl"]
    assert cfg.search.mode == ["min", "min"]


def test_single_objective_is_not_multi_objective():
    cfg = load_config(CONFIGS / "quickstart.yaml")
    assert cfg.search.multi_objective is False
    assert space_config({}, metric="val_kl", mode="max").search.multi_objective is False


# --- the tune CLI ---------------------------------------------------------------------------


def test_tune_cli_bad_space_fails_before_ray(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "run:\n"
        f"  storage_path: {tmp_path / 'results'}\n"
        "search:\n"
        "  space:\n"
        "    train.lr: {loguniform: [0, 1]}\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "raytrain_vae.tune", str(path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: search.space.train.lr: ")
    assert "low must be > 0" in lines[0]
    assert "Traceback" not in proc.stderr
    for stream in (proc.stdout, proc.stderr):
        assert "Started a local Ray instance" not in stream
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates_and_its_space_parses(path):
    cfg = load_config(path)
    ConvVAE(cfg.model, (1, 28, 28))
    if cfg.search.space:
        assert parse_space(cfg)


def plain(value):
    """A config value as YAML gives it (a list of sections as a list of dicts)."""
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value.model_dump() if hasattr(value, "model_dump") else value


@pytest.mark.parametrize(
    "best_name, search_name",
    [("fmnist_best", "fmnist_search"), ("fmnist_hierarchical", "fmnist_hierarchical_search")],
)
def test_a_shipped_winner_is_a_point_of_its_search_trained_longer(best_name, search_name):
    best = load_config(CONFIGS / f"{best_name}.yaml")
    searched = load_config(CONFIGS / f"{search_name}.yaml")
    for param in parse_space(searched):
        value = best
        for part in param.path.split("."):
            value = getattr(value, part)
        if param.kind == "choice":
            assert plain(value) in param.args, param.path
        else:
            low, high = param.args[:2]
            assert low <= value <= high, param.path
    assert best.model.channels == searched.model.channels
    assert best.train.epochs > searched.train.epochs and best.data.limit is None


def test_the_space_check_sizes_each_distinct_model_once(monkeypatch):
    # Every combination of choices and range ends is checked, but only the model keys change
    # the model: the quickstart's 3 latent sizes x 2 channel lists (the base is one of them).
    from raytrain_vae.models import sizing

    built = []
    real = sizing.build_model
    monkeypatch.setattr(sizing, "build_model", lambda *a, **k: built.append(a) or real(*a, **k))
    sizing._memory_bytes.cache_clear()
    cfg = load_config("quickstart")
    parse_space(cfg)
    assert len(built) == 3 * 2
    batch = cfg.train.batch_size
    first = sizing.training_memory_bytes(cfg.model, (1, 28, 28), batch)
    assert len(built) == 6  # answered from the cache
    cfg.model.latent_dim = 64  # a model not seen before is sized afresh
    assert sizing.training_memory_bytes(cfg.model, (1, 28, 28), batch) > first
    assert len(built) == 7
