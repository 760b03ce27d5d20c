"""The deployment files under deploy/: systemd unit, Kubernetes kustomizations, container image, compose stack.

Fast and offline. The kustomizations are rendered by a small renderer below (resources, components,
configMapGenerator with kustomize's content-hash name, strategic-merge and JSON6902 patches, images);
where a `kubectl` or `kustomize` binary exists its output must be identical. Every rendered object is
validated against the Kubernetes OpenAPI schemas shipped in kubernetes-validate (strict: unknown fields
fail); the CRDs (ServiceMonitor, PrometheusRule, ScaledObject) are checked field by field. Every
`INSPECTD_<SECTION>__<KEY>` named anywhere under deploy/ must be a real setting, and the values the
manifests set must load through `daemon.config.load_settings`.
"""

from __future__ import annotations

import argparse
import base64
import copy
import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from cli.main import EXIT_CONFIG, build_parser
from daemon.config import Section, Settings, load_settings
from daemon.kafka_clients import FETCH_HEADROOM
from daemon.metrics import WorkerMetrics

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKER = DEPLOY / "docker"
SYSTEMD = DEPLOY / "systemd"
BASE_CONFIG = K8S / "base" / "config.toml"
DEFAULTS = load_settings(ROOT / "config.toml")
DRAIN_S = DEFAULTS.worker.drain_timeout_s
CREDENTIALS_SECRET = "inspectd-credentials"
CONSOLE = "console"  # the operator console's objects carry app.kubernetes.io/component: console
# The oldest Kubernetes release the manifests are meant for, and the newest schemas shipped.
K8S_VERSIONS = ["1.29", "latest"]
CRD_KINDS = {"ServiceMonitor", "PrometheusRule", "ScaledObject"}
ENV_NAME = re.compile(r"\bINSPECTD_([A-Z0-9_]+)")


def subcommands() -> set[str]:
    """The sub-commands of `inspectd` (train, score, run...)."""
    actions = build_parser()._actions
    return {name for a in actions if isinstance(a, argparse._SubParsersAction) for name in a.choices}


def load_docs_text(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


def load_docs(path: Path) -> list[dict[str, Any]]:
    return load_docs_text(path.read_text())


def setting_field(name: str) -> tuple[str, str] | None:
    """`INSPECTD_KAFKA__TOPIC` -> ("kafka", "topic") when that setting exists, else None."""
    section, sep, key = name.removeprefix("INSPECTD_").lower().partition("__")
    field = Settings.model_fields.get(section)
    if not sep or field is None or not issubclass(field.annotation, Section):
        return None
    return (section, key) if key in field.annotation.model_fields else None


def settings_from_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> Settings:
    """The settings a process gets with `env` on top of the shipped config.toml."""
    for name in list(os.environ):
        if name.startswith("INSPECTD_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith("INSPECTD_") and name != "INSPECTD_CONFIG":
            monkeypatch.setenv(name, value)
    return load_settings(BASE_CONFIG)


# --------------------------------------------------------------------------------------------------
# A small kustomize: enough for what deploy/k8s uses, and it refuses anything else.

# Strategic-merge keys of the lists these patches touch (from the Kubernetes API's patchMergeKey).
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
}
KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "components", "configMapGenerator", "patches", "images"}
GENERATED = "__generated__"


