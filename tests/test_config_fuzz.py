"""Property: whatever bytes, YAML or overrides a user gives, the config loader either returns a
Config or raises UserError (one line, bounded length); never another exception."""

from __future__ import annotations

import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raytrain_vae.config import Config, UserError, load_config

SETTINGS = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KEYS = [
    "data", "model", "train", "scaling", "run", "search", "export", "space", "channels", "lr",
    "seed", "limit", "num_workers", "batch_size", "storage_path", "dir", "choice", "metric",
    "algorithm", "scheduler", "latent_dim", "cpus_per_worker", "val_fraction",
]  # fmt: skip
TOKENS = [
    "data:", "model:", "train:", "search:", "space:", " channels:", " lr:", "\n", "  ", "- ",
    "[", "]", "{", "}", ",", ": ", "&a ", "*a", "&b ", "*b", "!!python/object:os.system ",
    "1", "-1", "1e400", ".nan", ".inf", "0x10", "null", "~", "'", '"', "\\0", "\t", "#", "?",
    "|", ">", "%YAML 1.2\n", "---\n", "...\n", "\x00", "\xff", "é", "<<: *a", "!!binary ",
    "2**64", "18446744073709551617", "true", "[8, 16]", "{choice: [1, 2]}",
]  # fmt: skip

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=8))
values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=4),
    max_leaves=25,
)


def loads_or_refuses(path: Path | None, overrides: list[str] | None = None) -> None:
    try:
        assert isinstance(load_config(path, overrides), Config)
    except UserError as exc:
        message = str(exc)
        assert "\n" not in message, message
        assert len(message) < 1000, message[:300]


def load_file(data: bytes) -> None:
    with tempfile.TemporaryDirectory(prefix="fuzz-") as folder:
        path = Path(folder) / "c.yaml"
        path.write_bytes(data)
        loads_or_refuses(path)


@SETTINGS
@given(st.binary(max_size=600))
def test_random_bytes(data):
    load_file(data)


@SETTINGS
@given(st.lists(st.sampled_from(TOKENS), max_size=40))
def test_random_yaml_text(tokens):
    load_file("".join(tokens).encode("utf-8", "surrogatepass"))


@SETTINGS
@given(st.dictionaries(keys, values, max_size=5))
def test_random_nested_yaml(document):
    load_file(yaml.safe_dump(document).encode())


@SETTINGS
@given(st.sampled_from(KEYS), st.dictionaries(keys, values, max_size=4))
def test_random_sections(section, body):
    load_file(yaml.safe_dump({section: body}).encode())


@SETTINGS
@given(st.lists(st.lists(st.sampled_from([*TOKENS, ".", "=", "a"]), max_size=12), max_size=3))
def test_random_overrides(overrides):
    loads_or_refuses(None, ["".join(tokens) for tokens in overrides])
