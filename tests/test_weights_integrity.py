"""Integrity of weights files: the header's sha256 covers the tensors and the metadata (format
/2), is required, and every malformed or edited file is refused with one short line."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import write_model_dir
from safetensors.torch import load_file, save_file

from raytrain_vae.config import UserError, load_config
from raytrain_vae.model_io import (
    FORMAT,
    FORMAT_V1,
    MODEL_FILE,
    ModelFileError,
    image_shape_of,
    load_model_dir,
    load_weights,
    weights_digest,
)

OVERRIDES = ["model.channels=[4,8]", "model.hidden_dim=8"]


@pytest.fixture
def cfg():
    return load_config(None, OVERRIDES)


@pytest.fixture
def weights(tmp_path, cfg) -> Path:
    """A model directory (weights and config) as export/training write it; returns the weights."""
    write_model_dir(tmp_path, cfg)
    return tmp_path / MODEL_FILE


def header(path: Path) -> dict[str, str]:
    """The metadata of a safetensors file, read without any of load_weights' checks."""
    n = int.from_bytes(path.read_bytes()[:8], "little")
    return json.loads(path.read_bytes()[8 : 8 + n])["__metadata__"]


def rewrite(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    save_file(state, path, metadata=metadata)


def rewrite_signed(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Rewrite as an attacker who recomputes the format /2 checksum over what they changed."""
    rewrite(path, state, {**metadata, "sha256": weights_digest(state, metadata)})


def refusal(path: Path, device: str = "cpu") -> str:
    """load_weights' error for path: a ModelFileError (a UserError) of one short line naming it."""
    with pytest.raises(ModelFileError) as info:
        load_weights(path, device)
    assert isinstance(info.value, UserError)
    msg = str(info.value)
    assert msg and "\n" not in msg and "\r" not in msg, f"not one line: {msg!r}"
    assert len(msg) < 300, f"{len(msg)} characters: {msg!r}"
    assert str(path) in msg
    return msg


# --- files save_weights writes -----------------------------------------------------------------


def test_round_trip_loads_the_same_tensors_with_checked_metadata(weights, cfg):
    raw = load_file(weights)
    state, meta = load_weights(weights)
    assert meta.keys() == {"format", "image_shape", "sha256"}
    assert meta["format"] == FORMAT == "raytrain_vae.convvae/2"
    assert image_shape_of(meta) == (1, 28, 28)
    assert state.keys() == raw.keys() and len(state) > 4
    for name, tensor in raw.items():
        assert torch.equal(state[name], tensor), name
    model, _ = load_model_dir(weights.parent)
    assert model.image_shape == (1, 28, 28)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, raw[name]), name


def test_the_checksum_covers_the_header_metadata(weights):
    state, meta = load_file(weights), header(weights)
    assert meta["sha256"] == weights_digest(state, meta)
    assert meta["sha256"] != weights_digest(state)  # the /1 checksum: tensors only
    assert weights_digest(state, {**meta, "image_shape": "1,28,27"}) != meta["sha256"]


# --- edited files --------------------------------------------------------------------------------


def test_changed_tensors_with_the_checksum_removed_are_refused(weights):
    meta = header(weights)
    del meta["sha256"]
    rewrite(weights, {k: torch.zeros_like(v) for k, v in load_file(weights).items()}, meta)
    assert "no checksum" in refusal(weights)


def test_image_shape_edited_in_the_header_is_refused_by_the_checksum(weights):
    state, meta = load_file(weights), header(weights)
    rewrite(weights, state, {**meta, "image_shape": "3,28,28"})  # old sha256 kept
    msg = refusal(weights)
    assert "do not match the checksum" in msg and "header" in msg


def test_format_relabelled_as_1_is_refused(weights):
    # The /2 checksum (tensors and metadata) is not the /1 one (tensors only).
    rewrite(weights, load_file(weights), {**header(weights), "format": FORMAT_V1})
    assert "do not match the checksum" in refusal(weights)


def test_a_bit_flipped_in_the_tensor_bytes_is_refused(weights):
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x10
    weights.write_bytes(bytes(data))
    assert load_file(weights)  # still a well-formed safetensors file
    assert "do not match the checksum" in refusal(weights)


def test_unknown_format_is_refused_even_with_a_recomputed_checksum(weights):
    state = load_file(weights)
    meta = {**header(weights), "format": "raytrain_vae.convvae/3"}
    rewrite_signed(weights, state, meta)
    msg = refusal(weights)
    assert "unknown weights format" in msg and "convvae/3" in msg


def test_missing_format_is_refused(weights):
    state, meta = load_file(weights), header(weights)
    del meta["format"]
    rewrite_signed(weights, state, meta)
    assert "unknown weights format" in refusal(weights)


def test_unknown_metadata_keys_are_refused_even_with_a_recomputed_checksum(weights):
    state = load_file(weights)
    meta = {**header(weights), "note": "hello"}
    rewrite_signed(weights, state, meta)
    msg = refusal(weights)
    assert "unknown keys" in msg and "note" in msg


LONG = "line one\nTraceback " + "x" * 2000


@pytest.mark.parametrize("key, value", [("format", LONG), ("image_shape", LONG), (LONG, "1")])
def test_long_or_multi_line_header_text_gives_one_short_line(weights, key, value):
    state = load_file(weights)
    meta = {**header(weights), key: value}
    rewrite_signed(weights, state, meta)
    msg = refusal(weights)
    assert "x" * 50 in msg and "x" * 400 not in msg  # quoted, then cut


# --- format /1 (written before /2; tensor-only checksum) ----------------------------------------


def write_v1(path: Path, state: dict[str, torch.Tensor], image_shape: str = "1,28,28") -> None:
    """A weights file exactly as save_weights wrote it before format /2."""
    meta = {"format": FORMAT_V1, "image_shape": image_shape, "sha256": weights_digest(state)}
    rewrite(path, state, meta)


def test_format_1_with_a_matching_tensor_checksum_loads(weights):
    raw = load_file(weights)
    write_v1(weights, raw)
    state, meta = load_weights(weights)
    assert meta["format"] == FORMAT_V1 and image_shape_of(meta) == (1, 28, 28)
    for name, tensor in raw.items():
        assert torch.equal(state[name], tensor), name
    model, _ = load_model_dir(weights.parent)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, raw[name]), name


