"""data.ingest: stream end to end: every epoch covers the training images once across workers,
validation is scored whole, a bad file met mid-epoch is one line, a set larger than its worker
trains, and S3 carries the data, the checkpoints, a search's trials and a reconstruction job."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import ray.train
import torch
from conftest import load_benchmark, own_lines
from PIL import Image
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from raytrain_vae import data
from raytrain_vae.config import load_config
from raytrain_vae.data import catalog as catalog_module
from raytrain_vae.data.files import ReadPlan, read_units
from raytrain_vae.export import load_model
from raytrain_vae.ingest import ShardedValidation, ShardStream, stream_datasets
from raytrain_vae.pictures import sample_images
from raytrain_vae.storage import list_files

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
TINY = ["model.channels=[4,8]", "model.hidden_dim=8", "model.latent_dim=2"]


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_folder(root: Path, n: int, size: int = 16) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / ("a" if i % 3 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:04d}.png").write_bytes(png(rng.integers(0, 256, (size, size, 3), np.uint8)))
    return root


@pytest.fixture(autouse=True)
def fresh_catalogs(monkeypatch):
    monkeypatch.setattr(data, "_CATALOGS", {})


# Two workers: each rank's share, and both together, are checked (one worker is the same
# path with one share). They leave a whole CPU free: Ray 2.60 shares spare CPUs with Ray Data
# in whole units, and a 2 x 0.75 CPU stream of a large set stalled in its second epoch.
@pytest.mark.parametrize("world", [2])
def test_stream_epochs_cover_the_training_split(tmp_path, ray_local, world, monkeypatch):
    """Both ranks' hashes, epoch by epoch: disjoint, within the training split, missing at most
    world - 1 (the equal split DDP needs); validation is every image exactly once; the order of
    an epoch is fresh."""
    # Units of 8 files: ~34 training blocks, so two epochs drawing the same block order (which
    # 5 units of 64 did by chance, about once in a hundred runs) cannot happen in practice.
    monkeypatch.setattr(catalog_module, "MIN_FILES_PER_UNIT", 8)
    monkeypatch.setattr(catalog_module, "MAX_FILES_PER_UNIT", 8)
    folder = write_folder(tmp_path / "imgs", 300)
    cfg = load_config(None, ["data.source=image_folder", f"data.path={folder}", *TINY])
    catalog = data.catalog_for(cfg.data)
    assert len(catalog.units["train"]) >= 30
    plan = ReadPlan.of(cfg.data, catalog)
    want_train = set(read_units(catalog.units["train"], plan).hashes.tolist())
    want_val = sorted(read_units(catalog.units["val"], plan).hashes.tolist())
    marker = tmp_path / "reports"
    marker.mkdir()

    def worker(_: dict) -> None:
        rank = ray.train.get_context().get_world_rank()
        # The batches the training loop takes: our block batching and local shuffle buffer.
        stream = ShardStream(0, 16, torch.device("cpu"), ray.train.get_dataset_shard, rank=rank)
        for epoch in range(2):
            rng = np.random.default_rng([0, epoch, rank])
            seen = [int(h) for b in stream.row_batches("train", 7, rng) for h in b["hash"]]
            scored = [int(h) for b in stream.row_batches("val", 5, None) for h in b["hash"]]
            np.save(marker / f"{epoch}-{rank}-train.npy", np.array(seen, np.int64))
            np.save(marker / f"{epoch}-{rank}-val.npy", np.array(scored, np.int64))
            ray.train.report({"epoch": epoch})

    TorchTrainer(
        worker,
        scaling_config=ScalingConfig(num_workers=world, resources_per_worker={"CPU": 0.5}),
        datasets=stream_datasets(cfg),
        dataset_config=ShardedValidation(),
        run_config=RunConfig(name=f"cover{world}", storage_path=str(tmp_path / "runs")),
    ).fit()
    orders = []
    for epoch in range(2):
        parts = [np.load(marker / f"{epoch}-{r}-train.npy").tolist() for r in range(world)]
        together = [h for part in parts for h in part]
        assert len(together) == len(set(together)), "an image was read twice in one epoch"
        assert set(together) <= want_train
        assert len(want_train) - len(together) <= world - 1
        assert len({len(p) for p in parts}) == 1, "ranks must take the same number of images"
        vals = [np.load(marker / f"{epoch}-{r}-val.npy").tolist() for r in range(world)]
        assert sorted(h for part in vals for h in part) == want_val
        orders.append(parts[0])
    assert orders[0] != orders[1], "the second epoch read in the same order as the first"


def test_validation_is_read_once_per_run_not_every_epoch(tmp_path, ray_local):
    """The hash split spreads validation over every row group: it is read when the datasets
    are made and held, so later passes neither read the files nor see them change."""
    rng = np.random.default_rng(2)
    pixels = pa.array(rng.integers(0, 256, (400, 64), np.uint8).tolist(), pa.list_(pa.uint8()))
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"pixels": pixels}), path, row_group_size=50)
    cfg = load_config(None, [
        "data.source=parquet", f"data.path={path}", "data.image_column=pixels",
        "data.pixels_shape=[1,8,8]", "data.channels=1", "data.val_fraction=0.1", *TINY,
    ])  # fmt: skip
    datasets = stream_datasets(cfg)
    path.unlink()
    for _ in range(2):
        hashes = [int(h) for b in datasets["val"].iter_batches(batch_size=None) for h in b["hash"]]
        assert len(hashes) == len(set(hashes)) == data.catalog_for(cfg.data).counts["val"] > 10
    with pytest.raises(Exception, match="p.parquet"):  # training reads its files every epoch
        list(datasets["train"].iter_batches(batch_size=None))


def test_a_set_larger_than_its_worker_trains_streamed(tmp_path):
    """data.ingest=stream trains a set whose decoded images outweigh all that its Ray Train
    worker holds: the worker's peak unique memory (its own pages; the object store's are
    shared) stays below the set. benchmarks/stream_memory.py shows it flat as the set grows."""
    bench = load_benchmark("stream_memory")
    n, side = 18000, 128  # 844 MiB decoded; a streamed worker peaks near 620 MiB here
    bench.write_images(tmp_path / "set", n, side)
    cmd = [
        sys.executable, "-m", "raytrain_vae.train", "vae", *bench.TRAIN, "model.channels=[4]",
        f"data.path={tmp_path / 'set'}", f"data.pixels_shape=[3,{side},{side}]",
        "data.ingest=stream", f"run.storage_path={tmp_path / 'runs'}", "run.name=big",
    ]  # fmt: skip
    peak, _ = bench.worker_peak_uss(cmd, tmp_path / "train.log", timeout_s=600)
    decoded = n * 3 * side * side
    assert peak < decoded, f"worker peak {peak / 2**20:.0f} MiB >= set {decoded / 2**20:.0f} MiB"
    assert "epoch 1/1" in (tmp_path / "train.log").read_text()
    assert list((tmp_path / "runs" / "big").glob("checkpoint_*/model.safetensors"))


def run_cli(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            [sys.executable, "-m", f"raytrain_vae.{module}", *args],
            capture_output=True,
            text=True,
            cwd=cwd,
            timeout=600,
        )
    except subprocess.TimeoutExpired as exc:  # say where it stood, not only that it hung
        tail = exc.stderr.decode(errors="replace")[-4000:] if exc.stderr else ""
        pytest.fail(f"{module} {' '.join(args)} ran past 600 s; its stderr ended:\n{tail}")


def last_line(proc: subprocess.CompletedProcess) -> str:
    return proc.stderr.strip().splitlines()[-1]


# memory reads on the workers too; stream is the path through Ray Data's tasks and logs.
@pytest.mark.parametrize("ingest", ["stream"])
def test_a_truncated_image_met_mid_epoch_is_one_line_and_exit_2(tmp_path, ingest):
    folder = write_folder(tmp_path / "imgs", 150)
    broken = sorted(folder.rglob("*.png"))[-1]
    broken.write_bytes(broken.read_bytes()[:200])
    proc = run_cli(
        "train", "configs/vae.yaml", "data.source=image_folder", f"data.path={folder}",
        f"data.ingest={ingest}", "train.epochs=1", "scaling.num_workers=1", *TINY,
        f"run.storage_path={tmp_path / 'runs'}", cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = last_line(proc)
    assert line.startswith("error: ") and str(broken) in line and "truncated" in line, line
    # One line: no traceback from the worker, Ray Data's split coordinator or the driver.
    ours = own_lines(proc.stderr)
    assert "Traceback" not in ours and ours.count(str(broken)) == 1, proc.stderr
    # Refused before its first checkpoint: no empty run folder left to mistake for a run.
    assert not (tmp_path / "runs" / "vae").exists(), list((tmp_path / "runs" / "vae").iterdir())


def test_a_run_stored_under_an_s3_uri_with_its_endpoint_in_the_query(
    s3_server, tmp_path, monkeypatch
):
    """run.storage_path=s3://bucket/runs?endpoint_override=HOST&scheme=http, no endpoint
    variable: the run's checkpoints land in runs/<name> (not in the query), and the same command
    again finds them there and resumes."""
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    host = s3_server.endpoint.split("://", 1)[1]
    query = f"endpoint_override={host}&scheme=http"
    storage = f"{s3_server.url('qruns')}?{query}"
    folder = write_folder(tmp_path / "imgs", 60)
    train = [
        "train", "configs/vae.yaml", "data.source=image_folder", f"data.path={folder}",
        "scaling.num_workers=1", *TINY, f"run.storage_path={storage}", "run.name=q",
    ]  # fmt: skip
    first = run_cli(*train, "train.epochs=1", cwd=REPO)
    assert first.returncode == 0, first.stderr[-3000:]
    assert list_files(f"{s3_server.url('qruns/q')}?{query}", (".safetensors",))
    again = run_cli(*train, "train.epochs=2", cwd=REPO)
    assert again.returncode == 0, again.stderr[-3000:]
    log = again.stdout + again.stderr
    assert "resumed from" in log and "after epoch 1" in log and "epoch 2/2" in log, log[-3000:]
    # The final checkpoint is printed as a URI that reaches the same server: evaluate takes it.
    final = final_checkpoint(again.stdout)
    assert final.startswith(s3_server.url("qruns/q/checkpoint_")), final
    assert final.endswith(f"?{query}"), final
    scored = run_cli("evaluate", "--model", final, "--k", "2", "--limit", "8", "--json", cwd=REPO)
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert json.loads(scored.stdout)["neg_elbo"] > 0
    search = run_cli(
        "tune", "configs/quickstart.yaml", *train[2:-1], "run.name=qsearch", "train.epochs=1",
        "search.num_samples=1", "search.space={train.lr: {choice: [0.001, 0.002]}}",
        f"export.dir={tmp_path / 'export'}", cwd=REPO,
    )  # fmt: skip
    assert search.returncode == 0, search.stderr[-3000:]
    assert (tmp_path / "export" / "model.safetensors").is_file()
    assert list_files(f"{s3_server.url('qruns/qsearch')}?{query}", (".csv",))


def final_checkpoint(stdout: str) -> str:
    """The checkpoint that `train` printed as "final checkpoint: <path>"."""
    found = re.search(r"^final checkpoint: (\S+)$", stdout, re.MULTILINE)
    assert found, stdout[-3000:]
    return found.group(1)


def write_parquet_dataset(fs, root: str, n: int) -> None:
    """n grey 16x16 PNGs with labels, over two files of several row groups each."""
    rng = np.random.default_rng(1)
    images = [png(rng.integers(0, 256, (16, 16), np.uint8)) for _ in range(n)]
    for part, rows in enumerate((slice(0, n // 2), slice(n // 2, n))):
        table = pa.table({"image": images[rows], "label": list(range(n))[rows]})
        with fs.open_output_stream(f"{root}/part-{part}.parquet") as out:
            pq.write_table(table, out, row_group_size=40)


def test_train_search_export_and_sample_against_s3(s3_server, tmp_path):
    """Data read from s3:// as a stream, checkpoints and a search's trials written to s3://,
    the export samples at the trained size, and a reconstruction job reads s3://: the
    endpoint comes from AWS_ENDPOINT_URL alone, as with MinIO or Ceph."""
    fs = s3_server.filesystem()
    write_parquet_dataset(fs, f"{s3_server.bucket}/faces", 240)
    common = [
        "data.source=parquet", f"data.path={s3_server.url('faces')}", "data.label_column=label",
        "data.channels=1", "data.ingest=stream", "scaling.num_workers=1", *TINY,
        f"run.storage_path={s3_server.url('runs')}",
    ]  # fmt: skip
    vae = str(REPO / "configs/vae.yaml")
    train = run_cli("train", vae, *common, "train.epochs=2", cwd=tmp_path)
    assert train.returncode == 0, train.stderr[-3000:]
    assert list_files(s3_server.url("runs/vae"), (".safetensors",))
    export = tmp_path / "export"
    search = run_cli(
        "tune", str(REPO / "configs/quickstart.yaml"), *common, "train.epochs=1",
        "search.num_samples=1", "search.space={train.lr: {choice: [0.001, 0.002]}}",
        "run.name=s3search", f"export.dir={export}", cwd=tmp_path,
    )  # fmt: skip
    assert search.returncode == 0, search.stderr[-3000:]
    assert (export / "model.safetensors").is_file()
    assert list_files(s3_server.url("runs/s3search"), (".csv",))
    # The export is local: the sampling job on it is the same as on any export
    # (tests/test_generate.py); here, that it samples at the trained size.
    assert sample_images(load_model(export), 2, seed=0).shape == (2, 1, 16, 16)
    # The training run's own checkpoint, as train printed it (on S3), is the job's model.
    final = final_checkpoint(train.stdout)
    assert final.startswith(s3_server.url("runs/vae/checkpoint_")), final
    rebuilt = run_cli(
        "generate", "reconstruct", "--model", final, "--input", s3_server.url("faces"),
        "--output", str(tmp_path / "recon"), cwd=tmp_path,
    )  # fmt: skip
    assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
    assert pq.read_table(tmp_path / "recon").num_rows == 240