def smp(base: Any, patch: Any, key: str = "") -> Any:
    """Strategic merge: maps merge recursively, lists with a merge key merge by it, other lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        assert not any(k.startswith("$") for k in patch), "patch directives are not supported"
        out = dict(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            else:
                out[k] = smp(out[k], v, k) if k in out else copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list) and key in MERGE_KEYS:
        # Like kustomize (kyaml): items new to the list come first, in the patch's order.
        mk, out, new = MERGE_KEYS[key], copy.deepcopy(base), []
        for item in patch:
            at = next((i for i, x in enumerate(out) if x.get(mk) == item.get(mk)), None)
            if at is None:
                new.append(copy.deepcopy(item))
            else:
                out[at] = smp(out[at], item)
        return new + out
    return copy.deepcopy(patch)


def json6902(doc: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")]
        node: Any = doc
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        if isinstance(node, list):
            last_i = len(node) if last == "-" else int(last)
            if op["op"] == "add":
                node.insert(last_i, op["value"])
            elif op["op"] == "remove":
                del node[last_i]
            else:
                node[last_i] = op["value"]
        elif op["op"] in ("add", "replace"):
            assert op["op"] == "add" or last in node, op
            node[last] = op["value"]
        else:
            assert op["op"] == "remove" and last in node, op
            del node[last]
    return doc


def matches(doc: dict[str, Any], target: dict[str, str]) -> bool:
    group, _, version = doc["apiVersion"].rpartition("/")
    return all(
        want == {"group": group, "version": version, "kind": doc["kind"], "name": doc["metadata"]["name"]}[field]
        for field, want in target.items()
    )


def apply_patches(root: Path, spec: dict[str, Any], docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for entry in spec.get("patches", []):
        assert set(entry) <= {"path", "patch", "target"}, entry
        patch = yaml.safe_load((root / entry["path"]).read_text() if "path" in entry else entry["patch"])
        if isinstance(patch, list):
            target, apply = entry["target"], lambda d, p=patch: json6902(d, p)
        else:
            target = entry.get("target") or {"kind": patch["kind"], "name": patch["metadata"]["name"]}
            apply = lambda d, p=patch: smp(d, p)  # noqa: E731
        hits = [i for i, d in enumerate(docs) if matches(d, target)]
        assert hits, f"patch {entry} in {root} matches nothing"
        for i in hits:
            docs[i] = apply(docs[i])
    return docs


def apply_images(spec: dict[str, Any], docs: list[dict[str, Any]]) -> None:
    for image in spec.get("images", []):
        for doc in docs:
            pod = doc.get("spec", {}).get("template", {}).get("spec", {})
            for c in pod.get("containers", []) + pod.get("initContainers", []):
                name, _, tag = c["image"].partition(":")
                if name == image["name"]:
                    c["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"


def kustomize_hash(cm: dict[str, Any]) -> str:
    """kustomize's name suffix of a generated ConfigMap (api/hasher): sha256 of Go's JSON encoding of
    kind, data and an empty name (kustomize 5 hashes before naming), first 10 hex digits, vowels mapped."""
    encoded = json.dumps(
        {"data": cm["data"], "kind": "ConfigMap", "name": ""}, separators=(",", ":"), sort_keys=True, ensure_ascii=False
    )
    for char, escape in (
        ("&", "\\u0026"),
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        encoded = encoded.replace(char, escape)
    hexdigest = hashlib.sha256(encoded.encode()).hexdigest()[:10]
    return hexdigest.translate(str.maketrans("013ae", "ghkmt"))


def accumulate(root: Path, kind: str = "Kustomization", docs: list[dict[str, Any]] | None = None) -> list[dict]:
    spec = yaml.safe_load((root / "kustomization.yaml").read_text())
    assert spec.get("kind", "Kustomization") == kind, root
    assert set(spec) <= KUSTOMIZATION_FIELDS, f"{root}: renderer lacks {set(spec) - KUSTOMIZATION_FIELDS}"
    docs = list(docs or [])
    for entry in spec.get("resources", []):
        path = (root / entry).resolve()
        docs += accumulate(path) if path.is_dir() else load_docs(path)
    for entry in spec.get("components", []):
        docs = accumulate((root / entry).resolve(), "Component", docs)
    for gen in spec.get("configMapGenerator", []):
        assert set(gen) <= {"name", "files"}, gen
        data = {}
        for f in gen["files"]:
            path = (root / f).resolve()
            assert path.is_relative_to(root.resolve()), f"{f}: kustomize refuses files outside {root}"
            data[path.name] = path.read_text()
        docs.append(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data, GENERATED: True}
        )
    docs = apply_patches(root, spec, docs)
    apply_images(spec, docs)
    return docs


def render(root: Path) -> list[dict[str, Any]]:
    """Build like `kustomize build root`: generated ConfigMaps get their hash suffix and references follow."""
    docs = accumulate(root)
    renamed = {}
    for doc in docs:
        if doc.pop(GENERATED, False):
            new = f"{doc['metadata']['name']}-{kustomize_hash(doc)}"
            renamed[doc["metadata"]["name"]], doc["metadata"]["name"] = new, new
    for doc in docs:
        pod = doc.get("spec", {}).get("template", {}).get("spec", {})
        for volume in pod.get("volumes", []):
            if "configMap" in volume:
                volume["configMap"]["name"] = renamed.get(volume["configMap"]["name"], volume["configMap"]["name"])
        for c in pod.get("containers", []):
            refs = [
                e["valueFrom"]["configMapKeyRef"]
                for e in c.get("env", [])
                if "configMapKeyRef" in e.get("valueFrom", {})
            ] + [e["configMapRef"] for e in c.get("envFrom", []) if "configMapRef" in e]
            for ref in refs:
                ref["name"] = renamed.get(ref["name"], ref["name"])
    return docs


# What an operator applies: each overlay, and the GPU overlay with both optional components.
COMBINED = "gpu+monitoring+keda"
VARIANTS = ["base", "cpu", "gpu", COMBINED]


def variant_dir(name: str, tmp: Path) -> Path:
    if name == "base":
        return K8S / "base"
    if name != COMBINED:
        return K8S / "overlays" / name
    # kustomize accepts only relative paths: an operator's overlay elsewhere that pulls in both components.
    tmp.mkdir(parents=True, exist_ok=True)
    rel = Path(os.path.relpath(K8S, tmp))
    (tmp / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [str(rel / "overlays" / "gpu")],
                "components": [str(rel / "components" / "monitoring"), str(rel / "components" / "keda")],
            }
        )
    )
    return tmp


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    tmp = tmp_path_factory.mktemp("kustomize")
    return {name: render(variant_dir(name, tmp / "combined")) for name in VARIANTS}


def component(doc: dict[str, Any]) -> str | None:
    return doc["metadata"].get("labels", {}).get("app.kubernetes.io/component")


def one(docs: list[dict[str, Any]], kind: str, of: str = "worker") -> dict[str, Any]:
    """The single object of `kind` of the workers (by default: everything but the console's), or of `of`
    ("console": labelled so; shared objects such as the ConfigMap have no component label)."""
    found = [
        d
        for d in docs
        if d["kind"] == kind and (component(d) != CONSOLE if of == "worker" else component(d) in (of, None))
    ]
    assert len(found) == 1, f"{len(found)} {kind} objects of the {of}"
    return found[0]


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == "inspectd")


def literal_env(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}


def kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


# --------------------------------------------------------------------------------------------------
# Kubernetes


def test_base_config_is_the_repository_config() -> None:
    assert BASE_CONFIG.read_bytes() == (ROOT / "config.toml").read_bytes(), (
        "deploy/k8s/base/config.toml must be a copy of config.toml: cp config.toml deploy/k8s/base/"
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_renderer_matches_kustomize(variant: str, rendered: dict, tmp_path: Path) -> None:
    command = kustomize_command()
    if command is None:
        pytest.skip("no kustomize or kubectl binary: only the built-in renderer is used")
    out = subprocess.run(
        [*command, str(variant_dir(variant, tmp_path))], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    assert sorted(load_docs_text(out.stdout), key=key) == sorted(rendered[variant], key=key)


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_manifests_validate_against_kubernetes_schemas(variant: str, k8s_version: str, rendered: dict) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="test dependency kubernetes-validate (dev extra)")
    version = str(kv.latest_version()) if k8s_version == "latest" else k8s_version
    docs = rendered[variant]
    assert {d["kind"] for d in docs} >= {
        "Deployment",
        "ConfigMap",
        "Service",
        "PodDisruptionBudget",
        "PersistentVolumeClaim",
        "ServiceAccount",
    }
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} invalid for Kubernetes {version}: {exc}")


def test_model_loader_tool_validates() -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="test dependency kubernetes-validate (dev extra)")
    (pod,) = load_docs(K8S / "tools" / "model-loader.yaml")
    kv.validate(pod, K8S_VERSIONS[0], strict=True)
    pvc = one(load_docs(K8S / "base" / "pvc.yaml"), "PersistentVolumeClaim")
    assert pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert pod["spec"]["securityContext"]["runAsUser"] == 10001  # files readable by the workers' user


def test_validation_catches_mistakes(rendered: dict) -> None:
    """Strict schema validation is what makes the checks above worth something."""
    kv = pytest.importorskip("kubernetes_validate", reason="test dependency kubernetes-validate (dev extra)")
    deployment = copy.deepcopy(one(rendered["gpu"], "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, K8S_VERSIONS[0], strict=True)


@pytest.mark.parametrize("variant", ["cpu", "gpu", COMBINED])
def test_deployment_runs_the_worker_as_configured(
    variant: str, rendered: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = rendered[variant]
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    c = container(docs)
    assert c["args"][0] in subcommands() and c["args"] == ["run"]
    assert c["image"].startswith("registry.example.com/inspectd:"), "the overlay sets the image"
    env = literal_env(c)
    # Secrets are referenced, never included.
    assert not [d for d in docs if d["kind"] == "Secret"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert set(refs) >= {"INSPECTD_REDIS__URL", "INSPECTD_KAFKA__SASL_PASSWORD"}
    assert {r["name"] for r in refs.values()} == {CREDENTIALS_SECRET}
    settings = settings_from_env(monkeypatch, {**env, **dict.fromkeys(refs, "redis://redis.example:6379/0")})
    # The settings file is the generated ConfigMap, mounted where INSPECTD_CONFIG points.
    config = one(docs, "ConfigMap")
    assert config["data"]["config.toml"] == BASE_CONFIG.read_text()
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_name = config["metadata"]["name"]
    config_volume = next(n for n, v in volumes.items() if v.get("configMap", {}).get("name") == config_name)
    assert Path(mounts[config_volume]["mountPath"]) / "config.toml" == Path(env["INSPECTD_CONFIG"])
    # The model directory is on the read-only model claim.
    pvc = one(docs, "PersistentVolumeClaim")
    model_volume = next(n for n, v in volumes.items() if "persistentVolumeClaim" in v)
    assert volumes[model_volume]["persistentVolumeClaim"] == {"claimName": pvc["metadata"]["name"], "readOnly": True}
    assert mounts[model_volume]["readOnly"] is True
    assert Path(settings.worker.model_dir).is_relative_to(mounts[model_volume]["mountPath"])
    # Health endpoint and probes.
    port = next(p for p in c["ports"] if p["name"] == "http")
    assert port["containerPort"] == settings.worker.http_port
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(settings.worker.http_port)
    assert annotations["prometheus.io/path"] == "/metrics"
    # SIGTERM drains for up to drain_timeout_s, then a batch: the grace period must cover both.
    assert pod["terminationGracePeriodSeconds"] >= settings.worker.drain_timeout_s + 30
    # Non-root, read-only root filesystem with a writable /tmp.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"])
    assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
    # Device per overlay.
    gpus = c["resources"]["limits"].get("nvidia.com/gpu")
    if variant == "cpu":
        assert settings.model.device == "cpu" and gpus is None
    else:
        assert settings.model.device == "cuda" and gpus == "1"
        assert c["resources"]["requests"]["nvidia.com/gpu"] == gpus
        assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_pdb_and_service_select_the_workers(variant: str, rendered: dict) -> None:
    docs = rendered[variant]
    labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert one(docs, "Deployment")["spec"]["replicas"] >= 2
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1
    service = one(docs, "Service")
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] in {p["name"] for p in container(docs)["ports"]}


@pytest.mark.parametrize("variant", ["cpu", "gpu", COMBINED])
def test_console_deployment_and_service(variant: str, rendered: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = rendered[variant]
    deployment = one(docs, "Deployment", "console")
    pod = deployment["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["args"] == ["console"] and c["args"][0] in subcommands()
    assert c["image"] == container(docs)["image"], "the workers' image"
    # One pod: sessions live in the process, and a second pod would not know them.
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert refs == {"INSPECTD_CONSOLE__REDIS_URL": {"name": CREDENTIALS_SECRET, "key": "console-redis-url"}}
    env = literal_env(c)
    settings = settings_from_env(monkeypatch, {**env, **dict.fromkeys(refs, "redis://console:pw@redis:6379/0")})
    assert settings.console.host == "0.0.0.0" and settings.console.cookie_secure
    assert settings.console.connection_url(settings.redis) == "redis://console:pw@redis:6379/0"
    port = next(p for p in c["ports"] if p["name"] == "http")
    assert port["containerPort"] == settings.console.port
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    users = next(n for n, v in volumes.items() if "secret" in v)
    assert Path(mounts[users]["mountPath"]) / "users.json" == Path(settings.console.users_file)
    assert mounts[users]["readOnly"] is True and volumes[users]["secret"]["defaultMode"] == 0o440
    config_name = one(docs, "ConfigMap")["metadata"]["name"]
    assert any(v.get("configMap", {}).get("name") == config_name for v in volumes.values())
    assert pod["securityContext"]["runAsNonRoot"] is True and c["securityContext"]["readOnlyRootFilesystem"] is True
    assert "nvidia.com/gpu" not in c["resources"]["limits"]
    service = one(docs, "Service", "console")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    worker_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert not service["spec"]["selector"].items() <= worker_labels.items(), "the console Service selects workers"


def metric_names() -> set[str]:
    """Every series name the worker exports (counters with _total, histograms with their suffixes...)."""
    suffixes = {
        "counter": ["_total", "_created"],
        "histogram": ["_bucket", "_sum", "_count", "_created"],
        "gauge": [""],
        "info": ["_info"],
    }
    return {f.name + s for f in WorkerMetrics().registry.collect() for s in suffixes[f.type]}


def test_monitoring_component(rendered: dict) -> None:
    docs = rendered[COMBINED]
    service = one(docs, "Service")
    monitor = one(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    rule = one(docs, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    try:
        import promql_parser
    except ImportError:  # optional test dependency: without it only the metric names are checked
        promql_parser = None
    known, used = metric_names(), set()
    for group in rule["spec"]["groups"]:
        assert group["name"] and group["rules"]
        for r in group["rules"]:
            assert set(r) <= {"alert", "expr", "for", "labels", "annotations"} and r["alert"] and r["expr"]
            assert re.fullmatch(r"\d+[smh]", r["for"])
            if promql_parser is not None:
                promql_parser.parse(r["expr"])  # raises ValueError on a syntax error
            used |= set(re.findall(r"\binspectd_[a-z_]+", r["expr"]))
    assert used and used <= known, f"unknown metrics: {used - known}"


def test_keda_component(rendered: dict) -> None:
    docs = rendered[COMBINED]
    scaled = one(docs, "ScaledObject")
    deployment = one(docs, "Deployment")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    assert 1 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]
    (trigger,) = scaled["spec"]["triggers"]
    meta = trigger["metadata"]
    assert trigger["type"] == "kafka"
    assert meta["topic"] == DEFAULTS.kafka.topic and meta["consumerGroup"] == DEFAULTS.kafka.group_id
    assert meta["bootstrapServers"] == literal_env(container(docs))["INSPECTD_KAFKA__BOOTSTRAP_SERVERS"]
    assert int(meta["lagThreshold"]) > 0
    assert meta["allowIdleConsumers"] == "false", "never more workers than partitions"
    assert meta["offsetResetPolicy"] == "earliest"
    assert 'auto_offset_reset="earliest"' in (ROOT / "daemon" / "kafka_clients.py").read_text()
    # Not in the plain overlays: KEDA and the Prometheus Operator are optional.
    for variant in ("base", "cpu", "gpu"):
        assert not CRD_KINDS & {d["kind"] for d in rendered[variant]}


# --------------------------------------------------------------------------------------------------
# Settings names and metric names used anywhere under deploy/


def deploy_files() -> Iterator[Path]:
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file() and path.name != "config.toml":
            yield path


def test_every_inspectd_variable_is_a_setting() -> None:
    seen = set()
    for path in deploy_files():
        for name in ENV_NAME.findall(path.read_text()):
            full = f"INSPECTD_{name}"
            seen.add(full)
            assert full == "INSPECTD_CONFIG" or setting_field(full), f"{path.relative_to(ROOT)}: {full} is no setting"
    assert {"INSPECTD_KAFKA__BOOTSTRAP_SERVERS", "INSPECTD_REDIS__URL", "INSPECTD_WORKER__MODEL_DIR"} <= seen
    assert setting_field("INSPECTD_KAFKA__NO_SUCH_KEY") is None and setting_field("INSPECTD_NOPE__URL") is None


def test_readme_covers_operations() -> None:
    text = (DEPLOY / "README.md").read_text()
    for needle in (
        "docs/RESULTS.md",
        "inspectd models rollback",
        "partitions",
        "model_dir",
        CREDENTIALS_SECRET,
        "/healthz",
        "/readyz",
        "systemctl",
        "kubectl",
        "docker compose",
    ):
        assert needle in text, needle
    known = metric_names()
    named = set(re.findall(r"\binspectd_[a-z_]+", text))
    assert {
        "inspectd_frames_total",
        "inspectd_bad_frames_total",
        "inspectd_consumer_lag",
        "inspectd_end_to_end_latency_seconds",
        "inspectd_stage_seconds",
        "inspectd_retries_total",
        "inspectd_model_info",
    } <= named
    histograms = {f.name for f in WorkerMetrics().registry.collect() if f.type == "histogram"}
    assert named <= known | histograms, f"unknown metrics in deploy/README.md: {named - known - histograms}"


# --------------------------------------------------------------------------------------------------
# systemd


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        assert current is not None, line
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


UNIT = SYSTEMD / "inspectd.service"


def test_systemd_unit_options(monkeypatch: pytest.MonkeyPatch) -> None:
    unit = parse_unit(UNIT.read_text())
    s = unit["Service"]
    first = {k: v[-1] for k, v in s.items()}
    assert first["Type"] in ("exec", "simple"), "inspectd does not implement sd_notify"
    exec_start = first["ExecStart"].split()
    assert Path(exec_start[0]).name == "inspectd" and exec_start[1] in subcommands() and exec_start[1:] == ["run"]
    assert first["Restart"] in ("on-failure", "always")
    assert str(EXIT_CONFIG) in first["RestartPreventExitStatus"].split(), "a configuration error is not retried"
    assert first["User"] == first["Group"] == "inspectd"
    assert parse_seconds(first["TimeoutStopSec"]) >= DRAIN_S + 30
    assert first["KillSignal"] == "SIGTERM"
    assert first["StandardOutput"] == first["StandardError"] == "journal"
    # Secrets from a root-only environment file; GPU-friendly sandboxing.
    assert first["EnvironmentFile"].lstrip("-") == "/etc/inspectd/inspectd.env"
    assert first["PrivateDevices"] == "no"
    assert first["DevicePolicy"] == "closed" and any(v.startswith("char-nvidia") for v in s["DeviceAllow"])
    assert "MemoryDenyWriteExecute" not in s and "ProcSubset" not in s
    for option in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "ProtectKernelModules", "RestrictSUIDSGID"):
        assert first[option] == "yes", option
    assert first["ProtectSystem"] == "strict"
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    env = dict(v.split("=", 1) for v in s["Environment"])
    assert env["INSPECTD_CONFIG"] == "/etc/inspectd/config.toml"
    settings = settings_from_env(monkeypatch, env)
    assert Path(settings.worker.model_dir).is_absolute()
    # The dedicated user comes from the sysusers.d file.
    sysusers = [
        ln.split()
        for ln in (SYSTEMD / "inspectd.sysusers.conf").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert ["u", "inspectd"] == sysusers[0][:2]


def parse_seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+)\s*(s|min|m)?", value)
    assert m, value
    return int(m[1]) * (60 if m[2] in ("min", "m") else 1)


def test_systemd_env_example() -> None:
    text = (SYSTEMD / "inspectd.env.example").read_text()
    assert "0600" in text
    for line in text.splitlines():
        line = line.strip().lstrip("#")
        if "=" in line and line.startswith("INSPECTD_"):
            name = line.split("=", 1)[0]
            assert setting_field(name), name


def verify_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointed at this environment's inspectd, which verify requires to exist."""
    exe = shutil.which("inspectd") or str(Path(sys.executable).parent / "inspectd")
    assert Path(exe).exists(), "the inspectd console script is not installed"
    text = re.sub(r"^ExecStart=\S+", f"ExecStart={exe}", UNIT.read_text(), flags=re.M)
    copy_path = tmp_path / UNIT.name
    copy_path.write_text(text)
    return copy_path


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    unit = verify_copy(tmp_path)
    out = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path
    )
    complaints = [ln for ln in (out.stdout + out.stderr).splitlines() if "inspectd" in ln]
    assert out.returncode == 0 and not complaints, out.stdout + out.stderr
    # The check itself works: an unknown key is reported.
    broken = tmp_path / "broken" / UNIT.name
    broken.parent.mkdir()
    broken.write_text(unit.read_text().replace("UMask=0027", "UMask=0027\nProtectEverything=yes"))
    out = subprocess.run(
        ["systemd-analyze", "verify", str(broken)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert "ProtectEverything" in out.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_security_exposure(tmp_path: Path) -> None:
    unit = verify_copy(tmp_path)
    out = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    if "--offline" in out.stderr or "unrecognized option" in out.stderr:
        pytest.skip("systemd-analyze security --offline needs systemd >= 250")
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out.stdout + out.stderr)
    assert m, out.stdout + out.stderr
    # 0 = fully sandboxed, 10 = not at all; GPU access and the network keep it above 0.
    assert float(m[1]) <= 2.5, out.stdout


# --------------------------------------------------------------------------------------------------
# Container image


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    lines = [ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))  # continuation lines
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1].strip()) for ln in text.splitlines() if ln.strip()]