def test_format_1_with_changed_tensors_is_refused(weights):
    raw = load_file(weights)
    write_v1(weights, raw)
    rewrite(weights, {k: torch.zeros_like(v) for k, v in raw.items()}, header(weights))
    msg = refusal(weights)
    assert "do not match the checksum" in msg


def test_format_1_without_a_checksum_is_refused(weights):
    rewrite(weights, load_file(weights), {"format": FORMAT_V1, "image_shape": "1,28,28"})
    assert "no checksum" in refusal(weights)


# --- files that are not weights at all ----------------------------------------------------------


def _truncated(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:-100])


def _huge_header_length(p: Path) -> None:
    p.write_bytes((2**62).to_bytes(8, "little") + p.read_bytes()[8:])


def _header_not_json(p: Path) -> None:
    p.write_bytes((7).to_bytes(8, "little") + b"{nope!}" + b"\0" * 64)


def _header_not_utf8(p: Path) -> None:
    body = b'{"__metadata__":{"format":"\xff\xfe"}}'
    p.write_bytes(len(body).to_bytes(8, "little") + body)


def _directory(p: Path) -> None:
    p.unlink()
    p.mkdir()


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.write_bytes(os.urandom(4096)),
        lambda p: p.write_bytes(b"<html>404</html>"),
        lambda p: p.write_bytes(b""),
        _truncated,
        lambda p: p.write_bytes(p.read_bytes()[:20]),
        _huge_header_length,
        _header_not_json,
        _header_not_utf8,
        _directory,
        lambda p: p.unlink(),
    ],
    ids=[
        "garbage",
        "html",
        "empty",
        "truncated",
        "truncated-in-header",
        "huge-header-length",
        "header-not-json",
        "header-not-utf8",
        "directory",
        "missing",
    ],
)
def test_unreadable_files_are_one_short_line(weights, damage):
    damage(weights)
    assert "unreadable weights" in refusal(weights)


def test_a_directory_is_named_as_one(weights):
    _directory(weights)
    assert "a directory" in refusal(weights)


def test_a_fifo_is_refused_without_blocking(weights):
    weights.unlink()
    os.mkfifo(weights)
    done = threading.Event()

    def writer() -> None:  # unblocks a reader that did open the FIFO: fail, do not hang
        while not done.is_set():
            try:
                os.close(os.open(weights, os.O_WRONLY | os.O_NONBLOCK))
                return
            except OSError:  # no reader yet
                time.sleep(0.01)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        msg = refusal(weights)
    finally:
        done.set()
        thread.join(5)
    assert "not a regular file" in msg


# --- image_shape ---------------------------------------------------------------------------------

BAD_SHAPES = [
    "1,28",
    "a,b,c",
    "1,28,28,1",
    "2,28,28",
    "1,0,28",
    "0,28,28",
    "1,28,65537",
    "-1,28,28",
    " 1,28,28",
    "1, 28,28",
    "01,28,28",
    "1,28,28\n",
    "1,2_8,28",
    "1,٢٨,28",  # Arabic-Indic digits, which int() accepts
    "",
]


@pytest.mark.parametrize("shape", BAD_SHAPES)
def test_bad_image_shape_is_refused_even_with_a_recomputed_checksum(weights, shape):
    state = load_file(weights)
    meta = {**header(weights), "image_shape": shape}
    rewrite_signed(weights, state, meta)
    assert "image_shape" in refusal(weights)
    with pytest.raises(ModelFileError, match="image_shape") as info:
        load_model_dir(weights.parent)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("shape", ["1,28", "a,b,c", "1,28,28,28"])
def test_bad_image_shape_in_a_format_1_file_is_refused(weights, shape):
    # Format /1's checksum does not cover the metadata: the strict parse is what refuses it.
    write_v1(weights, load_file(weights), image_shape=shape)
    assert "image_shape" in refusal(weights)
    with pytest.raises(ModelFileError, match="image_shape"):
        load_model_dir(weights.parent)


def test_missing_image_shape_is_refused(weights):
    state, meta = load_file(weights), header(weights)
    del meta["image_shape"]
    rewrite_signed(weights, state, meta)
    assert "image_shape" in refusal(weights)


@pytest.mark.parametrize(
    "text, shape",
    [("1,28,28", (1, 28, 28)), ("3,1,65536", (3, 1, 65536)), ("1,27,19", (1, 27, 19))],
)
def test_image_shape_of_good_shapes(text, shape):
    assert image_shape_of({"image_shape": text}) == shape


@pytest.mark.parametrize("shape", BAD_SHAPES)
def test_image_shape_of_bad_shapes(shape):
    with pytest.raises(ModelFileError, match="image_shape"):
        image_shape_of({"image_shape": shape})
