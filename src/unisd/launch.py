"""How the pipeline's train step runs `unisd train`: as one process, as torchrun ranks inside its pod, or as a
Kubeflow Trainer TrainJob across nodes. Always the CLI a user runs by hand (`unisd train --config …`), so the
step computes what a round run by hand computes.

    LaunchSpec                   GPUs per node, nodes, and (nodes > 1) where the TrainJob runs
    train_argv(...)              the `unisd train` arguments for a set of artifact folders
    train_command(argv, gpus)    [python -m unisd train …] (1 GPU) or torchrun --standalone --nproc_per_node=G
    run_command(cmd)             runs it, output streamed to the pod log; one-line error on failure
    trainjob_manifest(...)       the TrainJob (trainer.kubeflow.org/v1alpha1) body for nodes > 1
    run_trainjob(...)            stage inputs on the shared PVC → create → wait → collect the output
    train_step(...)              what the KFP component calls; then logs the step metrics to MLflow

The step metrics are logged by the launching process after training (not by the ranks), so N ranks never log
N copies. No KFP imports here.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TRAINER_GROUP, TRAINER_VERSION, TRAINJOB_PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
DEFAULT_RUNTIME = "unisd-torch-distributed"  # manifests/trainer/runtime.yaml, charts/unisd (trainer.enabled)
PATCH_MANAGER = "unisd.ai/train-step"
TRAINER_CONTAINER = "node"  # the container and replicated job name of torch-distributed style runtimes
SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


class TrainLaunchError(RuntimeError):
    """The train subprocess or TrainJob failed; the message names it and its last error line."""


@dataclass(frozen=True)
class LaunchSpec:
    """Where the train step runs (the pipeline's cluster settings, fixed at compile time). The TrainJob fields
    matter only for nodes > 1."""

    gpus: int = 1  # GPUs per node = ranks per node
    nodes: int = 1
    image: str = ""  # the TrainJob's image (the train image)
    namespace: str = ""  # TrainJob namespace; "" = the pod's own namespace
    runtime: str = DEFAULT_RUNTIME
    gpu_resource: str = "nvidia.com/gpu"
    cpu_per_node: str = "8"
    memory_per_node: str = "64G"
    shm_size: str = "16Gi"
    cache_pvc: str = "unisd-cache"
    cache_mount_path: str = "/cache"
    node_selector: dict = field(default_factory=dict)
    tolerations: list = field(default_factory=list)
    timeout_s: int = 6 * 3600
    poll_s: float = 15.0

    def __post_init__(self):
        for name in ("gpus", "nodes", "timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"launch spec: {name} must be an integer ≥ 1, got {value!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> LaunchSpec:
        data = dict(data or {})
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"launch spec: unknown field(s) {sorted(unknown)}")
        for name in ("gpus", "nodes", "timeout_s"):  # kfp.local hands back collected ints as floats
            if isinstance(data.get(name), float) and data[name].is_integer():
                data[name] = int(data[name])
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def train_argv(
    config: str | Path,
    *,
    prepared: str | Path,
    out: str | Path,
    contexts: str | Path | None = None,
    rollouts: Sequence[str | Path] = (),
    scores: Sequence[str | Path] = (),
    previous: str | Path | None = None,
) -> list[str]:
    """`unisd train` arguments (after `unisd`) for these folders (commands.py `train`)."""
    argv = ["train", "--config", str(config), "--prepared", str(prepared)]
    if contexts:
        argv += ["--contexts", str(contexts)]
    if rollouts:
        argv += ["--rollouts", *map(str, rollouts)]
    if scores:
        argv += ["--scores", *map(str, scores)]
    if previous:
        argv += ["--previous", str(previous)]
    return [*argv, "--out", str(out)]


def train_command(argv: Sequence[str], gpus: int, *, python: str = sys.executable) -> list[str]:
    """The in-pod command: one process for 1 GPU, else torchrun (`python -m torch.distributed.run`: the
    torchrun entry point of this interpreter, no PATH lookup) with one rank per GPU on this node."""
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise ValueError(f"train_command: gpus must be an integer ≥ 1, got {gpus!r}")
    unisd = ["-m", "unisd", *argv]
    if gpus == 1:
        return [python, *unisd]
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}", *unisd]


def run_command(cmd: Sequence[str], *, env: Mapping[str, str] | None = None, what: str = "train") -> None:
    """Run `cmd`, its output streamed to ours (the pod log); on failure raise one line with its exit code and
    the last error line it printed (torchrun prints which rank failed)."""
    tail: deque[str] = deque(maxlen=200)
    proc = subprocess.Popen(
        list(cmd), env=dict(env) if env is not None else None, stderr=subprocess.PIPE, text=True, bufsize=1
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        sys.stderr.write(line)
        tail.append(line.rstrip())
    code = proc.wait()
    if code != 0:
        raise TrainLaunchError(
            f"{what} failed (exit code {code}): {_error_line(tail)} [command: {_short(cmd)}]"
        )


def _error_line(lines: Sequence[str]) -> str:
    """The most telling line of a failed run's stderr: its last `…Error: …` line, else its last line."""
    for line in reversed(lines):
        text = line.strip()
        head = text.split(":", 1)[0]
        if ": " in text and (head.endswith(("Error", "Exception")) or head.startswith("unisd")):
            return text
    return next((t.strip() for t in reversed(lines) if t.strip()), "no output")


def _short(cmd: Sequence[str]) -> str:
    parts = [Path(c).name if i == 0 else c for i, c in enumerate(cmd)]
    return " ".join(parts[:8]) + (" …" if len(parts) > 8 else "")


# ----------------------------------------------------------------------------------------------------------
# nodes > 1: a Kubeflow Trainer TrainJob


def trainjob_name(key: str) -> str:
    """A stable DNS-1035 name per train output: a retried step pod finds its own TrainJob (and its checkpoints on
    the PVC) again instead of starting a second one."""
    return "unisd-train-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def trainjob_manifest(spec: LaunchSpec, name: str, argv: Sequence[str], namespace: str) -> dict[str, Any]:
    """The TrainJob for `unisd train argv` on spec.nodes × spec.gpus ranks. The torch runtime injects PET_NNODES,
    PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR/PORT, which torchrun reads as its own flags; the runtime
    patch mounts the shared cache PVC (inputs, checkpoints, output) and shm, and places the pods on GPU nodes."""
    if not spec.image:
        raise ValueError("launch spec: image is required for a TrainJob (nodes > 1)")
    return {
        "apiVersion": f"{TRAINER_GROUP}/{TRAINER_VERSION}",
        "kind": "TrainJob",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/part-of": "unisd", "app.kubernetes.io/component": "train"},
        },
        "spec": {
            "runtimeRef": {"apiGroup": TRAINER_GROUP, "kind": "ClusterTrainingRuntime", "name": spec.runtime},
            "activeDeadlineSeconds": spec.timeout_s,
            "trainer": _trainer_spec(spec, argv),
            "runtimePatches": [_runtime_patch(_pod_patch(spec))],
        },
    }


