"""The train step's launcher (unisd.launch): torchrun ranks in the pod, a Kubeflow TrainJob across nodes, and
online mode through the DAG.

    test_train_command_...                 1 GPU = one process; G GPUs = torchrun --standalone, G ranks
    test_two_ranks_through_the_launcher    the component's own train_step runs 2 gloo ranks (tiny:llama,
                                           online, HF generate): ranks = 2, staleness ≈ 0, logged once per step
    test_compiled_multi_gpu_train_step     IR: 4 GPUs requested, shm scaled, the launch spec → torchrun command
    test_compiled_multi_node_train_step    IR: a launcher pod (no GPU, the PVC); the TrainJob it would create
                                           validates against Kubeflow Trainer v2.3.0's CRD schema
    test_trainer_manifests_...             runtime (CRD schema) + RBAC (kubernetes-validate --strict), kustomize
                                           files and the chart with trainer.enabled
    test_online_dag_...                    kfp.local, 2 online rounds: rollout/score skipped, round 1 continues
                                           round 0's adapter, train/staleness ≈ 0 in MLflow for every step

The CRD schemas (tests/data/kubeflow-trainer-v2.3.0-crd-schemas.json.gz) are the openAPIV3Schema of
github.com/kubeflow/trainer v2.3.0 manifests/base/crds/ (TrainJob, ClusterTrainingRuntime), made strict here:
an object with declared properties rejects unknown ones (what `kubectl apply` does with strict field
validation), so a misspelt field fails.
"""

from __future__ import annotations

import copy
import gzip
import json
import os
from pathlib import Path

import pytest
import yaml

from unisd.launch import LaunchSpec, train_argv, train_command, train_step, trainjob_manifest

REPO = Path(__file__).resolve().parents[1]
CRD_SCHEMAS = Path(__file__).parent / "data" / "kubeflow-trainer-v2.3.0-crd-schemas.json.gz"
os.environ.setdefault("UNISD_DATA_DIR", str(REPO.parent / "shared" / "data"))


# ----------------------------------------------------------------------------------------------------------
# CRD schema validation


def _strict(schema):
    """A copy of a CRD structural schema where objects with declared properties forbid unknown fields."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def crd_validate():
    jsonschema = pytest.importorskip("jsonschema")
    crds = json.load(gzip.open(CRD_SCHEMAS))

    def validate(obj: dict) -> list[str]:
        kind = obj.get("kind")
        assert kind in crds, f"no CRD schema for {kind}"
        schema = _strict(crds[kind]["schema"])
        validator = jsonschema.Draft7Validator(schema)
        problems = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(obj)]
        assert obj["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
        scoped = crds[kind]["scope"] == "Namespaced"
        if scoped != ("namespace" in obj["metadata"]):
            problems.append(f"metadata.namespace: {kind} is {crds[kind]['scope']}")
        return problems

    return validate


# ----------------------------------------------------------------------------------------------------------
# the command


def test_train_command_one_gpu_is_a_plain_process_and_more_gpus_is_torchrun():
    argv = train_argv("c.yaml", prepared="p", out="o", rollouts=["r"], scores=["s"], previous="prev")
    assert argv == [
        "train", "--config", "c.yaml", "--prepared", "p", "--rollouts", "r", "--scores", "s",
        "--previous", "prev", "--out", "o",
    ]  # fmt: skip
    assert train_command(argv, 1, python="py") == ["py", "-m", "unisd", *argv]
    four = train_command(argv, 4, python="py")
    assert four == [
        "py", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", "-m", "unisd", *argv,
    ]  # fmt: skip
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="gpus must be an integer"):
            train_command(argv, bad)
    with pytest.raises(ValueError, match="launch spec: nodes"):
        LaunchSpec(nodes=0)
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['gpu'\]"):
        LaunchSpec.from_dict({"gpu": 2})
    # kfp hands a dict parameter's ints back as floats (protobuf Struct)
    assert LaunchSpec.from_dict({"gpus": 4.0, "nodes": 1.0}).gpus == 4


def _online_config(tmp_path: Path, tracking_uri: str, name: str, **train) -> Path:
    config = {
        "model": "tiny:llama",
        "preset": "sd",
        "prepare": {"benchmarks": ["commonsenseqa"], "train_limit": 4, "eval_limit": 4},
        "train": {
            "mode": "online",
            "online_max_new_tokens": 6,
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "lr": 1e-3,
            "micro_batch_size": 1,
            "grad_accum": 2,
            "max_steps": 2,
            "checkpoint_every": 1,
            **train,
        },
        "eval": {"limit": 4, "max_new_tokens": 6, "batch_size": 4, "bootstrap_samples": 100},
        "tracking": {"tracking_uri": tracking_uri, "experiment": name, "registered_model": name},
        "pipeline": {"rounds": 1, "shards": 1, "pipeline_root": str(tmp_path / "kfp")},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    from mlflow_server import MlflowServer

    srv = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    yield srv
    srv.stop()


def _history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, key))


@pytest.mark.slow
def test_two_ranks_through_the_launcher(tmp_path, mlflow_server):
    """train_step — what train_op calls — with gpus=2 runs `torchrun --standalone --nproc_per_node=2 -m unisd
    train` (gloo on CPU): the manifest says 2 ranks, online staleness ≈ 0 (HF generate), and the launcher (not
    each rank) logs one point per step to MLflow, round 1's steps offset by 10,000."""
    from unisd import tracking
    from unisd.pipeline_steps import parse_config, prepare
    from unisd.runconfig import load_run_config

    config = _online_config(tmp_path, mlflow_server.uri, "launch-2-ranks")
    cfg = load_run_config(config)
    prepare(cfg, str(tmp_path / "prepared"))
    run_id = tracking.start_run(cfg.tracking, run_name="launch")
    out = tmp_path / "train"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    manifest = train_step(
        LaunchSpec(gpus=2),
        config,
        prepared=tmp_path / "prepared",
        out=out,
        run_id=run_id,
        round_index=1,
        env=env,
    )
    assert manifest["counts"]["ranks"] == 2 and manifest["counts"]["steps"] == 2
    assert (out / "adapter" / "adapter_config.json").exists()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(0 <= r["train/staleness"] < 1e-3 and r["rollout/tokens"] > 0 for r in rows), rows
    staleness = _history(mlflow_server.uri, run_id, "train/staleness")
    assert [s for s, _ in staleness] == [10_001, 10_002]  # one point per step: logged once, not per rank
    assert [v for _, v in staleness] == pytest.approx([r["train/staleness"] for r in rows])
    assert parse_config(config.read_text()).train.mode == "online"


