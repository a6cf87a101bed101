"""Shared test helpers: tiny MNIST-style IDX datasets on disk, tiny saved model directories, no
system dataset copies, and a module-wide local Ray."""

from __future__ import annotations

import gzip
import http.client
import importlib.util
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
import ray
import torch

import raytrain_vae.data.idx as idx_source
from raytrain_vae.config import Config, DataSection, ModelSection, load_config
from raytrain_vae.data.idx import FILES
from raytrain_vae.export import export_model
from raytrain_vae.model_io import save_model_dir
from raytrain_vae.models import VAE, build_model
from raytrain_vae.objectives import reconstruction_nll

# The smallest model the tests save and load: milliseconds to build and to run.
TINY_MODEL = ["model.channels=[4,8]", "model.hidden_dim=8", "model.latent_dim=2"]


def tiny_config(*overrides: str) -> Config:
    """The default config with TINY_MODEL, then overrides (a later key wins)."""
    return load_config(None, [*TINY_MODEL, *overrides])


def write_model_dir(
    folder: Path,
    cfg: Config,
    image_shape: tuple[int, int, int] = (1, 28, 28),
    seed: int = 0,
    metrics: dict | None = None,
) -> VAE:
    """A saved model directory in folder (created if need be), as an export or a checkpoint
    holds one: weights of a model built after torch.manual_seed(seed), config.yaml and
    metrics.json (default {"epoch": 1}). Returns the model, as built (training mode)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = build_model(cfg.model, image_shape)
    save_model_dir(model, cfg, folder, {"epoch": 1} if metrics is None else metrics)
    return model


@pytest.fixture
def exported(tmp_path) -> Path:
    """A tiny exported model (tmp/export) whose config reads 28x28 MNIST-style IDX files written
    in tmp/data; its checkpoint is tmp/ckpt."""
    root = tmp_path / "data"
    make_idx_dataset(seed=3, n_train=24, n_test=12, height=28, width=28).write(root, gz=False)
    cfg = Config(
        data=DataSection(source="mnist", root=str(root), download=False, binarize="static"),
        model=ModelSection(channels=[8, 16], latent_dim=4, hidden_dim=32),
    )
    write_model_dir(tmp_path / "ckpt", cfg, (1, 28, 28), metrics={"epoch": 1})
    return export_model(tmp_path / "ckpt", tmp_path / "export")


def negative_elbo_steps(model: VAE, x: torch.Tensor, steps: int, lr: float = 3e-3) -> list[float]:
    """Train `model` on the one batch `x` by Adam on the mean negative ELBO: each step's loss."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        p = model(x)
        loss = (reconstruction_nll(model, p.out, x) + p.kl[0]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def grid_pixels(path: Path, grid_width: int) -> np.ndarray:
    """The image grid of a picture (pictures.titled) at its own size, grey: below the title
    band, right of any row labels, one pixel per upscaled block."""
    from PIL import Image

    from raytrain_vae.pictures import TITLE_BAND

    with Image.open(path) as picture:
        body = np.asarray(picture.convert("RGB"))[TITLE_BAND:, :, 0]
    left = int(np.argmax(body[0] == 0))  # the grid's top padding is black, labels sit on white
    region = body[:, left:]
    scale = region.shape[1] // grid_width
    assert scale >= 1 and region.shape[1] == grid_width * scale, (region.shape, grid_width)
    return region[::scale, ::scale]


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file as in MNIST: big-endian magic 0x0000080<ndim> (uint8 data), dims, pixels."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


@dataclass
class Written:
    """The four arrays of an MNIST-style dataset, and how to write them as IDX files."""

    train_images: np.ndarray  # (N, H, W) uint8
    train_labels: np.ndarray  # (N,) uint8
    test_images: np.ndarray
    test_labels: np.ndarray

    def write(self, folder: Path, gz: bool = True) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for key, stem in FILES.items():
            payload = idx_bytes(getattr(self, key))
            if gz:
                (folder / f"{stem}.gz").write_bytes(gzip.compress(payload))
            else:
                (folder / stem).write_bytes(payload)


def make_idx_dataset(
    *, seed: int = 0, n_train: int, n_test: int, height: int, width: int
) -> Written:
    """Random uint8 images (every training image distinct) and labels 0-9."""
    rng = np.random.default_rng(seed)
    written = Written(
        train_images=rng.integers(0, 256, size=(n_train, height, width), dtype=np.uint8),
        train_labels=rng.integers(0, 10, size=n_train, dtype=np.uint8),
        test_images=rng.integers(0, 256, size=(n_test, height, width), dtype=np.uint8),
        test_labels=rng.integers(0, 10, size=n_test, dtype=np.uint8),
    )
    # Every image distinct, so "same set of images" is a meaningful comparison.
    assert len({im.tobytes() for im in written.train_images}) == n_train
    return written


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A tiny saved model (tiny_config(), 1x28x28, seed 0) at tmp_path / "model"."""
    folder = tmp_path / "model"
    write_model_dir(folder, tiny_config())
    return folder


@pytest.fixture
def no_system_copies(monkeypatch, tmp_path):
    """Never find a dataset installed on this machine (e.g. /usr/share/datasets)."""
    for name in list(idx_source.SYSTEM_DIRS):
        monkeypatch.setitem(idx_source.SYSTEM_DIRS, name, [str(tmp_path / "no-system-copy" / name)])


@pytest.fixture(scope="module")
def ray_local():
    """One real local Ray (2 CPUs) per test module: starting one takes 3 to 5 s."""
    ray.init(num_cpus=2)
    yield
    ray.shutdown()


# An S3-compatible server (moto) on loopback, for the storage tests.

S3_BUCKET = "raytrain-test"
S3_START_TIMEOUT_S = 20.0
MLFLOW_START_TIMEOUT_S = 60.0  # about 6 s on 2 cores: imports, sqlite tables, uvicorn
# Set elsewhere, these would send requests past the test server or sign them otherwise.
S3_CLEARED_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_SESSION_TOKEN", "AWS_PROFILE")


@dataclass
class S3Server:
    """A running moto S3 server: endpoint (http://127.0.0.1:PORT), a bucket in it, the keys that
    reach it, and the seconds it took to start and answer."""

    endpoint: str
    bucket: str
    access_key: str = "testing"
    secret_key: str = "testing"
    start_s: float = 0.0

    def url(self, key: str) -> str:
        """s3://BUCKET/key."""
        return f"s3://{self.bucket}/{key}"

    def environment(self) -> dict[str, str]:
        """The standard AWS variables that send a client to this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def filesystem(self, **options) -> pafs.S3FileSystem:
        """A pyarrow filesystem on this server, built here: independent of raytrain_vae.storage."""
        return pafs.S3FileSystem(
            access_key=self.access_key,
            secret_key=self.secret_key,
            endpoint_override=self.endpoint.split("://", 1)[1],
            scheme="http",
            region="us-east-1",
            **options,
        )

    def put(self, key: str, data: bytes) -> None:
        """Writes the object s3://BUCKET/key."""
        with self.filesystem().open_output_stream(f"{self.bucket}/{key}") as stream:
            stream.write(data)


# Lines Ray forwards from its own actors: on a loaded machine Ray Train's placement-group
# cleaner may print a traceback of its own (a state-API timeout, or "multiple active Ray
# instances" while a test's shared Ray runs beside a CLI's own) that says nothing of ours.
RAY_ACTOR_LINE = re.compile(r"^(\x1b\[\d+m)?\((PlacementGroupCleaner|TrainController) pid=")


def own_lines(stderr: str) -> str:
    """stderr without the lines Ray forwards from its own actors."""
    return "\n".join(line for line in stderr.splitlines() if not RAY_ACTOR_LINE.match(line))


def load_benchmark(name: str):
    """A script of benchmarks/ as a module (they are scripts, not a package), importing its
    neighbours as it does when run (its folder on sys.path)."""
    repo = Path(__file__).resolve().parents[1]
    if str(repo / "benchmarks") not in sys.path:
        sys.path.append(str(repo / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, repo / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    """A loopback port nobody listens on (right now)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(port: int, path: str) -> bool:
    """Whether an HTTP server answers GET path on the loopback port."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        connection.request("GET", path)
        connection.getresponse().read()
        return True
    except OSError:
        return False
    finally:
        connection.close()


def _stop(process: subprocess.Popen) -> None:
    """Ends the server's process group (its own session): SIGTERM, then SIGKILL after 10 s."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@dataclass
class LocalServer:
    """A server process the tests started, on a loopback port."""

    url: str
    process: subprocess.Popen

    def kill(self) -> None:
        """SIGKILL its whole process group at once: a server that dies mid-run."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@contextmanager
def local_server(
    name: str,
    argv: list[str],
    folder: Path,
    probe: str,
    timeout_s: float,
    environment: dict[str, str] | None = None,
) -> Iterator[LocalServer]:
    """argv (with {port} filled in) on a free loopback port, in its own process group, output
    in folder/NAME-PORT.log; yields it once GET probe answers (up to timeout_s), and ends it on
    exit. A start that loses its port to another process is tried again (3 tries)."""
    folder.mkdir(parents=True, exist_ok=True)
    for attempt in range(3):
        port = free_port()
        log = folder / f"{name}-{port}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(
                [arg.format(port=port) for arg in argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(environment or {})},
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while process.poll() is None and time.monotonic() < deadline and not _answers(port, probe):
            time.sleep(0.1)
        if process.poll() is None and _answers(port, probe):
            break
        _stop(process)
        if attempt == 2 or time.monotonic() >= deadline:
            raise RuntimeError(f"{name} server did not start:\n{log.read_text()[-2000:]}")
    try:
        yield LocalServer(f"http://127.0.0.1:{port}", process)
    finally:
        _stop(process)


@contextmanager
def moto_server(folder: Path, environment: dict[str, str] | None = None) -> Iterator[str]:
    """`python -m moto.server` on a free loopback port (moto's own page answers: no S3 action);
    yields its endpoint."""
    argv = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "{port}"]
    with local_server("moto", argv, folder, "/moto-api/", S3_START_TIMEOUT_S, environment) as s:
        yield s.url


@contextmanager
def mlflow_server(folder: Path) -> Iterator[LocalServer]:
    """`mlflow server` with a sqlite store and artifacts in folder, on a free loopback port,
    one worker; yields it once /health answers."""
    argv = [
        str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1",
        "--port", "{port}", "--workers", "1",
        "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
        "--artifacts-destination", str(folder / "artifacts"),
    ]  # fmt: skip
    with local_server("mlflow", argv, folder, "/health", MLFLOW_START_TIMEOUT_S) as server:
        yield server


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    """One moto S3 server per test module (starting one takes about 0.5 to 1.5 s), with the
    bucket S3_BUCKET. For the module's duration os.environ holds AWS_ENDPOINT_URL (the server),
    AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY ("testing") and AWS_DEFAULT_REGION (us-east-1),
    and lacks S3_CLEARED_VARIABLES: subprocesses started meanwhile inherit them. Ray workers
    inherit the environment of ray.init: list s3_server before ray_local in a test's arguments.
    Objects written by one test stay for the next: give each test its own key prefix."""
    started = time.monotonic()
    with (
        moto_server(tmp_path_factory.mktemp("moto")) as endpoint,
        pytest.MonkeyPatch.context() as patch,
    ):
        server = S3Server(endpoint, S3_BUCKET)
        for name in S3_CLEARED_VARIABLES:
            patch.delenv(name, raising=False)
        for name, value in server.environment().items():
            patch.setenv(name, value)
        server.filesystem(allow_bucket_creation=True).create_dir(server.bucket)
        server.start_s = time.monotonic() - started
        yield server


@pytest.fixture
def s3_server_with_iam(tmp_path) -> Iterator[S3Server]:
    """A moto S3 server of its own that checks credentials (moto's IAM; the first 3 requests,
    which create a user, its access key and an allow-all policy, pass unchecked), with the bucket
    S3_BUCKET; .access_key / .secret_key are the user's. os.environ is left alone."""
    import boto3  # moto's dependency; only this fixture needs it

    started = time.monotonic()
    with moto_server(tmp_path / "moto-iam", {"INITIAL_NO_AUTH_ACTION_COUNT": "3"}) as endpoint:
        iam = boto3.client(
            "iam",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="setup",
            aws_secret_access_key="setup",
        )
        iam.create_user(UserName="raytrain")
        key = iam.create_access_key(UserName="raytrain")["AccessKey"]
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
        }
        iam.put_user_policy(
            UserName="raytrain", PolicyName="all", PolicyDocument=json.dumps(policy)
        )
        server = S3Server(endpoint, S3_BUCKET, key["AccessKeyId"], key["SecretAccessKey"])
        server.filesystem(allow_bucket_creation=True).create_dir(server.bucket)
        server.start_s = time.monotonic() - started
        yield server
