"""Offline checks of the deployment files: docker/, manifests/ (kustomize), charts/unisd/.

Nothing here builds an image or talks to a cluster. What is checked:
- every manifest of the kustomize base and overlays, rendered the way `kubectl apply -k` would (a small
  renderer below, cross-checked against `kubectl kustomize` where that binary exists), and every
  template of the Helm chart rendered offline (helm-python-sdk, embedded Helm v4) under several value
  sets, passes `kubernetes-validate --strict` against Kubernetes 1.31 (the oldest we target) and 1.37
  (the newest schema kubernetes-validate 1.37.0 ships); the chart passes `helm lint --strict`;
- security properties read from those rendered objects (non-root, no privilege escalation, capabilities
  dropped, read-only roots, no service-account token and no network for sandbox pods, secrets only by
  reference, resources set, least-privilege RBAC);
- the Dockerfiles parse, COPY only files that exist and that .dockerignore sends, pin their bases, run
  as a non-root uid and carry the package version;
- the upload script the chart's Job runs drives a real kfp.Client against a fake KFP API server on
  127.0.0.1 (upload, new version, recurring run create/keep/replace/disable).

Needs the [deploy] extra (kubernetes-validate, helm-python-sdk); skipped without it.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

import unisd
from unisd.images import DEFAULT_REGISTRY
from unisd.images import image as _image

kv = pytest.importorskip("kubernetes_validate.utils", reason="needs the [deploy] extra (kubernetes-validate)")
helm = pytest.importorskip("helm_python", reason="needs the [deploy] extra (helm-python-sdk)")

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = REPO / "manifests"
CHART = REPO / "charts" / "unisd"
DOCKER = REPO / "docker"
UPLOAD_SCRIPT = CHART / "files" / "upload_pipeline.py"
K8S_VERSIONS = ("1.31.0", "1.37.0")
KUSTOMIZE_TARGETS = ("base", "overlays/gpu", "overlays/dev")
SANDBOX_LABEL = ("unisd.ai/sandbox", "true")
LAUNCHER_LABEL = ("unisd.ai/sandbox-kfp-launcher", "true")
RUN_AS_USER = 10001
VERSION = unisd.__version__


def image(kind: str) -> str:
    """The image reference unisd uses for `kind`, independent of UNISD_IMAGE_REGISTRY in the env."""
    return _image(kind, registry=DEFAULT_REGISTRY)


# Helm value sets the chart must render and validate under (name -> overrides).
CHART_VARIANTS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "scheduled-multiuser": {
        "schedule": {
            "enabled": True,
            "cron": "0 30 3 * * 1-5",
            "maxConcurrency": 2,
            "params": {"preset": "unisd"},
        },
        "kfp": {"namespace": "team-a", "serviceAccountToken": {"enabled": True}},
        "namespace": {"create": True, "name": "unisd-prod"},
        "image": {"pullSecrets": ["ghcr-pull"]},
        "cache": {"storageClassName": "cephfs"},
        # the built-ins on a data PVC (a path relative to its mount), credentials for S3 datasets by reference
        "data": {"source": "unisd-data/v1", "pvc": "team-data", "secretName": "team-data-s3"},
    },
    "minimal": {
        "mlflow": {"enabled": False},
        "pipeline": {"upload": {"enabled": False}},
        "limitRange": {"enabled": False},
        "resourceQuota": {"enabled": False},
    },
}


# ----------------------------------------------------------------------------------------------------
# A small kustomize: resources (files or directories), namespace, and inline JSON6902 patches
# (op add/replace/remove with a kind/name target) — exactly the features manifests/ uses. Anything
# else in a kustomization.yaml is an error, so a new feature cannot slip past the checks unrendered.

CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass"}
KUSTOMIZATION_KEYS = {"apiVersion", "kind", "namespace", "resources", "patches"}


def _pointer(path: str) -> list[str]:
    """RFC 6901 JSON pointer -> list of tokens."""
    if not path.startswith("/"):
        raise ValueError(f"JSON pointer {path!r} must start with '/'")
    return [t.replace("~1", "/").replace("~0", "~") for t in path[1:].split("/")]


def apply_json6902(doc: dict, ops: list[dict], where: str) -> dict:
    """Apply RFC 6902 add/replace/remove operations to a copy of `doc`."""
    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = _pointer(op["path"])
        node: Any = doc
        for token in parents:
            node = node[int(token)] if isinstance(node, list) else node[token]
        kind = op["op"]
        if isinstance(node, list):
            index = len(node) if last == "-" else int(last)
            if kind == "add":
                node.insert(index, op["value"])
            elif kind == "replace":
                node[index] = op["value"]
            elif kind == "remove":
                del node[index]
            else:
                raise ValueError(f"{where}: unsupported patch op {kind!r}")
        else:
            if kind in ("replace", "remove") and last not in node:
                raise KeyError(f"{where}: {op['path']} does not exist, cannot {kind} it")
            if kind in ("add", "replace"):
                node[last] = op["value"]
            elif kind == "remove":
                del node[last]
            else:
                raise ValueError(f"{where}: unsupported patch op {kind!r}")
    return doc


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def render_kustomization(directory: Path) -> list[dict]:
    """The objects `kubectl kustomize directory` would produce (for the features listed above)."""
    kfile = directory / "kustomization.yaml"
    spec = yaml.safe_load(kfile.read_text())
    unknown = set(spec) - KUSTOMIZATION_KEYS
    if unknown:
        raise ValueError(f"{kfile}: the test renderer does not implement {sorted(unknown)}")
    docs: list[dict] = []
    for entry in spec.get("resources", []):
        target = (directory / entry).resolve()
        docs += render_kustomization(target) if target.is_dir() else load_docs(target)
    for i, patch in enumerate(spec.get("patches", [])):
        where = f"{kfile} patches[{i}]"
        target = patch["target"]
        ops = yaml.safe_load(patch["patch"])
        hits = [
            n
            for n, d in enumerate(docs)
            if d["kind"] == target["kind"] and d["metadata"]["name"] == target["name"]
        ]
        if len(hits) != 1:
            raise ValueError(f"{where}: target {target} matches {len(hits)} objects, expected 1")
        docs[hits[0]] = apply_json6902(docs[hits[0]], ops, where)
    if "namespace" in spec:
        for d in docs:
            if d["kind"] not in CLUSTER_SCOPED:
                d["metadata"]["namespace"] = spec["namespace"]
    return docs


def _key(doc: dict) -> tuple[str, str, str]:
    return doc["kind"], doc["metadata"].get("namespace", ""), doc["metadata"]["name"]


@pytest.fixture(scope="module")
def kustomize_docs() -> dict[str, list[dict]]:
    return {t: render_kustomization(MANIFESTS / t) for t in KUSTOMIZE_TARGETS}


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def render_chart(values: dict[str, Any]) -> tuple[list[dict], dict[str, str]]:
    """Render the chart offline as `helm install unisd -n unisd`; return (objects, raw files)."""
    with helm.Chart.load(CHART) as chart:
        files = chart.render(values, name="unisd", namespace="unisd", is_install=True)
    docs = [
        d for name, text in files.items() if name.endswith(".yaml") for d in yaml.safe_load_all(text) if d
    ]
    return docs, files


@pytest.fixture(scope="module")
def chart_docs() -> dict[str, list[dict]]:
    return {name: render_chart(values)[0] for name, values in CHART_VARIANTS.items()}


@pytest.fixture(scope="module")
def all_targets(kustomize_docs, chart_docs) -> dict[str, list[dict]]:
    """Every rendered object set: kustomize:<target> and chart:<variant>."""
    out = {f"kustomize:{t}": d for t, d in kustomize_docs.items()}
    out.update({f"chart:{v}": d for v, d in chart_docs.items()})
    return out


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str, name_suffix: str) -> dict:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]
    assert len(found) == 1, f"expected one {kind} named *{name_suffix}, found {[_key(d) for d in found]}"
    return found[0]


# ----------------------------------------------------------------------------------------------------
# Rendering and schema validation


def test_renderer_implements_json6902_and_rejects_bad_targets():
    doc = {"kind": "X", "metadata": {"name": "a"}, "spec": {"l": [1, 2], "m": {"a/b": 1}}}
    out = apply_json6902(
        doc,
        [
            {"op": "replace", "path": "/spec/m/a~1b", "value": 2},
            {"op": "add", "path": "/spec/l/-", "value": 3},
            {"op": "remove", "path": "/spec/l/0"},
        ],
        "t",
    )
    assert out["spec"] == {"l": [2, 3], "m": {"a/b": 2}}
    assert doc["spec"]["l"] == [1, 2], "the input must not be modified"
    with pytest.raises(KeyError, match="does not exist"):
        apply_json6902(doc, [{"op": "replace", "path": "/spec/missing", "value": 1}], "t")


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with built-in kustomize) not installed")
@pytest.mark.parametrize("target", KUSTOMIZE_TARGETS)
def test_renderer_agrees_with_kubectl_kustomize(target, kustomize_docs):
    out = subprocess.run(
        ["kubectl", "kustomize", str(MANIFESTS / target)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    real = sorted((d for d in yaml.safe_load_all(out.stdout) if d), key=_key)
    ours = sorted(kustomize_docs[target], key=_key)
    assert [_key(d) for d in ours] == [_key(d) for d in real]
    for a, b in zip(ours, real):
        assert a == b, f"{_key(a)} differs from kubectl kustomize"


def _validate_all(docs: list[dict], version: str) -> list[str]:
    problems = []
    for d in docs:
        try:
            kv.validate(d, version, strict=True)
        except kv.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            problems.append(f"{_key(d)}: {path}: {exc.message}")
        except kv.SchemaNotFoundError as exc:
            problems.append(f"{_key(d)}: {exc.message}")
    return problems


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_rendered_object_passes_strict_schema_validation(version, all_targets):
    problems = [f"{name}: {p}" for name, docs in all_targets.items() for p in _validate_all(docs, version)]
    assert not problems, "\n".join(problems)


def test_strict_validation_catches_a_misspelt_field(kustomize_docs):
    """The validator is not a rubber stamp: an unknown field fails under strict mode."""
    deployment = copy.deepcopy(one(kustomize_docs["base"], "Deployment", "mlflow"))
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContxt"] = {}
    assert _validate_all([deployment], K8S_VERSIONS[0])


def test_kubernetes_validate_cli_strict(tmp_path, all_targets):
    """The same check through the `kubernetes-validate --strict` command line, on files."""
    files = []
    for name, docs in all_targets.items():
        path = tmp_path / (re.sub(r"[^a-z0-9]+", "_", name) + ".yaml")
        path.write_text(yaml.safe_dump_all(docs))
        files.append(str(path))
    cmd = [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet"]
    cmd += [a for v in K8S_VERSIONS for a in ("-k", v)] + files
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "WARN" not in out.stdout, out.stdout + out.stderr


def test_helm_lint_strict_is_clean():
    for kube_version in ("v" + v for v in K8S_VERSIONS):
        for values in CHART_VARIANTS.values():
            report = helm.lint(CHART, values, strict=True, kube_version=kube_version)
            serious = [m for m in report["messages"] if m["severity"] >= 2]
            assert not report["errors"] and not serious, report


def test_chart_values_schema_rejects_bad_values():
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema({})  # the defaults are valid
        for bad in (
            {"schedule": {"enabled": True, "cron": "0 2 * * *"}},  # 5 fields: KFP needs 6
            {"image": {"tag": "latest"}},
            {
                "mlflow": {
                    "backendStore": {"secretName": "db", "secretKey": "uri", "value": "postgresql://u:p@h/db"}
                }
            },
            {"kfp": {"host": "ml-pipeline:8888"}},
            {"data": {"mountPath": "data"}},
            {"data": {"pvc": "Team_Data"}},
            {"data": {"accessKeyId": "AKIA…"}},  # credentials never in values: a Secret by name
        ):
            with pytest.raises(helm.HelmValuesError):
                chart.validate_schema(bad)


# ----------------------------------------------------------------------------------------------------
# Security properties


def pod_specs(docs: list[dict]) -> list[tuple[str, dict, dict]]:
    """(where, pod metadata, pod spec) for every object that carries a pod template."""
    out = []
    for d in docs:
        where = f"{d['kind']}/{d['metadata']['name']}"
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"):
            tpl = d["spec"]["template"]
        elif d["kind"] == "CronJob":
            tpl = d["spec"]["jobTemplate"]["spec"]["template"]
        elif d["kind"] == "PodTemplate":
            tpl = d["template"]
        elif d["kind"] == "Pod":
            tpl = d
        else:
            continue
        out.append((where, tpl.get("metadata", {}), tpl["spec"]))
    return out


def test_every_target_defines_pods(all_targets):
    for name, docs in all_targets.items():
        assert pod_specs(docs), f"{name} has no pod specs: the security checks below would be vacuous"


def container_problems(where: str, pod: dict) -> list[str]:
    """Pod Security 'restricted' plus our own rules (read-only root, resources), for one pod spec."""
    problems = []
    psc = pod.get("securityContext", {})
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(flag):
            problems.append(f"{where}: {flag}")
    for vol in pod.get("volumes", []):
        if "hostPath" in vol:
            problems.append(f"{where}: hostPath volume {vol['name']}")
    for c in pod.get("initContainers", []) + pod["containers"]:
        cw = f"{where}/{c['name']}"
        sc = c.get("securityContext", {})
        non_root = sc.get("runAsNonRoot", psc.get("runAsNonRoot"))
        uid = sc.get("runAsUser", psc.get("runAsUser"))
        seccomp = sc.get("seccompProfile", psc.get("seccompProfile", {})).get("type")
        if non_root is not True:
            problems.append(f"{cw}: runAsNonRoot is not true")
        if uid is None or uid == 0:
            problems.append(f"{cw}: runAsUser must be set and non-zero, is {uid}")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{cw}: seccompProfile {seccomp}")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{cw}: allowPrivilegeEscalation is not false")
        if sc.get("privileged"):
            problems.append(f"{cw}: privileged")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []) or caps.get("add"):
            problems.append(f"{cw}: capabilities must drop ALL and add none, are {caps}")
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{cw}: readOnlyRootFilesystem is not true")
        res = c.get("resources", {})
        for kind in ("requests", "limits"):
            for r in ("cpu", "memory"):
                if r not in res.get(kind, {}):
                    problems.append(f"{cw}: resources.{kind}.{r} missing")
    return problems


def test_pod_security(all_targets):
    problems = [
        f"{name}: {p}"
        for name, docs in all_targets.items()
        for where, _, pod in pod_specs(docs)
        for p in container_problems(where, pod)
    ]
    assert not problems, "\n".join(problems)


def test_pod_security_checker_flags_root(kustomize_docs):
    where, _, pod = next(p for p in pod_specs(kustomize_docs["base"]) if p[0].startswith("Deployment"))
    bad = copy.deepcopy(pod)
    bad["securityContext"]["runAsUser"] = 0
    bad["containers"][0]["securityContext"].pop("runAsUser")
    bad["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    found = container_problems(where, bad)
    assert any("runAsUser" in p for p in found) and any("allowPrivilegeEscalation" in p for p in found)


def _is_sandbox(meta: dict) -> bool:
    return meta.get("labels", {}).get(SANDBOX_LABEL[0]) == SANDBOX_LABEL[1]


def test_sandbox_pods_have_no_token(all_targets):
    for name, docs in all_targets.items():
        sandboxes = [(w, pod) for w, meta, pod in pod_specs(docs) if _is_sandbox(meta)]
        assert sandboxes, f"{name}: no sandbox pod template"
        accounts = {d["metadata"]["name"]: d for d in by_kind(docs, "ServiceAccount")}
        for where, pod in sandboxes:
            assert pod.get("automountServiceAccountToken") is False, f"{name} {where}"
            account = accounts[pod["serviceAccountName"]]
            assert account.get("automountServiceAccountToken") is False, f"{name} {where}: {account}"
            assert not any("projected" in v for v in pod.get("volumes", [])), f"{name} {where}"
            assert pod.get("enableServiceLinks") is False, f"{name} {where}: service env vars leak addresses"


def _selects(selector: dict, labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        value, op = labels.get(expr["key"]), expr["operator"]
        if (
            (op == "In" and value not in expr["values"])
            or (op == "NotIn" and value in expr["values"])
            or (op == "Exists" and value is None)
            or (op == "DoesNotExist" and value is not None)
        ):
            return False
    return True


def effective_policy(docs: list[dict], labels: dict[str, str], direction: str) -> list[dict] | None:
    """Union of the rules of every NetworkPolicy isolating these pod labels in `direction`
    ("Ingress"/"Egress"); None when no policy isolates them (everything allowed)."""
    rules: list[dict] | None = None
    for pol in by_kind(docs, "NetworkPolicy"):
        spec = pol["spec"]
        types = spec.get("policyTypes", ["Ingress"] + (["Egress"] if "egress" in spec else []))
        if direction in types and _selects(spec["podSelector"], labels):
            rules = (rules or []) + spec.get(direction.lower(), [])
    return rules


def test_network_policy_isolates_sandbox_pods(all_targets):
    bare = dict([SANDBOX_LABEL])
    step = dict([SANDBOX_LABEL, LAUNCHER_LABEL])
    for name, docs in all_targets.items():
        if not by_kind(docs, "NetworkPolicy"):
            pytest.fail(f"{name}: no NetworkPolicy")
        # A bare sandbox pod: isolated both ways with no rule allowing anything.
        assert effective_policy(docs, bare, "Ingress") == [], name
        assert effective_policy(docs, bare, "Egress") == [], name
        # A KFP step pod with the launcher label: still no ingress; egress only to DNS in kube-system
        # and to the KFP control plane in kubeflow, on listed ports, never an ipBlock or "anywhere".
        assert effective_policy(docs, step, "Ingress") == [], name
        egress = effective_policy(docs, step, "Egress")
        assert egress, f"{name}: a KFP step pod would have no egress; its launcher could not work"
        for rule in egress:
            assert rule.get("to") and rule.get("ports"), f"{name}: egress rule open to anywhere: {rule}"
            for peer in rule["to"]:
                assert "ipBlock" not in peer, f"{name}: {peer}"
                ns = (
                    peer.get("namespaceSelector", {})
                    .get("matchLabels", {})
                    .get("kubernetes.io/metadata.name")
                )
                assert ns in ("kube-system", "kubeflow"), f"{name}: egress to namespace {ns}: {peer}"
                assert peer.get("podSelector"), f"{name}: egress to a whole namespace: {peer}"
        # Ordinary pods (MLflow) are not caught by the sandbox policies.
        assert effective_policy(docs, {"app.kubernetes.io/name": "mlflow"}, "Egress") is None


def test_pod_labels_in_settings_match_the_network_policies(all_targets):
    for name, docs in all_targets.items():
        settings = one(docs, "ConfigMap", "pipeline-settings")["data"]
        labels = json.loads(settings["UNISD_SANDBOX_POD_LABELS"])
        assert labels.get(SANDBOX_LABEL[0]) == SANDBOX_LABEL[1], name
        assert effective_policy(docs, labels, "Ingress") == [], name


SECRETISH = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|CREDENTIAL|(^|_)KEY($|_)|ACCESS_KEY|PRIVATE", re.I)
CREDENTIAL_URI = re.compile(r"://[^/\s:@]+:[^/\s@]+@")


def _env_problems(where: str, env: list[dict]) -> list[str]:
    problems = []
    for var in env:
        name, value = var["name"], var.get("value")
        if value is None:
            continue
        if SECRETISH.search(name) and not name.endswith(("_PATH", "_FILE")):
            problems.append(f"{where}: env {name} has a plaintext value; use valueFrom.secretKeyRef")
        if CREDENTIAL_URI.search(str(value)):
            problems.append(f"{where}: env {name} holds a URI with credentials")
    return problems


def test_no_plaintext_secrets(all_targets):
    problems = []
    for name, docs in all_targets.items():
        problems += [f"{name}: Secret {d['metadata']['name']} rendered" for d in by_kind(docs, "Secret")]
        for where, _, pod in pod_specs(docs):
            for c in pod.get("initContainers", []) + pod["containers"]:
                problems += _env_problems(f"{name} {where}/{c['name']}", c.get("env", []))
                problems += [
                    f"{name} {where}: arg holds a URI with credentials"
                    for a in c.get("args", []) + c.get("command", [])
                    if CREDENTIAL_URI.search(a)
                ]
        for cm in by_kind(docs, "ConfigMap"):
            for key, value in cm.get("data", {}).items():
                if key.endswith(".py"):
                    continue
                if SECRETISH.search(key) or CREDENTIAL_URI.search(value):
                    problems.append(
                        f"{name}: ConfigMap {cm['metadata']['name']} key {key} looks like a secret"
                    )
    assert not problems, "\n".join(problems)
    assert _env_problems("x", [{"name": "DB_PASSWORD", "value": "hunter2"}]), "the checker must flag this"


def test_no_secret_objects_in_the_repository_files():
    for path in [*MANIFESTS.rglob("*.yaml"), *CHART.rglob("*.yaml"), *CHART.rglob("*.tpl")]:
        text = path.read_text()
        assert not re.search(r"^kind:\s*Secret\s*$", text, re.M), f"{path} defines a Secret"
        assert not CREDENTIAL_URI.search(text.replace("USER:PASSWORD@", "")), f"{path} holds credentials"


def test_rbac_is_least_privilege(all_targets):
    for name, docs in all_targets.items():
        assert not by_kind(docs, "ClusterRole") and not by_kind(docs, "ClusterRoleBinding"), name
        role = one(docs, "Role", "pipeline-runner")
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"], f"{name}: {rule}"
            assert not {"list", "watch"} & set(rule["verbs"]) or "secrets" not in rule["resources"]
            if "secrets" in rule["resources"] or "configmaps" in rule["resources"]:
                assert rule["verbs"] == ["get"] and rule.get("resourceNames"), f"{name}: {rule}"
            assert "pods/exec" not in rule["resources"], f"{name}: {rule}"
        granted = {(g, r) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
        assert ("argoproj.io", "workflowtaskresults") in granted, "Argo executors need this"
        binding = one(docs, "RoleBinding", "pipeline-runner")
        assert binding["subjects"] == [
            {
                "kind": "ServiceAccount",
                "name": role["metadata"]["name"],
                "namespace": role["metadata"].get("namespace", binding["metadata"].get("namespace")),
            }
        ]


def test_namespace_pod_security_labels(kustomize_docs, chart_docs):
    spaces = [d for docs in kustomize_docs.values() for d in by_kind(docs, "Namespace")]
    spaces += by_kind(chart_docs["scheduled-multiuser"], "Namespace")
    assert len(spaces) == len(KUSTOMIZE_TARGETS) + 1
    for ns in spaces:
        labels = ns["metadata"]["labels"]
        assert labels["pod-security.kubernetes.io/enforce"] in ("baseline", "restricted")
        assert labels["pod-security.kubernetes.io/warn"] == "restricted"
        assert labels["pod-security.kubernetes.io/audit"] == "restricted"
    assert not by_kind(chart_docs["defaults"], "Namespace"), "by default the chart uses the release namespace"


# ----------------------------------------------------------------------------------------------------
# MLflow, cache, overlays, settings, versions


def _mlflow_pin() -> str:
    text = (REPO / "pyproject.toml").read_text()
    match = re.search(r'"mlflow==([0-9.]+)"', text)
    assert match, "pyproject.toml pins mlflow==X.Y.Z"
    return match.group(1)


def test_mlflow_server(all_targets):
    for name, docs in all_targets.items():
        if name == "chart:minimal":
            assert not by_kind(docs, "Deployment"), "mlflow.enabled=false must drop the server"
            continue
        dep = one(docs, "Deployment", "mlflow")
        pod = dep["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        assert c["image"] == f"ghcr.io/mlflow/mlflow:v{_mlflow_pin()}-full", name
        args = c["args"]
        assert args[0] == "server"
        assert any(a.startswith("--artifacts-destination=s3://") for a in args), args
        hosts = next(a for a in args if a.startswith("--allowed-hosts=")).split("=", 1)[1].split(",")
        svc = one(docs, "Service", "mlflow")
        ns = svc["metadata"].get("namespace", "unisd")
        sname, port = svc["metadata"]["name"], svc["spec"]["ports"][0]["port"]
        for host in (sname, f"{sname}.{ns}", f"{sname}.{ns}.svc.cluster.local:{port}"):
            assert host in hosts, f"{name}: {host} missing from --allowed-hosts"
        assert "*" not in hosts
        env = {e["name"]: e for e in c["env"]}
        assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["name"], name
        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert "secretKeyRef" in env[var]["valueFrom"], name
        assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"]["value"] == "false"
        assert not any(a.startswith("--backend-store-uri") for a in args), "keep the DB URI out of argv"
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            assert c[probe]["httpGet"]["path"] == "/health", f"{name}: {probe}"
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]], "read-only root needs a writable /tmp"
        assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
        assert c["ports"][0]["containerPort"] == port


def quantity(q: str) -> int:
    """Kubernetes binary quantity ("20Gi", "1Ti") in bytes."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50}
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti|Pi)?", str(q))
    assert match, f"unexpected quantity {q!r}"
    return int(match.group(1)) * units.get(match.group(2) or "", 1)