DOCKERFILE = DOCKER / "Dockerfile"


def dockerignore_included(rel: str, patterns: list[str]) -> bool:
    included = True
    parts = Path(rel).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        p = pattern.lstrip("!").rstrip("/")
        hit = any(
            fnmatch.fnmatch(c, p) or (p.startswith("**/") and fnmatch.fnmatch(Path(c).name, p[3:])) for c in candidates
        )
        if hit:
            included = negate
    return included


def test_dockerfile_builds_from_project_files() -> None:
    steps = dockerfile_instructions(DOCKERFILE)
    ignore = [
        ln.strip()
        for ln in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    sources = []
    for op, args in steps:
        if op == "COPY" and not args.startswith("--from"):
            *srcs, _dest = args.split()
            sources += srcs
    for src in sources:
        path = ROOT / src
        assert path.exists(), f"COPY {src}: no such file in the build context"
        files = [path] if path.is_file() else [p for p in path.rglob("*.py") if "__pycache__" not in p.parts]
        assert files
        for f in files:
            assert dockerignore_included(str(f.relative_to(ROOT)), ignore), f"{f} is excluded by the dockerignore"
    assert not dockerignore_included(".venv/bin/python", ignore)
    assert not dockerignore_included("daemon/__pycache__/cli.cpython-311.pyc", ignore)
    # Every package that setuptools installs is in the image, and what pip needs to build it.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert {p.split(".")[0] for p in project["tool"]["setuptools"]["packages"]} <= set(sources)
    assert {"pyproject.toml", project["project"]["readme"], "config.toml"} <= set(sources)


def test_dockerfile_runtime_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    steps = dockerfile_instructions(DOCKERFILE)
    final = steps[max(i for i, (op, _) in enumerate(steps) if op == "FROM") :]
    last = {op: args for op, args in final}
    assert json.loads(last["ENTRYPOINT"]) == ["inspectd"]
    cmd = json.loads(last["CMD"])
    assert cmd == ["run"] and cmd[0] in subcommands()
    user = last["USER"].split(":")[0]
    assert user not in ("0", "root") and int(user) > 0
    assert "/healthz" in last["HEALTHCHECK"] and "--start-period" in last["HEALTHCHECK"]
    assert last["STOPSIGNAL"] == "SIGTERM"
    assert int(last["EXPOSE"]) == DEFAULTS.worker.http_port
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(args for op, args in final if op == "ENV")))
    assert "NVIDIA_VISIBLE_DEVICES" not in env, "GPUs are granted by the runtime, not the image"
    settings_from_env(monkeypatch, env)
    assert env["INSPECTD_CONFIG"] == "/etc/inspectd/config.toml"
    assert any(op == "COPY" and args.split() == ["config.toml", env["INSPECTD_CONFIG"]] for op, args in final)


