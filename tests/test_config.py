"""Config loading, overrides, validation messages, the train CLI's error path, dump round-trip."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raytrain_vae.config import (
    Config,
    ConfigError,
    DataSection,
    ModelSection,
    RunSection,
    ScalingSection,
    TrackingSection,
    TrainSection,
    UserError,
    child_path,
    dump_config,
    load_config,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = REPO_ROOT / "configs" / "vae.yaml"
SECTIONS = {
    "data": DataSection,
    "model": ModelSection,
    "train": TrainSection,
    "scaling": ScalingSection,
    "run": RunSection,
    "tracking": TrackingSection,
}


def _write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _config_error(path, overrides=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    msg = str(info.value)
    assert msg and "\n" not in msg, f"message must be one non-empty line: {msg!r}"
    return msg


# --- loading ------------------------------------------------------------------------------


def test_example_config_loads():
    cfg = load_config(EXAMPLE)
    assert isinstance(cfg, Config)
    assert cfg.data.source == "fashion_mnist"
    assert cfg.data.binarize == "dynamic"
    assert cfg.data.limit is None
    assert cfg.data.val_fraction == pytest.approx(1 / 12, abs=1e-6)
    assert cfg.model.channels == [32, 64]
    assert cfg.model.likelihood == "bernoulli"
    assert cfg.train.lr == pytest.approx(2e-3)
    assert cfg.train.grad_clip is None
    assert cfg.scaling.num_workers == 2
    assert cfg.train.batch_size % cfg.scaling.num_workers == 0
    assert cfg.run.name == "vae"


def test_example_config_lists_every_key():
    # The example file is the config reference: each section and key must appear in it.
    raw = yaml.safe_load(EXAMPLE.read_text())
    assert set(raw) == set(SECTIONS)
    for name, section in SECTIONS.items():
        assert set(raw[name]) == set(section.model_fields), name


def test_example_config_values_are_the_defaults_except_workers():
    example = load_config(EXAMPLE).model_dump()
    defaults = Config().model_dump()
    assert example["scaling"].pop("num_workers") == 2
    assert defaults["scaling"].pop("num_workers") == 1
    assert example["data"].pop("val_fraction") == pytest.approx(
        defaults["data"].pop("val_fraction"), abs=1e-6
    )
    assert example == defaults


def test_no_path_gives_defaults():
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.train.lr == 2e-3
    assert cfg.train.batch_size == 128
    assert cfg.model.latent_dim == 16
    assert cfg.scaling.num_workers == 1
    assert cfg.data.download is True


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_empty_yaml_file_loads_to_defaults(tmp_path, text):
    assert load_config(_write(tmp_path, text)) == Config()


def test_partial_file_keeps_other_defaults(tmp_path):
    cfg = load_config(_write(tmp_path, "model:\n  latent_dim: 3\n"))
    assert cfg.model.latent_dim == 3
    assert cfg.model.channels == [32, 64]
    assert cfg.train == TrainSection()


# --- overrides ----------------------------------------------------------------------------


def test_overrides_apply_with_types():
    cfg = load_config(EXAMPLE, ["train.lr=3e-4", "model.channels=[16,32]", "data.limit=100"])
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == pytest.approx(3e-4)
    assert cfg.model.channels == [16, 32]
    assert all(type(c) is int for c in cfg.model.channels)
    assert type(cfg.data.limit) is int and cfg.data.limit == 100
    # untouched keys keep the file's values
    assert cfg.scaling.num_workers == 2
    assert cfg.model.latent_dim == 16


def test_overrides_apply_without_file_and_last_one_wins():
    cfg = load_config(None, ["train.epochs=3", "train.epochs=5", "data.binarize=static"])
    assert cfg.train.epochs == 5
    assert cfg.data.binarize == "static"


def test_override_to_null():
    cfg = load_config(None, ["data.limit=100", "data.limit=null"])
    assert cfg.data.limit is None


def test_overrides_do_not_mutate_anything_between_loads():
    load_config(EXAMPLE, ["train.lr=3e-4"])
    assert load_config(EXAMPLE).train.lr == pytest.approx(2e-3)


@pytest.mark.parametrize("override, key", [("model.foo=1", "model.foo"), ("foo.bar=1", "foo.bar")])
def test_unknown_override_key_raises(override, key):
    msg = _config_error(EXAMPLE, [override])
    assert key in msg
    assert "unknown key" in msg


def test_override_below_a_leaf_is_unknown():
    msg = _config_error(None, ["train.lr.x=1"])
    assert "train.lr.x" in msg and "unknown key" in msg


@pytest.mark.parametrize("override", ["train.lr", "=3", "train.lr 3e-4"])
def test_malformed_override_raises(override):
    msg = _config_error(EXAMPLE, [override])
    assert "override" in msg
    assert "key.sub=value" in msg


def test_bad_override_value_names_key_and_source():
    msg = _config_error(EXAMPLE, ["model.latent_dim=0"])
    assert str(EXAMPLE) in msg
    assert "model.latent_dim" in msg
    assert "greater than 0" in msg


def test_config_error_is_a_user_error():
    assert issubclass(ConfigError, UserError)


# --- bad values in a file -----------------------------------------------------------------

BAD_VALUES = [
    ("model:\n  latent_dim: 0\n", "model.latent_dim", "greater than 0"),
    ("model:\n  channels: []\n", "model.channels", "at least one conv layer"),
    ("model:\n  channels: [32, -1]\n", "model.channels", "must be > 0"),
    ("train:\n  beta: -1\n", "train.beta", "greater than or equal to 0"),
    ("train:\n  batch_size: 0\n", "train.batch_size", "greater than 0"),
    (
        "train:\n  batch_size: 129\nscaling:\n  num_workers: 2\n",
        "train.batch_size",
        "multiple of scaling.num_workers",
    ),
    ("model: {latnt_dim: 3}\n", "model.latnt_dim", "unknown key"),
    ("bogus_section: {a: 1}\n", "bogus_section", "unknown key"),
    ("train:\n  lr: fast\n", "train.lr", "valid number"),
    ("data:\n  binarize: maybe\n", "data.binarize", "'none', 'static' or 'dynamic'"),
]


@pytest.mark.parametrize(
    "text, key, reason", BAD_VALUES, ids=[f"{k}-{i}" for i, (_, k, _) in enumerate(BAD_VALUES)]
)
def test_bad_value_message_names_file_key_and_reason(tmp_path, text, key, reason):
    path = _write(tmp_path, text, "bad.yaml")
    msg = _config_error(path)
    assert msg.startswith(f"{path}: "), msg
    assert key in msg, msg
    assert reason in msg, msg


def test_divisible_batch_size_is_accepted(tmp_path):
    cfg = load_config(_write(tmp_path, "train: {batch_size: 130}\nscaling: {num_workers: 2}\n"))
    assert cfg.train.batch_size == 130


def test_bad_value_message_reports_the_value_once(tmp_path):
    # The offending value should appear once, not "(got [32, -1]) (got [32, -1])".
    path = _write(tmp_path, "model:\n  channels: [32, -1]\n")
    msg = _config_error(path)
    assert msg.count("[32, -1]") == 1, msg


def test_batch_size_error_names_the_key_not_the_whole_config():
    # The cross-field check must report train.batch_size, not "(top level)" followed by a dump
    # of every section of the config.
    msg = _config_error(EXAMPLE, ["train.batch_size=129"])
    assert "train.batch_size" in msg and "scaling.num_workers" in msg
    assert "(top level)" not in msg, msg
    assert "storage_path" not in msg, msg
    assert len(msg) < 300, msg


def test_yaml_that_is_not_a_mapping(tmp_path):
    path = _write(tmp_path, "- data\n- model\n")
    msg = _config_error(path)
    assert str(path) in msg
    assert "mapping" in msg and "list" in msg


def test_malformed_yaml(tmp_path):
    path = _write(tmp_path, "model:\n  latent_dim: [1, 2\ntrain: {}\n")
    msg = _config_error(path)
    assert str(path) in msg
    assert "malformed YAML" in msg
    assert "line" in msg


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    msg = _config_error(path)
    assert str(path) in msg
    assert "no such config file" in msg


# --- the train CLI exits before Ray starts ----------------------------------------------


@pytest.mark.parametrize(
    "args, expected",
    [(["bad.yaml"], "model.latent_dim"), (["configs/vae.yaml", "model.foo=1"], "model.foo")],
)
def test_cli_user_error_is_one_line_with_status_2(tmp_path, args, expected):
    bad = _write(tmp_path, "model:\n  latent_dim: 0\n", "bad.yaml")
    args = [str(bad) if a == "bad.yaml" else a for a in args]
    proc = subprocess.run(
        [sys.executable, "-m", "raytrain_vae.train", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:") and expected in lines[0]
    if args[0] == str(bad):
        assert str(bad) in lines[0]
    assert proc.stdout == ""


# --- dump_config round-trip -------------------------------------------------------------


def _round_trip(tmp_path: Path, cfg: Config) -> Config:
    text = dump_config(cfg)
    raw = yaml.safe_load(text)
    for name, section in SECTIONS.items():
        assert set(raw[name]) == set(section.model_fields), name
    return load_config(_write(tmp_path, text, "dumped.yaml"))


def test_dump_round_trips_defaults(tmp_path):
    assert _round_trip(tmp_path, Config()) == Config()


def test_dump_round_trips_example(tmp_path):
    cfg = load_config(EXAMPLE)
    assert _round_trip(tmp_path, cfg) == cfg


def test_dump_round_trips_non_defaults(tmp_path):
    cfg = load_config(
        EXAMPLE,
        [
            "train.lr=3e-5",
            "model.channels=[16,32,64]",
            "model.likelihood=gaussian",
            "data.limit=100",
            "data.val_fraction=0.1",
            "train.grad_clip=1.5",
            "train.kl_warmup_epochs=2.5",
            "run.storage_path=s3://bucket/runs",
            "run.max_failures=-1",
        ],
    )
    cfg = cfg.model_copy(update={"run": RunSection(name="on")})  # a YAML 1.1 boolean word
    back = _round_trip(tmp_path, cfg)
    assert back == cfg
    assert back.run.name == "on"
    assert back.train.lr == 3e-5


@pytest.mark.parametrize(
    ("storage", "folder"),
    [
        ("/data/runs", "/data/runs/r1"),
        ("/data/runs/", "/data/runs/r1"),
        ("/", "/r1"),
        ("s3://bucket", "s3://bucket/r1"),
        ("s3://bucket/runs/", "s3://bucket/runs/r1"),
        # The endpoint in the query stays the query's: the run's name goes into the path.
        (
            "s3://bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http",
            "s3://bucket/runs/r1?endpoint_override=127.0.0.1:9000&scheme=http",
        ),
    ],
)
def test_the_run_folder_is_the_storage_path_and_the_run_name(storage, folder):
    cfg = load_config(None, [f"run.storage_path={storage}", "run.name=r1"])
    assert cfg.run_folder() == folder
    assert child_path(folder, "tensorboard", "x") == folder.replace("/r1", "/r1/tensorboard/x")


def test_unwritable_storage_path_fails_before_ray_starts(tmp_path):
    from raytrain_vae.training import preflight

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cfg = load_config(None, [f"run.storage_path={blocker / 'runs'}"])
    with pytest.raises(ConfigError, match=r"run.storage_path .*: not writable"):
        preflight(cfg)