def test_overlays(kustomize_docs):
    def cache(target: str) -> int:
        pvc = one(kustomize_docs[target], "PersistentVolumeClaim", "cache")
        return quantity(pvc["spec"]["resources"]["requests"]["storage"])

    assert cache("overlays/dev") < cache("base") < cache("overlays/gpu")

    gpu = one(kustomize_docs["overlays/gpu"], "ConfigMap", "pipeline-settings")["data"]
    assert json.loads(gpu["UNISD_GPU_NODE_SELECTOR"]) == {"nvidia.com/gpu.present": "true"}
    tolerations = json.loads(gpu["UNISD_GPU_TOLERATIONS"])
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
    assert int(gpu["UNISD_GPU_COUNT"]) >= 1
    quota = one(kustomize_docs["overlays/gpu"], "ResourceQuota", "quota")["spec"]["hard"]
    assert int(quota["requests.nvidia.com/gpu"]) >= 1

    dev = kustomize_docs["overlays/dev"]
    assert one(dev, "Deployment", "mlflow")["spec"]["replicas"] == 1
    assert one(dev, "ConfigMap", "pipeline-settings")["data"]["UNISD_GPU_COUNT"] == "0"
    dev_mem = one(dev, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]["resources"]
    base_mem = one(kustomize_docs["base"], "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][
        0
    ]
    assert quantity(dev_mem["limits"]["memory"]) < quantity(base_mem["resources"]["limits"]["memory"])


