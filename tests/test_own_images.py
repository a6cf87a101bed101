"""Training on the user's own images (image_folder, parquet, cifar10 offline, S3): no Ray."""

from __future__ import annotations

import io
import os
import pickle
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import S3Server
from PIL import Image
from torchvision.transforms.v2 import functional as TVF

import raytrain_vae.data as data
from raytrain_vae.config import ConfigError, DataSection, ModelSection, UserError, load_config
from raytrain_vae.data import DataError, load_splits, split_counts
from raytrain_vae.likelihoods import LIKELIHOODS
from raytrain_vae.models import build_model
from raytrain_vae.objectives import elbo_terms

H, W = 6, 5  # H != W catches transposed images
SPLITS = ("train", "val", "test")


@pytest.fixture(autouse=True)
def fresh_catalogs(monkeypatch):
    """No test sees another's listing of its files."""
    monkeypatch.setattr(data, "_CATALOGS", {})


# --- helpers ------------------------------------------------------------------------------


def encode(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    """(H, W) grey or (H, W, 3) RGB uint8 pixels as PNG or JPEG file bytes."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def decoded(file_bytes: bytes, mode: str = "RGB") -> np.ndarray:
    """What PIL makes of file bytes in `mode` (L or RGB), as uint8 (C, H, W)."""
    array = np.array(Image.open(io.BytesIO(file_bytes)).convert(mode))
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def write_images(
    root: Path,
    names: list[str],
    seed: int = 0,
    size: tuple[int, int] = (H, W),
    grey: bool | None = None,
) -> dict[str, bytes]:
    """Random-pixel images at root/name (PNG, or JPEG for .jpg/.jpeg), grey and RGB by turns
    unless `grey` says; returns {name: file bytes}."""
    rng = np.random.default_rng(seed)
    written = {}
    for i, name in enumerate(names):
        is_grey = i % 2 == 1 if grey is None else grey
        pixels = rng.integers(0, 256, size=size if is_grey else (*size, 3), dtype=np.uint8)
        fmt = "JPEG" if name.lower().endswith((".jpg", ".jpeg")) else "PNG"
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        written[name] = encode(pixels, fmt)
        path.write_bytes(written[name])
    return written


def folder_cfg(path: Path | str, **kw) -> DataSection:
    kw.setdefault("binarize", "none")
    return DataSection(source="image_folder", path=str(path), **kw)


def load(cfg: DataSection) -> data.Splits:
    """load_splits on a fresh listing (files may have changed since the last one)."""
    data._CATALOGS.clear()
    return load_splits(cfg)


def rows_of(images: torch.Tensor) -> list[bytes]:
    return [image.numpy().tobytes() for image in images]


def split_of_pixels(splits: data.Splits) -> dict[bytes, str]:
    """Each image's pixel bytes -> the split that holds it (every image distinct)."""
    where = {row: name for name in SPLITS for row in rows_of(getattr(splits, name))}
    assert len(where) == sum(len(getattr(splits, name)) for name in SPLITS)
    return where


def labels_of_pixels(splits: data.Splits) -> dict[bytes, int]:
    """Each image's pixel bytes -> its label."""
    return {
        row: label
        for name in SPLITS
        for row, label in zip(
            rows_of(getattr(splits, name)), getattr(splits, f"{name}_labels").tolist(), strict=True
        )
    }


def split_by_key(splits: data.Splits, files: dict[str, bytes], mode: str = "RGB") -> dict:
    """{name: split} for written files, found by their decoded pixels."""
    where = split_of_pixels(splits)
    return {name: where[decoded(b, mode).tobytes()] for name, b in files.items()}


def one_line(raised: pytest.ExceptionInfo, *parts: str) -> str:
    """The error's message: a UserError, one line, holding each of parts."""
    message = str(raised.value)
    assert isinstance(raised.value, UserError), type(raised.value)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, message
    return message


def png_table(n: int, seed: int, **extra) -> tuple[pa.Table, list[bytes]]:
    """A table with an `image` column of n random RGB PNGs (and extra columns)."""
    rng = np.random.default_rng(seed)
    pngs = [encode(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)) for _ in range(n)]
    return pa.table({"image": pngs, **extra}), pngs


