"""Dataset discovery and IDX decoding, the train/val/test split, sharding, binarization."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision.datasets
from conftest import Written, idx_bytes, make_idx_dataset
from torchvision.datasets import MNIST

import raytrain_vae.data.idx as idx_source
from raytrain_vae.config import DataSection, UserError
from raytrain_vae.data import (
    DataError,
    eval_indices,
    load_splits,
    shard_indices,
    to_model_input,
)
from raytrain_vae.data.idx import FILES

N_TRAIN, N_TEST, H, W = 60, 12, 6, 5  # H != W catches transposed images

# Never find a dataset installed on this machine.
pytestmark = pytest.mark.usefixtures("no_system_copies")


def make_written(seed: int = 0) -> Written:
    return make_idx_dataset(seed=seed, n_train=N_TRAIN, n_test=N_TEST, height=H, width=W)


@pytest.fixture
def written() -> Written:
    return make_written()


@pytest.fixture
def root(tmp_path, written) -> Path:
    """tmp_path/root holding the four gzipped IDX files, as downloaded from the MNIST site."""
    root = tmp_path / "root"
    written.write(root, gz=True)
    return root


def cfg_for(root: Path, **kw) -> DataSection:
    kw.setdefault("binarize", "none")
    return DataSection(source="mnist", root=str(root), download=False, **kw)


def _rows(images: torch.Tensor) -> list[bytes]:
    return sorted(im.numpy().tobytes() for im in images.reshape(len(images), -1))


# --- reading -----------------------------------------------------------------------------


def test_load_splits_round_trips_pixels_and_labels(root, written):
    s = load_splits(cfg_for(root))
    n_val = round(N_TRAIN * (1 / 12))
    assert s.val.shape == (n_val, 1, H, W)
    assert s.train.shape == (N_TRAIN - n_val, 1, H, W)
    assert s.test.shape == (N_TEST, 1, H, W)
    for t in (s.train, s.val, s.test):
        assert t.dtype == torch.uint8
        assert t.is_contiguous()
    assert s.image_shape == (1, H, W)
    assert s.dynamic_binarize is False

    # val + train together are exactly the written training images, each with its own label
    together = torch.cat([s.val, s.train])
    assert _rows(together) == _rows(torch.from_numpy(written.train_images))
    label_of = {
        im.tobytes(): int(y)
        for im, y in zip(written.train_images, written.train_labels, strict=True)
    }
    pairs = [(s.train, s.train_labels), (s.val, s.val_labels)]
    for images, labels in pairs:
        assert labels.dtype == torch.long
        for im, y in zip(images, labels, strict=True):
            assert label_of[im[0].numpy().tobytes()] == int(y)

    # the test split is the written test set, in order
    assert torch.equal(s.test[:, 0], torch.from_numpy(written.test_images))
    assert torch.equal(s.test_labels, torch.from_numpy(written.test_labels).long())


@pytest.mark.parametrize("val_fraction", [0.1, 0.25, 0.5])
def test_val_size_is_rounded_fraction(root, val_fraction):
    s = load_splits(cfg_for(root, val_fraction=val_fraction))
    assert len(s.val) == round(N_TRAIN * val_fraction)
    assert len(s.val) + len(s.train) == N_TRAIN


def test_split_is_fixed_across_loads(root):
    a, b = load_splits(cfg_for(root)), load_splits(cfg_for(root))
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    assert torch.equal(a.train_labels, b.train_labels)


@pytest.mark.parametrize("limit", [20, 37])
def test_limit_caps_train_plus_val(root, written, limit):
    s = load_splits(cfg_for(root, limit=limit))
    assert len(s.train) + len(s.val) == limit
    assert len(s.val) == round(limit / 12)
    assert len(s.test) == N_TEST  # the test split is never limited
    written_rows = set(_rows(torch.from_numpy(written.train_images)))
    assert set(_rows(torch.cat([s.train, s.val]))) <= written_rows


def test_limit_too_small_leaves_no_training_images(root):
    with pytest.raises(DataError, match="limit"):
        load_splits(cfg_for(root, limit=1))


def test_gz_files_are_decompressed_into_raw_cache_and_reused(root, written):
    first = load_splits(cfg_for(root))
    raw = root / "MNIST" / "raw"
    for key, stem in FILES.items():
        cached = raw / stem
        assert cached.is_file(), stem
        assert cached.read_bytes() == idx_bytes(getattr(written, key))
    assert not [p for p in raw.iterdir() if p.name.startswith(".")], "temp files left behind"

    # A second load reads the cache: it still works once the .gz files are gone.
    for gz_file in root.glob("*.gz"):
        gz_file.unlink()
    second = load_splits(cfg_for(root))
    assert second.source == str(raw)
    for name in ("train", "val", "test", "train_labels", "val_labels", "test_labels"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name


def test_plain_files_in_torchvision_layout(tmp_path, written):
    root = tmp_path / "root"
    raw = root / "MNIST" / "raw"
    written.write(raw, gz=False)
    before = sorted(p.name for p in raw.iterdir())
    s = load_splits(cfg_for(root))
    assert s.source == str(raw)
    assert torch.equal(s.test[:, 0], torch.from_numpy(written.test_images))
    assert _rows(torch.cat([s.train, s.val])) == _rows(torch.from_numpy(written.train_images))
    assert sorted(p.name for p in raw.iterdir()) == before  # nothing written next to them


def test_gz_files_in_torchvision_layout(tmp_path, written):
    root = tmp_path / "root"
    written.write(root / "MNIST" / "raw", gz=True)
    s = load_splits(cfg_for(root))
    assert torch.equal(s.test[:, 0], torch.from_numpy(written.test_images))


def test_system_copy_is_found(monkeypatch, tmp_path, written):
    system = tmp_path / "usr-share-mnist"
    written.write(system, gz=True)
    monkeypatch.setitem(idx_source.SYSTEM_DIRS, "mnist", [str(system)])
    s = load_splits(cfg_for(tmp_path / "empty-root"))
    assert s.source == str(system)
    assert torch.equal(s.test[:, 0], torch.from_numpy(written.test_images))


def test_image_and_label_counts_must_agree(tmp_path):
    w = make_written()
    w.train_labels = w.train_labels[:-1]
    w.write(tmp_path / "root")
    with pytest.raises(DataError, match="counts differ"):
        load_splits(cfg_for(tmp_path / "root"))


def test_truncated_gz_file_raises_data_error(tmp_path, written):
    root = tmp_path / "root"
    written.write(root)
    path = root / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(DataError, match="cannot read mnist"):
        load_splits(cfg_for(root))


def test_file_that_is_not_idx_raises_data_error(tmp_path, written):
    # e.g. an HTML error page or an empty file saved under the IDX name
    root = tmp_path / "root"
    raw = root / "MNIST" / "raw"
    written.write(raw, gz=False)
    (raw / "train-labels-idx1-ubyte").write_bytes(b"<html>rate limited</html>\n")
    with pytest.raises(DataError, match="cannot read mnist") as info:
        load_splits(cfg_for(root))
    assert str(raw / "train-labels-idx1-ubyte") in str(info.value)


@pytest.mark.parametrize(
    "damage, why",
    [
        (lambda b: b[:-1], "holds 359 bytes of data, its header says (12, 6, 5)"),
        (lambda b: b + b"\0", "holds 361 bytes of data"),
        (lambda b: b[:10], "cut short in its header"),
        (lambda b: b"\0\0\x0d" + b[3:], "not an IDX file of 3-dimensional uint8 data"),  # float
        (lambda b: b[:3] + b"\x02" + b[4:], "not an IDX file of 3-dimensional uint8 data"),
    ],
)
def test_an_idx_file_whose_size_or_type_disagrees_with_its_header_is_named(
    tmp_path, written, damage, why
):
    root = tmp_path / "root"
    raw = root / "MNIST" / "raw"
    written.write(raw, gz=False)
    path = raw / "t10k-images-idx3-ubyte"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DataError) as info:
        load_splits(cfg_for(root))
    assert str(info.value).startswith(f"cannot read mnist from {path}: ")
    assert why in str(info.value)


def test_a_read_only_root_reads_the_gz_files_without_a_cache(root, written):
    root.chmod(0o555)
    try:
        s = load_splits(cfg_for(root))
    finally:
        root.chmod(0o755)
    assert torch.equal(s.test[:, 0], torch.from_numpy(written.test_images))
    if os.geteuid() != 0:  # root writes through any mode
        assert not (root / "MNIST").exists()


def test_reading_idx_files_and_every_command_module_leave_torchvision_unimported(root):
    """torchvision costs each process 1.5 s to import, each Ray worker included
    (docs/performance.md): only downloading, grids and resizing import it."""
    modules = ["training", "worker", "tune", "generate", "evaluation", "export", "ingest"]
    code = "; ".join(
        [
            "import sys",
            *(f"import raytrain_vae.{name}" for name in modules),
            "from raytrain_vae.config import DataSection",
            "from raytrain_vae.data import load_splits",
            f"load_splits(DataSection(source='mnist', root={str(root)!r}, download=False))",
            "print('torchvision' in sys.modules)",
        ]
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr[-2000:]


# --- missing data and downloads ---------------------------------------------------------


def test_missing_data_without_download(tmp_path):
    root = tmp_path / "empty"
    with pytest.raises(DataError) as info:
        load_splits(cfg_for(root))
    msg = str(info.value)
    assert isinstance(info.value, UserError)
    assert "\n" not in msg
    assert "mnist not found" in msg
    assert "data.download is false" in msg
    # where it looked
    assert str(root / "MNIST" / "raw") in msg
    assert str(root) in msg
    assert str(tmp_path / "no-system-copy" / "mnist") in msg
    # how to fix it
    assert "fix:" in msg
    assert "data.download=true" in msg
    assert "train-images-idx3-ubyte" in msg


def test_missing_fashion_mnist_suggests_the_system_package(tmp_path):
    cfg = DataSection(source="fashion_mnist", root=str(tmp_path / "empty"), download=False)
    with pytest.raises(DataError) as info:
        load_splits(cfg)
    msg = str(info.value)
    assert str(tmp_path / "empty" / "FashionMNIST" / "raw") in msg
    assert "apt-get install dataset-fashion-mnist" in msg


def _offline(*args, **kwargs):
    raise urllib.error.URLError("offline")


def test_download_failure_via_download_method(monkeypatch, tmp_path):
    monkeypatch.setattr(MNIST, "download", _offline)
    cfg = DataSection(source="mnist", root=str(tmp_path / "empty"), download=True)
    with pytest.raises(DataError) as info:
        load_splits(cfg)
    msg = str(info.value)
    assert "download failed" in msg
    assert "offline" in msg
    assert str(tmp_path / "empty" / "MNIST" / "raw") in msg
    assert "\n" not in msg


def test_download_failure_via_datasets_entry(monkeypatch, tmp_path):
    class MNIST:  # same name, so the torchvision folder layout is unchanged
        def __init__(self, root, train=True, download=False):
            _offline()

    monkeypatch.setattr(torchvision.datasets, "MNIST", MNIST)
    cfg = DataSection(source="mnist", root=str(tmp_path / "empty"), download=True)
    with pytest.raises(DataError, match="download failed.*offline"):
        load_splits(cfg)


def test_download_is_not_attempted_when_files_exist(monkeypatch, root):
    monkeypatch.setattr(MNIST, "download", _offline)
    s = load_splits(DataSection(source="mnist", root=str(root), download=True, binarize="none"))
    assert len(s.test) == N_TEST


# --- sharding ---------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("n", [12, 13, 14, 60])
def test_shard_indices_disjoint_equal_and_covering(n, world):
    for epoch in range(3):
        shards = [shard_indices(n, rank, world, epoch, seed=5) for rank in range(world)]
        for shard in shards:
            assert len(shard) == n // world
            assert shard.dtype == torch.long
            assert int(shard.min()) >= 0 and int(shard.max()) < n
        flat = torch.cat(shards)
        assert len(set(flat.tolist())) == len(flat), "shards overlap"
        assert len(flat) == world * (n // world)
        if n % world == 0:
            assert sorted(flat.tolist()) == list(range(n))


def test_shard_indices_leftover_rotates_over_epochs():
    n, world = 13, 3
    seen = set()
    for epoch in range(20):
        for rank in range(world):
            seen.update(shard_indices(n, rank, world, epoch, seed=0).tolist())
    assert seen == set(range(n))


def test_shard_indices_epochs_and_seeds_reorder():
    n, world = 60, 2
    base = shard_indices(n, 0, world, epoch=0, seed=1)
    assert torch.equal(base, shard_indices(n, 0, world, epoch=0, seed=1))
    assert not torch.equal(base, shard_indices(n, 0, world, epoch=1, seed=1))
    assert not torch.equal(base, shard_indices(n, 0, world, epoch=0, seed=2))
    orders = {tuple(shard_indices(n, 0, 1, epoch=e, seed=1).tolist()) for e in range(5)}
    assert len(orders) == 5


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("n", [1, 2, 12, 13, 14])
def test_eval_indices_disjoint_and_cover_everything(n, world):
    # n < world happens in training: data.limit=13 leaves a 1-image validation split, and every
    # rank evaluates its eval_indices share of it.
    parts = [eval_indices(n, rank, world).tolist() for rank in range(world)]
    flat = [i for part in parts for i in part]
    assert len(flat) == len(set(flat))
    assert sorted(flat) == list(range(n))
    assert parts == [eval_indices(n, rank, world).tolist() for rank in range(world)]


# --- binarization -----------------------------------------------------------------------


def _values(t: torch.Tensor) -> set[int]:
    return set(t.unique().tolist())


def test_binarize_none_keeps_grey_levels(root):
    s = load_splits(cfg_for(root, binarize="none"))
    for t in (s.train, s.val, s.test):
        assert len(_values(t) - {0, 255}) > 10


def test_binarize_static(root):
    grey = load_splits(cfg_for(root, binarize="none"))
    a = load_splits(cfg_for(root, binarize="static"))
    b = load_splits(cfg_for(root, binarize="static"))
    assert a.dynamic_binarize is False
    for name in ("train", "val", "test"):
        t, g = getattr(a, name), getattr(grey, name)
        assert _values(t) == {0, 255}, name
        assert t.dtype == torch.uint8 and t.shape == g.shape
        assert torch.equal(t, getattr(b, name)), f"{name} differs between loads"
        # a sample of the grey image: black stays black, white stays white
        assert bool((t[g == 0] == 0).all()) and bool((t[g == 255] == 255).all())
    assert torch.equal(a.train_labels, grey.train_labels)
    # on average the sample follows the grey level
    everything = torch.cat([a.train.flatten(), a.val.flatten(), a.test.flatten()]).float()
    grey_all = torch.cat([grey.train.flatten(), grey.val.flatten(), grey.test.flatten()]).float()
    assert abs(everything.mean() - grey_all.mean()) < 10


def test_binarize_dynamic(root):
    grey = load_splits(cfg_for(root, binarize="none"))
    a = load_splits(cfg_for(root, binarize="dynamic"))
    b = load_splits(cfg_for(root, binarize="dynamic"))
    assert a.dynamic_binarize is True
    assert torch.equal(a.train, grey.train)  # training images keep their grey levels
    for name in ("val", "test"):
        t = getattr(a, name)
        assert _values(t) == {0, 255}, name
        assert torch.equal(t, getattr(b, name)), f"{name} differs between loads"


def test_to_model_input_without_sampling():
    batch = torch.tensor([[0, 64, 128, 255]], dtype=torch.uint8)
    x = to_model_input(batch, dynamic=False)
    assert x.dtype == torch.float32
    assert torch.allclose(x, batch.float() / 255)
    assert batch.tolist() == [[0, 64, 128, 255]]  # input untouched


def test_to_model_input_dynamic_sampling():
    batch = torch.full((256, 1, 28, 28), 64, dtype=torch.uint8)
    x = to_model_input(batch, dynamic=True, generator=torch.Generator().manual_seed(3))
    assert x.shape == batch.shape and x.dtype == torch.float32
    assert _values(x) == {0, 1}
    assert abs(x.mean().item() - 64 / 255) < 0.01
    again = to_model_input(batch, dynamic=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(x, again)
    other = to_model_input(batch, dynamic=True, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(x, other)
    # black and white pixels are deterministic
    edges = torch.tensor([[0, 255] * 100], dtype=torch.uint8)
    y = to_model_input(edges, dynamic=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(y, edges.float() / 255)
