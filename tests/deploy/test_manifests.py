"""Offline checks of deploy/: the manifests parse, carry what Kubernetes and we need, and use only
flags and environment variables the kvmesh CLI actually has."""

from __future__ import annotations

import argparse
import importlib
import re
from pathlib import Path

import pytest
import yaml

from services.cli import COMMANDS

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S = DEPLOY / "k8s"
IMAGE = "ghcr.io/kvmesh/kvmesh:0.1.0"
# KVMESH_* variables the code reads (tests below check each occurs in the source tree)
SOURCE_DIRS = ("services", "transport", "kernels")


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def base_docs() -> list[dict]:
    kustomization = _docs(K8S / "kustomization.yaml")[0]
    return [d for name in kustomization["resources"] for d in _docs(K8S / name)]


def deployments() -> list[dict]:
    return [d for d in base_docs() if d["kind"] == "Deployment"]


def containers() -> list[tuple[str, dict]]:
    return [(d["metadata"]["name"], c) for d in deployments() for c in d["spec"]["template"]["spec"]["containers"]]


def kvmesh_parser(command: str) -> argparse.ArgumentParser:
    module_name, _ = COMMANDS[command]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        pytest.skip(f"`kvmesh {command}` ({module_name}) is not in this build yet")
    parser = argparse.ArgumentParser(prog=f"kvmesh {command}", exit_on_error=False)
    module.add_arguments(parser)
    return parser


def test_every_yaml_file_parses_and_is_listed():
    listed = set(_docs(K8S / "kustomization.yaml")[0]["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    for path in DEPLOY.rglob("*.yaml"):
        assert _docs(path), path


def test_deployments_select_their_own_pods_and_name_image_and_resources():
    assert {d["metadata"]["name"] for d in deployments()} == {
        "kvmesh-router", "kvmesh-worker", "kvmesh-memserver-gpu", "kvmesh-memserver-cpu"}
    for d in deployments():
        assert d["apiVersion"] == "apps/v1"
        selector = d["spec"]["selector"]["matchLabels"]
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), d["metadata"]["name"]
    for name, c in containers():
        assert c["image"] == IMAGE
        requests, limits = c["resources"]["requests"], c["resources"]["limits"]
        assert {"cpu", "memory"} <= requests.keys() and {"cpu", "memory"} <= limits.keys(), name


def test_gpu_roles_ask_for_exactly_one_gpu_and_cpu_memservers_for_none():
    gpus = {name: c["resources"]["limits"].get("nvidia.com/gpu") for name, c in containers()}
    assert gpus == {"kvmesh-router": None, "kvmesh-worker": 1, "kvmesh-memserver-gpu": 1,
                    "kvmesh-memserver-cpu": None}
    for name, c in containers():
        assert c["resources"]["requests"].get("nvidia.com/gpu") == gpus[name]


def test_probes_use_ready_and_health():
    for name, c in containers():
        assert c["livenessProbe"]["httpGet"]["path"] == "/health", name
        ready_path = c["readinessProbe"]["httpGet"]["path"]
        assert ready_path == ("/ready" if name in ("kvmesh-router", "kvmesh-worker") else "/health"), name
        port_names = {p["name"] for p in c["ports"]}
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            if probe in c:
                assert c[probe]["httpGet"]["port"] in port_names


def test_router_service_reaches_the_router_port():
    service = next(d for d in base_docs() if d["kind"] == "Service")
    router = next(d for d in deployments() if d["metadata"]["name"] == "kvmesh-router")
    assert service["spec"]["selector"].items() <= router["spec"]["template"]["metadata"]["labels"].items()
    container_port = router["spec"]["template"]["spec"]["containers"][0]["ports"][0]
    assert service["spec"]["ports"][0]["targetPort"] == container_port["name"]
    assert service["metadata"]["name"] == "kvmesh-router"


def test_cluster_token_comes_from_the_secret_everywhere():
    secret = next(d for d in base_docs() if d["kind"] == "Secret")
    for name, c in containers():
        token = next(e for e in c["env"] if e["name"] == "KVMESH_CLUSTER_TOKEN")
        ref = token["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"], name


def test_ucx_env_and_configmaps_exist():
    configmaps = {d["metadata"]["name"]: d for d in base_docs() if d["kind"] == "ConfigMap"}
    rdma = _docs(K8S / "rdma" / "ucx-rdma.yaml")[0]
    for data in (configmaps["kvmesh-ucx"]["data"], rdma["data"]):
        assert {"UCX_TLS", "UCX_NET_DEVICES"} <= data.keys()
        assert all(k.startswith("UCX_") for k in data)
    assert "rc" in rdma["data"]["UCX_TLS"] and "tcp" in configmaps["kvmesh-ucx"]["data"]["UCX_TLS"]
    for name, c in containers():
        for ref in c.get("envFrom", []):
            assert ref["configMapRef"]["name"] in configmaps, name


def test_kvmesh_env_vars_used_exist_in_the_code():
    source = "\n".join(p.read_text() for d in SOURCE_DIRS for p in (DEPLOY.parent / d).rglob("*.py"))
    text = "\n".join(p.read_text() for p in DEPLOY.rglob("*") if p.is_file() and p.name != "bootstrap.sh")
    used = set(re.findall(r"\bKVMESH_[A-Z_]+\b", text))
    assert used, "expected the manifests to set KVMESH_CLUSTER_TOKEN"
    assert {v for v in used if v not in source} == set()


def _substitute(args: list[str], env: list[dict]) -> list[str]:
    """Kubernetes' $(VAR) expansion, with placeholders for fieldRef values."""
    names = {e["name"] for e in env}

    def sub(arg: str) -> str:
        for var in re.findall(r"\$\((\w+)\)", arg):
            assert var in names, f"$({var}) is not defined in the container env"
            arg = arg.replace(f"$({var})", "10.0.0.1" if var.endswith("IP") else "pod-0")
        return arg

    return [sub(a) for a in args]


CONTAINERS = containers()


@pytest.mark.parametrize("name, container", CONTAINERS, ids=[n for n, _ in CONTAINERS])
def test_container_args_parse_with_the_kvmesh_cli(name, container):
    command, *rest = _substitute(container["args"], container.get("env", []))
    assert command in COMMANDS
    parser = kvmesh_parser(command)
    try:
        parser.parse_args(rest)
    except argparse.ArgumentError as e:
        pytest.fail(f"{name}: kvmesh {command} rejects {rest}: {e}")


def test_dockerfile_entrypoint_is_kvmesh_and_default_command_parses():
    text = (DEPLOY / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["kvmesh"]' in text
    cmd = yaml.safe_load(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    kvmesh_parser(cmd[0]).parse_args(cmd[1:])
    for path in re.findall(r"^COPY (\S+) ", text, re.M):
        assert (DEPLOY.parent / path).exists(), path
    assert "torch==2.13.0" in text  # same pin as bootstrap.sh