def _trainer_spec(spec: LaunchSpec, argv: Sequence[str]) -> dict[str, Any]:
    """The TrainJob's `trainer`: torchrun of `unisd argv` on spec.nodes × spec.gpus, its resources, the caches."""
    mount = spec.cache_mount_path
    gpus = {spec.gpu_resource: str(spec.gpus)}
    return {
        "image": spec.image,
        "command": ["torchrun", "-m", "unisd"],
        "args": list(argv),
        "numNodes": spec.nodes,
        "numProcPerNode": spec.gpus,
        "resourcesPerNode": {
            "requests": {"cpu": spec.cpu_per_node, "memory": spec.memory_per_node, **gpus},
            "limits": {"memory": spec.memory_per_node, **gpus},
        },
        "env": [
            {"name": "HF_HOME", "value": f"{mount}/hf"},
            {"name": "UNISD_CACHE_DIR", "value": f"{mount}/unisd"},
        ],
    }


def _pod_patch(spec: LaunchSpec) -> dict[str, Any]:
    """The trainer pods' patch: the shared cache PVC and shm mounted, the node selector and tolerations."""
    mount = spec.cache_mount_path
    pod_patch: dict[str, Any] = {
        "volumes": [
            {"name": "cache", "persistentVolumeClaim": {"claimName": spec.cache_pvc}},
            {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.shm_size}},
        ],
        "containers": [
            {
                "name": TRAINER_CONTAINER,
                "volumeMounts": [
                    {"name": "cache", "mountPath": mount},
                    {"name": "shm", "mountPath": "/dev/shm"},
                ],
            }
        ],
    }
    if spec.node_selector:
        pod_patch["nodeSelector"] = {str(k): str(v) for k, v in spec.node_selector.items()}
    if spec.tolerations:
        pod_patch["tolerations"] = [dict(t) for t in spec.tolerations]
    return pod_patch


