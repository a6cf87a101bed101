"""The README documents every config key (and only real ones) and the commands CI runs."""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path

from pydantic import BaseModel

from raytrain_vae.config import Config

REPO = Path(__file__).resolve().parents[1]


def _section_models(annotation: object) -> list[type[BaseModel]]:
    """The BaseModel classes a field holds: itself, or every model of a (optional) union."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _section_models(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        models = [m for a in args for m in _section_models(a)]
        if models and len(models) == len(args):
            return models
    return []


def dotted_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every leaf config key as a full dotted path (`train.lr`, `search.scheduler.type`)."""
    keys: list[str] = []
    for name, field in model.model_fields.items():
        sections = _section_models(field.annotation)
        if sections:
            for section in sections:
                keys += [k for k in dotted_keys(section, f"{prefix}{name}.") if k not in keys]
        else:
            keys.append(prefix + name)
    return keys


def readme_config_keys() -> list[str]:
    """The keys in the first column of the README's "Config reference" table."""
    readme = (REPO / "README.md").read_text()
    match = re.search(r"^## Config reference\n(.*?)(?=^## )", readme, re.M | re.S)
    assert match, "README has no '## Config reference' section"
    keys = re.findall(r"^\| `([^`]+)` \|", match.group(1), re.M)
    assert keys, "README's config reference has no table of keys"
    return keys


def test_config_walk_finds_nested_keys():
    keys = dotted_keys(Config)
    assert "train.lr" in keys and "search.scheduler.grace_period" in keys
    assert len(keys) == len(set(keys))
    assert not any(k in {"data", "model", "train", "search", "search.scheduler"} for k in keys)


def test_readme_documents_every_config_key():
    documented = set(readme_config_keys())
    missing = [k for k in dotted_keys(Config) if k not in documented]
    assert not missing, f"README config reference lacks {missing}"


def test_readme_documents_only_real_config_keys():
    listed = readme_config_keys()
    real = set(dotted_keys(Config))
    unknown = [k for k in listed if k not in real]
    assert not unknown, f"README config reference lists keys that are not in Config: {unknown}"
    duplicated = sorted({k for k in listed if listed.count(k) > 1})
    assert not duplicated, f"README config reference lists keys twice: {duplicated}"


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


def test_every_local_link_of_the_readme_and_docs_exists():
    # The lab notes and the module map left the README for docs/; their links must hold.
    readme = (REPO / "README.md").read_text()
    assert "(docs/performance.md)" in readme and "(docs/layout.md)" in readme
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)\)", page.read_text()):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.name} links to {target}"


def test_docs_layout_names_every_module():
    layout = (REPO / "docs" / "layout.md").read_text()
    for path in sorted((REPO / "raytrain_vae").iterdir()):
        if path.suffix == ".py" and path.name != "__init__.py":
            assert f"`{path.name}`" in layout, path.name
        elif path.is_dir() and (path / "__init__.py").exists():
            assert f"`{path.name}/`" in layout, path.name
