"""The cluster deployment, checked offline with the real tools.

The Helm chart is linted (also ``--strict``) and rendered by the real ``helm`` binary for the default
values and for the combinations an operator actually uses; every rendered object is validated against
the Kubernetes JSON schemas of the oldest supported and a current version (``kubernetes-validate``,
strict: unknown fields fail), and the key fields each template renders are asserted. The StatefulSet's
command is started as a real server that must answer the kubelet's gRPC health check. The ConfigMap and the Secret-fed environment are
loaded by the server's own ``kvstore.config.load_config``, so a chart key the server would reject at
startup fails here. The KubeRay, compose, Dockerfile, Grafana and Prometheus files are checked the same
way: KubeRay pod templates against the core/v1 Pod schema, the Dockerfile with hadolint, the dashboard's
PromQL with promtool. ``scripts/bootstrap.d/helm.sh`` installs helm, hadolint and promtool.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import kubernetes_validate.utils
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvstore.config import load_config, parse_bytes

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "kvstore"
DEPLOY = ROOT / "deploy"
KUBE_VERSION = "1.35.0"
# Objects must validate on the oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and on a current one.
SCHEMA_VERSIONS = ("1.27.0", KUBE_VERSION)
RELEASE = "kvs"
NAMESPACE = "kvstore"
STORE_CONFIG = (
    f"{RELEASE}-kvstore"  # the server's ConfigMap; {RELEASE}-kvstore-client holds the client settings
)

# The metric names kvstore/metrics.py exports (the contract with the server).
COUNTERS = {
    "kvstore_tier_hits_total",
    "kvstore_tier_misses_total",
    "kvstore_tier_evictions_total",
    "kvstore_tier_errors_total",
    "kvstore_integrity_failures_total",
    "kvstore_requests_total",
    "kvstore_blob_bytes_total",
}
GAUGES = {"kvstore_tier_bytes", "kvstore_tier_objects"}
HISTOGRAMS = {"kvstore_request_duration_seconds"}
METRIC_NAMES = COUNTERS | GAUGES | {h + s for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}

# Values scenarios: each is rendered, linted, schema-validated and loaded by the server's config loader.
SCENARIOS: dict[str, dict[str, Any]] = {
    "default": {},
    "redis-internal": {"redis": {"enabled": True, "internal": {"enabled": True}}},
    "redis-external-secret": {
        "redis": {"enabled": True, "existingSecret": "redis-url", "existingSecretUrlKey": "url"}
    },
    "s3-existing-secret": {
        "s3": {
            "enabled": True,
            "endpointUrl": "http://minio.storage:9000",
            "bucket": "kv-prod",
            "existingSecret": "s3-creds",
        },
    },
    "s3-inline": {"s3": {"enabled": True, "accessKeyId": "AKIAEXAMPLE", "secretAccessKey": "s3cr3t/+="}},
    "s3-ambient": {"s3": {"enabled": True, "region": "eu-west-1"}},
    "observability": {
        "replicaCount": 3,
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
        "networkPolicy": {
            "enabled": True,
            "clientSelectors": [{"podSelector": {"matchLabels": {"ray.io/cluster": "kvstore-workers"}}}],
        },
        "autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 6},
    },
    "auth": {
        "auth": {"tokens": {"tok-a-0123456789": "team-a", "tok-b-0123456789": "team-b"}},
        "quotas": {"defaultMaxBytes": "10GiB", "perTenant": {"team-a": "100GiB"}},
    },
    "tls": {
        "auth": {
            "tls": {"enabled": True, "existingSecret": "kvstore-tls", "clientCA": True},
            "existingSecret": "kvstore-tokens",
        }
    },
    "no-persistence": {
        "persistence": {"enabled": False},
        "metrics": {"enabled": False},
        "pdb": {"enabled": False},
    },
    "disk-off": {
        "disk": {"enabled": False},
        "redis": {"enabled": True, "internal": {"enabled": True}},
        "networkPolicy": {"enabled": True},
    },
    "open": {"auth": {"enabled": False}, "networkPolicy": {"enabled": False}},
    "auth-existing-secret": {
        "auth": {
            "existingSecret": "team-tokens",
            "existingSecretTokensKey": "map.json",
            "existingSecretClientTokenKey": "worker-token",
        }
    },
    "cluster-dns": {"replicaCount": 4, "cluster": {"replication": 3, "writeAck": "all"}},
    "cluster-static": {
        "replicaCount": 2,
        "cluster": {
            "membership": "static",
            "staticMembers": ["store-a.example:50051", "store-b.example:50051"],
        },
    },
    "cluster-off": {"replicaCount": 3, "cluster": {"enabled": False, "clientConfigMap": False}},
    "redis-cluster": {
        "replicaCount": 3,
        "redis": {
            "enabled": True,
            "url": "redis://redis-cluster-0.redis-cluster:6379",
            "cluster": True,
            "clusterNodes": ["redis-cluster-1.redis-cluster:6379", "redis-cluster-2.redis-cluster:6379"],
        },
    },
}


# ---------------------------------------------------------------- tools


def _tool(name: str) -> str:
    """Path of an installed tool: bootstrap puts helm and promtool in /usr/local/bin (or ~/.local/bin)
    and pip puts hadolint next to this interpreter."""
    candidates = (
        os.environ.get(name.upper()),
        shutil.which(name),
        str(Path(sysconfig.get_path("scripts")) / name),
        str(Path.home() / ".local/bin" / name),
    )
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError(
        f"{name} is not installed: run `make install` (scripts/bootstrap.d/helm.sh installs it)"
    )


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The helm binary plus an environment whose cache/config dirs are private to the test session."""
    home = tmp_path_factory.mktemp("helm-home")
    env = dict(os.environ)
    for var in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
        env[var] = str(home / var.lower())
    env["HELM_BIN"] = _tool("helm")
    return env