def parquet_cfg(path: Path | str, **kw) -> DataSection:
    kw.setdefault("binarize", "none")
    return DataSection(source="parquet", path=str(path), **kw)


FOLDER_NAMES = [f"{top}/img{i}.png" for top in ("b", "a") for i in range(6)]
FOLDER_NAMES += [f"top{i}.png" for i in range(5)] + ["a/j0.jpg", "b/j1.jpeg", "j2.JPG"]


# --- image_folder: reading, labels, stable splits, limit --------------------------------


def test_image_folder_reads_every_image_once_with_subfolder_labels(tmp_path):
    files = write_images(tmp_path / "imgs", FOLDER_NAMES)
    cfg = folder_cfg(tmp_path / "imgs")
    s = load_splits(cfg)
    for name in SPLITS:
        images = getattr(s, name)
        assert images.dtype == torch.uint8 and tuple(images.shape[1:]) == (3, H, W)
        assert len(getattr(s, f"{name}_labels")) == len(images)
    assert min(len(s.train), len(s.val), len(s.test)) >= 1
    # The union of the splits is exactly the images written (JPEG: as PIL decodes it).
    loaded = Counter(row for name in SPLITS for row in rows_of(getattr(s, name)))
    assert loaded == Counter(decoded(b).tobytes() for b in files.values())
    # Labels: the index of the subfolder among the sorted names, -1 at the top level.
    label_of = {
        decoded(b).tobytes(): {"a": 0, "b": 1}.get(n.split("/")[0], -1) for n, b in files.items()
    }
    assert labels_of_pixels(s) == label_of
    assert split_counts(cfg) == {name: len(getattr(s, name)) for name in SPLITS}
    assert data.image_shape(cfg) == (3, H, W)
    assert sorted(set(label_of.values())) == [-1, 0, 1]


def test_relative_and_home_paths_keep_labels_and_splits(tmp_path, monkeypatch):
    files = write_images(tmp_path / "imgs", FOLDER_NAMES)
    absolute = load(folder_cfg(tmp_path / "imgs"))
    expected = split_by_key(absolute, files)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    for path in ("imgs", "./imgs/", "~/imgs"):
        s = load(folder_cfg(path))
        assert split_by_key(s, files) == expected, path
        for name in SPLITS:  # the same images, in the same order, with the same labels
            assert torch.equal(getattr(s, name), getattr(absolute, name)), path
            assert torch.equal(getattr(s, f"{name}_labels"), getattr(absolute, f"{name}_labels"))


def test_splits_hold_when_files_are_added_or_listed_elsewhere(tmp_path):
    names = [f"{top}/img{i}.png" for top in ("a", "b") for i in range(15)] + ["x.png", "y.png"]
    files = write_images(tmp_path / "imgs", names)
    before = split_by_key(load(folder_cfg(tmp_path / "imgs")), files)
    assert set(before.values()) == set(SPLITS)
    # (a) 50 new files, in the subfolders, a new subfolder and the top level.
    added = [f"{top}new{i}.png" for top in ("a/", "b/", "c/", "") for i in range(12)]
    added += ["a/new99.png", "new98.png"]
    new = write_images(tmp_path / "imgs", added, seed=1)
    assert len(new) == 50
    after = split_by_key(load(folder_cfg(tmp_path / "imgs")), {**files, **new})
    assert {n: after[n] for n in files} == before
    # (b) a copy elsewhere, its files created in the reverse order.
    for name in reversed(names):
        (tmp_path / "copy" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "copy" / name).write_bytes(files[name])
    assert split_by_key(load(folder_cfg(tmp_path / "copy")), files) == before


def test_test_path_is_the_test_split(tmp_path):
    files = write_images(tmp_path / "imgs", [f"a/{i}.png" for i in range(20)])
    tests = write_images(tmp_path / "held", [f"c/t{i}.png" for i in range(7)], seed=1)
    cfg = folder_cfg(tmp_path / "imgs", test_path=str(tmp_path / "held"))
    s = load_splits(cfg)
    assert sorted(rows_of(s.test)) == sorted(decoded(b).tobytes() for b in tests.values())
    train_val = rows_of(s.train) + rows_of(s.val)
    assert sorted(train_val) == sorted(decoded(b).tobytes() for b in files.values())
    assert split_counts(cfg) == {"train": len(s.train), "val": len(s.val), "test": 7}