def test_settings_are_consistent(all_targets):
    for name, docs in all_targets.items():
        data = one(docs, "ConfigMap", "pipeline-settings")["data"]
        for key in ("UNISD_GPU_NODE_SELECTOR", "UNISD_GPU_TOLERATIONS", "UNISD_SANDBOX_POD_LABELS"):
            json.loads(data[key])  # must be JSON
        from pipelines.unisd_pipeline import ClusterSettings

        settings = ClusterSettings.from_env(data)  # every key parses (a bad backend name is refused)
        assert settings.sandbox_backend == "" and settings.run_as_user == RUN_AS_USER, name
        assert data["UNISD_IMAGE_TAG"] == VERSION, name
        assert data["UNISD_RUN_AS_USER"] == str(RUN_AS_USER)
        names = {(d["kind"], d["metadata"]["name"]) for d in docs}
        assert ("PersistentVolumeClaim", data["UNISD_CACHE_PVC"]) in names, name
        assert ("ServiceAccount", data["UNISD_RUNNER_SERVICE_ACCOUNT"]) in names, name
        if ("Service", "unisd-mlflow") in names:
            ns = one(docs, "Service", "mlflow")["metadata"].get("namespace")
            assert data["UNISD_MLFLOW_TRACKING_URI"] == f"http://unisd-mlflow.{ns}.svc.cluster.local:5000"


