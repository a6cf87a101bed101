"""Choosing and sizing the ingest before Ray starts: memory or stream, the CPUs a stream keeps
free for its read tasks, a memory set too big for this machine, and S3 storage for Ray."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch
from conftest import tiny_config
from PIL import Image

from raytrain_vae import data
from raytrain_vae import training as train
from raytrain_vae.config import ConfigError
from raytrain_vae.data.files import ReadPlan, read_unit
from raytrain_vae.data.source import DataError
from raytrain_vae.ingest import (
    ERROR_COLUMN,
    STREAM_SPARE_CPUS,
    raise_carried_errors,
    read_unit_rows,
)
from raytrain_vae.loop import mirror_half


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_CATALOGS", {})
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), np.uint8)).save(tmp_path / f"{i}.png")
    return tmp_path


def files_config(folder, *overrides):
    return tiny_config("data.source=image_folder", f"data.path={folder}", *overrides)


def test_a_stream_reserves_cpus_for_its_read_tasks(folder):
    memory = files_config(folder, "data.ingest=memory", "scaling.num_workers=2")
    stream = files_config(folder, "data.ingest=stream", "scaling.num_workers=2")
    assert train.worker_bundles(memory) == [{"CPU": 1.0}, {"CPU": 1.0}]
    assert train.worker_bundles(stream)[-1] == {"CPU": STREAM_SPARE_CPUS} == {"CPU": 1.0}
    assert train.worker_bundles(stream, extra_cpus=0.1)[-1] == {"CPU": 0.1 + STREAM_SPARE_CPUS}
    assert train.data_cpus(memory) == 0


def test_auto_follows_the_decoded_size(folder):
    assert data.ingest_mode(files_config(folder).data) == "memory"
    tiny_budget = files_config(folder, "data.stream_above_mb=0.001").data
    assert data.decoded_bytes(tiny_budget) > 0.001 * 2**20
    assert data.ingest_mode(tiny_budget) == "stream"
    # the public datasets are decoded in memory whatever their size
    assert data.ingest_mode(tiny_config("data.stream_above_mb=0.001").data) == "memory"


def test_memory_ingest_bigger_than_the_machine_is_refused(folder, monkeypatch):
    cfg = files_config(folder, "data.ingest=memory", "scaling.num_workers=2")
    monkeypatch.setattr(train, "machine_memory_bytes", lambda: 10_000)
    with pytest.raises(ConfigError, match="data.ingest=stream"):
        train.check_data_fits_memory(cfg)
    monkeypatch.setattr(train, "machine_memory_bytes", lambda: 2**30)
    train.check_data_fits_memory(cfg)
    stream = files_config(folder, "data.ingest=stream")
    monkeypatch.setattr(train, "machine_memory_bytes", lambda: 1)
    train.check_data_fits_memory(stream)  # a stream holds no copy


def test_storage_for_ray_passes_the_endpoint_only_when_one_is_set(monkeypatch, tmp_path):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    assert train.ray_storage_args(str(tmp_path)) == {
        "storage_path": str(tmp_path),
        "storage_filesystem": None,
    }
    assert train.ray_storage_args("s3://b/runs")["storage_filesystem"] is None
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    args = train.ray_storage_args("s3://b/runs")
    assert args["storage_path"] == "b/runs"
    assert isinstance(args["storage_filesystem"], pafs.S3FileSystem)


def test_split_images_reads_only_the_units_a_limit_needs(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_CATALOGS", {})
    rng = np.random.default_rng(1)
    for i in range(400):
        Image.fromarray(rng.integers(0, 256, (4, 4, 3), np.uint8)).save(tmp_path / f"{i}.png")
    cfg = files_config(tmp_path, "data.binarize=none").data
    read = []
    original = data.files.read_unit
    monkeypatch.setattr(data.files, "read_unit", lambda u, p: read.append(u) or original(u, p))
    images, labels = data.split_images(cfg, "train", 10)
    assert images.shape == (10, 3, 4, 4) and len(labels) == 10 and len(read) == 1
    every, _ = data.split_images(cfg, "train")
    assert len(every) == data.split_counts(cfg)["train"]
    assert torch.equal(every[:10], images)


def test_hflip_mirrors_about_half_the_training_images_in_both_ingests(folder):
    """Memory: in the loop, per batch; stream: in the Ray Data task that decodes the unit."""
    torch.manual_seed(0)
    batch = torch.randint(0, 256, (400, 3, 4, 5), dtype=torch.uint8)
    out = mirror_half(batch)
    same = (out == batch).flatten(1).all(1)
    mirrored = (out == batch.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all()) and 150 < int(mirrored.sum()) < 250

    cfg = files_config(folder, "data.hflip=true", "data.binarize=none").data
    catalog = data.catalog_for(cfg)
    plan = ReadPlan.of(cfg, catalog)
    unit = catalog.units["train"][0]
    plain = read_unit(unit, plan).images
    fields = {k: np.array([v]) for k, v in dataclasses.asdict(unit).items()}
    fields["files"] = np.array([list(unit.files)], dtype=object)
    streamed = read_unit_rows(fields, plan)["image"]
    flipped = [not np.array_equal(a, b) for a, b in zip(plain, streamed, strict=True)]
    assert any(flipped) and not all(flipped)
    for a, b, was in zip(plain, streamed, flipped, strict=True):
        assert np.array_equal(b, a[..., ::-1] if was else a)
    val_unit = catalog.units["val"][0]
    fields = {k: np.array([v]) for k, v in dataclasses.asdict(val_unit).items()}
    fields["files"] = np.array([list(val_unit.files)], dtype=object)
    assert np.array_equal(read_unit_rows(fields, plan)["image"], read_unit(val_unit, plan).images)


def test_a_parquet_row_group_without_images_of_a_split_adds_no_block(tmp_path, monkeypatch):
    # Splits are drawn per image, so a small row group can hold no validation image at all.
    # An empty image tensor is a column Ray Data cannot type (it pickles it, with a warning).
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setattr(data, "_CATALOGS", {})
    pixels = np.random.default_rng(0).integers(0, 256, (40, 3 * 4 * 4), np.uint8)
    column = pa.FixedSizeListArray.from_arrays(pa.array(pixels.reshape(-1)), 3 * 4 * 4)
    pq.write_table(pa.table({"pixels": column}), tmp_path / "a.parquet", row_group_size=2)
    cfg = tiny_config(
        "data.source=parquet", f"data.path={tmp_path}", "data.image_column=pixels",
        "data.pixels_shape=[3,4,4]", "data.binarize=none", "data.val_fraction=0.1",
    ).data  # fmt: skip
    catalog = data.catalog_for(cfg)
    plan = ReadPlan.of(cfg, catalog)
    outputs = []
    for unit in catalog.units["val"]:
        fields = {k: np.array([v]) for k, v in dataclasses.asdict(unit).items()}
        fields["files"] = np.array([list(unit.files)], dtype=object)
        outputs.append((read_unit(unit, plan).images, read_unit_rows(fields, plan)))
    assert any(len(images) == 0 for images, _ in outputs)
    for images, rows in outputs:
        if len(images):
            assert np.array_equal(rows["image"], images)
        else:
            assert rows == {}


def test_image_folder_units_hold_about_unit_bytes_of_decoded_images():
    """Few Ray Data tasks per epoch for small images, few images per task for large ones."""
    from raytrain_vae.data.catalog import MAX_FILES_PER_UNIT, MIN_FILES_PER_UNIT, files_per_unit

    assert files_per_unit(28 * 28) == MAX_FILES_PER_UNIT == 1024
    assert files_per_unit(3 * 64 * 64) == 341
    assert files_per_unit(3 * 256 * 256) == MIN_FILES_PER_UNIT == 64


def test_a_bad_file_in_a_training_read_reaches_the_worker_as_its_one_line(folder, monkeypatch):
    # A training read task returns the error as a block (Ray Data would log a raised one's
    # traceback in its split coordinator); the worker raises it. Validation's read raises.
    monkeypatch.setattr(data, "_CATALOGS", {})
    cfg = files_config(folder, "data.binarize=none").data
    catalog = data.catalog_for(cfg)
    plan = ReadPlan.of(cfg, catalog)
    unit = catalog.units["train"][0]
    broken, gone = Path(unit.files[-1]), Path(unit.files[0])
    broken.write_bytes(broken.read_bytes()[:40])
    fields = {k: np.array([v]) for k, v in dataclasses.asdict(unit).items()}
    fields["files"] = np.array([list(unit.files)], dtype=object)
    with pytest.raises(DataError, match=str(broken)):
        read_unit_rows(fields, plan)
    # One row per worker: Ray Train's equal split may drop up to (workers - 1) rows.
    carried = read_unit_rows(fields, plan, error_rows=3)
    assert list(carried) == [ERROR_COLUMN] and len(carried[ERROR_COLUMN]) == 3
    assert all(str(broken) in str(message) for message in carried[ERROR_COLUMN])
    good = {"image": np.zeros((2, 1, 2, 2), np.uint8)}
    blocks = raise_carried_errors(iter([good, carried, good]))
    assert next(blocks) is good
    with pytest.raises(DataError, match=f"^{re.escape(str(broken))}: "):
        next(blocks)
    gone.unlink()  # a file that disappeared after listing: our UserError from storage
    missing = read_unit_rows(fields, plan, error_rows=1)[ERROR_COLUMN]
    assert len(missing) == 1 and str(gone) in str(missing[0])