def test_limit_keeps_that_many_training_images_and_no_old_newcomers(tmp_path):
    files = write_images(tmp_path / "imgs", [f"{i:03}.png" for i in range(60)])
    cfg = folder_cfg(tmp_path / "imgs", limit=10)
    s = load(cfg)
    kept = set(rows_of(s.train) + rows_of(s.val))
    full = load(folder_cfg(tmp_path / "imgs"))
    assert len(kept) == 10 == split_counts(cfg)["train"] + split_counts(cfg)["val"]
    assert kept <= set(rows_of(full.train) + rows_of(full.val))  # training-split images only
    assert rows_of(s.test) == rows_of(full.test)  # the limit leaves the test split alone
    # Added files may displace kept ones (a smaller hash), but no unused old file comes in.
    new = write_images(tmp_path / "imgs", [f"new{i:03}.png" for i in range(30)], seed=1)
    s2 = load(cfg)
    kept2 = set(rows_of(s2.train) + rows_of(s2.val))
    added = {decoded(b).tobytes() for b in new.values()}
    assert len(kept2) == 10
    assert kept2 <= kept | added
    assert kept2 <= {decoded(b).tobytes() for b in {**files, **new}.values()}


# --- geometry: channels, crop, resize, model sizes -------------------------------------


def test_channels_follow_pil_conversions(tmp_path):
    rgb = write_images(tmp_path / "rgb", [f"{i}.png" for i in range(8)], grey=False)
    s = load_splits(folder_cfg(tmp_path / "rgb", channels=1))
    assert s.image_shape == (1, H, W)
    loaded = sorted(rows_of(torch.cat([s.train, s.val, s.test])))
    assert loaded == sorted(decoded(b, "L").tobytes() for b in rgb.values())
    grey = write_images(tmp_path / "grey", [f"{i}.png" for i in range(8)], grey=True)
    s = load_splits(folder_cfg(tmp_path / "grey", channels=3))
    images = torch.cat([s.train, s.val, s.test])
    assert images.shape[1] == 3
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])
    assert sorted(rows_of(images[:, :1])) == sorted(
        decoded(b, "L").tobytes() for b in grey.values()
    )


def test_crop_then_resize_match_torchvision(tmp_path):
    files = write_images(tmp_path / "imgs", [f"{i}.png" for i in range(8)], size=(20, 16))
    cfg = folder_cfg(tmp_path / "imgs", crop=[12, 10], image_size=[6, 4])
    assert data.image_shape(cfg) == (3, 6, 4)
    s = load_splits(cfg)
    loaded = sorted(rows_of(torch.cat([s.train, s.val, s.test])))

    def expected(b: bytes) -> bytes:
        image = TVF.center_crop(torch.from_numpy(decoded(b).copy()), [12, 10])
        return TVF.resize(image, [6, 4], antialias=True).numpy().tobytes()

    assert loaded == sorted(expected(b) for b in files.values())
    # An image smaller than the crop is refused, by name.
    write_images(tmp_path / "imgs", ["small.png"], size=(11, 16))
    with pytest.raises(DataError) as raised:
        load(cfg)
    one_line(raised, str(tmp_path / "imgs" / "small.png"), "data.crop")


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (3, 64, 64)])
def test_models_train_on_folder_images_of_common_sizes(tmp_path, shape):
    c, h, w = shape
    write_images(tmp_path / "imgs", [f"{i}.png" for i in range(4)], size=(h, w), grey=c == 1)
    cfg = folder_cfg(tmp_path / "imgs", channels=c)
    assert data.image_shape(cfg) == shape
    s = load_splits(cfg)
    x = data.to_model_input(torch.cat([s.train, s.val, s.test])[:2], dynamic=False)
    assert tuple(x.shape) == (2, *shape)
    for name in LIKELIHOODS:
        torch.manual_seed(0)
        model_cfg = ModelSection(channels=[4, 8], hidden_dim=8, latent_dim=2, likelihood=name)
        model = build_model(model_cfg, shape)
        recon, kl = elbo_terms(model, x)
        (recon + kl).mean().backward()
        grads = [p.grad for p in model.parameters()]
        assert torch.isfinite(recon).all() and torch.isfinite(kl).all(), name
        assert all(g is not None and torch.isfinite(g).all() for g in grads), name
        assert any(g.abs().sum() > 0 for g in grads), name
        assert tuple(model.mean_image(model(x)[0]).shape) == (2, *shape), name