def _runtime_patch(pod_patch: dict[str, Any]) -> dict[str, Any]:
    """The runtime patch that applies `pod_patch` to the runtime's trainer replicated job."""
    return {
        "manager": PATCH_MANAGER,
        "trainingRuntimeSpec": {
            "template": {
                "spec": {
                    "replicatedJobs": [
                        {
                            "name": TRAINER_CONTAINER,
                            "template": {"spec": {"template": {"spec": pod_patch}}},
                        }
                    ]
                }
            }
        },
    }


def trainjob_state(obj: Mapping[str, Any]) -> tuple[str, str]:
    """("Complete" | "Failed" | "Running", message) from a TrainJob's status conditions."""
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") in ("Complete", "Failed") and cond.get("status") == "True":
            return cond["type"], f"{cond.get('reason', '')}: {cond.get('message', '')}".strip(": ")
    return "Running", ""


def stage_inputs(
    work: Path, inputs: Mapping[str, str | Path | Sequence[str | Path] | None]
) -> dict[str, Any]:
    """Copy the step's input artifacts onto the shared PVC (TrainJob pods cannot see this pod's artifact
    paths); returns the same mapping with the PVC paths."""
    staged: dict[str, Any] = {}
    for key, value in inputs.items():
        if not value:
            staged[key] = value
            continue
        many = not isinstance(value, str | Path)
        paths = []
        for i, src in enumerate(value if many else [value]):
            dest = work / "in" / (f"{key}-{i}" if many else key)
            if Path(src).is_dir():
                shutil.copytree(src, dest, dirs_exist_ok=True)
            else:
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest)
            paths.append(str(dest))
        staged[key] = paths if many else paths[0]
    return staged


