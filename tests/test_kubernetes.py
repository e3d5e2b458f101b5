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
# What the Secret m365relay-database holds in the tests (its password must stay out of sight).
DATABASE_URL = "postgresql://m365relay:Pw0fTheSecret@db.example.com/m365relay?sslmode=verify-full"


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
    """The container that serves (not cluster mode's `db upgrade` init container)."""
    return next(c for c in pod.get("initContainers", []) + pod["containers"]
                if c["image"].startswith("m365relay") and c.get("args", [""])[0] == "serve")


def workloads(docs: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]


def test_every_kustomization_is_found() -> None:
    names = {str(p.relative_to(KUBE)) for p in KUSTOMIZATIONS}
    assert names == {"base", "overlays/workload-identity", "overlays/sidecar",
                     "overlays/cluster"}
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
    database = tmp_path / "database-url"
    database.write_text(f"{DATABASE_URL}\n")  # kubectl create secret --from-file keeps it
    text = text.replace("/var/run/secrets/m365relay-database/database-url", str(database))
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


def test_cluster_runs_replicas_on_the_database(tmp_path: Path) -> None:
    docs = render(KUBE / "overlays" / "cluster")
    assert not [d for d in docs if d["kind"] in ("StatefulSet", "PersistentVolumeClaim")]
    assert not [d for d in docs if d["metadata"]["name"] == "m365relay-headless"]
    deployment = find(docs, "Deployment")
    assert deployment["spec"]["replicas"] >= 2
    pod = deployment["spec"]["template"]["spec"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    relay = relay_container(pod)
    args = build_parser().parse_args(relay["args"])

    # The config parses with the relay's own parser, in cluster mode; the node is the pod.
    config = _config(docs, tmp_path, {"POD_NAME": "m365relay-6d5f8b7c9-x2x7q"})
    spool = config.spool
    assert spool.clustered and spool.directory is None
    assert spool.node == "m365relay-6d5f8b7c9-x2x7q"
    assert spool.postgres is not None and spool.postgres.sslmode == "verify-full"
    assert "Pw0fTheSecret" not in repr(config)
    assert spool.upgrade_schema is False  # the init container's job
    for container in pod["initContainers"] + pod["containers"]:
        (pod_name,) = [e for e in container["env"] if e["name"] == "POD_NAME"]
        assert pod_name["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}

    # The schema first: `db upgrade` with the same image and the same config file.
    (init,) = pod["initContainers"]
    upgrade = build_parser().parse_args(init["args"])
    assert upgrade.func.__module__ == "relay.queue.db" and upgrade.db_action == "upgrade"
    assert upgrade.config == args.config and init["image"] == relay["image"]
    assert "restartPolicy" not in init  # runs to completion before the relay starts
    volumes = {v["name"]: v for v in pod["volumes"]}
    database = volumes["database"]["secret"]
    assert database["secretName"] == "m365relay-database"
    text = find(docs, "ConfigMap")["data"]["m365relay.yaml"]
    path = yaml.safe_load(text)["spool"]["postgres"]["file"]
    for container in (init, relay):
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts[str(Path(path).parent)] == "database"
        assert mounts[str(args.config.parent)] == "config"
        assert container["securityContext"] == {"allowPrivilegeEscalation": False,
                                                "readOnlyRootFilesystem": True,
                                                "capabilities": {"drop": ["ALL"]}}
    # No spool volume: nothing of a pod's outlives it but what is in the database.
    assert envconfig.DEFAULT_SPOOL not in {m["mountPath"] for m in relay["volumeMounts"]}
    assert all("secret" in v or "configMap" in v for v in volumes.values())

    assert relay["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert config.http is not None and config.http.port == next(
        p["containerPort"] for p in relay["ports"] if p["name"] == "http")
    assert pod["terminationGracePeriodSeconds"] >= args.shutdown_timeout + 10
    assert pod["securityContext"]["runAsUser"] == int(
        dockerfile()[-1].last("USER").split(":")[0])

    # One relay at least through drains; spread over nodes and zones.
    pdb = find(docs, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1 and "maxUnavailable" not in pdb["spec"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    spread = {c["topologyKey"]: c for c in pod["topologySpreadConstraints"]}
    assert set(spread) == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    assert all(c["labelSelector"]["matchLabels"].items() <= labels.items()
               for c in spread.values())

    # The clients' own addresses reach the relay (accounts by `networks`, per-IP limits).
    service = find(docs, "Service", "m365relay")
    assert service["spec"]["type"] == "LoadBalancer"
    assert service["spec"]["externalTrafficPolicy"] == "Local"
    assert service["spec"]["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} == {"smtp", "submission"}


def _spool_of(docs: tuple[dict[str, Any], ...], container: dict[str, Any]
              ) -> tuple[bool, str]:
    """(clustered, the spool directory) of a serving relay: its ConfigMap or its variables."""
    args = build_parser().parse_args(container["args"])
    env = {e["name"]: e.get("value", "") for e in container.get("env", [])}
    if args.config is None:
        assert args.config_from_env
        clustered = bool({"M365RELAY_DATABASE_URL", "M365RELAY_DATABASE_URL_FILE"} & set(env))
        return clustered, env.get("M365RELAY_SPOOL", envconfig.DEFAULT_SPOOL)
    spool = yaml.safe_load(find(docs, "ConfigMap")["data"]["m365relay.yaml"])["spool"]
    return "postgres" in spool, spool.get("directory", "")


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(KUBE)))
def test_several_replicas_only_on_the_database(directory: Path) -> None:
    """A file spool on a ReadWriteOnce volume is one pod's: a second replica behind the same
    Service would have its own spool, and mail queued there waits for a pod that may never
    come back. Several replicas: spool.postgres, or a sidecar's spool that is its pod's own."""
    for workload in workloads(render(directory)):
        pod = workload["spec"]["template"]["spec"]
        replicas = workload["spec"].get("replicas", 1)
        clustered, spool_dir = _spool_of(render(directory), relay_container(pod))
        mounts = {m["mountPath"]: m["name"] for m in relay_container(pod)["volumeMounts"]}
        claims = {c["metadata"]["name"] for c in workload["spec"].get("volumeClaimTemplates", [])}
        claims |= {v["name"] for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}
        name = workload["metadata"]["name"]
        if clustered:
            assert spool_dir not in mounts and not claims, f"{name}: a spool volume unused"
        elif mounts[spool_dir] in claims:
            assert replicas == 1, f"{name}: {replicas} replicas on one file spool's volume"
        else:
            (volume,) = [v for v in pod["volumes"] if v["name"] == mounts[spool_dir]]
            assert "emptyDir" in volume, f"{name}: the spool on {volume}"