def test_too_small_image_names_the_sizes_that_work():
    cfg = ModelSection(channels=[4, 8, 16], hidden_dim=8, latent_dim=2)
    with pytest.raises(ConfigError) as raised:
        build_model(cfg, (3, 3, 3))
    one_line(raised, "3x3", "8 or more", "at most 1 layers", "data.image_size")
    # What the message claims holds: 8x8 is the smallest side, 1 layer takes 3x3.
    build_model(cfg, (3, 8, 8))
    with pytest.raises(ConfigError):
        build_model(cfg, (3, 7, 7))
    build_model(ModelSection(channels=[4], hidden_dim=8, latent_dim=2), (3, 3, 3))
    with pytest.raises(ConfigError):
        build_model(ModelSection(channels=[4, 8], hidden_dim=8, latent_dim=2), (3, 3, 3))


# --- parquet ----------------------------------------------------------------------------


def test_parquet_image_bytes_with_labels_over_files_and_row_groups(tmp_path):
    (tmp_path / "pq").mkdir()
    expected = {}
    for part, n in (("part-0", 23), ("part-1", 17)):
        table, pngs = png_table(n, seed=n, label=list(range(n)))
        pq.write_table(table, tmp_path / "pq" / f"{part}.parquet", row_group_size=5)
        expected.update({decoded(b).tobytes(): i for i, b in enumerate(pngs)})
        assert pq.ParquetFile(tmp_path / "pq" / f"{part}.parquet").num_row_groups >= 4
    cfg = parquet_cfg(tmp_path / "pq", label_column="label")
    s = load_splits(cfg)
    rows = {name: rows_of(getattr(s, name)) for name in SPLITS}
    assert Counter(r for name in SPLITS for r in rows[name]) == Counter(expected.keys())
    assert labels_of_pixels(s) == expected
    assert split_counts(cfg) == {name: len(rows[name]) for name in SPLITS}
    assert min(split_counts(cfg).values()) >= 1


def test_parquet_pixels_column(tmp_path):
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (30, 64), dtype=np.uint8)
    column = pa.array([row.tolist() for row in pixels], pa.list_(pa.uint8()))
    pq.write_table(pa.table({"pixels": column}), tmp_path / "p.parquet", row_group_size=8)
    cfg = parquet_cfg(tmp_path / "p.parquet", image_column="pixels", pixels_shape=[1, 8, 8])
    s = load_splits(cfg.model_copy(update={"channels": 1}))
    assert s.image_shape == (1, 8, 8)
    assert sorted(rows_of(torch.cat([s.train, s.val, s.test]))) == sorted(
        row.tobytes() for row in pixels
    )
    # data.channels unset: 3 channels (the documented default for files), each the grey image.
    s3 = load_splits(cfg)
    assert s3.image_shape == (3, 8, 8) and torch.equal(s3.train[:, 1:2], s.train)


def test_parquet_pixels_are_shaped_as_one_batch_like_each_image_alone(tmp_path):
    """The pixels column is converted a row group at a time; each image comes out as the
    spec makes it of that image alone (grey to RGB, centre crop, antialiased resize)."""
    rng = np.random.default_rng(4)
    pixels = rng.integers(0, 256, (40, 1, 10, 12), dtype=np.uint8)
    column = pa.array([row.ravel().tolist() for row in pixels], pa.list_(pa.int16()))
    pq.write_table(pa.table({"pixels": column}), tmp_path / "p.parquet", row_group_size=16)
    cfg = parquet_cfg(tmp_path / "p.parquet", image_column="pixels", pixels_shape=[1, 10, 12],
                      channels=3, crop=[8, 10], image_size=[4, 5])  # fmt: skip
    s = load_splits(cfg)
    alone = TVF.resize(TVF.center_crop(torch.from_numpy(pixels), [8, 10]), [4, 5], antialias=True)
    expected = sorted(a.expand(3, -1, -1).numpy().tobytes() for a in alone)
    assert s.image_shape == (3, 4, 5)
    assert sorted(rows_of(torch.cat([s.train, s.val, s.test]))) == expected


