"""Cluster files: launcher YAMLs pass Ray's own schema offline; KubeRay jobs run real commands."""

from __future__ import annotations

import copy
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from raytrain_vae.config import load_config
from raytrain_vae.generate import build_parser

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = sorted((REPO / "cluster").glob("*.yaml"))
KUBERAY = sorted((REPO / "cluster" / "kuberay").glob("*.yaml"))


def validate_launcher(config: dict) -> None:
    """Ray's cluster-launcher check (private API, wrapped here only): fill defaults, validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def test_there_are_launcher_configs_for_aws_and_gcp():
    assert {p.name for p in LAUNCHER} >= {"aws.yaml", "gcp.yaml"}


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_yaml_passes_rays_schema(path):
    config = yaml.safe_load(path.read_text())
    validate_launcher(config)
    head = config["head_node_type"]
    assert config["available_node_types"][head]["resources"] == {}  # no training on the head
    assert any("pip install" in c and "raytrain_vae" in c for c in config["setup_commands"])
    assert all("--dashboard-host=0.0.0.0" not in c for c in config["head_start_ray_commands"])


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_every_launched_node_starts_with_token_auth_and_the_token(path):
    # Ray 2.60 starts `ray start` without authentication unless RAY_AUTH_MODE=token, and then
    # needs the token on the node: the user's ~/.ray/auth_token is copied to every node.
    config = yaml.safe_load(path.read_text())
    user = config["auth"]["ssh_user"]
    assert config["file_mounts"][f"/home/{user}/.ray/auth_token"] == "~/.ray/auth_token"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token ray start" in c for c in starts), key
    assert "ray get-auth-token --generate" in path.read_text()  # the header's first command


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_every_kuberay_cluster_turns_token_auth_on(path):
    spec = yaml.safe_load(path.read_text())["spec"]["rayClusterSpec"]
    assert spec["authOptions"] == {"mode": "token"}
    # The submitter pod and the operator call the jobs API through the head's Service: a
    # dashboard bound to the pod's loopback would leave the job unsubmitted.
    assert "dashboard-host" not in spec["headGroupSpec"]["rayStartParams"]


def test_schema_check_is_real():
    config = yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())
    config["max_workers"] = "many"
    with pytest.raises(jsonschema.ValidationError, match="not of type 'integer'"):
        validate_launcher(config)


def test_there_are_rayjobs_for_the_search_and_for_sampling():
    entry = {p.name: yaml.safe_load(p.read_text())["spec"]["entrypoint"] for p in KUBERAY}
    assert any("raytrain_vae.tune" in e for e in entry.values())
    assert any("raytrain_vae.generate sample" in e for e in entry.values())


@pytest.mark.parametrize("path", KUBERAY, ids=lambda p: p.name)
def test_kuberay_rayjob_has_required_fields_and_a_real_entrypoint(path):
    job = yaml.safe_load(path.read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["metadata"]["name"]
    spec = job["spec"]
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert "rayStartParams" in head and head["template"]["spec"]["containers"][0]["image"]
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"] and group["template"]["spec"]["containers"][0]["image"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "-m"]
    module, args = argv[2], argv[3:]
    if module in {"raytrain_vae.tune", "raytrain_vae.train"}:
        load_config(REPO / args[0], args[1:])  # the config file exists and every override is valid
    else:
        assert module == "raytrain_vae.generate"
        build_parser().parse_args(args)
