"""The one CLI (`raytrain-vae`, `python -m raytrain_vae`): subcommands, complete --help,
--version, `config`, shipped configs by name, and a wheel that runs away from the checkout (the
README's Python example, generate, evaluate and images from it)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from test_api import readme_example
from test_readme import dotted_keys

from raytrain_vae import __version__
from raytrain_vae.commands import COMMANDS, config_main, main
from raytrain_vae.config import ConfigError, load_config
from raytrain_vae.evaluation import main as evaluate_main
from raytrain_vae.generate import build_parser

REPO = Path(__file__).resolve().parents[1]


def help_of(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exited:
        main(list(argv))
    assert exited.value.code == 0
    return capsys.readouterr().out


def test_version_and_the_list_of_commands(capsys):
    assert help_of(capsys, "--version").strip() == f"raytrain-vae {__version__}"
    top = help_of(capsys, "--help")
    for name in COMMANDS:
        assert f"\n  {name} " in top
    with pytest.raises(SystemExit) as exited:
        main(["bogus"])
    assert exited.value.code == 2


@pytest.mark.parametrize("command", ["train", "tune", "evaluate", "images", "config"])
def test_each_command_has_its_own_complete_help(capsys, command: str):
    text = help_of(capsys, command, "--help")
    assert text.startswith(f"usage: raytrain-vae {command} ")
    assert "example" in text
    if command in ("train", "tune"):
        assert "raytrain-vae config --schema" in text and "tracking  MLflow" in text
    if command == "tune":
        assert "loguniform" in text  # the search-space syntax


def flags_without_help(parser) -> list[str]:
    return [a.dest for a in parser._actions if not a.help and a.dest != "help"]  # noqa: SLF001


def test_every_flag_says_what_it_does_and_its_default(capsys):
    sample = help_of(capsys, "generate", "sample", "--help")
    assert "--batch-size BATCH_SIZE\n" in sample and "(default: 1024)" in sample
    subparsers = build_parser()._subparsers._group_actions[0].choices  # noqa: SLF001
    for name, parser in subparsers.items():
        assert flags_without_help(parser) == [], name
    with pytest.raises(SystemExit):
        evaluate_main(["--help"])
    assert "(default: 1000)" in capsys.readouterr().out


def test_config_prints_the_resolved_config_and_the_schema(capsys):
    assert config_main(["quickstart", "train.lr=1e-3"], "raytrain-vae config") == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == load_config("quickstart", ["train.lr=1e-3"]).model_dump(mode="json")
    assert printed["train"]["lr"] == 1e-3
    assert config_main(["--schema"], "raytrain-vae config") == 0
    schema = capsys.readouterr().out
    for key in dotted_keys(load_config().__class__):
        assert f"\n{key} = " in f"\n{schema}", key


def test_shipped_configs_load_by_name_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config("quickstart").run.name == "quickstart"
    with pytest.raises(ConfigError, match="no shipped config of that name.*quickstart"):
        load_config("quickstrat")
    (tmp_path / "quickstart").write_text("run: {name: mine}\n")  # a file here wins
    assert load_config("quickstart").run.name == "mine"


def test_python_dash_m_runs_the_cli():
    proc = subprocess.run(
        [sys.executable, "-m", "raytrain_vae", "config", "vae", "run.name=x"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["run"]["name"] == "x"


def build_wheel(folder: Path) -> Path:
    build = [sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "-w", str(folder)]
    setuptools = importlib.metadata.version("setuptools")
    if int(setuptools.split(".")[0]) >= 77:
        build.append("--no-build-isolation")  # no download when this venv can build it
    subprocess.run(build, check=True, capture_output=True, timeout=300)
    (wheel,) = folder.glob(f"raytrain_vae-{__version__}-*.whl")  # pyproject reads the version
    return wheel


def install_in_new_venv(wheel: Path, fresh: Path) -> Path:
    """A new venv holding only the wheel (its dependencies are this venv's); its bin folder."""
    venv.create(fresh, with_pip=True)
    python = fresh / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    deps = next(p for p in sys.path if p.endswith("site-packages"))
    (Path(site) / "dependencies.pth").write_text(deps + "\n")  # torch, ray, ... from here
    subprocess.run(
        [python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
        check=True, timeout=300,
    )  # fmt: skip
    return fresh / "bin"


@pytest.mark.slow
def test_the_wheel_runs_the_readme_example_and_the_clis_away_from_the_checkout(tmp_path):
    """The wheel holds the configs, LICENSE and py.typed. Installed into a new venv, from
    another folder (HOME there too: the quickstart stores runs in ~/ray_results): the README's
    Python example (a search, evaluate, a training run), then `generate sample`, `evaluate
    --json` and `images` on its export, each with its progress lines."""
    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    for member in ("raytrain_vae/py.typed", "raytrain_vae/configs/quickstart.yaml"):
        assert member in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    bin_dir = install_in_new_venv(wheel, tmp_path / "venv")
    away = tmp_path / "elsewhere"
    away.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"HOME": str(away)}

    def run(*argv: object, timeout: float = 300) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [str(a) for a in argv], cwd=away, env=env, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc

    assert yaml.safe_load(run(bin_dir / "raytrain-vae", "config", "quickstart").stdout)["run"] == (
        load_config("quickstart").run.model_dump(mode="json")
    )
    where = run(bin_dir / "python", "-c", "import raytrain_vae; print(raytrain_vae.__file__)")
    assert where.stdout.startswith(str(tmp_path / "venv")), where  # the wheel's, not the checkout

    example = run(bin_dir / "python", "-c", readme_example(), timeout=600).stdout.splitlines()
    assert any(line.startswith("test negative ELBO ") for line in example), example
    final = Path(example[-1].split()[0])
    assert final.parent == away / "ray_results" / "raytrain_vae" / "notebook"
    export = away / "exports" / "quickstart"

    cli = bin_dir / "raytrain-vae"
    sampled = run(cli, "generate", "sample", "--model", export, "--num-samples", 64,
                  "--output", away / "samples")  # fmt: skip
    assert pq.read_table(away / "samples").num_rows == 64 and "rows/s" in sampled.stdout
    scored = run(cli, "evaluate", "--model", export, "--k", 5, "--limit", 100, "--json")
    metrics = json.loads(scored.stdout)
    assert metrics["images"] == 100 and metrics["iwae_k"] == 5
    assert "evaluate: 100/100 images scored" in scored.stderr
    drawn = run(cli, "images", "--model", export, "--output", away / "pictures")
    assert "images: 3/3 pictures drawn" in drawn.stderr
    for name in ("samples.png", "reconstructions.png", "interpolations.png"):
        assert Image.open(away / "pictures" / name).width >= 512, name