@pytest.mark.parametrize(
    "row, phrase",
    [
        ([7] * 63, "row 21: `pixels` holds 63 values, data.pixels_shape [1, 8, 8] needs 64"),
        ([7] * 63 + [300], "row 21: `pixels` holds 300; pixels must be integers 0..255"),
        ([7] * 63 + [None], "row 21: `pixels` holds a null value"),
        (None, "row 21: `pixels` is null"),
    ],
)
def test_parquet_bad_pixel_row_is_named(tmp_path, row, phrase):
    rows = [[7] * 64] * 21 + [row] + [[7] * 64] * 5
    pq.write_table(pa.table({"pixels": pa.array(rows, pa.list_(pa.int64()))}),
                   tmp_path / "p.parquet", row_group_size=8)  # fmt: skip
    cfg = parquet_cfg(tmp_path / "p.parquet", image_column="pixels", pixels_shape=[1, 8, 8])
    with pytest.raises(DataError) as raised:
        load_splits(cfg.model_copy(update={"channels": 1}))
    assert str(raised.value) == f"{tmp_path / 'p.parquet'} {phrase}"


def test_parquet_id_column_keeps_splits_through_renames(tmp_path):
    table, pngs = png_table(40, seed=5, id=[f"img-{i}" for i in range(40)])
    (tmp_path / "pq").mkdir()
    pq.write_table(table, tmp_path / "pq" / "a.parquet", row_group_size=9)
    by_id = dict(zip(table.column("id").to_pylist(), pngs, strict=True))

    def splits_now(**kw) -> dict[str, str]:
        return split_by_key(load(parquet_cfg(tmp_path / "pq", **kw)), by_id)

    with_id, without_id = splits_now(id_column="id"), splits_now()
    os.rename(tmp_path / "pq" / "a.parquet", tmp_path / "pq" / "renamed.parquet")
    assert splits_now(id_column="id") == with_id
    assert splits_now() != without_id  # path#row moves some rows
    # Rows in another order (and row groups): the id still decides.
    pq.write_table(
        table.take(list(range(39, -1, -1))), tmp_path / "pq" / "renamed.parquet", row_group_size=4
    )
    assert splits_now(id_column="id") == with_id


def test_parquet_missing_column_names_file_and_columns(tmp_path):
    table, _ = png_table(3, seed=0)
    pq.write_table(
        table.rename_columns(["img"]).append_column("n", pa.array([1, 2, 3])),
        tmp_path / "x.parquet",
    )
    with pytest.raises(DataError) as raised:
        data.ensure_files(parquet_cfg(tmp_path))
    one_line(raised, str(tmp_path / "x.parquet"), "'image'", "img, n")
    with pytest.raises(DataError) as raised:
        data.ensure_files(parquet_cfg(tmp_path, image_column="img", label_column="label"))
    one_line(raised, "'label'", "data.label_column", "img, n")


@pytest.mark.parametrize("row", [0, 3])
def test_parquet_null_image_names_file_and_row(tmp_path, row):
    _, pngs = png_table(6, seed=0)
    pngs[row] = None
    pq.write_table(pa.table({"image": pa.array(pngs, pa.binary())}), tmp_path / "n.parquet")
    with pytest.raises(DataError) as raised:
        load_splits(parquet_cfg(tmp_path / "n.parquet"))
    one_line(raised, str(tmp_path / "n.parquet"), f"row {row}", "null")


@pytest.mark.parametrize("row", [0, 3])
def test_parquet_bytes_that_are_no_image_name_file_and_row(tmp_path, row):
    _, pngs = png_table(6, seed=0)
    pngs[row] = b"these bytes are not an image"
    pq.write_table(pa.table({"image": pa.array(pngs, pa.binary())}), tmp_path / "b.parquet")
    with pytest.raises(DataError) as raised:
        load_splits(parquet_cfg(tmp_path / "b.parquet"))
    one_line(raised, str(tmp_path / "b.parquet"), f"row {row}", "not a readable PNG/JPEG image")
    assert "0x" not in str(raised.value)  # PIL's message names our buffer's address