def _run(
    args: list[str], env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def _values_file(tmp_path: Path, values: dict[str, Any]) -> Path:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def helm_template(
    env: dict[str, str],
    tmp_path: Path,
    values: dict[str, Any],
    release: str = RELEASE,
    namespace: str = NAMESPACE,
) -> list[dict[str, Any]]:
    """Render the chart with helm and return the objects it produced."""
    proc = _run(
        [
            env["HELM_BIN"],
            "template",
            release,
            str(CHART),
            "--namespace",
            namespace,
            "--kube-version",
            KUBE_VERSION,
            "-f",
            str(_values_file(tmp_path, values)),
        ],
        env,
    )
    if proc.returncode != 0:
        raise AssertionError(f"helm template failed:\n{proc.stderr}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def helm_template_error(env: dict[str, str], tmp_path: Path, values: dict[str, Any]) -> str:
    proc = _run(
        [
            env["HELM_BIN"],
            "template",
            RELEASE,
            str(CHART),
            "--kube-version",
            KUBE_VERSION,
            "-f",
            str(_values_file(tmp_path, values)),
        ],
        env,
    )
    assert proc.returncode != 0, f"helm template accepted values it should reject: {values}"
    return proc.stderr


@pytest.fixture(scope="session")
def rendered(
    helm: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, list[dict[str, Any]]]:
    """Every scenario rendered once for the whole session."""
    return {
        name: helm_template(helm, tmp_path_factory.mktemp(name), values) for name, values in SCENARIOS.items()
    }


def one(docs: Iterable[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def kinds(docs: Iterable[dict[str, Any]]) -> list[str]:
    return sorted(d["kind"] for d in docs)


def store_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


# ---------------------------------------------------------------- schemas for the CRDs we render or ship

_SELECTOR = {
    "type": "object",
    "properties": {"matchLabels": {"type": "object"}, "matchExpressions": {"type": "array"}},
    "additionalProperties": False,
}
_DURATION = {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"}
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "jobLabel": {"type": "string"},
                "selector": _SELECTOR,
                "namespaceSelector": {
                    "type": "object",
                    "properties": {
                        "matchNames": {"type": "array", "items": {"type": "string"}},
                        "any": {"type": "boolean"},
                    },
                    "additionalProperties": False,
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": _DURATION,
                            "scrapeTimeout": _DURATION,
                            "scheme": {"enum": ["http", "https"]},
                        },
                    },
                },
            },
        },
    },
}
_GROUP = {
    "type": "object",
    "required": ["rayStartParams", "template"],
    "properties": {
        "rayStartParams": {"type": "object", "additionalProperties": {"type": "string"}},
        "template": {"type": "object", "required": ["spec"]},
    },
}
RAYCLUSTER_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayCluster"},
        "spec": {
            "type": "object",
            "required": ["rayVersion", "headGroupSpec", "workerGroupSpecs"],
            "additionalProperties": False,
            "properties": {
                "rayVersion": {"type": "string", "pattern": r"^\d+\.\d+\.\d+$"},
                "enableInTreeAutoscaling": {"type": "boolean"},
                "autoscalerOptions": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
                        "idleTimeoutSeconds": {"type": "integer", "minimum": 0},
                        "securityContext": {"type": "object"},
                        "resources": {"type": "object"},
                    },
                },
                "headGroupSpec": {
                    **_GROUP,
                    "properties": {
                        **_GROUP["properties"],
                        "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                    },
                },
                "workerGroupSpecs": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        **_GROUP,
                        "required": [
                            "groupName",
                            "replicas",
                            "minReplicas",
                            "maxReplicas",
                            "rayStartParams",
                            "template",
                        ],
                        "properties": {
                            **_GROUP["properties"],
                            "groupName": {"type": "string"},
                            "replicas": {"type": "integer", "minimum": 0},
                            "minReplicas": {"type": "integer", "minimum": 0},
                            "maxReplicas": {"type": "integer", "minimum": 1},
                        },
                    },
                },
            },
        },
    },
}
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR_SCHEMA,
    ("ray.io/v1", "RayCluster"): RAYCLUSTER_SCHEMA,
}


# kubernetes-validate re-reads and re-parses its multi-megabyte schema files on every call; they never change
# during a run, so the reader is memoised (8x faster over the ~150 objects validated here).
if not hasattr(kubernetes_validate.utils.schema_contents, "cache_info"):
    kubernetes_validate.utils.schema_contents = functools.lru_cache(maxsize=None)(
        kubernetes_validate.utils.schema_contents
    )


def validate_object(doc: dict[str, Any]) -> None:
    """Kubernetes schema (strict) for built-in kinds, our CRD schema for the custom ones."""
    crd = CRD_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
    if crd is not None:
        jsonschema.validate(doc, crd)
        return
    for version in SCHEMA_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(
                f"{doc['kind']}/{doc['metadata']['name']} (Kubernetes {version}): {exc.message}"
            ) from None


def validate_pod_template(template: dict[str, Any], where: str) -> None:
    """A pod template (of a StatefulSet, RayCluster...) checked as a core/v1 Pod."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": where, **template.get("metadata", {})},
        "spec": template["spec"],
    }
    validate_object(pod)


# ---------------------------------------------------------------- lint and schemas


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_chart_lints_strict(helm: dict[str, str], tmp_path: Path, scenario: str) -> None:
    values = _values_file(tmp_path, SCENARIOS[scenario])
    for extra in ([], ["--strict"]):
        proc = _run(
            [helm["HELM_BIN"], "lint", str(CHART), "--kube-version", KUBE_VERSION, "-f", str(values), *extra],
            helm,
        )
        assert proc.returncode == 0, (
            f"helm lint {' '.join(extra)} failed for {scenario}:\n{proc.stdout}{proc.stderr}"
        )
        assert "[ERROR]" not in proc.stdout and "[WARNING]" not in proc.stdout, proc.stdout


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_rendered_objects_match_kubernetes_schemas(
    rendered: dict[str, list[dict[str, Any]]], scenario: str
) -> None:
    docs = rendered[scenario]
    assert docs, "nothing rendered"
    for doc in docs:
        validate_object(doc)
        assert doc["metadata"].get("namespace") == NAMESPACE, f"{doc['kind']} not namespaced"


def test_schema_validation_catches_a_wrong_object() -> None:
    """The validator is strict: a typo'd field or a wrong type fails (so the test above can fail)."""
    with pytest.raises(AssertionError, match="readinesProbe|Additional properties"):
        validate_pod_template(
            {"spec": {"containers": [{"name": "x", "image": "x:1", "readinesProbe": {}}]}}, "typo"
        )
    with pytest.raises(AssertionError):
        validate_object(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "s"},
                "spec": {"ports": [{"port": "grpc"}]},
            }
        )