def test_a_failed_launch_is_one_line_naming_the_error(tmp_path):
    """The train subprocess fails (no prepared data): one line with the exit code and its error, no traceback."""
    from unisd.launch import TrainLaunchError

    config = _online_config(tmp_path, f"sqlite:///{tmp_path}/m.db", "fails")
    with pytest.raises(TrainLaunchError) as err:
        train_step(LaunchSpec(), config, prepared=tmp_path / "missing", out=tmp_path / "out")
    message = str(err.value)
    assert "\n" not in message and "exit code" in message and "missing" in message, message


# ----------------------------------------------------------------------------------------------------------
# the compiled IR


def _compile(tmp_path: Path, monkeypatch, **env) -> tuple[dict, dict]:
    from unisd.cli import main

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "pipeline.yaml"
    assert main(["compile", "--output", str(out), "--rounds", "2"]) == 0
    spec, platform = list(yaml.safe_load_all(out.read_text()))
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def _train_tasks(spec: dict) -> dict:
    from test_pipeline import body_tasks

    return {k: v for k, v in body_tasks(spec).items() if k.startswith("train-op")}


def _launch(task: dict) -> LaunchSpec:
    return LaunchSpec.from_dict(task["inputs"]["parameters"]["launch"]["runtimeValue"]["constant"])


def test_compiled_multi_gpu_train_step(tmp_path, monkeypatch):
    spec, k8s = _compile(tmp_path, monkeypatch, UNISD_TRAIN_GPUS="4")
    tasks = _train_tasks(spec)
    assert len(tasks) == 2  # both rounds
    executors = spec["deploymentSpec"]["executors"]
    for task in tasks.values():
        launch = _launch(task)
        assert (launch.gpus, launch.nodes) == (4, 1)
        cmd = train_command(train_argv("c", prepared="p", out="o"), launch.gpus)
        assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"]
        executor = task["componentRef"]["name"].replace("comp-", "exec-")
        resources = executors[executor]["container"]["resources"]
        assert resources["accelerator"]["resourceCount"] == "4"
        assert resources["resourceCpuRequest"] == "16" and resources["resourceMemoryLimit"] == "256G"
        shm = [m for m in k8s[executor]["emptyDirMounts"] if m["mountPath"] == "/dev/shm"]
        assert shm == [
            {"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": "64Gi", "volumeName": "shm"}
        ]
    # the other GPU stages keep one GPU
    rollout = next(v for k, v in executors.items() if k.startswith("exec-rollout-op"))
    assert rollout["container"]["resources"]["accelerator"]["resourceCount"] == "1"