def kubernetes_api():
    """CustomObjectsApi with the pod's service account (outside a cluster: the kubeconfig)."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.CustomObjectsApi()


def submit_trainjob(api, body: Mapping[str, Any]) -> None:
    """Create the TrainJob; an existing one of the same name (a retried step) is reused, or replaced if it
    failed (the rerun resumes from the checkpoints on the PVC)."""
    from kubernetes.client.exceptions import ApiException

    ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
    args = (TRAINER_GROUP, TRAINER_VERSION, ns, TRAINJOB_PLURAL)
    try:
        api.create_namespaced_custom_object(*args, dict(body))
        return
    except ApiException as err:
        if err.status != 409:
            raise TrainLaunchError(
                f"creating TrainJob {ns}/{name} failed: {err.status} {err.reason}"
            ) from None
    state, _ = trainjob_state(api.get_namespaced_custom_object(*args, name))
    if state == "Failed":
        api.delete_namespaced_custom_object(*args, name)
        for _ in range(60):  # wait for the old one to go before creating its replacement
            try:
                api.get_namespaced_custom_object(*args, name)
            except ApiException as err:
                if err.status == 404:
                    break
            time.sleep(2)
        api.create_namespaced_custom_object(*args, dict(body))
    log.info("TrainJob %s/%s exists (%s): waiting for it", ns, name, state)


def wait_trainjob(api, namespace: str, name: str, *, timeout_s: float, poll_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        obj = api.get_namespaced_custom_object(
            TRAINER_GROUP, TRAINER_VERSION, namespace, TRAINJOB_PLURAL, name
        )
        state, message = trainjob_state(obj)
        if state == "Complete":
            return
        if state == "Failed":
            raise TrainLaunchError(f"TrainJob {namespace}/{name} failed: {message or 'no message'}")
        if time.monotonic() > deadline:
            raise TrainLaunchError(f"TrainJob {namespace}/{name} did not finish within {timeout_s:.0f} s")
        time.sleep(poll_s)


def run_trainjob(
    spec: LaunchSpec, inputs: Mapping[str, Any], out_dir: str | Path, *, api=None, key: str | None = None
) -> Path:
    """nodes > 1: stage the inputs on the PVC, create the TrainJob, wait, copy its output (without the
    checkpoints, which stay on the PVC for a retry) into `out_dir`. Returns the PVC work folder."""
    name = trainjob_name(key or str(out_dir))
    work = Path(spec.cache_mount_path) / "unisd" / "trainjobs" / name
    staged = stage_inputs(work, inputs)
    argv = train_argv(staged.pop("config"), out=work / "out", **staged)
    namespace = spec.namespace or Path(SA_NAMESPACE_FILE).read_text().strip()
    api = api or kubernetes_api()
    submit_trainjob(api, trainjob_manifest(spec, name, argv, namespace))
    wait_trainjob(api, namespace, name, timeout_s=spec.timeout_s, poll_s=spec.poll_s)
    shutil.copytree(work / "out", out_dir, dirs_exist_ok=True, ignore=shutil.ignore_patterns("checkpoints"))
    return work


# ----------------------------------------------------------------------------------------------------------
# the train step


def train_step(
    spec: LaunchSpec,
    config_path: str | Path,
    *,
    prepared: str | Path,
    out: str | Path,
    contexts: str | Path | None = None,
    rollouts: Sequence[str | Path] = (),
    scores: Sequence[str | Path] = (),
    previous: str | Path | None = None,
    run_id: str | None = None,
    round_index: int = 0,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The pipeline's train step: `unisd train` in this pod (1 process or torchrun ranks) or as a TrainJob
    (nodes > 1); then its step metrics to MLflow (round r's steps offset by r · 10,000). Returns the manifest."""
    from unisd.artifacts import read_json
    from unisd.pipeline_steps import log_train_metrics, parse_config

    folders = dict(prepared=prepared, contexts=contexts, rollouts=rollouts, scores=scores, previous=previous)
    if spec.nodes == 1:
        argv = train_argv(config_path, out=out, **folders)
        run_command(train_command(argv, spec.gpus), env=env_with_src(env))
    else:
        run_trainjob(spec, {"config": config_path, **folders}, out)
    manifest = read_json(Path(out) / "manifest.json")
    if run_id:
        cfg = parse_config(Path(config_path).read_text())
        log_train_metrics(cfg, run_id, out, round_index)
    return manifest


def env_with_src(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for the train subprocess: ours, with this checkout's `unisd` first on PYTHONPATH (an
    editable or image install needs nothing; a source checkout run through kfp.local does)."""
    env = dict(os.environ if env is None else env)
    # A KFP executor sets _KFP_RUNTIME, which strips kfp.dsl to its runtime part; the `unisd` CLI (which
    # loads the pipeline commands) is no executor.
    env.pop("_KFP_RUNTIME", None)
    src = str(Path(__file__).resolve().parents[1])
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if src not in paths:
        env["PYTHONPATH"] = os.pathsep.join([src, *paths])
    return env