# --- bad input ----------------------------------------------------------------------------


def test_folders_without_images(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "notes.txt").write_text("hello")
    for path, words in (
        (tmp_path / "empty", "no .png"),
        (tmp_path / "text", "no .png"),
        (tmp_path / "missing", "no such file or folder"),
    ):
        with pytest.raises(UserError) as raised:
            data.ensure_files(folder_cfg(path))
        one_line(raised, str(path), words)


def test_truncated_png_is_named_when_read(tmp_path):
    files = write_images(tmp_path / "imgs", [f"img{i}.png" for i in range(5)], size=(16, 16))
    whole = next(iter(files.values()))
    assert len(whole) > 300
    (tmp_path / "imgs" / "broken.png").write_bytes(whole[:100])
    cfg = folder_cfg(tmp_path / "imgs", image_size=16)
    data.ensure_files(cfg)  # listing reads headers only: the 100 bytes hold the PNG header
    with pytest.raises(DataError) as raised:
        load_splits(cfg)
    one_line(raised, str(tmp_path / "imgs" / "broken.png"))


def test_two_sizes_without_image_size_name_one_file_of_each(tmp_path):
    write_images(tmp_path / "imgs", ["a.png", "b.png"])
    write_images(tmp_path / "imgs", ["c.png"], size=(H + 1, W))
    with pytest.raises(DataError) as raised:
        load_splits(folder_cfg(tmp_path / "imgs"))
    one_line(raised, "a.png", "c.png", f"{W}x{H}", f"{W}x{H + 1}", "data.image_size")
    s = load(folder_cfg(tmp_path / "imgs", image_size=[H, W]))
    assert sum(len(getattr(s, name)) for name in SPLITS) == 3


def test_config_errors_for_paths_and_ingest():
    with pytest.raises(ConfigError) as raised:
        load_config(None, ["data.source=image_folder"])
    one_line(raised, "data.path")
    with pytest.raises(ConfigError) as raised:
        load_config(None, ["data.source=mnist", "data.path=/tmp/imgs"])
    one_line(raised, "data.path", "mnist")
    cfg = load_config(None, ["data.source=mnist", "data.ingest=stream"]).data
    with pytest.raises(ConfigError) as raised:
        data.ingest_mode(cfg)
    one_line(raised, "data.ingest=stream", "mnist")


def test_ingest_auto_streams_only_above_the_threshold(tmp_path):
    write_images(tmp_path / "imgs", [f"{i}.png" for i in range(20)])
    assert data.ingest_mode(folder_cfg(tmp_path / "imgs")) == "memory"
    assert data.ingest_mode(folder_cfg(tmp_path / "imgs", stream_above_mb=0.001)) == "stream"
    assert data.ingest_mode(folder_cfg(tmp_path / "imgs", ingest="memory")) == "memory"


# --- cifar10 offline --------------------------------------------------------------------


class _Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 str (BINSTRING), as the real CIFAR-10 batch files hold them."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_str