def test_compiled_multi_node_train_step(tmp_path, monkeypatch, crd_validate):
    spec, k8s = _compile(tmp_path, monkeypatch, UNISD_TRAIN_GPUS="8", UNISD_TRAIN_NODES="2")
    executors = spec["deploymentSpec"]["executors"]
    for task in _train_tasks(spec).values():
        launch = _launch(task)
        assert (launch.gpus, launch.nodes) == (8, 2)
        executor = task["componentRef"]["name"].replace("comp-", "exec-")
        # the step pod only stages, submits and waits: no GPU, but the PVC the TrainJob shares
        assert "accelerator" not in executors[executor]["container"].get("resources", {})
        assert k8s[executor]["pvcMount"][0]["constant"] == launch.cache_pvc == "unisd-cache"

        argv = train_argv("/cache/unisd/trainjobs/x/in/config", prepared="/cache/p", out="/cache/o")
        job = trainjob_manifest(launch, "unisd-train-0123456789ab", argv, "unisd")
        assert crd_validate(job) == []
        trainer = job["spec"]["trainer"]
        assert (trainer["numNodes"], trainer["numProcPerNode"]) == (2, 8)
        assert trainer["command"] == ["torchrun", "-m", "unisd"] and trainer["args"] == argv
        assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "8"
        assert trainer["image"] == executors[executor]["container"]["image"]  # the train image
        assert job["spec"]["runtimeRef"]["name"] == "unisd-torch-distributed"
        pod = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
        pod = pod["template"]["spec"]["template"]["spec"]
        assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "unisd-cache"
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"

    # the validator is not a rubber stamp: a misspelt field, a wrong type, a missing runtimeRef all fail
    bad = copy.deepcopy(job)
    bad["spec"]["trainer"]["numProcsPerNode"] = 8
    bad["spec"]["trainer"]["numNodes"] = "2"
    del bad["spec"]["runtimeRef"]
    problems = " | ".join(crd_validate(bad))
    assert "numProcsPerNode" in problems and "'2' is not of type 'integer'" in problems
    assert "'runtimeRef' is a required property" in problems


# ----------------------------------------------------------------------------------------------------------
# runtime + RBAC manifests