def test_dockerfile_pins_match_pyproject() -> None:
    args = dict(a.split("=", 1) for op, a in dockerfile_instructions(DOCKERFILE) if op == "ARG" and "=" in a)
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    specs = {
        re.match(r"[A-Za-z0-9_.-]+", d)[0].lower(): SpecifierSet(d[len(re.match(r"[A-Za-z0-9_.-]+", d)[0]) :])
        for d in deps
    }
    assert Version(args["TORCH_VERSION"]) in specs["torch"]
    assert Version(args["TORCHVISION_VERSION"]) in specs["torchvision"]
    assert args["PYTHON_IMAGE"].startswith("python:3.11")
    assert args["TORCH_INDEX_URL"] == "https://pypi.org/simple", "default: PyPI's CUDA-bundling wheels"
    text = DOCKERFILE.read_text()
    assert "https://download.pytorch.org/whl/cpu" in text, "the CPU variant is documented"


# --------------------------------------------------------------------------------------------------
# Compose stack


def compose_interpolate(value: str) -> str:
    """Compose's ${VAR:-default} / ${VAR-default} with an empty environment."""
    return re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: m[2] or "", value)


def compose(name: str = "compose.yaml") -> dict[str, Any]:
    return yaml.safe_load((DOCKER / name).read_text())


