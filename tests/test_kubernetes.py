"""deploy/kubernetes: every kustomization rendered with `kubectl kustomize` (the kustomize
built into kubectl, offline), each object validated against the schemas of the Kubernetes
versions still supported (kubernetes-validate), and what the relay needs of them checked
against the relay itself: its config, its ports, its drain deadline, its uid."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import Version, all_versions
from test_docker import dockerfile

from relay.cli import build_parser
from relay.config import env as envconfig
from relay.config import records as config_mod

ROOT = Path(__file__).resolve().parent.parent
KUBE = ROOT / "deploy" / "kubernetes"
KUSTOMIZATIONS = sorted(p.parent for p in KUBE.rglob("kustomization.yaml"))
# Kubernetes supports its three newest minor releases: the newest three of those the
# installed kubernetes-validate has schemas for (`pip install -U kubernetes-validate` to move).
SUPPORTED = sorted({".".join(v.split(".")[:2]) for v in all_versions()}, key=Version)[-3:]


@functools.cache
def render(directory: Path) -> tuple[dict[str, Any], ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        reason = "kubectl (with its built-in kustomize) is not installed: scripts/setup adds it"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    result = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d)


def find(docs: tuple[dict[str, Any], ...], kind: str, name: str | None = None
         ) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind
             and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


def relay_container(pod: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in pod.get("initContainers", []) + pod["containers"]
                if c["image"].startswith("m365relay"))


def test_every_kustomization_is_found() -> None:
    names = {str(p.relative_to(KUBE)) for p in KUSTOMIZATIONS}
    assert names == {"base", "overlays/workload-identity", "overlays/sidecar"}
    # Cluster mode (several replicas on a PostgreSQL queue) does not exist yet: a stub says so.
    assert "does not exist yet" in (KUBE / "overlays/cluster/README.md").read_text()
    assert SUPPORTED and all(Version(v) >= Version("1.33") for v in SUPPORTED)


@pytest.mark.parametrize("version", SUPPORTED)
@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(KUBE)))
def test_renders_and_validates_against_the_schemas(directory: Path, version: str) -> None:
    docs = render(directory)
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def _config(docs: tuple[dict[str, Any], ...], tmp_path: Path, env: dict[str, str] | None = None
            ) -> config_mod.Config:
    """The ConfigMap's m365relay.yaml as the relay parses it; files it names stand in here."""
    text = find(docs, "ConfigMap")["data"]["m365relay.yaml"]
    secret = tmp_path / "client-secret"
    secret.write_text("value from the Secret")
    text = text.replace("/var/run/secrets/m365relay/client-secret", str(secret))
    text = text.replace("/var/spool/m365relay", str(tmp_path / "spool"))
    old = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        return config_mod.parse(yaml.safe_load(text), base_dir=tmp_path)
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key)
            else:
                os.environ[key] = value


def test_statefulset_keeps_the_spool_and_runs_locked_down(tmp_path: Path) -> None:
    docs = render(KUBE / "base")
    sts = find(docs, "StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    container = relay_container(pod)
    config = _config(docs, tmp_path)

    # The spool is a PersistentVolumeClaim mounted where the config keeps it.
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == claim["metadata"]["name"])
    assert mount["mountPath"] == envconfig.DEFAULT_SPOOL
    assert config.spool.directory == tmp_path / "spool"

    # The config is the ConfigMap; the client secret a Secret; both where the config says.
    args = build_parser().parse_args(container["args"])
    assert str(args.config) == "/etc/m365relay/m365relay.yaml"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert {m["name"] for m in container["volumeMounts"]} <= set(volumes) | {"spool"}
    assert volumes["config"]["configMap"]["name"] == find(docs, "ConfigMap")["metadata"]["name"]
    assert volumes["credentials"]["secret"]["secretName"] == "m365relay-credentials"

    # Drain deadline inside the grace period, with room to exit.
    assert pod["terminationGracePeriodSeconds"] >= args.shutdown_timeout + 10

    # Probes on the relay's HTTP endpoint.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert config.http is not None and config.http.port == ports["http"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert {lis.port for lis in config.listeners} == {ports["smtp"], ports["submission"]}

    # Non-root as the image's uid, read-only root, no capabilities, seccomp.
    uid = int(dockerfile()[-1].last("USER").split(":")[0])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == uid
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"] == {"allowPrivilegeEscalation": False,
                                            "readOnlyRootFilesystem": True,
                                            "capabilities": {"drop": ["ALL"]}}