def _check_trainer_objects(docs: list[dict], crd_validate, *, runtime: str, runner: str, namespace: str):
    import kubernetes_validate.utils as kv

    by_kind = {d["kind"]: d for d in docs}
    assert set(by_kind) == {"ClusterTrainingRuntime", "Role", "RoleBinding"}, set(by_kind)
    rt = by_kind["ClusterTrainingRuntime"]
    assert rt["metadata"]["name"] == runtime and crd_validate(rt) == []
    assert "torch" in rt["spec"]["mlPolicy"]
    pod = rt["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False and pod["securityContext"]["runAsNonRoot"] is True
    assert [c["name"] for c in pod["containers"]] == ["node"]  # the container the TrainJob patches
    for kind in ("Role", "RoleBinding"):
        for version in ("1.31.0", "1.37.0"):
            kv.validate(by_kind[kind], version, strict=True)
        assert by_kind[kind]["metadata"]["namespace"] == namespace
    (rule,) = by_kind["Role"]["rules"]
    assert rule == {
        "apiGroups": ["trainer.kubeflow.org"],
        "resources": ["trainjobs"],
        "verbs": ["create", "get", "list", "watch", "delete"],
    }
    assert by_kind["RoleBinding"]["subjects"] == [
        {"kind": "ServiceAccount", "name": runner, "namespace": namespace}
    ]
    assert by_kind["RoleBinding"]["roleRef"]["name"] == by_kind["Role"]["metadata"]["name"]


def test_trainer_manifests_validate_and_match_the_settings(crd_validate):
    pytest.importorskip("kubernetes_validate")
    from pipelines.unisd_pipeline import ClusterSettings

    folder = REPO / "manifests" / "trainer"
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    docs = [d for f in kustomization["resources"] for d in yaml.safe_load_all((folder / f).read_text()) if d]
    settings = yaml.safe_load((REPO / "manifests" / "base" / "pipeline-settings.yaml").read_text())["data"]
    runtime = settings["UNISD_TRAINER_RUNTIME"]
    assert runtime == ClusterSettings().trainer_runtime == LaunchSpec().runtime
    assert (settings["UNISD_TRAIN_GPUS"], settings["UNISD_TRAIN_NODES"]) == ("1", "1")
    env = {k: v for k, v in settings.items() if k.startswith("UNISD_TRAIN")}
    assert (ClusterSettings.from_env(env | {"UNISD_TRAIN_NODES": "3"}).train_nodes) == 3
    with pytest.raises(ValueError, match="UNISD_TRAIN_GPUS must be an integer"):
        ClusterSettings.from_env({"UNISD_TRAIN_GPUS": "two"})
    _check_trainer_objects(
        docs,
        crd_validate,
        runtime=runtime,
        runner=settings["UNISD_RUNNER_SERVICE_ACCOUNT"],
        namespace="unisd",
    )


def test_chart_renders_the_trainer_runtime_and_rbac_when_enabled(crd_validate):
    helm = pytest.importorskip("helm_python")
    chart = REPO / "charts" / "unisd"

    def render(values):
        with helm.Chart.load(chart) as c:
            files = c.render(values, name="unisd", namespace="unisd", is_install=True)
        return [d for n, t in files.items() if n.endswith(".yaml") for d in yaml.safe_load_all(t) if d]

    default = render({})
    assert not [
        d for d in default if d["kind"] == "ClusterTrainingRuntime" or "trainjob" in d["metadata"]["name"]
    ]
    docs = render({"trainer": {"enabled": True, "gpusPerNode": 8, "nodes": 2}})
    settings = next(
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("settings")
    )
    data = settings["data"]
    assert (data["UNISD_TRAIN_GPUS"], data["UNISD_TRAIN_NODES"]) == ("8", "2")
    trainer = [d for d in docs if d["kind"] in ("ClusterTrainingRuntime", "Role", "RoleBinding")]
    trainer = [
        d for d in trainer if d["kind"] == "ClusterTrainingRuntime" or "trainjob" in d["metadata"]["name"]
    ]
    _check_trainer_objects(
        trainer,
        crd_validate,
        runtime=data["UNISD_TRAINER_RUNTIME"],
        runner=data["UNISD_RUNNER_SERVICE_ACCOUNT"],
        namespace="unisd",
    )
    for kube_version in ("v1.31.0", "v1.37.0"):
        report = helm.lint(chart, {"trainer": {"enabled": True}}, strict=True, kube_version=kube_version)
        assert not report["errors"] and not [m for m in report["messages"] if m["severity"] >= 2], report


# ----------------------------------------------------------------------------------------------------------
# online mode through the DAG


@pytest.mark.slow
def test_online_dag_generates_in_the_train_step_and_continues_each_round(
    tmp_path, monkeypatch, mlflow_server
):
    """`unisd run` (kfp.local) with train.mode=online, 2 rounds, tiny:llama: the rollout and score stages
    record a skip, each train step generates with its current student (staleness ≈ 0 for HF generate, logged to
    MLflow as train/staleness for every step of both rounds), and round 1 starts from round 0's adapter."""
    from unisd.cli import main

    monkeypatch.chdir(tmp_path)
    config = _online_config(tmp_path, mlflow_server.uri, "online-dag")
    data = yaml.safe_load(config.read_text())
    data["pipeline"]["rounds"] = 2
    config.write_text(yaml.safe_dump(data))
    assert main(["run", "--config", str(config)]) == 0

    (run_dir,) = (tmp_path / "kfp").glob("run-*")
    # the stages' own outputs (merge-shards copies them)
    manifests = [
        json.loads(p.read_text()) for p in run_dir.glob("**/manifest.json") if "merge-shards" not in str(p)
    ]
    rollouts = [m for m in manifests if m.get("stage") == "rollout"]
    assert len(rollouts) == 2 and all(m["skipped"] == "train.mode=online" for m in rollouts)
    scores = [m for m in manifests if m.get("stage") == "score"]
    assert len(scores) == 2 and all(m["skipped"] for m in scores)  # sd: no views in the first place
    trains = sorted(
        (
            m for m in manifests if m.get("stage") == "train" and "starting_model" not in m
        ),  # not the round before 0
        key=lambda m: bool(m["config"]["train"]["init_adapter"]),
    )
    assert len(trains) == 2
    first, second = trains
    assert first["config"]["train"]["init_adapter"] is None
    adapter = Path(second["config"]["train"]["init_adapter"])
    assert adapter.name == "adapter" and Path(first["export"]["adapter"]).resolve() == adapter.resolve()

    summary = json.loads((run_dir / "summary.json").read_text())
    staleness = _history(mlflow_server.uri, summary["mlflow"]["run_id"], "train/staleness")
    assert [s for s, _ in staleness] == [1, 2, 10_001, 10_002]
    assert all(0 <= v < 1e-3 for _, v in staleness), staleness