@pytest.mark.parametrize("name", ["compose.yaml", "compose.gpu.yaml"])
def test_compose_files_follow_the_compose_spec(name: str) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    vendor = pytest.importorskip(
        "check_jsonschema.builtin_schemas.vendor",
        reason="test dependency check-jsonschema (ships the compose-spec schema)",
    )
    schema = json.loads((Path(vendor.__file__).parent / "compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(compose(name)), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_compose_stack(monkeypatch: pytest.MonkeyPatch) -> None:
    services = compose()["services"]
    assert {"kafka", "kafka-init", "redis", "inspectd"} <= set(services)
    assert services["kafka"]["image"].startswith("apache/kafka:")
    kafka_env = services["kafka"]["environment"]
    assert "controller" in kafka_env["KAFKA_PROCESS_ROLES"], "KRaft, no ZooKeeper"
    assert len(base64.urlsafe_b64decode(kafka_env["CLUSTER_ID"] + "==")) == 16, "a KRaft cluster id is a UUID"
    worker = services["inspectd"]
    build = worker["build"]
    context = (DOCKER / build["context"]).resolve()
    assert context == ROOT and (context / build["dockerfile"]).resolve() == DOCKERFILE
    assert worker["command"][0] in subcommands()
    env = {k: compose_interpolate(str(v)) for k, v in worker["environment"].items()}
    settings = settings_from_env(monkeypatch, env)
    assert settings.kafka.bootstrap_servers in kafka_env["KAFKA_ADVERTISED_LISTENERS"]
    assert settings.redis.connection_url().startswith("redis://redis:")
    # The model directory: `make evaluate`'s model by default, mounted read-only.
    source, target, mode = compose_interpolate(worker["volumes"][0]).split(":")
    assert target == settings.worker.model_dir and mode == "ro"
    assert (DOCKER / source).resolve() == ROOT / "runs" / "elpv-demo" / "model"
    assert "OUT=${OUT:-runs/elpv-demo}" in (ROOT / "scripts" / "elpv_demo.sh").read_text()
    assert parse_seconds(worker["stop_grace_period"]) >= DRAIN_S + 30
    assert worker["depends_on"]["kafka-init"]["condition"] == "service_completed_successfully"
    assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    port = worker["ports"][0].rsplit(":", 1)[1]
    assert int(port) == settings.worker.http_port


def test_compose_console(monkeypatch: pytest.MonkeyPatch) -> None:
    services = compose()["services"]
    console = services["console"]
    assert console["image"] == services["inspectd"]["image"] and console["command"] == ["console"]
    assert console["command"][0] in subcommands()
    settings = settings_from_env(monkeypatch, {k: str(v) for k, v in console["environment"].items()})
    assert settings.redis.connection_url().startswith("redis://redis:")
    assert console["ports"] == [f"127.0.0.1:{settings.console.port}:{settings.console.port}"]
    volume, target = console["volumes"][0].split(":")
    assert volume in compose()["volumes"] and Path(settings.console.users_file).parent == Path(target)
    assert str(settings.console.port) in " ".join(console["healthcheck"]["test"])


def test_systemd_console_unit(monkeypatch: pytest.MonkeyPatch) -> None:
    unit = parse_unit((SYSTEMD / "inspectd-console.service").read_text())
    s = {k: v[-1] for k, v in unit["Service"].items()}
    exec_start = s["ExecStart"].split()
    assert Path(exec_start[0]).name == "inspectd" and exec_start[1:] == ["console"]
    assert exec_start[1] in subcommands()
    assert s["User"] == "inspectd" and s["KillSignal"] == "SIGTERM" and s["ProtectSystem"] == "strict"
    env = dict(v.split("=", 1) for v in unit["Service"]["Environment"])
    settings = settings_from_env(monkeypatch, env)
    assert Path(settings.console.users_file).parent == Path("/var/lib") / s["StateDirectory"]
    assert settings.console.host == "127.0.0.1", "behind a reverse proxy on the same host"


def test_compose_creates_the_topics() -> None:
    init = compose()["services"]["kafka-init"]
    script = " ".join(init["command"])
    created = {m[0]: int(m[1]) for m in re.findall(r"--topic (\S+) --partitions (\d+)", script)}
    assert created[DEFAULTS.kafka.topic] >= 2, "several partitions: partitions >= workers"
    assert DEFAULTS.kafka.dlq_topic in created
    # Frames up to [kafka] max_message_bytes (+ record overhead) must fit the topics.
    sizes = [int(s) for s in re.findall(r"max\.message\.bytes=(\d+)", script)]
    assert len(sizes) == 2 and min(sizes) >= DEFAULTS.kafka.max_message_bytes + FETCH_HEADROOM
    assert "--if-not-exists" in script
    assert init["depends_on"]["kafka"]["condition"] == "service_healthy"


def test_compose_gpu_override(monkeypatch: pytest.MonkeyPatch) -> None:
    worker = compose("compose.gpu.yaml")["services"]["inspectd"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert settings_from_env(monkeypatch, worker["environment"]).model.device == "cuda"
    assert worker["build"]["args"]["TORCH_INDEX_URL"] == "https://pypi.org/simple"
