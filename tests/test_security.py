"""Security: nothing untrusted is unpickled, Ray's token auth is never turned off, and nothing
the project starts listens beyond loopback by default."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import pytest
import torch

from raytrain_vae.checkpoint import load_checkpoint
from raytrain_vae.config import Config, dump_config, load_config
from raytrain_vae.model_io import (
    CONFIG_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    ModelFileError,
    save_weights,
)
from raytrain_vae.models.conv import ConvVAE

REPO = Path(__file__).resolve().parents[1]
SHIPPED = [
    *(REPO / "raytrain_vae").rglob("*.py"),
    *(REPO / "benchmarks").rglob("*.py"),
    *(REPO / "configs").rglob("*.yaml"),
    *(REPO / "cluster").rglob("*.yaml"),
    *(REPO / "cluster").rglob("*.md"),
    REPO / "README.md",
    REPO / ".ci" / "run",
]


def shipped_text() -> dict[Path, str]:
    return {p: p.read_text() for p in SHIPPED}


def test_no_code_unpickles():
    for path in (REPO / "raytrain_vae").rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"pickle\.loads?\(|cloudpickle|joblib\.load", text), path
        for call in re.findall(r"torch\.load\([^)]*\)", text, flags=re.S):
            assert "weights_only=True" in call, f"{path}: {call}"


def test_token_auth_is_never_disabled_and_dashboards_stay_on_loopback():
    for path, text in shipped_text().items():
        text = text.replace("Never set `RAY_AUTH_MODE=disabled`", "")  # the README's warning
        assert not re.search(r"RAY_AUTH_MODE\s*[=:]\s*['\"]?disabled", text), path
        assert "auth_mode" not in text.lower().replace("ray_auth_mode", ""), path
        assert not re.search(r"dashboard[-_]host\s*[=:]?\s*['\"]?0\.0\.0\.0", text), path


def test_readme_says_how_ray_job_submit_gets_the_token():
    readme = (REPO / "README.md").read_text()
    cluster = (REPO / "cluster" / "README.md").read_text()
    assert "RAY_AUTH_MODE=token" in readme
    assert "RAY_AUTH_TOKEN" in readme + cluster


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_checkpoint(folder: Path, cfg: Config) -> ConvVAE:
    folder.mkdir()
    model = ConvVAE(cfg.model, (1, 28, 28))
    save_weights(model, folder / MODEL_FILE)
    (folder / CONFIG_FILE).write_text(dump_config(cfg))
    (folder / "state.json").write_text('{"epoch": 1, "step": 3, "history": []}')
    return model


def test_resume_refuses_a_pickled_payload_in_the_optimizer_state(tmp_path):
    cfg = load_config(None, ["model.channels=[4,8]", "model.hidden_dim=8"])
    folder = tmp_path / "checkpoint"
    model = write_checkpoint(folder, cfg)
    marker = tmp_path / "pwned"
    with open(folder / OPTIMIZER_FILE, "wb") as f:
        pickle.dump({"state": _Exploit(marker), "param_groups": []}, f)
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(ModelFileError, match="refused, not a plain tensor state") as info:
        load_checkpoint(folder, model, optimizer, cfg, torch.device("cpu"))
    assert "\n" not in str(info.value)
    assert not marker.exists(), "the pickled payload ran"


def test_resume_loads_a_plain_optimizer_state(tmp_path):
    cfg = load_config(None, ["model.channels=[4,8]", "model.hidden_dim=8"])
    folder = tmp_path / "checkpoint"
    model = write_checkpoint(folder, cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.rand(2, 1, 28, 28))[0].sum().backward()
    optimizer.step()
    torch.save(optimizer.state_dict(), folder / OPTIMIZER_FILE)
    fresh = torch.optim.AdamW(model.parameters(), lr=0.5)
    state = load_checkpoint(folder, model, fresh, cfg, torch.device("cpu"))
    assert state.epoch == 1 and fresh.param_groups[0]["lr"] == 0.01