DATA_KEYS = ("UNISD_DATA_SOURCE", "UNISD_DATA_PVC", "UNISD_DATA_MOUNT_PATH", "UNISD_DATA_ENV_FROM")


def test_data_settings_reach_only_the_prepare_pod(all_targets, tmp_path, monkeypatch):
    """Every target's settings ConfigMap has the data keys, and they parse as ClusterSettings; the chart's
    data values, compiled (`unisd compile` with the ConfigMap as env, as the upload Job runs it), give the
    prepare executor the data dir, the data PVC and the Secret, and no other executor any of them."""
    from pipelines.cli import compile_pipeline
    from pipelines.unisd_pipeline import DATA_SECRET_KEYS, ClusterSettings

    for name, docs in all_targets.items():
        data = one(docs, "ConfigMap", "pipeline-settings")["data"]
        assert set(DATA_KEYS) <= set(data), name
        settings = ClusterSettings.from_env(data)
        assert tuple(settings.data_secret_keys) == DATA_SECRET_KEYS, name
        if name != "chart:scheduled-multiuser":
            assert settings.data_dir() == "" and not settings.data_pvc and not settings.data_secret, name
    data = one(all_targets["chart:scheduled-multiuser"], "ConfigMap", "pipeline-settings")["data"]
    for key, value in data.items():
        monkeypatch.setenv(key, value)
    spec, platform = list(yaml.safe_load_all(compile_pipeline(tmp_path / "p.yaml").read_text()))
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for label, executor in spec["deploymentSpec"]["executors"].items():
        env = {e["name"]: e["value"] for e in executor["container"].get("env", [])}
        claims = {m["constant"]: m["mountPath"] for m in k8s.get(label, {}).get("pvcMount", [])}
        secrets = {s["secretName"] for s in k8s.get(label, {}).get("secretAsEnv", [])}
        if label == "exec-prepare-op":
            assert env["UNISD_DATA_DIR"] == "/data/unisd-data/v1"
            assert claims == {"team-data": "/data"} and "team-data-s3" in secrets
        else:
            assert "UNISD_DATA_DIR" not in env and "team-data" not in claims, label
            assert "team-data-s3" not in secrets, label