def test_values_schema_rejects_bad_values(helm: dict[str, str], tmp_path: Path) -> None:
    assert "maxBytes" in helm_template_error(helm, tmp_path, {"memory": {"maxBytes": "lots"}})
    assert "additional properties" in helm_template_error(helm, tmp_path, {"memroy": {"maxBytes": "1GiB"}})
    assert "fsync" in helm_template_error(helm, tmp_path, {"disk": {"fsync": "sometimes"}})
    assert "set together" in helm_template_error(
        helm, tmp_path, {"s3": {"enabled": True, "accessKeyId": "a"}}
    )
    assert "existingSecret" in helm_template_error(helm, tmp_path, {"auth": {"tls": {"enabled": True}}})
    assert "redis.enabled" in helm_template_error(helm, tmp_path, {"redis": {"internal": {"enabled": True}}})
    # cluster.*: each bad membership input is refused with what to fix.
    assert "writeAck" in helm_template_error(helm, tmp_path, {"cluster": {"writeAck": "most"}})
    assert "replication" in helm_template_error(helm, tmp_path, {"cluster": {"replication": 0}})
    assert "membership" in helm_template_error(helm, tmp_path, {"cluster": {"membership": "gossip"}})
    assert "staticMembers" in helm_template_error(helm, tmp_path, {"cluster": {"membership": "static"}})
    assert "staticMembers': items at 0 and 1 are equal" in helm_template_error(
        helm, tmp_path, {"cluster": {"membership": "static", "staticMembers": ["a:1", "a:1"]}}
    )
    assert "staticMembers" in helm_template_error(
        helm, tmp_path, {"cluster": {"membership": "static", "staticMembers": ["no-port"]}}
    )
    assert "external Redis Cluster" in helm_template_error(
        helm, tmp_path, {"redis": {"enabled": True, "cluster": True, "internal": {"enabled": True}}}
    )
    assert "clusterNodes" in helm_template_error(
        helm, tmp_path, {"redis": {"enabled": True, "cluster": True, "clusterNodes": ["redis://x"]}}
    )


def _leaf_paths(node: Any, prefix: str = "") -> Iterable[str]:
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from _leaf_paths(value, f"{prefix}{key}.")
    else:
        yield prefix.rstrip(".")


def test_every_value_is_documented_and_in_the_schema() -> None:
    text = (CHART / "values.yaml").read_text()
    values = yaml.safe_load(text)
    documented = set(re.findall(r"^\s*## @param (\S+)", text, re.MULTILINE))
    for path in _leaf_paths(values):
        parts = path.split(".")
        prefixes = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
        assert prefixes & documented, f"values.yaml: {path} has no `## @param`"
    for param in documented:
        node: Any = values
        for part in param.split("."):
            assert isinstance(node, dict) and part in node, (
                f"`## @param {param}` documents a value that does not exist"
            )
            node = node[part]
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert set(schema["properties"]) == set(values), (
        "values.schema.json and values.yaml disagree on top-level keys"
    )
    # The defaults themselves satisfy the schema.
    jsonschema.validate(values, schema)


# ---------------------------------------------------------------- what each template renders


def test_default_render_has_the_expected_objects(rendered: dict[str, list[dict[str, Any]]]) -> None:
    assert kinds(rendered["default"]) == sorted(
        [
            "ConfigMap",
            "ConfigMap",
            "NetworkPolicy",
            "Pod",  # the `helm test` hook
            "PodDisruptionBudget",
            "Secret",
            "Service",
            "Service",
            "ServiceAccount",
            "StatefulSet",
        ]
    )


