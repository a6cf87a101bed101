"""The Python API (`import raytrain_vae`): its names, its lazy import, the modules behind the
old `-m` entry points, config resolution, evaluate's two forms. The README's example runs as
written from an installed wheel in tests/test_commands.py."""

from __future__ import annotations

import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import make_idx_dataset, tiny_config, write_model_dir

import raytrain_vae
from raytrain_vae import api
from raytrain_vae.config import ConfigError, load_config
from raytrain_vae.data import split_images
from raytrain_vae.evaluation import evaluate as evaluate_images
from raytrain_vae.evaluation import evaluate_export
from raytrain_vae.export import export_model

REPO = Path(__file__).resolve().parents[1]
NAMES = {"load_config", "train", "search", "load_model", "evaluate", "SearchResult"}


def python(*args: str, cwd: Path = REPO, env: dict | None = None, timeout: float = 120):
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_the_package_exports_the_api_without_importing_torch_or_ray():
    code = (
        "import sys, raytrain_vae as rv\n"
        "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))\n"
        "print(rv.train.__module__, rv.evaluate.__module__, rv.load_model.__module__)\n"
        "from raytrain_vae import train, evaluate\n"
        "print(train is rv.train and evaluate is rv.evaluate and callable(train))\n"
    )
    proc = python("-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "[]",  # `import raytrain_vae` alone loads neither
        "raytrain_vae.api raytrain_vae.api raytrain_vae.export",
        "True",
    ]
    assert set(dir(raytrain_vae)) >= NAMES and set(raytrain_vae.__all__) >= NAMES
    assert raytrain_vae.search is api.search and raytrain_vae.load_config is load_config
    with pytest.raises(AttributeError, match="no attribute 'fit'"):
        raytrain_vae.fit  # noqa: B018


def test_the_old_module_names_run_with_m_and_refuse_an_import():
    for name, module in (("train", "training"), ("evaluate", "evaluation")):
        with pytest.raises(ImportError, match=f"raytrain_vae.{module}"):
            __import__(f"raytrain_vae.{name}")
        assert callable(getattr(raytrain_vae, name))  # the failed import left the function
        proc = python("-m", f"raytrain_vae.{name}", "--help")
        assert proc.returncode == 0 and f"usage: python -m raytrain_vae.{name}" in proc.stdout


def test_a_config_resolves_from_a_name_a_path_or_a_config_with_overrides(tmp_path):
    by_name = api.resolved("quickstart", ["train.lr=1e-3"])
    assert by_name.run.name == "quickstart" and by_name.train.lr == 1e-3
    path = tmp_path / "c.yaml"
    path.write_text("train: {epochs: 7}\n")
    assert api.resolved(path).train.epochs == 7
    changed = api.resolved(by_name, ["model.channels=[8,16]", "train.epochs=2"])
    assert changed.model.channels == [8, 16] and changed.train.epochs == 2
    assert changed.train.lr == 1e-3 and changed.search == by_name.search  # the rest is kept
    assert api.resolved(by_name) is by_name
    with pytest.raises(ConfigError, match="train.nope"):
        api.resolved(by_name, ["train.nope=1"])
    with pytest.raises(ConfigError, match="train.lr"):
        api.resolved(by_name, ["train.lr=-1"])


@pytest.fixture
def exported(tmp_path) -> Path:
    make_idx_dataset(seed=2, n_train=24, n_test=12, height=28, width=28).write(tmp_path / "data")
    cfg = tiny_config("data.source=mnist", f"data.root={tmp_path / 'data'}", "data.download=false")
    write_model_dir(tmp_path / "ckpt", cfg, metrics={"epoch": 1})
    return export_model(tmp_path / "ckpt", tmp_path / "export")


def test_evaluate_takes_an_export_folder_or_a_model_and_images(exported):
    by_folder = raytrain_vae.evaluate(exported, k=4, limit=8)
    direct = evaluate_export(exported, "test", 8, 4)
    direct.pop("seconds"), by_folder.pop("seconds")
    assert by_folder == direct and by_folder["images"] == 8 and by_folder["split"] == "test"

    model = raytrain_vae.load_model(exported)
    images, _ = split_images(load_config(exported / "config.yaml").data, "test", None)
    by_model = raytrain_vae.evaluate(model, images, k=4, seed=1)
    assert by_model == evaluate_images(model, images, 4, 100, 1)
    assert raytrain_vae.evaluate(exported, images, k=4, seed=1) == by_model
    assert raytrain_vae.evaluate(model, images, k=0, limit=3)["images"] == 3
    with pytest.raises(ValueError, match="needs images"):
        raytrain_vae.evaluate(model)
    assert isinstance(images, torch.Tensor) and images.dtype == torch.uint8


def readme_example() -> str:
    """The first Python block of the README's 'Python API' section (run by test_commands)."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_a_deprecation_warning_from_our_code_fails_the_suite():
    """pyproject's filterwarnings turns a DeprecationWarning (or FutureWarning) attributed to a
    raytrain_vae module into an error in every test; another library's stays quiet."""
    for category in (DeprecationWarning, FutureWarning):
        with pytest.raises(category):
            warnings.warn_explicit("old", category, "x.py", 1, module="raytrain_vae.generate")
    warnings.warn_explicit("old", DeprecationWarning, "x.py", 1, module="ray.data.dataset")


def test_evaluate_leaves_the_callers_random_state_mode_and_device(exported):
    model = raytrain_vae.load_model(exported).train()
    images, _ = split_images(load_config(exported / "config.yaml").data, "test", None)
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    first = raytrain_vae.evaluate(model, images, k=2)
    assert torch.equal(torch.rand(3), expected)  # as if evaluate had not drawn anything
    assert model.training and next(model.parameters()).device.type == "cpu"
    assert raytrain_vae.evaluate(model, images, k=2) == first  # its own seed, every time


def test_json_mode_keeps_stdout_clean_when_the_work_fails():
    """stdout_to_stderr: lines printed inside go to stderr, at the file descriptor too, and
    stdout comes back when an exception leaves the block."""
    code = (
        "import os, sys\n"
        "from raytrain_vae.cli import stdout_to_stderr\n"
        "try:\n"
        "    with stdout_to_stderr(True):\n"
        "        print('inside', flush=True)\n"
        "        os.write(1, b'raw\\n')\n"
        "        raise ValueError('boom')\n"
        "except ValueError:\n"
        "    print('after')\n"
    )
    proc = python("-c", code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "after\n"
    assert "inside" in proc.stderr and "raw" in proc.stderr