def test_image_tags_match_the_package_version(all_targets):
    assert yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"] == VERSION
    ours = {image(k) for k in ("train", "rollout", "sandbox")}
    for name, docs in all_targets.items():
        for where, _, pod in pod_specs(docs):
            for c in pod["containers"]:
                if c["image"].startswith("ghcr.io/unisd/"):
                    assert c["image"] in ours, f"{name} {where}: {c['image']} is not one of {sorted(ours)}"
                assert not c["image"].endswith(":latest") and ":" in c["image"].rsplit("/", 1)[-1]


# ----------------------------------------------------------------------------------------------------
# The chart's upload Job


def test_upload_job_is_a_hook_that_runs_the_cli_and_the_shipped_script(chart_docs):
    _, files = render_chart(CHART_VARIANTS["scheduled-multiuser"])
    docs = chart_docs["scheduled-multiuser"]
    job = one(docs, "Job", "upload-pipeline")
    hooks = set(job["metadata"]["annotations"]["helm.sh/hook"].split(","))
    assert hooks == {"post-install", "post-upgrade"}
    pod = job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == image("sandbox")
    script = c["args"][0]
    assert script.startswith("unisd compile --output /tmp/pipeline.yaml && ")
    assert "{{" not in script and "$" not in script, "values must arrive as env vars, not in the shell line"
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["UNISD_SCHEDULE_CRON"] == "0 30 3 * * 1-5"
    assert env["UNISD_SCHEDULE_MAX_CONCURRENCY"] == "2"
    assert json.loads(env["UNISD_SCHEDULE_PARAMS"]) == {"preset": "unisd"}
    assert env["UNISD_KFP_NAMESPACE"] == "team-a"
    assert env["UNISD_PACKAGE_VERSION"] == VERSION
    # The script path in the shell line is the mounted ConfigMap key, and the key holds files/ verbatim.
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    cm = one(docs, "ConfigMap", "upload-script")
    assert f"{mounts['script']}/upload_pipeline.py" in script
    assert cm["data"]["upload_pipeline.py"].rstrip("\n") == UPLOAD_SCRIPT.read_text().rstrip("\n")
    # Multi-user KFP: a projected token with the KFP audience, where the script is told to look.
    token = next(v for v in pod["volumes"] if v["name"] == "kfp-token")
    source = token["projected"]["sources"][0]["serviceAccountToken"]
    assert source["audience"] == "pipelines.kubeflow.org"
    assert env["KF_PIPELINES_SA_TOKEN_PATH"] == f"{mounts['kfp-token']}/{source['path']}"
    assert pod["automountServiceAccountToken"] is False
    assert "logs job/unisd-upload-pipeline" in files["unisd/templates/NOTES.txt"]

    default_job = one(chart_docs["defaults"], "Job", "upload-pipeline")
    default_env = {
        e["name"]: e.get("value") for e in default_job["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert default_env["UNISD_SCHEDULE_CRON"] == "", "schedule.enabled=false must not schedule"


# ----------------------------------------------------------------------------------------------------
# Dockerfiles: a small parser and the checks


@dataclass
class Instruction:
    line: int
    cmd: str
    args: str
    flags: dict[str, str] = field(default_factory=dict)


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions of a Dockerfile: joins `\\` continuations, drops comments and blank lines,
    splits leading --flags. Heredocs and a non-default escape directive are refused, not misread."""
    out: list[Instruction] = []
    buf, start = "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if re.match(r"#\s*escape\s*=", line) and not out and not buf:
            raise ValueError(f"line {n}: escape directive not supported")
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue  # comment lines inside a continuation are dropped by Docker too
        if not buf:
            start = n
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        cmd, _, rest = buf.partition(" ")
        rest = rest.strip()
        if "<<" in rest and cmd.upper() in ("RUN", "COPY"):
            raise ValueError(f"line {start}: heredocs are not supported by this parser")
        flags = {}
        while rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            key, _, value = flag[2:].partition("=")
            flags[key] = value
            rest = rest.strip()
        out.append(Instruction(start, cmd.upper(), rest, flags))
        buf = ""
    if buf:
        raise ValueError(f"line {start}: file ends inside a line continuation")
    return out


def _words(args: str) -> list[str]:
    return json.loads(args) if args.startswith("[") else args.split()


def _substitute(value: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m.group(1), m.group(0)), value)


def _assignments(args: str) -> dict[str, str]:
    """KEY=VALUE pairs of ENV/ARG/LABEL (quoted values allowed); a bare ARG name maps to ''."""
    pairs = re.findall(r'([\w.\-]+)(?:=("[^"]*"|\S*))?', args)
    return {k: v.strip('"') for k, v in pairs}


def _glob_regex(pattern: str) -> str:
    """.dockerignore glob -> regex: `*` and `?` stay within one path segment, `**` spans segments."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return out


def dockerignore_sends(path: str, patterns: list[str]) -> bool:
    """Whether Docker sends `path` (relative to the context) given .dockerignore patterns: the last
    pattern matching the path or one of its parent folders decides; `!` re-includes."""
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    sent = True
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _glob_regex(pattern.lstrip("!").strip("/"))
        if any(re.fullmatch(regex, c) for c in candidates):
            sent = negate
    return sent


def dockerfile_problems(path: Path, ignore_patterns: list[str]) -> list[str]:
    instructions = parse_dockerfile(path.read_text())
    problems: list[str] = []
    variables: dict[str, str] = {}
    stages: list[str] = []
    user: str | None = None
    labels: dict[str, str] = {}
    env: dict[str, str] = {}
    for ins in instructions:
        where = f"{path.name}:{ins.line}"
        if ins.cmd == "ARG":
            for k, v in _assignments(ins.args).items():
                variables.setdefault(k, v)
                if SECRETISH.search(k):
                    problems.append(
                        f"{where}: ARG {k} looks like a secret (build args end up in the image history)"
                    )
        elif ins.cmd == "FROM":
            ref = _substitute(ins.args.split()[0], variables)
            name = ref.split("@")[0].rsplit("/", 1)[-1]
            if "@sha256:" not in ref and (":" not in name or name.endswith(":latest")):
                problems.append(f"{where}: base image {ref} is not pinned to a tag or digest")
            stages.append(ins.args.split()[-1] if " AS " in ins.args.upper() else ref)
            user, labels, env = None, {}, {}
        elif ins.cmd == "ADD":
            problems.append(f"{where}: use COPY, not ADD")
        elif ins.cmd == "COPY":
            if "from" in ins.flags:
                continue
            *sources, _dest = _words(ins.args)
            for src in sources:
                if not (REPO / src).exists():
                    problems.append(f"{where}: COPY source {src} does not exist in the repository")
                elif not dockerignore_sends(src, ignore_patterns):
                    problems.append(f"{where}: COPY source {src} is excluded by .dockerignore")
        elif ins.cmd == "USER":
            user = ins.args.split(":")[0]
        elif ins.cmd == "LABEL":
            labels.update(_assignments(ins.args))
        elif ins.cmd == "ENV":
            for k, v in _assignments(ins.args).items():
                env[k] = v
                if SECRETISH.search(k) or CREDENTIAL_URI.search(v):
                    problems.append(f"{where}: ENV {k} looks like a secret")
    if not stages:
        problems.append(f"{path.name}: no FROM")
    if user is None or user in ("0", "root") or (user.isdigit() and int(user) == 0):
        problems.append(f"{path.name}: the final stage must switch to a non-root USER, has {user}")
    version = _substitute(labels.get("org.opencontainers.image.version", ""), variables)
    if version != VERSION:
        problems.append(f"{path.name}: label org.opencontainers.image.version is {version!r}, not {VERSION}")
    if not env.get("HF_HOME", "").startswith("/cache/"):
        problems.append(
            f"{path.name}: HF_HOME must live on the mounted /cache volume, is {env.get('HF_HOME')}"
        )
    return problems


def _dockerignore() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def test_dockerfiles_exist():
    assert sorted(p.name for p in DOCKER.glob("*.Dockerfile")) == [
        "rollout.Dockerfile",
        "sandbox.Dockerfile",
        "train.Dockerfile",
    ]


@pytest.mark.parametrize("name", ["train", "rollout", "sandbox"])
def test_dockerfile(name):
    path = DOCKER / f"{name}.Dockerfile"
    problems = dockerfile_problems(path, _dockerignore())
    assert not problems, "\n".join(problems)
    text = path.read_text()
    assert f"-t {image(name)} ." in text, "the build command in the header names the image unisd uses"
    user = [i.args for i in parse_dockerfile(text) if i.cmd == "USER"][-1]
    assert user.split(":")[0] == str(RUN_AS_USER), "the manifests run as this uid"


def test_rollout_image_keeps_vllm_pins_apart():
    def runs(name: str) -> str:
        return "\n".join(i.args for i in parse_dockerfile((DOCKER / name).read_text()) if i.cmd == "RUN")

    rollout = runs("rollout.Dockerfile")
    assert "vllm==0.33.0" in rollout and "pip install --no-deps ." in rollout
    assert "torch==" not in rollout.replace("'2.14.0'", ""), "the rollout env takes vLLM's torch (2.14.0)"
    assert "'2.14.0'" in rollout, "the build asserts vLLM kept its torch"
    train = runs("train.Dockerfile")
    assert "torch==2.13.0" in train and "deepspeed==0.19.8" in train


def test_train_image_runs_on_tcmalloc():
    """The train image preloads the allocator unisd.allocator would pick, from the link its RUN creates."""
    from unisd.allocator import LIBRARIES

    instructions = parse_dockerfile((DOCKER / "train.Dockerfile").read_text())
    runs = "\n".join(i.args for i in instructions if i.cmd == "RUN")
    env = " ".join(i.args for i in instructions if i.cmd == "ENV")
    preload = re.search(r"LD_PRELOAD=(\S+)", env).group(1)
    assert Path(preload).name in LIBRARIES["tcmalloc"]
    assert "libtcmalloc-minimal4" in runs
    link = runs.split("ln -s ", 1)[1].split("&&")[0].split()
    assert link[-1] == preload, "the link ENV preloads is the one the RUN creates"
    # tcmalloc's default prints a line on stderr for every allocation over 1 GiB
    assert "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD=" in env


def test_dockerfile_parser_and_checker_catch_mistakes(tmp_path):
    parsed = parse_dockerfile(
        '# syntax=docker/dockerfile:1\nFROM a:1 AS b\nRUN echo 1 \\\n  # note\n  && echo 2\nCOPY ["x", "y"]\n'
    )
    assert [(i.line, i.cmd) for i in parsed] == [(2, "FROM"), (3, "RUN"), (6, "COPY")]
    assert parsed[1].args == "echo 1  && echo 2"
    with pytest.raises(ValueError, match="heredoc"):
        parse_dockerfile("FROM a:1\nRUN <<EOF\necho\nEOF\n")
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM python:latest\nENV API_TOKEN=abc\nCOPY no/such/dir ./\nCOPY .venv ./\nUSER root\n")
    problems = "\n".join(dockerfile_problems(bad, _dockerignore()))
    for expected in (
        "not pinned",
        "API_TOKEN",
        "does not exist",
        "non-root USER",
        "image.version",
        "HF_HOME",
    ):
        assert expected in problems, f"{expected!r} not reported:\n{problems}"


def test_dockerignore_sends_what_images_copy_and_nothing_else():
    patterns = _dockerignore()
    for sent in ("pyproject.toml", "README.md", "src/unisd/__init__.py", "configs", "pipelines"):
        assert dockerignore_sends(sent, patterns), sent
    for kept in (".venv/bin/python", ".git/config", "mlflow.db", "src/unisd/__pycache__/x.pyc", "tests/x.py"):
        assert not dockerignore_sends(kept, patterns), kept


# ----------------------------------------------------------------------------------------------------
# upload_pipeline.py against a fake KFP API (real kfp.Client, real HTTP on 127.0.0.1)


class FakeKfp:
    """Just enough of the KFP v2beta1 REST API for upload_pipeline.py, with state and a call log."""

    def __init__(self) -> None:
        self.pipelines: dict[str, dict] = {}
        self.versions: dict[str, list[dict]] = {}
        self.experiments: dict[str, dict] = {}
        self.recurring: dict[str, dict] = {}
        self.calls: list[tuple[str, str]] = []
        self._n = 0

    def _id(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}-{self._n}"

    @staticmethod
    def _name_filter(query: dict) -> str | None:
        if "filter" not in query:
            return None
        (pred,) = json.loads(query["filter"][0])["predicates"]
        assert pred["key"] == "display_name" and pred["operation"] in (1, "EQUALS")
        return pred.get("stringValue", pred.get("string_value"))

    def handle(self, method: str, path: str, query: dict, body: bytes) -> tuple[int, dict]:
        self.calls.append((method, path))
        name = self._name_filter(query)
        if (method, path) == ("GET", "/apis/v2beta1/healthz"):
            return 200, {"multi_user": False}
        if (method, path) == ("GET", "/apis/v2beta1/pipelines"):
            found = [p for p in self.pipelines.values() if name is None or p["display_name"] == name]
            return 200, {"pipelines": found, "total_size": len(found)}
        if (method, path) == ("POST", "/apis/v2beta1/pipelines/upload"):
            assert b"uploadfile" in body, "the package must be sent as multipart uploadfile"
            pid = self._id("pipeline")
            desc = query.get("description", [""])[0]
            self.pipelines[pid] = {"pipeline_id": pid, "display_name": query["name"][0], "description": desc}
            vid = self._id("version")
            first = {"pipeline_id": pid, "pipeline_version_id": vid, "display_name": query["name"][0]}
            self.versions[pid] = [first | {"description": desc}]
            return 200, self.pipelines[pid]
        if (method, path) == ("POST", "/apis/v2beta1/pipelines/upload_version"):
            pid = query["pipelineid"][0]
            version = {
                "pipeline_id": pid,
                "pipeline_version_id": self._id("version"),
                "display_name": query["name"][0],
                "description": query.get("description", [""])[0],
            }
            self.versions[pid].append(version)
            return 200, version
        match = re.fullmatch(r"/apis/v2beta1/pipelines/([^/]+)/versions", path)
        if method == "GET" and match:
            found = [v for v in self.versions[match.group(1)] if name is None or v["display_name"] == name]
            if query.get("sort_by") == ["created_at desc"]:
                found = found[::-1]
            return 200, {"pipeline_versions": found, "total_size": len(found)}
        if (method, path) == ("GET", "/apis/v2beta1/experiments"):
            found = [e for e in self.experiments.values() if name is None or e["display_name"] == name]
            return 200, {"experiments": found, "total_size": len(found)}
        if (method, path) == ("POST", "/apis/v2beta1/experiments"):
            exp = json.loads(body) | {"experiment_id": self._id("experiment")}
            self.experiments[exp["experiment_id"]] = exp
            return 200, exp
        if (method, path) == ("GET", "/apis/v2beta1/recurringruns"):
            found = [
                r
                for r in self.recurring.values()
                if r["experiment_id"] == query["experiment_id"][0]
                and (name is None or r["display_name"] == name)
            ]
            return 200, {"recurringRuns": found, "total_size": len(found)}
        if (method, path) == ("POST", "/apis/v2beta1/recurringruns"):
            run = json.loads(body) | {"recurring_run_id": self._id("recurring")}
            self.recurring[run["recurring_run_id"]] = run
            return 200, run
        match = re.fullmatch(r"/apis/v2beta1/recurringruns/([^/:]+)(:disable)?", path)
        if match and method == "DELETE":
            del self.recurring[match.group(1)]
            return 200, {}
        if match and method == "POST" and match.group(2):
            self.recurring[match.group(1)]["mode"] = "DISABLE"
            return 200, {}
        return 404, {"error": f"fake KFP has no route {method} {path}"}


@pytest.fixture
def fake_kfp():
    state = FakeKfp()

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            url = urlparse(self.path)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            status, payload = state.handle(self.command, url.path, parse_qs(url.query), body)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = _serve

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def uploader():
    spec = importlib.util.spec_from_file_location("unisd_upload_pipeline", UPLOAD_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_upload_script_helpers(uploader, monkeypatch):
    monkeypatch.delenv("UNISD_KFP_HOST", raising=False)
    assert uploader.version_name("0.1.0", b"abc") == "0.1.0-ba7816bf8f01"
    assert uploader.check_cron(" 0 0  2 * * * ") == "0 0 2 * * *"
    with pytest.raises(ValueError, match="6"):
        uploader.check_cron("0 2 * * *")
    with pytest.raises(SystemExit):
        uploader.parse_args(["--package", "p.yaml"])  # no host anywhere


def test_upload_script_against_fake_kfp(uploader, fake_kfp, tmp_path, monkeypatch, capsys):
    state, host = fake_kfp
    for var in ("UNISD_KFP_HOST", "UNISD_SCHEDULE_CRON", "KF_PIPELINES_SA_TOKEN_PATH", "UNISD_KFP_NAMESPACE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("UNISD_RUNNER_SERVICE_ACCOUNT", "unisd-pipeline-runner")
    package = tmp_path / "pipeline.yaml"
    package.write_text("pipelineInfo:\n  name: unisd\n")
    base = ["--package", str(package), "--host", host, "--package-version", VERSION]
    cron = ["--schedule-cron", "0 0 2 * * *", "--max-concurrency", "2", "--params", '{"preset": "unisd"}']

    # 1. First install: the pipeline is created and the recurring run points at its only version.
    assert uploader.main(base + cron) == 0
    (pipeline,) = state.pipelines.values()
    assert pipeline["display_name"] == "unisd"
    (run,) = state.recurring.values()
    first_version = state.versions[pipeline["pipeline_id"]][0]["pipeline_version_id"]
    assert run["pipeline_version_reference"]["pipeline_version_id"] == first_version
    assert run["trigger"]["cron_schedule"]["cron"] == "0 0 2 * * *"
    assert int(run["max_concurrency"]) == 2 and run["no_catchup"] is True
    assert run["service_account"] == "unisd-pipeline-runner"
    assert run["runtime_config"]["parameters"] == {"preset": "unisd"}
    assert run["mode"] == "ENABLE" and run["display_name"] == "unisd-scheduled"

    # 2. Upgrade, compiled pipeline changed: a new version named by content, the run is replaced.
    package.write_text("pipelineInfo:\n  name: unisd\n# changed\n")
    assert uploader.main(base + cron) == 0
    versions = state.versions[pipeline["pipeline_id"]]
    assert len(versions) == 2
    assert versions[1]["display_name"] == uploader.version_name(VERSION, package.read_bytes())
    (run2,) = state.recurring.values()
    assert run2["recurring_run_id"] != run["recurring_run_id"]
    assert run2["pipeline_version_reference"]["pipeline_version_id"] == versions[1]["pipeline_version_id"]

    # 3. Same upgrade again: nothing uploaded, the run kept.
    uploads_before = sum(1 for c in state.calls if c[1].startswith("/apis/v2beta1/pipelines/upload"))
    assert uploader.main(base + cron) == 0
    assert sum(1 for c in state.calls if c[1].startswith("/apis/v2beta1/pipelines/upload")) == uploads_before
    assert list(state.recurring) == [run2["recurring_run_id"]]
    assert "kept" in capsys.readouterr().out

    # 4. schedule.enabled=false (empty cron from the Job's env): the run is disabled, not deleted.
    monkeypatch.setenv("UNISD_SCHEDULE_CRON", "")
    assert uploader.main(base) == 0
    assert state.recurring[run2["recurring_run_id"]]["mode"] == "DISABLE"
    assert len(state.experiments) == 1, "the experiment is found by name, not re-created"


def test_upload_script_rejects_bad_input(uploader, tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    assert uploader.main(["--package", str(missing), "--host", "http://127.0.0.1:9"]) == 2
    assert "does not exist" in capsys.readouterr().err
    package = tmp_path / "p.yaml"
    package.write_text("x: 1\n")
    assert uploader.main(["--package", str(package), "--host", "http://127.0.0.1:9", "--params", "[1]"]) == 2
    assert "JSON object" in capsys.readouterr().err
