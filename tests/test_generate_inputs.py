"""read_inputs on user files: every bad input is one clear UserError line, nothing is written;
valid Parquet, PNG and JPEG inputs are read as before."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import tiny_config, write_model_dir
from PIL import Image

from raytrain_vae.batch_actors import png_bytes
from raytrain_vae.config import UserError
from raytrain_vae.inputs import read_inputs

REPO = Path(__file__).resolve().parents[1]
SIZE = 28 * 28


def _model(folder: Path, shape: tuple[int, int, int]) -> Path:
    write_model_dir(folder, tiny_config("model.hidden_dim=16", "model.latent_dim=3"), shape)
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return _model(tmp_path_factory.mktemp("model"), (1, 28, 28))


@pytest.fixture(scope="module")
def rgb_model_dir(tmp_path_factory) -> Path:
    return _model(tmp_path_factory.mktemp("rgbmodel"), (3, 28, 28))


def grey(value: int = 0, size: tuple[int, int] = (28, 28)) -> np.ndarray:
    """A (1, H, W) uint8 image of one grey value."""
    return np.full((1, size[1], size[0]), value, np.uint8)


def encoded(array: np.ndarray, fmt: str) -> bytes:
    """(1, H, W) or (3, H, W) uint8 -> image file bytes in format fmt (PNG, JPEG)."""
    image = Image.fromarray(array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 100} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def parquet(tmp_path: Path, columns: dict, name: str = "in.parquet", **kwargs) -> str:
    path = tmp_path / name
    pq.write_table(pa.table(columns), path, **kwargs)
    return str(path)


def pixels(value: int = 0, rows: int = 1) -> list[list[int]]:
    return [[value] * SIZE for _ in range(rows)]


def folder(tmp_path: Path, files: dict[str, bytes], name: str = "images") -> str:
    path = tmp_path / name
    path.mkdir()
    for file, data in files.items():
        (path / file).write_bytes(data)
    return str(path)


def file(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def parquet_folder_with_a_broken_file(tmp_path: Path) -> str:
    path = folder(tmp_path, {"b.parquet": b"garbage" * 10}, "pq")
    parquet(Path(path), {"pixels": pixels(1)}, "a.parquet")
    return path


def repeated_column_name(tmp_path: Path) -> str:
    table = pa.Table.from_arrays([pa.array([1]), pa.array([2])], ["id", "id"])
    pq.write_table(table, tmp_path / "in.parquet")
    return str(tmp_path / "in.parquet")


def folder_holding_a_folder_named_png(tmp_path: Path) -> str:
    path = folder(tmp_path, {})
    (Path(path) / "x.png").mkdir()  # a folder is not an image
    return path


def fifo(path: Path) -> str:
    os.mkfifo(path)
    return str(path)


def truncated_png() -> bytes:
    return png_bytes(np.random.default_rng(0).integers(0, 256, (1, 28, 28), np.uint8))[:-60]


# name -> (tmp_path -> (the --input path, substrings the error line must hold))
Case = Callable[[Path], tuple[str, tuple[str, ...]]]
BAD_INPUTS: dict[str, Case] = {
    # out of range
    "pixels_over_255": lambda t: (
        parquet(t, {"pixels": pixels(0, 2) + pixels(300)}),
        ("in.parquet", "row 2", "300", "0..255"),
    ),
    "pixels_negative": lambda t: (
        parquet(t, {"pixels": pixels(-1)}),
        ("in.parquet", "row 0", "-1", "0..255"),
    ),
    "pixels_fractions": lambda t: (
        parquet(t, {"pixels": [[0.5] * SIZE]}),
        ("in.parquet", "0.5", "integers"),
    ),
    "pixels_nan": lambda t: (
        parquet(t, {"pixels": [[float("nan")] * SIZE]}),
        ("in.parquet", "nan", "integers"),
    ),
    "pixels_strings": lambda t: (
        parquet(t, {"pixels": [["1"] * SIZE]}),
        ("in.parquet", "`pixels`", "string"),
    ),
    "pixels_not_lists": lambda t: (
        parquet(t, {"pixels": [1, 2]}),
        ("in.parquet", "`pixels`", "list"),
    ),
    # ragged
    "pixels_ragged": lambda t: (
        parquet(t, {"pixels": pixels(1) + [[1] * 700]}),
        ("in.parquet", "row 1", "700", "784"),
    ),
    "pixels_ragged_in_a_later_row_group": lambda t: (
        parquet(t, {"pixels": pixels(1, 3) + [[1] * 5] + pixels(1)}, row_group_size=2),
        ("in.parquet", "row 3", "5 values"),
    ),
    "pixels_fixed_size_wrong": lambda t: (
        parquet(t, {"pixels": pa.array([[1] * 100], pa.list_(pa.uint8(), 100))}),
        ("in.parquet", "100 values", "784"),
    ),
    "pixels_null_row": lambda t: (
        parquet(t, {"pixels": [*pixels(1), None]}),
        ("in.parquet", "row 1", "null"),
    ),
    "pixels_null_value": lambda t: (
        parquet(t, {"pixels": [[1] * (SIZE - 1) + [None]]}),
        ("in.parquet", "row 0", "null"),
    ),
    # empty
    "parquet_no_rows": lambda t: (
        parquet(t, {"pixels": pa.array([], pa.list_(pa.uint8()))}),
        ("in.parquet", "no rows"),
    ),
    "empty_file": lambda t: (file(t / "in.parquet", b""), ("in.parquet", "empty")),
    "folder_without_images": lambda t: (
        folder(t, {"notes.txt": b"hi", "scan.gif": b"GIF89a"}),
        ("images", "no .png, .jpg, .jpeg"),
    ),
    "folder_with_a_folder_named_png": lambda t: (
        folder_holding_a_folder_named_png(t),
        ("images", "no .png"),
    ),
    # image column
    "image_not_an_image": lambda t: (
        parquet(t, {"image": [png_bytes(grey()), b"hello"]}),
        ("in.parquet", "row 1", "not an image"),
    ),
    "image_null": lambda t: (
        parquet(t, {"image": pa.array([png_bytes(grey()), None], pa.binary())}),
        ("in.parquet", "row 1", "null"),
    ),
    "image_strings": lambda t: (
        parquet(t, {"image": ["a.png"]}),
        ("in.parquet", "`image`", "bytes", "string"),
    ),
    "image_truncated": lambda t: (
        parquet(t, {"image": [truncated_png()]}),
        ("in.parquet", "row 0", "broken"),
    ),
    "no_image_or_pixels_column": lambda t: (
        parquet(t, {"text": ["x"]}),
        ("in.parquet", "`image`", "`pixels`"),
    ),
    # id and label
    "id_repeated": lambda t: (
        parquet(t, {"id": [5, 9, 5], "pixels": pixels(1, 3)}),
        ("in.parquet", "`id`", "repeats 5", "rows 0 and 2"),
    ),
    "id_null": lambda t: (
        parquet(t, {"id": [5, None], "pixels": pixels(1, 2)}),
        ("in.parquet", "row 1", "`id`", "null"),
    ),
    "id_text": lambda t: (
        parquet(t, {"id": ["a", "b"], "pixels": pixels(1, 2)}),
        ("in.parquet", "`id`", "integers"),
    ),
    "id_fractions": lambda t: (
        parquet(t, {"id": [1.5], "pixels": pixels(1)}),
        ("in.parquet", "`id`", "integers"),
    ),
    "label_text": lambda t: (
        parquet(t, {"label": ["cat"], "pixels": pixels(1)}),
        ("in.parquet", "`label`", "integers"),
    ),
    "label_lists": lambda t: (
        parquet(t, {"label": [[1, 2]], "pixels": pixels(1)}),
        ("in.parquet", "`label`", "integers"),
    ),
    # files and paths
    "not_parquet": lambda t: (
        file(t / "in.parquet", b"id,pixels\n1,2\n"),
        ("in.parquet", "not readable as Parquet"),
    ),
    "parquet_folder_with_a_broken_file": lambda t: (
        parquet_folder_with_a_broken_file(t),
        ("pq", "b.parquet", "not readable as Parquet"),
    ),
    "repeated_column_name": lambda t: (
        repeated_column_name(t),
        ("in.parquet", "not readable as Parquet"),
    ),
    "one_image_file": lambda t: (
        file(t / "photo.jpg", encoded(grey(), "JPEG")),
        ("photo.jpg", "folder of images"),
    ),
    "missing_path": lambda t: (str(t / "nowhere.parquet"), ("nowhere.parquet", "no such file")),
    "nul_byte_in_path": lambda t: (str(t / "bad\0name.parquet"), ("name.parquet", "NUL")),
    "fifo_not_a_file": lambda t: (fifo(t / "pipe.parquet"), ("pipe.parquet", "not a regular")),
    "very_long_missing_path": lambda t: (
        str(t / ("d" * 200) / ("x" * 200 + "end.parquet")),
        ("end.parquet", "no such file"),
    ),
    # image folders
    "folder_broken_png": lambda t: (
        folder(t, {"a.png": png_bytes(grey()), "b.png": b"\x89PNG\r\n\x1a\n not really"}),
        ("b.png", "not an image"),
    ),
    "folder_truncated_png": lambda t: (
        folder(t, {"a.png": png_bytes(grey()), "b.png": truncated_png()}),
        ("b.png", "broken"),
    ),
    "folder_png_of_the_wrong_size": lambda t: (
        folder(t, {"a.png": png_bytes(grey()), "small.png": png_bytes(grey(0, (8, 12)))}),
        ("small.png", "8x12", "28x28"),
    ),
    "folder_jpeg_of_the_wrong_size": lambda t: (
        folder(t, {"big.JPG": encoded(grey(0, (32, 32)), "JPEG")}),
        ("big.JPG", "32x32"),
    ),
    "folder_file_name_with_a_newline": lambda t: (
        folder(t, {"line\nbreak.png": b"nope"}),
        ("break.png", "not an image"),
    ),
}


def snapshot(root: Path) -> list[Path]:
    return sorted(root.rglob("*"))


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_is_one_error_line_naming_it_and_writes_nothing(model_dir, tmp_path, case):
    input_path, needles = BAD_INPUTS[case](tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(UserError) as caught:
        read_inputs(str(model_dir), "test", input_path)
    message = str(caught.value)
    assert message.isprintable() and len(message) < 300, message
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    assert snapshot(tmp_path) == before


def test_empty_input_path_is_refused_not_read_as_the_current_folder(
    model_dir, tmp_path, monkeypatch
):
    (tmp_path / "a.png").write_bytes(png_bytes(grey()))
    before = snapshot(tmp_path)
    monkeypatch.chdir(tmp_path)  # Path("") is ".": a folder of images
    with pytest.raises(UserError, match="--input is empty"):
        read_inputs(str(model_dir), "test", "")
    assert snapshot(tmp_path) == before


def test_unknown_split_is_refused(model_dir):
    with pytest.raises(UserError, match="split must be test, val or train"):
        read_inputs(str(model_dir), "tests", None)


def test_folder_reads_png_and_jpeg_files_in_sorted_name_order(model_dir, tmp_path):
    values = {"a.png": 10, "b.JPG": 80, "c.jpeg": 150, "d.Png": 200, "e.JPEG": 250}
    files = {
        name: encoded(grey(v), "PNG" if name.lower().endswith(".png") else "JPEG")
        for name, v in values.items()
    }
    files["notes.txt"] = b"not an image, not read"
    path = folder(tmp_path, dict(reversed(files.items())))  # creation order is not name order
    table = read_inputs(str(model_dir), "test", path)
    assert table.column_names == ["id", "source", "pixels"]
    assert [Path(p).name for p in table.column("source").to_pylist()] == sorted(values)
    assert table.column("id").to_pylist() == [0, 1, 2, 3, 4]
    got = np.array(table.column("pixels").to_pylist(), dtype=np.int64)
    assert got.shape == (5, SIZE)
    want = np.array(list(values.values()))[:, None]
    assert np.abs(got - want).max() <= 2  # JPEG is lossy, even at quality 100
    np.testing.assert_array_equal(got[[0, 3]], np.repeat(want[[0, 3]], SIZE, axis=1))


def test_rgb_image_for_a_grey_model_and_grey_for_rgb_are_converted(
    model_dir, rgb_model_dir, tmp_path
):
    rgb = np.random.default_rng(1).integers(0, 256, (3, 28, 28), np.uint8)
    path = folder(tmp_path, {"rgb.png": png_bytes(rgb), "grey.png": png_bytes(grey(77))})
    as_grey = np.array(read_inputs(str(model_dir), "test", path).column("pixels").to_pylist())
    expected = np.asarray(Image.fromarray(rgb.transpose(1, 2, 0)).convert("L")).reshape(-1)
    np.testing.assert_array_equal(as_grey[1], expected)  # grey.png sorts first
    as_rgb = np.array(read_inputs(str(rgb_model_dir), "test", path).column("pixels").to_pylist())
    assert as_rgb.shape == (2, 3 * SIZE)
    np.testing.assert_array_equal(as_rgb[0], np.full(3 * SIZE, 77))
    np.testing.assert_array_equal(as_rgb[1], rgb.reshape(-1))


def test_valid_parquet_inputs_read_as_before(model_dir, tmp_path):
    rows = np.random.default_rng(2).integers(0, 256, (5, SIZE), np.uint8)
    ids = [105, 7, -3, 42, 0]
    path = parquet(
        tmp_path,
        {"id": ids, "label": ["1", "2", "3", "4", None], "pixels": rows.tolist()},
        row_group_size=2,
    )
    table = read_inputs(str(model_dir), "test", path)
    assert table.column_names == ["id", "source", "pixels", "label"]
    assert table.column("source").to_pylist() == [f"{path}#{row}" for row in range(5)]
    assert table.schema.field("pixels").type == pa.list_(pa.uint8(), SIZE)
    assert table.column("id").to_pylist() == ids
    assert table.column("label").to_pylist() == [1, 2, 3, 4, None]
    np.testing.assert_array_equal(np.array(table.column("pixels").to_pylist()), rows)
    # whole-number floats, narrow integers and fixed-size lists are pixels too
    for values in (rows.astype(np.float32), rows.astype(np.int16), rows):
        kind = pa.list_(pa.from_numpy_dtype(values.dtype), SIZE)
        column = pa.array(list(values), kind)
        got = read_inputs(
            str(model_dir), "test", parquet(tmp_path, {"pixels": column}, "p.parquet")
        )
        assert got.column("id").to_pylist() == [0, 1, 2, 3, 4]
        np.testing.assert_array_equal(np.array(got.column("pixels").to_pylist()), rows)
    pngs = [png_bytes(r.reshape(1, 28, 28)) for r in rows]
    got = read_inputs(str(model_dir), "test", parquet(tmp_path, {"image": pngs}, "i.parquet"))
    np.testing.assert_array_equal(np.array(got.column("pixels").to_pylist()), rows)


def test_cli_reconstruct_bad_input_is_one_line_status_2_and_no_output(model_dir, tmp_path):
    bad = parquet(tmp_path, {"pixels": pixels(300)}, "bad.parquet")
    proc = subprocess.run(
        [sys.executable, "-m", "raytrain_vae.generate", "reconstruct", "--model", str(model_dir),
         "--input", bad, "--output", str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error:"), proc.stderr
    assert "bad.parquet" in proc.stderr and "300" in proc.stderr
    assert snapshot(tmp_path) == [tmp_path / "bad.parquet"]