def test_statefulset_probes_security_and_storage(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["default"]
    sts = one(docs, "StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    c = store_container(docs)
    assert c["image"] == "ghcr.io/kvstore/kvstore:0.1.0"
    assert c["command"] == ["kvstore"] and c["args"] == ["serve", "--config", "/etc/kvstore/config.yaml"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["grpc"] == {"port": 50051}, probe
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and sc["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False and pod["enableServiceLinks"] is False
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"grpc": 50051, "metrics": 9090}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts == {"config": "/etc/kvstore", "tmp": "/tmp", "data": "/var/lib/kvstore"}
    (pvc,) = sts["spec"]["volumeClaimTemplates"]
    assert pvc["metadata"]["name"] == "data" and pvc["spec"]["resources"]["requests"]["storage"] == "80Gi"
    assert "storageClassName" not in pvc["spec"]
    assert c["resources"]["limits"]["memory"] == "4Gi"
    assert sts["spec"]["replicas"] == 1
    assert sts["spec"]["serviceName"] == f"{RELEASE}-kvstore-headless"
    annotations = sts["spec"]["template"]["metadata"]["annotations"]
    assert re.fullmatch(r"[0-9a-f]{64}", annotations["checksum/config"])


def test_pvc_follows_values(helm: dict[str, str], tmp_path: Path) -> None:
    docs = helm_template(
        helm,
        tmp_path,
        {
            "persistence": {
                "size": "500Gi",
                "storageClass": "local-nvme",
                "retentionPolicy": {"whenScaled": "Delete"},
            }
        },
    )
    sts = one(docs, "StatefulSet")
    (pvc,) = sts["spec"]["volumeClaimTemplates"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "500Gi"
    assert pvc["spec"]["storageClassName"] == "local-nvme"
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"] == {
        "whenDeleted": "Retain",
        "whenScaled": "Delete",
    }
    docs = helm_template(helm, tmp_path, {"persistence": {"storageClass": "-"}})
    assert one(docs, "StatefulSet")["spec"]["volumeClaimTemplates"][0]["spec"]["storageClassName"] == ""


def test_without_persistence_the_disk_tier_uses_an_emptydir(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    docs = rendered["no-persistence"]
    sts = one(docs, "StatefulSet")
    assert "volumeClaimTemplates" not in sts["spec"]
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    assert volumes["data"]["emptyDir"]["sizeLimit"] == "80Gi"
    assert [p["name"] for p in store_container(docs)["ports"]] == ["grpc"]
    assert "PodDisruptionBudget" not in kinds(docs)
    docs = rendered["disk-off"]
    assert "data" not in {v["name"] for v in one(docs, "StatefulSet")["spec"]["template"]["spec"]["volumes"]}
    assert "volumeClaimTemplates" not in one(docs, "StatefulSet")["spec"]


def test_services_expose_grpc_and_metrics(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["default"]
    svc = one(docs, "Service", f"{RELEASE}-kvstore")
    assert {p["name"]: (p["port"], p["targetPort"]) for p in svc["spec"]["ports"]} == {
        "grpc": (50051, "grpc"),
        "metrics": (9090, "metrics"),
    }
    assert next(p for p in svc["spec"]["ports"] if p["name"] == "grpc")["appProtocol"] == "kubernetes.io/h2c"
    headless = one(docs, "Service", f"{RELEASE}-kvstore-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert [p["name"] for p in headless["spec"]["ports"]] == ["grpc"]
    pod_labels = one(docs, "StatefulSet")["spec"]["template"]["metadata"]["labels"]
    for service in (svc, headless):
        assert service["spec"]["selector"].items() <= pod_labels.items()
    assert one(docs, "StatefulSet")["spec"]["selector"]["matchLabels"] == svc["spec"]["selector"]


def test_labels_come_from_one_helper(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for scenario, docs in rendered.items():
        for doc in docs:
            labels = doc["metadata"]["labels"]
            assert labels["app.kubernetes.io/instance"] == RELEASE, (scenario, doc["kind"])
            assert labels["app.kubernetes.io/managed-by"] == "Helm"
            assert labels["helm.sh/chart"] == "kvstore-0.1.0"
            assert labels["app.kubernetes.io/component"] in ("store", "redis", "client")


def test_config_map_is_accepted_by_the_server_config_loader(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """The rendered config.yaml plus the pod's env, as `kvstore serve` would load them."""
    loaded = {}
    for scenario, docs in rendered.items():
        if scenario == "tls":
            continue  # the TLS files exist only inside the pod; covered by test_tls_mounts_the_certificate_secret
        path = tmp_path / f"{scenario}.yaml"
        path.write_text(one(docs, "ConfigMap", STORE_CONFIG)["data"]["config.yaml"])
        loaded[scenario] = load_config(path, environ=_pod_environment(docs))
    cfg = loaded["default"]
    assert (cfg.server.host, cfg.server.port, cfg.metrics.port) == ("0.0.0.0", 50051, 9090)
    assert cfg.memory.max_bytes == 2 * 1024**3 and cfg.disk.max_bytes == 64 * 1024**3
    assert cfg.server.max_message_bytes == parse_bytes("72MiB")
    assert cfg.disk.enabled and cfg.disk.path == "/var/lib/kvstore/disk"
    assert not cfg.redis.enabled and not cfg.s3.enabled
    # Secure by default: one generated token, for the tenant the workers and the connector default to.
    ((generated, tenant),) = cfg.auth.tokens.items()
    assert tenant == "default" and len(generated) >= 32
    assert loaded["open"].auth.tokens == {}
    assert loaded["redis-internal"].redis.enabled
    assert loaded["redis-internal"].redis.url == f"redis://{RELEASE}-kvstore-redis:6379/0"
    assert loaded["redis-external-secret"].redis.url == "redis://from-secret:6379/0"
    s3 = loaded["s3-existing-secret"].s3
    assert (s3.enabled, s3.endpoint_url, s3.bucket) == (True, "http://minio.storage:9000", "kv-prod")
    assert (s3.access_key_id, s3.secret_access_key) == (
        "from-secret/s3-creds/access-key-id",
        "from-secret/s3-creds/secret-access-key",
    )
    assert (loaded["s3-inline"].s3.access_key_id, loaded["s3-inline"].s3.secret_access_key) == (
        "AKIAEXAMPLE",
        "s3cr3t/+=",
    )
    assert loaded["s3-ambient"].s3.access_key_id is None and loaded["s3-ambient"].s3.region == "eu-west-1"
    auth = loaded["auth"]
    assert {t: n for t, n in auth.auth.tokens.items() if n != "default"} == {
        "tok-a-0123456789": "team-a",
        "tok-b-0123456789": "team-b",
    }
    assert len(auth.auth.tokens) == 3  # the listed tokens next to the generated one
    assert loaded["auth-existing-secret"].auth.tokens == {"from-secret": "tenant"}
    assert auth.quotas.default_max_bytes == 10 * 1024**3 and auth.quotas.per_tenant == {
        "team-a": 100 * 1024**3
    }
    assert loaded["no-persistence"].metrics.port == 0
    assert not loaded["disk-off"].disk.enabled
    assert not cfg.redis.cluster
    rc = loaded["redis-cluster"].redis
    assert rc.enabled and rc.cluster and rc.url == "redis://redis-cluster-0.redis-cluster:6379"
    assert rc.cluster_nodes == "redis-cluster-1.redis-cluster:6379,redis-cluster-2.redis-cluster:6379"


def _pod_environment(docs: list[dict[str, Any]]) -> dict[str, str]:
    """The store container's env with secretKeyRefs resolved: from the chart's own Secret when it renders
    one, else a recognisable placeholder standing for the operator's existing Secret."""
    secrets = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "Secret"}
    env = {}
    for name, entry in env_of(store_container(docs)).items():
        if "value" in entry:
            env[name] = entry["value"]
            continue
        ref = entry["valueFrom"]["secretKeyRef"]
        if ref["name"] in secrets:
            env[name] = base64.b64decode(secrets[ref["name"]][ref["key"]]).decode()
        elif name == "KVSTORE_REDIS__URL":
            env[name] = "redis://from-secret:6379/0"
        elif name == "KVSTORE_AUTH__TOKENS":
            env[name] = json.dumps({"from-secret": "tenant"})
        else:
            env[name] = f"from-secret/{ref['name']}/{ref['key']}"
    return env


def _free_port() -> int:
    """A free loopback port (metrics.port 0 means "off", so the metrics endpoint needs a real one)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_rendered_container_command_serves_grpc_health_and_metrics(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """Run what the default StatefulSet runs (command, args, ConfigMap, Secret-fed env) and ask it what the
    kubelet asks: grpc.health.v1 Check with the empty service name. Only the listen addresses and the disk
    path are overridden (loopback, port 0, a temp dir) so that the test binds no fixed port. The default is
    secure: a call without a token is refused, and the chart's `helm test` pod, run here as its script with
    the token from the rendered Secret, passes (it also checks that refusal itself)."""
    docs = rendered["default"]
    container = store_container(docs)
    config_path = tmp_path / "config.yaml"
    config_path.write_text(one(docs, "ConfigMap", STORE_CONFIG)["data"]["config.yaml"])
    args = [str(config_path) if a == "/etc/kvstore/config.yaml" else a for a in container["args"]]
    assert container["command"] == ["kvstore"]
    ready = tmp_path / "ready.json"
    env = {
        **os.environ,
        **_pod_environment(docs),
        "KVSTORE_SERVER__HOST": "127.0.0.1",
        "KVSTORE_SERVER__PORT": "0",
        "KVSTORE_METRICS__HOST": "127.0.0.1",
        "KVSTORE_METRICS__PORT": str(_free_port()),
        "KVSTORE_DISK__PATH": str(tmp_path / "disk"),
        "KVSTORE_MEMORY__MAX_BYTES": "64MiB",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    assert yaml.safe_load(config_path.read_text())["metrics"]["port"] == 9090
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvstore", *args, "--ready-file", str(ready)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            if proc.poll() is not None:
                raise AssertionError(f"kvstore serve exited {proc.returncode}:\n{proc.stdout.read()}")
            if time.monotonic() > deadline:
                raise AssertionError("kvstore serve did not become ready within 60 s")
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        import grpc

        with grpc.insecure_channel(f"127.0.0.1:{info['port']}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=5
            )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with urllib.request.urlopen(
            f"http://127.0.0.1:{info['metrics_port']}/metrics", timeout=5
        ) as response:
            exposition = response.read().decode()
        exported = set(re.findall(r"^(kvstore_[a-z_]+)", exposition, re.MULTILINE))
        tier_metrics = {n for n in METRIC_NAMES if n.startswith(("kvstore_tier_", "kvstore_integrity_"))}
        assert tier_metrics <= exported, f"missing from /metrics: {sorted(tier_metrics - exported)}"
        _check_auth_and_helm_test(docs, f"127.0.0.1:{info['port']}", tmp_path)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()


def _check_auth_and_helm_test(docs: list[dict[str, Any]], target: str, tmp_path: Path) -> None:
    """Against a server running the rendered config: Stats needs the Secret's token, and the `helm test`
    pod's script passes with the environment the pod would get (`kvstore` is this checkout's CLI)."""
    from kvstore.errors import Unauthenticated
    from transfer.rpc.client import KVClient

    secret = one(docs, "Secret")["data"]
    token = base64.b64decode(secret["token"]).decode()
    with KVClient(target) as client, pytest.raises(Unauthenticated):
        client.stats()
    with KVClient(target, token=token) as client:
        assert client.stats().version
    pod = one(docs, "Pod")
    (container,) = pod["spec"]["containers"]
    assert container["command"] == ["sh", "-ec"]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "kvstore"
    shim.write_text(f'#!/bin/sh\nexec {sys.executable} -m kvstore "$@"\n')
    shim.chmod(0o755)
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
        "TARGET": target,
        "TLS_ARGS": env_of(container)["TLS_ARGS"]["value"],
    }
    ref = env_of(container)["KVSTORE_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == one(docs, "Secret")["metadata"]["name"]
    env["KVSTORE_TOKEN"] = base64.b64decode(secret[ref["key"]]).decode()
    passed = _run([*container["command"], *container["args"]], env, timeout=120)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert "a call without a token was refused" in passed.stdout
    env["KVSTORE_TOKEN"] = "not-the-token"
    refused = _run([*container["command"], *container["args"]], env, timeout=120)
    assert refused.returncode != 0 and "UNAUTHENTICATED" in refused.stdout + refused.stderr


def test_secrets_reach_the_pod_only_through_secret_refs(rendered: dict[str, list[dict[str, Any]]]) -> None:
    # Operator-managed Secret: referenced, never rendered.
    docs = rendered["s3-existing-secret"]
    assert all("access-key-id" not in d.get("data", {}) for d in docs if d["kind"] == "Secret")
    env = env_of(store_container(docs))
    assert env["KVSTORE_S3__ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {
        "name": "s3-creds",
        "key": "access-key-id",
    }
    assert env["KVSTORE_S3__SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "s3-creds",
        "key": "secret-access-key",
    }
    # Inline credentials: in the chart's Secret, not in the ConfigMap.
    docs = rendered["s3-inline"]
    secret = one(docs, "Secret")
    assert base64.b64decode(secret["data"]["secret-access-key"]).decode() == "s3cr3t/+="
    assert "s3cr3t" not in one(docs, "ConfigMap", STORE_CONFIG)["data"]["config.yaml"]
    assert (
        env_of(store_container(docs))["KVSTORE_S3__SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"]
        == (secret["metadata"]["name"])
    )
    # Ambient credentials (IRSA, instance role): no credential env at all.
    assert (
        not {"KVSTORE_S3__ACCESS_KEY_ID", "KVSTORE_S3__SECRET_ACCESS_KEY"}
        & env_of(store_container(rendered["s3-ambient"])).keys()
    )
    # Auth tokens: a JSON map in the Secret, fed as KVSTORE_AUTH__TOKENS; the listed ones next to the
    # generated one, which is also the Secret's `token` (what clients read).
    docs = rendered["auth"]
    ref = env_of(store_container(docs))["KVSTORE_AUTH__TOKENS"]["valueFrom"]["secretKeyRef"]
    data = one(docs, "Secret", ref["name"])["data"]
    tokens = json.loads(base64.b64decode(data[ref["key"]]))
    generated = base64.b64decode(data["token"]).decode()
    assert tokens == {**SCENARIOS["auth"]["auth"]["tokens"], generated: "default"}
    config = one(docs, "ConfigMap", STORE_CONFIG)["data"]["config.yaml"]
    assert "tok-a" not in config and generated not in config
    # A secret change rolls the pods.
    assert (
        one(rendered["auth"], "StatefulSet")["spec"]["template"]["metadata"]["annotations"]["checksum/secret"]
        != one(rendered["open"], "StatefulSet")["spec"]["template"]["metadata"]["annotations"][
            "checksum/secret"
        ]
    )
    assert "KVSTORE_AUTH__TOKENS" not in env_of(store_container(rendered["open"]))


def test_default_is_secure_generated_token_and_network_policy(
    helm: dict[str, str], tmp_path: Path, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    """Out of the box: auth on with a token the chart generated into its Secret, and a NetworkPolicy that
    admits the labelled workers/engines to gRPC and Prometheus to the metrics port; the KubeRay workers
    carry that label and read that Secret."""
    docs = helm_template(helm, tmp_path, {}, release="kvstore", namespace="kvstore")
    secret = one(docs, "Secret", "kvstore")
    token = base64.b64decode(secret["data"]["token"]).decode()
    assert re.fullmatch(r"[A-Za-z0-9]{48}", token), "48 random alphanumerics (~285 bits)"
    assert json.loads(base64.b64decode(secret["data"]["tokens.json"])) == {token: "default"}
    assert env_of(store_container(docs))["KVSTORE_AUTH__TOKENS"]["valueFrom"]["secretKeyRef"] == {
        "name": "kvstore",
        "key": "tokens.json",
    }
    # Generated, not shipped: another render (a fresh install) draws another token.
    other = one(helm_template(helm, tmp_path, {}, release="kvstore", namespace="kvstore"), "Secret")
    assert base64.b64decode(other["data"]["token"]).decode() != token
    # Kept across upgrades: the token is read back from the live Secret by lookup before a new one is drawn.
    helper = (CHART / "templates" / "_helpers.tpl").read_text()
    assert 'lookup "v1" "Secret" .Release.Namespace (include "kvstore.fullname" .)' in helper
    policy = one(docs, "NetworkPolicy", "kvstore")
    grpc_rule, metrics_rule = policy["spec"]["ingress"]
    assert grpc_rule == {
        "ports": [{"port": "grpc", "protocol": "TCP"}],
        "from": [{"podSelector": {"matchLabels": {"kvstore.io/client": "true"}}}],
    }
    assert metrics_rule["from"] == [
        {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}
    ]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= (
        one(docs, "StatefulSet")["spec"]["template"]["metadata"]["labels"].items()
    )
    admitted = grpc_rule["from"][0]["podSelector"]["matchLabels"].items()
    # The `helm test` pod and every KubeRay pod are admitted and take the token from this Secret.
    test_pod = one(docs, "Pod")
    assert admitted <= test_pod["metadata"]["labels"].items()
    assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert env_of(test_pod["spec"]["containers"][0])["KVSTORE_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "kvstore",
        "key": "token",
    }
    ray = yaml.safe_load((DEPLOY / "kuberay" / "raycluster.yaml").read_text())
    for template in _ray_templates(ray):
        assert admitted <= template["metadata"]["labels"].items()
        ref = env_of(template["spec"]["containers"][0])["KVSTORE_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == ("kvstore", "token")


def test_generated_token_is_drawn_once_per_render(helm: dict[str, str], tmp_path: Path) -> None:
    """The StatefulSet's checksum/secret renders secret.yaml a second time; it must hash the very Secret of
    this render (one token per render), or the first `helm upgrade` after an install would roll every pod
    although the token, read back by lookup, did not change."""
    proc = _run(
        [helm["HELM_BIN"], "template", RELEASE, str(CHART), "-n", NAMESPACE, "--kube-version", KUBE_VERSION],
        helm,
    )
    assert proc.returncode == 0, proc.stderr
    sources = {}
    for part in proc.stdout.split("\n---\n"):
        head, _, body = part.partition("\n")
        sources[head.removeprefix("# Source: kvstore/")] = body
    secret_text = "\n" + sources["templates/secret.yaml"] + "\n"
    sts = yaml.safe_load(sources["templates/statefulset.yaml"])
    checksum = sts["spec"]["template"]["metadata"]["annotations"]["checksum/secret"]
    assert hashlib.sha256(secret_text.encode()).hexdigest() == checksum


def test_auth_and_network_policy_are_turned_off_only_explicitly(
    helm: dict[str, str], tmp_path: Path, rendered: dict[str, list[dict[str, Any]]]
) -> None:
    docs = rendered["open"]
    assert "Secret" not in kinds(docs) and "NetworkPolicy" not in kinds(docs)
    assert "KVSTORE_AUTH__TOKENS" not in env_of(store_container(docs))
    assert "KVSTORE_TOKEN" not in env_of(one(docs, "Pod")["spec"]["containers"][0])
    # Off and tokens at once is a contradiction, refused with what to fix.
    for auth in ({"tokens": {"t-0123456789": "a"}}, {"existingSecret": "mine"}):
        assert "auth.enabled=false" in helm_template_error(
            helm, tmp_path, {"auth": {"enabled": False, **auth}}
        )
    assert "enabled" in helm_template_error(helm, tmp_path, {"auth": {"enabled": "no"}})
    assert "tenant" in helm_template_error(helm, tmp_path, {"auth": {"tenant": "a b"}})


def test_an_existing_auth_secret_is_used_and_nothing_is_generated(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    docs = rendered["auth-existing-secret"]
    assert "Secret" not in kinds(docs)
    assert env_of(store_container(docs))["KVSTORE_AUTH__TOKENS"]["valueFrom"]["secretKeyRef"] == {
        "name": "team-tokens",
        "key": "map.json",
    }
    assert env_of(one(docs, "Pod")["spec"]["containers"][0])["KVSTORE_TOKEN"]["valueFrom"][
        "secretKeyRef"
    ] == {
        "name": "team-tokens",
        "key": "worker-token",
    }
    assert one(docs, "NetworkPolicy")  # the policy stays on


def test_tls_mounts_the_certificate_secret_and_probes_fall_back_to_tcp(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    docs = rendered["tls"]
    c = store_container(docs)
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe].get("tcpSocket") == {"port": "grpc"} and "grpc" not in c[probe]
    assert {"name": "tls", "mountPath": "/etc/kvstore-tls", "readOnly": True} in c["volumeMounts"]
    volumes = {v["name"]: v for v in one(docs, "StatefulSet")["spec"]["template"]["spec"]["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "kvstore-tls"
    config = yaml.safe_load(one(docs, "ConfigMap", STORE_CONFIG)["data"]["config.yaml"])
    assert config["auth"] == {
        "tls_cert": "/etc/kvstore-tls/tls.crt",
        "tls_key": "/etc/kvstore-tls/tls.key",
        "tls_client_ca": "/etc/kvstore-tls/ca.crt",
    }
    assert env_of(c)["KVSTORE_AUTH__TOKENS"]["valueFrom"]["secretKeyRef"]["name"] == "kvstore-tokens"


def test_in_chart_redis(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["redis-internal"]
    deployment = one(docs, "Deployment", f"{RELEASE}-kvstore-redis")
    pod = deployment["spec"]["template"]["spec"]
    (redis,) = pod["containers"]
    assert redis["image"] == "docker.io/library/redis:7.4.2-alpine"
    assert (
        redis["securityContext"]["readOnlyRootFilesystem"] is True and pod["securityContext"]["runAsNonRoot"]
    )
    assert "allkeys-lru" in redis["args"]
    svc = one(docs, "Service", f"{RELEASE}-kvstore-redis")
    assert svc["spec"]["ports"][0]["port"] == 6379
    assert svc["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert "Deployment" not in kinds(rendered["redis-external-secret"])


def test_service_monitor_network_policy_and_hpa(rendered: dict[str, list[dict[str, Any]]]) -> None:
    docs = rendered["observability"]
    svc = one(docs, "Service", f"{RELEASE}-kvstore")
    sm = one(docs, "ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "prom"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] in {p["name"] for p in svc["spec"]["ports"]}
    # Only one Service carries a metrics port, so each pod is scraped once.
    assert [
        s["metadata"]["name"]
        for s in docs
        if s["kind"] == "Service" and "metrics" in {p["name"] for p in s["spec"]["ports"]}
    ] == [svc["metadata"]["name"]]
    sts = one(docs, "StatefulSet")
    assert "replicas" not in sts["spec"], "the HPA owns the replica count"
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "name": sts["metadata"]["name"],
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    policy = one(docs, "NetworkPolicy")
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    grpc_rule, metrics_rule = policy["spec"]["ingress"]
    assert grpc_rule["ports"] == [{"port": "grpc", "protocol": "TCP"}]
    assert grpc_rule["from"] == SCENARIOS["observability"]["networkPolicy"]["clientSelectors"]
    assert metrics_rule["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    # Redis only lets the store in.
    policies = {p["metadata"]["name"]: p for p in rendered["disk-off"] if p["kind"] == "NetworkPolicy"}
    redis_policy = policies[f"{RELEASE}-kvstore-redis"]
    assert (
        redis_policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"].items()
        <= pod_labels.items()
    )
    for optional in ("ServiceMonitor", "HorizontalPodAutoscaler"):
        assert optional not in kinds(rendered["default"])
    assert "NetworkPolicy" not in kinds(rendered["open"])


def test_install_notes(helm: dict[str, str], tmp_path: Path) -> None:
    """NOTES.txt renders the addresses workers need and warns when authentication is off."""

    def notes(values: dict[str, Any]) -> str:
        proc = _run(
            [
                helm["HELM_BIN"],
                "install",
                "kvstore",
                str(CHART),
                "--dry-run=client",
                "--namespace",
                "kvstore",
                "-f",
                str(_values_file(tmp_path, values)),
            ],
            helm,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.split("NOTES:", 1)[1]

    text = notes({})
    assert "kvstore.kvstore.svc.cluster.local:50051" in text
    assert "kvstore-<ordinal>.kvstore-headless.kvstore.svc.cluster.local:50051" in text
    assert "authentication is off" not in text and "Authentication is on" in text
    # How to read the generated token, and the label the NetworkPolicy admits.
    assert (
        "export KVSTORE_TOKEN=$(kubectl -n kvstore get secret kvstore -o jsonpath='{.data.token}' | base64 -d)"
        in text
    )
    assert "secretKeyRef: {name: kvstore, key: token}" in text
    assert "kvstore.io/client=true" in text and "NetworkPolicy is off" not in text
    text = notes({"auth": {"enabled": False}, "networkPolicy": {"enabled": False}})
    assert "authentication is off (auth.enabled=false)" in text and "NetworkPolicy is off" in text
    assert "KVSTORE_TOKEN" not in text
    text = notes({"auth": {"existingSecret": "mine", "existingSecretClientTokenKey": "client.token"}})
    assert "get secret mine -o jsonpath='{.data.client\\.token}'" in text and "generated" not in text
    assert "KVSTORE_TARGET=dns:///kvstore-headless.kvstore.svc.cluster.local:50051" in text
    assert "KVSTORE_REPLICATION=1" in text  # one pod: R is capped at the members there are
    text = notes({"auth": {"existingSecret": "tokens"}, "replicaCount": 2, "metrics": {"enabled": False}})
    assert (
        "authentication is off" not in text
        and "2 replicas form one keyspace" in text
        and "KVSTORE_REPLICATION=2" in text
        and "ConfigMap kvstore-client" in text
        and "/metrics" not in text
    )
    text = notes({"replicaCount": 2, "cluster": {"enabled": False}})
    assert (
        "private RAM and disk cache" in text
        and "KVSTORE_TARGET=kvstore.kvstore.svc.cluster.local:50051" in text
    )


def test_release_named_kvstore_gets_the_membership_the_workers_use(
    helm: dict[str, str], tmp_path: Path
) -> None:
    """The KubeRay workers are given exactly what the chart's client ConfigMap says for a 3-replica
    release "kvstore": the headless Service (only Ready pods) as dns:/// membership, R and the ack mode."""
    docs = helm_template(helm, tmp_path, {"replicaCount": 3}, release="kvstore", namespace="kvstore")
    headless = one(docs, "Service", "kvstore-headless")
    client = one(docs, "ConfigMap", "kvstore-client")["data"]
    address = client["KVSTORE_TARGET"]
    assert address.startswith("dns:///"), address
    host, port = address.removeprefix("dns:///").rsplit(":", 1)
    assert host.split(".")[:2] == [headless["metadata"]["name"], headless["metadata"]["namespace"]], address
    assert int(port) == next(p["port"] for p in headless["spec"]["ports"] if p["name"] == "grpc")
    assert (client["KVSTORE_REPLICATION"], client["KVSTORE_WRITE_ACK"]) == ("2", "one")
    ray = yaml.safe_load((DEPLOY / "kuberay" / "raycluster.yaml").read_text())
    for template in _ray_templates(ray):
        env = env_of(template["spec"]["containers"][0])
        assert {k: env[k]["value"] for k in client} == client


def test_cluster_membership_and_replication_follow_values(rendered: dict[str, list[dict[str, Any]]]) -> None:
    def client(scenario: str) -> dict[str, str]:
        return one(rendered[scenario], "ConfigMap", f"{RELEASE}-kvstore-client")["data"]

    headless = one(rendered["default"], "Service", f"{RELEASE}-kvstore-headless")["spec"]
    sts = one(rendered["default"], "StatefulSet")["spec"]
    # Membership is the headless Service's records: the StatefulSet's pods, and only Ready ones.
    assert headless["clusterIP"] == "None" and headless["publishNotReadyAddresses"] is False
    assert sts["serviceName"] == f"{RELEASE}-kvstore-headless"
    assert headless["selector"].items() <= sts["template"]["metadata"]["labels"].items()
    assert client("default") == {
        "KVSTORE_TARGET": f"dns:///{RELEASE}-kvstore-headless.{NAMESPACE}.svc.cluster.local:50051",
        "KVSTORE_REPLICATION": "1",  # R=2 by default, capped at the 1 replica there is
        "KVSTORE_WRITE_ACK": "one",
    }
    assert (client("cluster-dns")["KVSTORE_REPLICATION"], client("cluster-dns")["KVSTORE_WRITE_ACK"]) == (
        "3",
        "all",
    )
    assert client("observability")["KVSTORE_REPLICATION"] == "2"  # autoscaling: minReplicas 2 bounds R
    assert client("cluster-static")["KVSTORE_TARGET"] == "store-a.example:50051,store-b.example:50051"
    assert client("cluster-static")["KVSTORE_REPLICATION"] == "2"
    assert all(d["metadata"]["name"] != f"{RELEASE}-kvstore-client" for d in rendered["cluster-off"])
    # Every replica keeps its own RAM and disk tier (its PVC), whatever the cluster settings.
    for scenario in ("cluster-dns", "redis-cluster"):
        sts = one(rendered[scenario], "StatefulSet")["spec"]
        assert sts["replicas"] in (3, 4) and sts["volumeClaimTemplates"][0]["metadata"]["name"]


# ---------------------------------------------------------------- deploy/: KubeRay, compose, Dockerfile, dashboards


def _ray_templates(ray: dict[str, Any]) -> list[dict[str, Any]]:
    spec = ray["spec"]
    return [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"])]


def test_kuberay_cluster_has_prefill_and_decode_groups() -> None:
    ray = yaml.safe_load((DEPLOY / "kuberay" / "raycluster.yaml").read_text())
    validate_object(ray)
    groups = {g["groupName"]: g for g in ray["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"prefill", "decode"}
    for name, group in groups.items():
        # rayStartParams.resources is a JSON object inside a quoted string, as `ray start --resources` takes it.
        assert json.loads(json.loads(group["rayStartParams"]["resources"])) == {name: 1}
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert ray["spec"]["rayVersion"] == importlib.metadata.version("ray"), (
        "rayVersion must match the workers' Ray"
    )
    for i, template in enumerate(_ray_templates(ray)):
        validate_pod_template(template, f"ray-{i}")
        (c,) = template["spec"]["containers"]
        assert re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+", c["image"]), c["image"]
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert template["spec"]["securityContext"]["runAsNonRoot"] is True
        assert c["resources"]["limits"]["memory"] == c["resources"]["requests"]["memory"]
        token = env_of(c)["KVSTORE_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert token["optional"] is True


def _pinned(image: str) -> bool:
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag not in ("latest", "") and any(ch.isdigit() for ch in tag)


def _compose_interpolate(text: str, environ: dict[str, str]) -> str:
    """Compose's `${NAME}` / `${NAME:?message}` interpolation (the forms deploy/compose.yaml uses): an unset
    or empty NAME with `:?` is an error naming the message, as `docker compose` refuses to start."""

    def one_variable(match: re.Match[str]) -> str:
        name, required, message = match.group(1), match.group(2), match.group(3)
        value = environ.get(name, "")
        if required and not value:
            raise ValueError(f"required variable {name} is missing a value: {message}")
        return value

    return re.sub(r"\$\{(\w+)(:\?([^}]*))?\}", one_variable, text)


def test_compose_file_is_pinned_and_its_store_env_is_a_valid_config() -> None:
    raw = (DEPLOY / "compose.yaml").read_text()
    with pytest.raises(ValueError, match="KVSTORE_TOKEN"):  # no token, no stack: auth is not optional
        _compose_interpolate(raw, {})
    token = "compose-token-0123456789abcdef"
    compose = yaml.safe_load(_compose_interpolate(raw, {"KVSTORE_TOKEN": token}))
    services = compose["services"]
    assert {"store", "store-1", "store-2", "redis", "s3"} <= set(services)
    for name, service in services.items():
        assert _pinned(service["image"]), f"{name}: image {service['image']} is not pinned"
    store = services["store"]
    assert store["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile", "target": "store"}
    assert (ROOT / "deploy" / "Dockerfile").is_file()
    assert store["read_only"] is True and store["user"] != "0" and store["cap_drop"] == ["ALL"]
    assert store["depends_on"]["redis"]["condition"] == "service_healthy"
    env = {k: str(v) for k, v in store["environment"].items()}
    cfg = load_config(None, environ=env)
    assert cfg.auth.tokens == {token: "default"}  # the stores accept the token the workers send
    assert compose["services"]["worker"]["environment"]["KVSTORE_TOKEN"] == token
    assert cfg.redis.enabled and cfg.redis.url == "redis://redis:6379/0"
    assert cfg.s3.enabled and cfg.s3.endpoint_url.startswith("http://s3:")
    assert cfg.server.host == "0.0.0.0" and cfg.metrics.port == 9090
    published = {p.split(":")[-1] for p in store["ports"]}
    assert published == {str(cfg.server.port), str(cfg.metrics.port)}
    assert all(p.startswith("127.0.0.1:") for p in store["ports"]), "compose publishes on loopback only"
    # Three replicas of one keyspace: same config, own volume, own host ports; clients get all three.
    replicas = [services[name] for name in ("store", "store-1", "store-2")]
    assert all(r["environment"] == store["environment"] for r in replicas)
    assert len({r["volumes"][0].split(":")[0] for r in replicas}) == 3
    host_ports = [p.rsplit(":", 2)[1] for r in replicas for p in r["ports"]]
    assert len(host_ports) == len(set(host_ports)) and all(
        p.startswith("127.0.0.1:") for r in replicas for p in r["ports"]
    )
    worker = services["worker"]["environment"]
    members = worker["KVSTORE_TARGET"].split(",")
    assert members == [f"{name}:{cfg.server.port}" for name in ("store", "store-1", "store-2")]
    assert 1 <= int(worker["KVSTORE_REPLICATION"]) <= len(members) and worker["KVSTORE_WRITE_ACK"] in (
        "one",
        "all",
    )
    assert set(services["worker"]["depends_on"]) == {"store", "store-1", "store-2"}


def _dockerfile_stages(text: str) -> dict[str, list[str]]:
    stages: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.IGNORECASE)
        if m:
            current = m.group(2) or m.group(1)
            stages[current] = [line]
        elif current:
            stages[current].append(line)
    return stages


def test_dockerfile_lints_and_builds_non_root_images() -> None:
    path = DEPLOY / "Dockerfile"
    proc = _run([_tool("hadolint"), "--failure-threshold", "warning", str(path)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = path.read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.MULTILINE).group(1)
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", base), base
    stages = _dockerfile_stages(text)
    assert list(stages)[-1] == "store", "a plain `docker build` must produce the store image"
    for target in ("store", "worker"):
        body = "\n".join(stages[target])
        assert re.search(r"^USER 10001:10001$", body, re.MULTILINE), f"{target} must run as uid 10001"
    store_steps = [line for line in stages["build"] + stages["store"] if not line.lstrip().startswith("#")]
    assert "torch" not in "\n".join(store_steps).replace('! python -P -c "import torch"', ""), (
        "no torch in the store"
    )

    assert "torch==${TORCH_VERSION}" in "\n".join(stages["build-worker"])
    assert re.search(r"TORCH_VERSION=2\.13\.0", text)
    assert {name for name, _ in re.findall(r'"(pip|setuptools|wheel)==([\d.]+)"', text)} == {
        "pip",
        "setuptools",
        "wheel",
    }
    constraints = (DEPLOY / "constraints.txt").read_text()
    assert f"ray=={importlib.metadata.version('ray')}" in constraints.split()
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for copied in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.MULTILINE):
        for src in copied.split():
            assert f"!{src}" in ignore or f"!{src}/" in ignore, f"{src} is excluded from the build context"


def test_grafana_dashboard_uses_only_exported_metrics_and_valid_promql(tmp_path: Path) -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "kvstore-dashboard.json").read_text())
    exprs = [(p["id"], t["refId"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10
    used = set()
    for _, _, expr in exprs:
        used |= set(re.findall(r"\bkvstore_[a-z_]+", expr))
    assert used <= METRIC_NAMES, f"unknown metrics: {sorted(used - METRIC_NAMES)}"
    exported = COUNTERS | GAUGES | HISTOGRAMS
    covered = {name for name in exported if any(u.startswith(name) for u in used)}
    assert covered == exported, f"metrics without a panel: {sorted(exported - covered)}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    # promtool parses every expression (Grafana variables replaced by what they expand to).
    rules = [
        {
            "record": f"kvstore:panel_{pid}:{ref.lower()}",
            "expr": expr.replace("$__rate_interval", "5m").replace("$instance", ".*"),
        }
        for pid, ref, expr in exprs
    ]
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = _run([_tool("promtool"), "check", "rules", str(rules_file)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_prometheus_scrape_example_targets_the_chart_metrics_port(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "scrape.yaml").read_text())
    job = next(j for j in scrape["scrape_configs"] if j["job_name"] == "kvstore")
    keep = next(r for r in job["relabel_configs"] if r.get("action") == "keep")
    svc = one(rendered["default"], "Service", f"{RELEASE}-kvstore")
    value = ";".join([svc["metadata"]["labels"]["app.kubernetes.io/name"], "metrics"])
    assert re.fullmatch(keep["regex"], value)
    assert "metrics" in {p["name"] for p in svc["spec"]["ports"]}