def write_cifar(root: Path, protocol: int | str, seed: int = 0) -> dict[str, np.ndarray]:
    """A cifar-10-batches-py folder of 20-image batches; returns each file's data rows."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rows = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        rows[name] = rng.integers(0, 256, (20, 3072), dtype=np.uint8)
        entry = {"data": rows[name], "labels": rng.integers(0, 10, 20).tolist()}
        with open(folder / name, "wb") as f:
            if protocol == "py2":
                _Py2Pickler(f, protocol=2).dump(entry)
            else:
                pickle.dump(entry, f, protocol=protocol)
    return rows


@pytest.mark.parametrize("protocol", ["py2", 2, 5])
def test_cifar10_offline_reads_channel_first_pixels(tmp_path, protocol):
    rows = write_cifar(tmp_path, protocol)
    cfg = DataSection(source="cifar10", root=str(tmp_path), download=False, binarize="none")
    data.ensure_files(cfg)
    s = load_splits(cfg)
    assert s.image_shape == (3, 32, 32)
    # Row layout: 1024 red, 1024 green, 1024 blue values, each 32 rows of 32.
    test_rows = rows["test_batch"]
    assert s.test[0, 1, 2, 3] == test_rows[0, 1024 + 2 * 32 + 3]
    assert s.test[5, 2, 31, 0] == test_rows[5, 2048 + 31 * 32]
    assert torch.equal(s.test, torch.from_numpy(test_rows.reshape(20, 3, 32, 32)))
    train_rows = np.concatenate([rows[f"data_batch_{i}"] for i in range(1, 6)])
    assert sorted(rows_of(torch.cat([s.train, s.val]))) == sorted(
        row.tobytes() for row in train_rows
    )


def test_cifar10_batch_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    write_cifar(tmp_path, "py2")
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_3", "wb") as f:
        pickle.dump({"data": Evil(), "labels": [0]}, f, protocol=2)
    cfg = DataSection(source="cifar10", root=str(tmp_path), download=False, binarize="none")
    with pytest.raises(DataError) as raised:
        load_splits(cfg)
    one_line(raised, "data_batch_3", "system")
    assert not marker.exists()


def test_cifar10_missing_without_download(tmp_path):
    cfg = DataSection(source="cifar10", root=str(tmp_path / "none"), download=False)
    with pytest.raises(DataError) as raised:
        data.ensure_files(cfg)
    one_line(raised, "cifar-10-batches-py", "data.download is false")
    with pytest.raises(DataError):
        load_splits(cfg)


# --- S3 -----------------------------------------------------------------------------------


def test_s3_folder_splits_like_a_local_copy(s3_server: S3Server, tmp_path):
    names = [f"{top}/x{i}.png" for top in ("a", "b") for i in range(10)]
    names += ["top.png", "a/with space.png", "b/100%.png", "b/x1+1.png"]
    files = write_images(tmp_path / "local", names)
    for name, b in files.items():
        s3_server.put(f"own-images/imgs/{name}", b)

    def placed(cfg: DataSection) -> dict[str, tuple[str, int]]:
        """{name: (split, label)} of every written file."""
        s = load(cfg)
        label = labels_of_pixels(s)
        return {
            n: (sp, label[decoded(files[n]).tobytes()]) for n, sp in split_by_key(s, files).items()
        }

    local = placed(folder_cfg(tmp_path / "local"))
    assert {label for _, label in local.values()} == {-1, 0, 1}
    host = s3_server.endpoint.split("://", 1)[1]
    for uri in (
        s3_server.url("own-images/imgs"),
        s3_server.url("own-images/imgs/"),
        s3_server.url(f"own-images/imgs?endpoint_override={host}&scheme=http"),
    ):
        assert placed(folder_cfg(uri)) == local, uri
        assert split_counts(folder_cfg(uri)) == split_counts(folder_cfg(tmp_path / "local"))
    missing = s3_server.url("own-images/nothing-here")
    with pytest.raises(UserError) as raised:
        load_splits(folder_cfg(missing))
    one_line(raised, missing)


# --- binarization -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_fixed_binarization_of_folder_images(tmp_path, mode):
    rng = np.random.default_rng(0)
    for i in range(30):  # levels 0, 128 and 255: 0 and 255 must stay as they are
        pixels = rng.choice(np.array([0, 128, 255], np.uint8), (H, W, 3))
        (tmp_path / f"{i}.png").write_bytes(encode(pixels))
    grey = load(folder_cfg(tmp_path))
    assert set(grey.val.unique().tolist()) == {0, 128, 255}  # binarize none keeps grey levels
    first = load(folder_cfg(tmp_path, binarize=mode))
    second = load(folder_cfg(tmp_path, binarize=mode))
    assert first.dynamic_binarize == (mode == "dynamic")
    names = ("train", "val", "test") if mode == "static" else ("val", "test")
    for name in names:
        fixed, levels = getattr(first, name), getattr(grey, name)
        assert set(fixed.unique().tolist()) == {0, 255}, name
        assert torch.equal(fixed, getattr(second, name)), name
        assert (fixed[levels == 0] == 0).all() and (fixed[levels == 255] == 255).all(), name
    if mode == "dynamic":
        assert torch.equal(first.train, grey.train)  # drawn afresh at every step instead
