"""Hostile but fair input to every CLI: one line on stderr (at most 300 characters), exit status
2, no traceback, nothing written or lost, and no Ray started. Each case is a finding of the
2026-11-30 tester or of its class; the cases that lost data or hung run the real CLI as a
subprocess (test_bad_input_e2e.py)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
import yaml
from conftest import make_idx_dataset, write_model_dir
from safetensors.torch import load_file, safe_open, save_file

from raytrain_vae import evaluation as evaluate
from raytrain_vae import generate, images, tune
from raytrain_vae import training as train
from raytrain_vae.cli import BUG_LINE, MAX_LINE, run_cli
from raytrain_vae.config import load_config
from raytrain_vae.outputs import MARKER

ALIAS_BOMB = "\n".join(
    ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    + ["model:", "  channels: *a9"]
)


@dataclass
class Sandbox:
    root: Path  # everything a case may touch lives here
    model: Path  # a valid exported model (its data in root/data)
    config: Path  # a tiny valid train/search config

    def tree(self) -> dict[str, bytes | None]:
        return {
            str(p.relative_to(self.root)): None if p.is_dir() else p.read_bytes()
            for p in sorted(self.root.rglob("*"))
        }


@pytest.fixture(scope="module")
def sandbox_template(tmp_path_factory) -> Sandbox:
    root = tmp_path_factory.mktemp("bad-input")
    written = make_idx_dataset(n_train=60, n_test=20, height=28, width=28)
    # Uncompressed: .gz files would be decompressed into a cache on first read, a change of
    # the filesystem that no case asked for.
    written.write(root / "data" / "FashionMNIST" / "raw", gz=False)
    overrides = [
        f"data.root={root / 'data'}", "data.download=false", "data.limit=40",
        "model.channels=[4,8]", "model.hidden_dim=16", "model.latent_dim=2", "train.epochs=1",
        "train.batch_size=8", "scaling.num_workers=1", f"run.storage_path={root / 'runs'}",
        f"export.dir={root / 'export'}",
    ]  # fmt: skip
    cfg = load_config(None, overrides)
    model = root / "model"
    write_model_dir(model, cfg)
    raw = cfg.model_dump(mode="json")
    raw["search"]["space"] = {"train.lr": {"loguniform": [1e-4, 1e-2]}}
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(raw))
    (root / "a-file").write_text("a file, not a folder")
    (root / "mine").mkdir()
    (root / "mine" / "notes.txt").write_text("keep")
    (root / "empty.parquet").write_bytes(_parquet({"pixels": pa.array([], pa.list_(pa.uint8()))}))
    return Sandbox(root, model, config)


@pytest.fixture
def sandbox(sandbox_template, monkeypatch) -> Iterator[Sandbox]:
    monkeypatch.chdir(sandbox_template.root)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    yield sandbox_template
    if ray.is_initialized():  # a case that failed by starting Ray must not leak it
        ray.shutdown()


def _parquet(columns: dict) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(columns), sink)
    return sink.getvalue().to_pybytes()


def assert_refused(
    sandbox: Sandbox, capsys, main: Callable[[list[str]], int], argv: list[str], *phrases: str
) -> str:
    """Run a CLI in-process as its console script does; check the whole promise; the line."""
    capsys.readouterr()
    before = sandbox.tree()
    code = run_cli(lambda: main(argv))
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    assert len(lines[0]) <= MAX_LINE
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    assert sandbox.tree() == before, "the filesystem changed"
    assert not ray.is_initialized(), "Ray started for input that could be checked before"
    return lines[0]


def run_train(s: Sandbox, *overrides: str) -> tuple[Callable, list[str]]:
    return train.main, [str(s.config), *overrides]


def run_tune(s: Sandbox, *overrides: str) -> tuple[Callable, list[str]]:
    return tune.main, [str(s.config), *overrides]


def write(s: Sandbox, name: str, data: bytes) -> str:
    """A file for one case, written outside the compared tree (under cases/)."""
    folder = s.root.parent / f"{s.root.name}-cases"
    folder.mkdir(exist_ok=True)
    (folder / name).write_bytes(data)
    return str(folder / name)


# --- config files and overrides (finding 5: binary, non-UTF-8, pathological YAML) ------------

CONFIG_CASES: dict[str, tuple[bytes, str]] = {
    "binary": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "not a YAML text file"),
    "latin-1": ("data:\n  root: caf\xe9\n".encode("latin-1"), "not UTF-8"),
    "nul-character": (b"data:\n  root: a\x00b\n", "malformed YAML"),
    "deep-nesting": (b"model: " + b"[" * 5000 + b"]" * 5000, "nested deeper than"),
    "deep-mapping": (b"model: " + b"{a: " * 3000 + b"1" + b"}" * 3000, "nested deeper than"),
    "alias-bomb": (ALIAS_BOMB.encode(), "expands to more than"),
    "a-list": (b"- 1\n- 2\n", "top level must be a mapping"),
    "inf-lr": (b"train:\n  lr: .inf\n", "train.lr"),
    "nan-cpus": (b"scaling:\n  cpus_per_worker: .nan\n", "scaling.cpus_per_worker"),
    "inf-cpus": (b"scaling:\n  cpus_per_worker: .inf\n", "finite"),
    "nul-in-storage-path": (b'run:\n  storage_path: "a\\0b"\n', "NUL"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_config_files(sandbox, capsys, case):
    data, phrase = CONFIG_CASES[case]
    path = write(sandbox, f"{case}.yaml", data)
    line = assert_refused(sandbox, capsys, train.main, [path], phrase)
    assert len(line) < 250  # the alias bomb's line was 36 MB


def test_config_path_that_is_a_folder_or_holds_a_nul(sandbox, capsys):
    assert_refused(sandbox, capsys, train.main, [str(sandbox.root)], "is a folder")
    assert_refused(sandbox, capsys, train.main, ["a\0b.yaml"], "NUL")


def test_config_path_that_never_ends_or_blocks(sandbox, capsys, tmp_path):
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)  # reading it would wait forever for a writer
    assert_refused(sandbox, capsys, train.main, [str(fifo)], "not a regular file")
    assert_refused(sandbox, capsys, train.main, ["/dev/zero"], "not a regular file")
    big = write(sandbox, "big.yaml", b"train:\n  lr: 0.001\n" + b"#" * 2**21)
    assert_refused(sandbox, capsys, train.main, [big], "larger than 1 MiB")


# --- values: numbers, seeds, sizes, paths (findings 4, 5, 6) ---------------------------------

OVERRIDE_CASES: dict[str, tuple[str, list[str], str]] = {
    "nan-lr": ("train", ["train.lr=.nan"], "train.lr"),
    "inf-cpus": ("train", ["scaling.cpus_per_worker=.inf"], "finite"),
    "seed-beyond-64-bits": ("train", ["train.seed=18446744073709551617"], "train.seed"),
    "negative-seed": ("train", ["train.seed=-1"], "train.seed"),
    "huge-channels": ("train", ["model.channels=[1048576,1048576]"], "GiB"),
    "huge-batch": ("train", ["train.batch_size=16777216"], "GiB"),
    "huge-hidden": ("train", ["model.hidden_dim=1048576", "model.latent_dim=1048576"], "GiB"),
    "too-wide": ("train", ["model.channels=[4,99999999999]"], "model.channels"),
    "limit-below-workers": (
        "train",
        ["data.limit=2", "scaling.num_workers=2", "train.batch_size=2"],
        "fewer than scaling.num_workers=2",
    ),
    "storage-below-a-file": ("train", ["run.storage_path=a-file/runs"], "not writable"),
    "home-of-no-user": ("train", ["data.root=~no-such-user-here/data"], "no such user"),
    "newline-in-key": ("train", ["train.l\nr=1"], "train.l\\nr: unknown key"),
    "misspelt-level-key": (
        "train",
        ["model.type=hierarchical", "model.levels=[{sise: 7, channels: 4}]"],
        "model.levels.0.sise: unknown key",
    ),
    "val-fraction-leaves-nothing": (
        "train",
        ["data.limit=null", "data.val_fraction=0.99999", "scaling.num_workers=2"],
        "leaves 1 training image(s) of fashion_mnist",
    ),
    "empty-storage-path": ("train", ['run.storage_path=""'], "must not be empty"),
    "optuna-seed": ("tune", ["search.algorithm.seed=4294967296"], "search.algorithm.seed"),
    "searched-limit": (
        "tune",
        ["scaling.num_workers=2", "train.batch_size=2", "search.space={data.limit: {choice: [2]}}"],
        "search.space.data.limit",
    ),
    "searched-workers-with-batch": (
        "tune",
        ["search.space={scaling.num_workers: {choice: [1, 3]}}"],
        "multiple of scaling.num_workers=3",
    ),
    "searched-pair-that-fails-together": (
        "tune",
        [
            "search.space={scaling.num_workers: {choice: [1, 2]}, "
            "train.batch_size: {choice: [8, 9]}}"
        ],
        "the trial",
    ),
    "searched-huge-model": (
        "tune",
        ["search.space={model.channels: {choice: [[4, 8], [1048576, 1048576]]}}"],
        "GiB",
    ),
    "searched-nan": ("tune", ["search.space={train.lr: {choice: [.nan]}}"], "finite"),
    "alias-bomb-in-space": (
        "tune",
        ["search.space={model.channels: {choice: &a [&b [1,1,1,1], *b, *b, *b]}}"],
        "search.space",
    ),
}


@pytest.mark.parametrize("case", list(OVERRIDE_CASES))
def test_bad_values(sandbox, capsys, case):
    cli, overrides, phrase = OVERRIDE_CASES[case]
    main = train.main if cli == "train" else tune.main
    assert_refused(sandbox, capsys, main, [str(sandbox.config), *overrides], phrase)


# --- outputs that are not ours (finding 1, in-process; the subprocess runs are e2e) ----------


@pytest.mark.parametrize(
    "value, phrase",
    [
        ("mine", "files raytrain_vae did not write"),
        (".", "is the current directory"),
        ('""', "must not be empty"),
        ('"~"', "your home directory"),  # a bare ~ is YAML's null: the default export
        ("a-file", "is not a folder"),
        ("model", "did not write"),  # a model saved by hand, without the marker
    ],
)
def test_export_dir_that_would_destroy_files(sandbox, capsys, value, phrase):
    assert_refused(sandbox, capsys, tune.main, [str(sandbox.config), f"export.dir={value}"], phrase)


def generate_argv(s: Sandbox, *extra: str, command: str = "sample") -> list[str]:
    argv = [command, "--model", str(s.model), "--output", str(s.root / "out"), *extra]
    return argv + (["--num-samples", "4"] if command == "sample" else [])


GENERATE_CASES: dict[str, tuple[list[str], str]] = {
    "temperature-nan": (["--temperature", "nan"], "--temperature"),
    "temperature-inf": (["--temperature", "inf"], "--temperature"),
    "num-gpus-nan": (["--num-gpus", "nan"], "--num-gpus"),
    "num-gpus-negative": (["--num-gpus", "-1"], "--num-gpus"),
    "seed-beyond-64-bits": (["--seed", str(2**64)], "--seed"),
    "batch-size-huge": (["--batch-size", str(2**21)], "--batch-size"),
    "concurrency-zero": (["--concurrency", "0"], "--concurrency"),
    "resource-wait-nan": (["--resource-wait-s", "nan"], "--resource-wait-s"),
    "overwrite-users-folder": (["--overwrite", "--output", "mine"], "did not write"),
    "overwrite-dot": (["--overwrite", "--output", "."], "current directory"),
    "output-is-a-file": (["--output", "a-file"], "not a folder"),
    "output-exists": (["--output", "model"], "did not write"),
    "output-nul": (["--output", "a\0b"], "NUL"),
    "output-below-a-file": (["--output", "a-file/out"], "a-file is not a folder"),
    "model-nul": (["--model", "a\0b"], "NUL"),
    "model-missing": (["--model", "nowhere"], "no such model directory"),
}


@pytest.mark.parametrize("case", list(GENERATE_CASES))
def test_bad_generate_flags(sandbox, capsys, case):
    extra, phrase = GENERATE_CASES[case]
    assert_refused(sandbox, capsys, generate.main, generate_argv(sandbox, *extra), phrase)


@pytest.mark.parametrize(
    "name, column, phrase",
    [
        ("out-of-range", pa.array([[300] * 784], pa.list_(pa.int64())), "0..255"),
        ("negative", pa.array([[-1] * 784], pa.list_(pa.int64())), "0..255"),
        ("ragged", pa.array([[0] * 784, [0] * 700], pa.list_(pa.uint8())), "700"),
        ("empty", pa.array([], pa.list_(pa.uint8())), "no rows"),
    ],
)
def test_bad_reconstruct_inputs(sandbox, capsys, name, column, phrase):
    path = write(sandbox, f"{name}.parquet", _parquet({"pixels": column}))
    argv = generate_argv(sandbox, "--input", path, command="reconstruct")
    assert_refused(sandbox, capsys, generate.main, argv, phrase)


# --- model files (finding 3) -----------------------------------------------------------------


def copied_model(s: Sandbox, name: str) -> Path:
    folder = s.root.parent / f"{s.root.name}-cases" / name
    folder.mkdir(parents=True, exist_ok=True)
    for f in s.model.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


def test_weights_without_checksum_are_refused_by_evaluate(sandbox, capsys):
    folder = copied_model(sandbox, "no-checksum")
    weights = folder / "model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "sha256"}
    zeroed = {k: torch.zeros_like(v) for k, v in load_file(weights).items()}
    save_file(zeroed, weights, metadata=meta)
    argv = ["--model", str(folder), "--k", "2"]
    assert_refused(sandbox, capsys, evaluate.main, argv, "checksum")


def test_edited_header_is_refused(sandbox, capsys):
    folder = copied_model(sandbox, "edited-header")
    weights = folder / "model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        meta = dict(f.metadata())
    save_file(load_file(weights), weights, metadata={**meta, "image_shape": "1,32,32"})
    assert_refused(sandbox, capsys, evaluate.main, ["--model", str(folder)], "checksum")


def test_model_config_that_is_binary_is_refused(sandbox, capsys):
    folder = copied_model(sandbox, "binary-config")
    (folder / "config.yaml").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF")
    assert_refused(sandbox, capsys, evaluate.main, ["--model", str(folder)], "not a YAML text")


# --- evaluate and images (findings 5 and 7) ---------------------------------------------------

EVALUATE_CASES: dict[str, tuple[list[str], str]] = {
    "unknown-device": (["--device", "tpu9"], "--device"),
    "device-type-not-supported": (["--device", "meta"], "only cpu and cuda"),
    "seed-beyond-64-bits": (["--seed", str(2**64)], "--seed"),
    "negative-k": (["--k", "-1"], "--k"),
    "batch-size-huge": (["--batch-size", str(2**21)], "--batch-size"),
    "output-is-a-folder": (["--output", "mine"], "is a folder"),
    "output-someone-elses-file": (["--output", "mine/notes.txt"], "was not written by"),
    "output-below-a-file": (["--output", "a-file/metrics.json", "--k", "2"], "is not a folder"),
    "output-empty": (["--output", ""], "empty path"),
}


@pytest.mark.parametrize("case", list(EVALUATE_CASES))
def test_bad_evaluate_flags(sandbox, capsys, case):
    extra, phrase = EVALUATE_CASES[case]
    argv = ["--model", str(sandbox.model), *extra]
    assert_refused(sandbox, capsys, evaluate.main, argv, phrase)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_evaluate_on_a_gpu_this_machine_lacks(sandbox, capsys):
    argv = ["--model", str(sandbox.model), "--device", "cuda"]
    assert_refused(sandbox, capsys, evaluate.main, argv, "no CUDA GPU")


def test_evaluate_output_written_then_replaced_only_by_evaluate(sandbox, capsys, tmp_path):
    out = tmp_path / "metrics.json"
    argv = ["--model", str(sandbox.model), "--k", "2", "--output", str(out)]
    for _ in range(2):  # the second run replaces the first run's file
        assert run_cli(lambda: evaluate.main(argv)) == 0
        assert json.loads(out.read_text())["written_by"] == "raytrain_vae.evaluate"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


IMAGES_CASES: dict[str, tuple[list[str], str]] = {
    "output-is-a-file": (["--output", "a-file"], "not a folder"),
    "output-users-folder": (["--output", "mine"], "did not write"),
    "output-an-export": (["--output", "export-like"], "holds a raytrain_vae export output"),
    "num-samples-huge": (["--output", "pics", "--num-samples", "100000000"], "--num-samples"),
    "seed-negative": (["--output", "pics", "--seed", "-3"], "--seed"),
    "broken-model-leaves-no-folder": (["--output", "pics", "--model", "mine"], "not a model"),
}


@pytest.mark.parametrize("case", list(IMAGES_CASES))
def test_bad_images_flags(sandbox, capsys, case):
    export_like = sandbox.root / "export-like"
    if not export_like.exists():  # an export: images must never replace it
        export_like.mkdir()
        (export_like / MARKER).write_text(json.dumps({"kind": "export"}))
        (export_like / "model.safetensors").write_bytes(b"weights")
    extra, phrase = IMAGES_CASES[case]
    argv = ["--model", str(sandbox.model), *extra]
    assert_refused(sandbox, capsys, images.main, argv, phrase)


# --- the error boundary itself ----------------------------------------------------------------


def test_an_unexpected_error_keeps_its_traceback_and_says_it_is_a_bug(capsys):
    def broken() -> int:
        return {}["missing"]

    assert run_cli(broken) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError" in err
    assert err.strip().splitlines()[-1] == BUG_LINE


def test_an_os_error_is_one_line_with_the_file(capsys):
    def full() -> int:
        raise OSError(28, "No space left on device", "/data/out.parquet")

    assert run_cli(full) == 2
    assert capsys.readouterr().err == "error: /data/out.parquet: No space left on device\n"


def test_a_long_message_is_cut_to_one_line(capsys):
    from raytrain_vae.config import UserError

    def verbose() -> int:
        raise UserError("x" * 5000 + "\nadvice added by a library on a second line")

    assert run_cli(verbose) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and len(err.strip()) == MAX_LINE
    assert err.startswith("error: xxx") and err.strip().endswith("...")


def test_a_refused_new_run_leaves_no_folder_but_a_started_one_is_kept(tmp_path, monkeypatch):
    """What fit() does with a new run's folder after Ray Train refused its input: removed when
    it holds only Ray Train's storage marker (or nothing), kept once the run wrote anything."""
    unstarted, empty, started = tmp_path / "unstarted", tmp_path / "empty", tmp_path / "started"
    for folder in (unstarted, started):
        folder.mkdir()
        (folder / train.RAY_STORAGE_MARKER).write_text("")
    empty.mkdir()
    (started / "tensorboard").mkdir()
    (started / "tensorboard" / "events.out").write_bytes(b"epoch 1")
    for folder in (unstarted, empty, started, tmp_path / "never-made"):
        train.remove_if_unstarted(str(folder))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["started"]
    assert (started / "tensorboard" / "events.out").read_bytes() == b"epoch 1"

    # Storage that refuses the deletion: the folder stays and no error of its own hides the
    # refusal the user must see.
    def refuse(path: str) -> None:
        raise train.UserError(f"{path}: permission denied")

    monkeypatch.setattr(train, "delete_folder", refuse)
    unstarted.mkdir()
    train.remove_if_unstarted(str(unstarted))
    assert unstarted.is_dir()