def test_service_and_disruption_budget_select_the_relay() -> None:
    docs = render(KUBE / "base")
    labels = find(docs, "StatefulSet")["spec"]["template"]["metadata"]["labels"]
    service = find(docs, "Service", "m365relay")
    assert service["spec"]["selector"].items() <= labels.items()
    assert {(p["port"], p["targetPort"]) for p in service["spec"]["ports"]} >= {
        (25, "smtp"), (587, "submission")}
    pdb = find(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert find(docs, "StatefulSet")["spec"]["serviceName"] == "m365relay-headless"
    find(docs, "Service", "m365relay-headless")


def test_workload_identity_needs_no_secret(tmp_path: Path) -> None:
    docs = render(KUBE / "overlays" / "workload-identity")
    account = find(docs, "ServiceAccount")
    pod = find(docs, "StatefulSet")["spec"]["template"]
    assert pod["spec"]["serviceAccountName"] == account["metadata"]["name"]
    assert pod["metadata"]["labels"]["azure.workload.identity/use"] == "true"
    token = tmp_path / "azure-identity-token"
    token.write_text("eyJ.projected.token")
    config = _config(docs, tmp_path, {"AZURE_FEDERATED_TOKEN_FILE": str(token)})
    (app,) = config.apps.values()
    assert app.client_secret is None
    assert app.client_assertion is not None and app.client_assertion.file == token
    assert account["metadata"]["annotations"]["azure.workload.identity/client-id"] == \
        app.client_id
    container = relay_container(pod["spec"])
    assert "credentials" not in {v["name"] for v in pod["spec"]["volumes"]}
    assert "credentials" not in {m["name"] for m in container["volumeMounts"]}
    # Only that mount goes: the config and the spool stay where the relay looks for them.
    assert {m["name"]: m["mountPath"] for m in container["volumeMounts"]} == {
        "config": "/etc/m365relay", "spool": envconfig.DEFAULT_SPOOL}
    assert not any(d["kind"] == "Secret" for d in docs)


def test_sidecar_app_sends_to_localhost_2525(tmp_path: Path) -> None:
    docs = render(KUBE / "overlays" / "sidecar")
    pod = find(docs, "Deployment")["spec"]["template"]["spec"]
    relay = relay_container(pod)
    assert relay["restartPolicy"] == "Always"  # a native sidecar: up before the app
    assert relay in pod["initContainers"]
    env = {e["name"]: e["value"] for e in relay["env"]}
    secret = tmp_path / "client-secret"
    secret.write_text("value from the Secret")
    env |= {"M365RELAY_CLIENT_SECRET_FILE": str(secret),
            "M365RELAY_SPOOL": str(tmp_path / "spool")}
    config = envconfig.from_env(env)
    assert [(lis.host, lis.port) for lis in config.listeners] == [("127.0.0.1", 2525)]
    (app,) = pod["containers"]
    app_env = {e["name"]: e["value"] for e in app["env"]}
    assert (app_env["SMTP_HOST"], app_env["SMTP_PORT"]) == ("localhost", "2525")
    args = build_parser().parse_args(relay["args"])
    assert args.config_from_env
    assert pod["terminationGracePeriodSeconds"] >= args.shutdown_timeout + 10
    probe = build_parser().parse_args(relay["startupProbe"]["exec"]["command"][1:])
    assert probe.func.__name__ == "cmd_healthcheck" and probe.config_from_env
    assert relay["securityContext"]["readOnlyRootFilesystem"] is True
    assert relay["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
