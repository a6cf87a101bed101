"""The README documents every config key and the commands CI runs."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from raytrain_vae.config import Config

REPO = Path(__file__).resolve().parents[1]


def dotted_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += dotted_keys(ann, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def test_readme_documents_every_config_key():
    readme = (REPO / "README.md").read_text()
    missing = [k for k in dotted_keys(Config) if f"`{k}`" not in readme]
    assert not missing, f"README config reference lacks {missing}"


def test_example_configs_list_every_key():
    training = (REPO / "configs" / "vae.yaml").read_text()
    searching = (REPO / "configs" / "search.yaml").read_text()
    for key in dotted_keys(Config):
        text = searching if key.split(".")[0] in {"search", "export"} else training
        leaf = key.split(".")[-1]
        assert f"  {leaf}:" in text or f"{{{leaf}:" in text or f", {leaf}:" in text, key


def test_ci_runs_the_readme_commands():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    for command in ('pip install -e ".[dev]"', "python -m pytest"):
        assert command in readme and command in ci, command
