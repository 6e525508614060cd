"""The compiled pipeline as a cluster runs it: every component of the cluster IR in a fresh process that gets
only what a pod would get, through register and gate, on the tiny random model.

How (what plays the part of what):
  the IR           `unisd submit`'s own path: compile_pipeline(cluster=True) with the cluster settings
                   (UNISD_* env, as the ConfigMap gives them) and submitted_arguments() as the run's arguments
  the KFP driver   kfp.local's DAG walk over the compiled YAML (ExitHandler, ParallelFor, Collected, If) and
                   its executor-input JSON + placeholder resolution; every executor's command/args are the
                   IR's own (`sh -ec … python3 -m kfp.dsl.executor_main …`)
  the pod          PodTaskHandler below: a fresh process, cwd an empty folder, TMPDIR/HOME private; its env is
                   ONLY its image's ENV (parsed from docker/train.Dockerfile, docker/sandbox.Dockerfile for
                   the grade and negatives pods), the IR container env,
                   and the IR's kubernetes platform spec (secretAsEnv from the test's "Secrets"; pvcMount →
                   a local folder per claim, paths under the mount rewritten to it; fieldPathAsEnv from the
                   pod's labels, i.e. the run's Argo workflow name); nothing of this process
                   (no UNISD_DATA_DIR, no AWS_* unless a Secret of the IR names it)
  the image        a copy of src/ components/ pipelines/ configs/ in a folder with no ../shared/data next to
                   it (the dev fallback of the data loader cannot find the benchmarks), on this venv's python
  data             only in a real S3-compatible server (moto), staged with `unisd data upload`
  tracking         a real `mlflow server` on 127.0.0.1 over HTTP (artifacts proxied by the server)

What differs from a pod (not covered): no container image or KFP launcher (artifacts are local folders the
next task reads in place, not copies downloaded from the object store), the python and its packages are this
venv's (each pod gets its own image's ENV), no retries/timeouts/GPU/node selectors/tolerations/security
contexts, pod labels not enforced (no NetworkPolicy), the PVC is a folder by path rewrite (not a mount at /cache), and
two knobs of this machine: HF_HUB_OFFLINE=1 (no Hub here) and OMP_NUM_THREADS=1 (shared 2-core machine).
Nothing is killed or retried here (tests/test_pvc_resume.py does that); this test checks where progress goes.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml
from mlflow_server import MlflowServer
from s3_server import S3Server, clear_fsspec_cache

from unisd.allocator import find as find_allocator
from unisd.images import image

REPO = Path(__file__).resolve().parents[1]
# kfp.local says that resources/accelerators/display names have no effect locally: known, listed above
pytestmark = pytest.mark.filterwarnings("ignore:Task .* have no effect:UserWarning")
DATA = {  # the cluster settings for data (ConfigMap keys) and the namespace's data Secret
    "UNISD_DATA_SOURCE": "s3://unisd-data/v1",
    "UNISD_DATA_ENV_FROM": "unisd-data-s3",
}

# What the train image sets where its ENV names these folders (docker/train.Dockerfile).
IMAGE_VENV, IMAGE_CODE, IMAGE_CACHE, POD_TMP = "/opt/venv", "/opt/unisd", "/cache", "/tmp"


def dockerfile_env(path: Path) -> dict[str, str]:
    """The ENV of a Dockerfile, in order (later ENV lines override earlier ones; ${VAR} expanded)."""
    text = path.read_text().replace("\\\n", " ")
    env: dict[str, str] = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
    for line in text.splitlines():
        if line.strip().startswith("ENV "):
            for word in shlex.split(line.strip()[4:]):
                key, _, value = word.partition("=")
                env[key] = value.replace("${PATH}", env["PATH"])  # the only variable the ENV lines use
    return env


def ir_of(package: Path) -> tuple[dict, dict]:
    """(pipeline spec, kubernetes platform spec of each executor) of a compiled IR file."""
    docs = list(yaml.safe_load_all(package.read_text()))
    platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if len(docs) > 1 else {}
    return docs[0], platform


def function_of(command: list[str]) -> str:
    return command[command.index("--function_to_execute") + 1]


class PodTaskHandler:
    """Stands in for kfp.local's SubprocessTaskHandler: runs the IR's command as a pod would (see the module
    docstring). Configured through class attributes by the test."""

    platform: dict[str, dict] = {}  # function name → the IR platform spec of its executor
    secrets: dict[str, dict[str, str]] = {}  # Kubernetes Secrets of the namespace: name → key → value
    volumes: Path  # each PVC claim is the folder volumes/<claim>
    pods: Path  # one scratch folder per pod
    rewrite: dict[str, str] = {}  # image paths → this machine's (venv, image copy)
    fields: dict[str, str] = {}  # the pod's downward-API fields (fieldPathAsEnv): labels of the run
    launched: list[dict] = []

    def __init__(self, image, full_command, pipeline_root, runner, env_vars=None) -> None:
        self.image, self.full_command, self.env_vars = image, list(full_command), dict(env_vars or {})

    def pod_env(self, fn: str, scratch: Path) -> dict[str, str]:
        spec = self.platform.get(fn, {})
        mounts = {m["mountPath"]: self.volumes / m["constant"] for m in spec.get("pvcMount", [])}
        for folder in mounts.values():
            folder.mkdir(parents=True, exist_ok=True)
        paths = {**self.rewrite, POD_TMP: str(scratch / "tmp"), IMAGE_CACHE: str(scratch / "cache")}
        paths.update({mount: str(folder) for mount, folder in mounts.items()})

        # one pass, whole path components at the start of each ':'-separated entry (a replaced path that
        # lies under /tmp itself must not be rewritten again)
        pattern = re.compile(
            "(^|:)(" + "|".join(map(re.escape, sorted(paths, key=len, reverse=True))) + ")(?=/|:|$)"
        )

        def local(value: str) -> str:
            return pattern.sub(lambda m: m.group(1) + paths[m.group(2)], value)

        dockerfile = "sandbox" if self.image == image("sandbox") else "train"  # grade_op: the sandbox image
        env = {k: local(v) for k, v in dockerfile_env(REPO / "docker" / f"{dockerfile}.Dockerfile").items()}
        # the image preloads tcmalloc from a fixed link: this machine's copy where it has one, else none
        if env.pop("LD_PRELOAD", None) and find_allocator("tcmalloc"):
            env["LD_PRELOAD"] = str(find_allocator("tcmalloc"))
        # the image installs the package editable from /opt/unisd/src; this venv's install points elsewhere
        env["PYTHONPATH"] = local(f"{IMAGE_CODE}/src:") + env["PYTHONPATH"]
        env |= {k: local(v) for k, v in self.env_vars.items()}  # the IR container env
        for ref in spec.get("fieldPathAsEnv", []):  # KFP lists these after the container env
            env[ref["name"]] = self.fields[ref["fieldPath"]]
        for ref in spec.get("secretAsEnv", []):
            secret = self.secrets.get(ref["secretName"])
            if secret is None:
                assert ref.get("optional"), (
                    f"{fn}: Secret {ref['secretName']} missing: the pod would not start"
                )
                continue
            env |= {k["envVar"]: secret[k["secretKey"]] for k in ref["keyToEnv"] if k["secretKey"] in secret}
        env |= {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TMPDIR": str(scratch / "tmp")}
        return env

    def run(self):
        from kfp.local import status

        fn = function_of(self.full_command)
        scratch = self.pods / f"{fn}-{uuid.uuid4().hex[:8]}"
        for sub in ("tmp", "cache", "cwd"):
            (scratch / sub).mkdir(parents=True)
        env = self.pod_env(fn, scratch)
        log = scratch / "pod.log"
        with open(log, "w") as out:
            code = subprocess.run(
                self.full_command, env=env, cwd=scratch / "cwd", stdout=out, stderr=subprocess.STDOUT
            ).returncode
        self.launched.append(
            {"function": fn, "image": self.image, "env": env, "cwd": str(scratch / "cwd"), "rc": code}
        )
        if code != 0:
            print(f"--- {fn} failed ({code}) ---\n{log.read_text(errors='replace')[-6000:]}")
        return status.Status.SUCCESS if code == 0 else status.Status.FAILURE


def image_copy(root: Path) -> Path:
    """What the train image holds at /opt/unisd (its Dockerfile's COPY lines), somewhere with no data."""
    code = root / "opt" / "unisd"
    for part in ("src", "components", "pipelines", "configs"):
        shutil.copytree(REPO / part, code / part, ignore=shutil.ignore_patterns("__pycache__"))
    return code


def tiny_config(path: Path) -> Path:
    """configs/demo.yaml on the tiny random model: MBPP + CommonsenseQA, UniSD*, one shard, one step."""
    config = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    config["model"] = "tiny:llama"
    config["prepare"].update(train_limit=4, eval_limit=3)
    config["contexts"].update(negative_max_tokens=12, induced_max_tokens=12)
    config["rollout"]["max_new_tokens"] = 12
    config["eval"].update(limit=3, max_new_tokens=16, bootstrap_samples=200)
    config["train"].update(max_steps=1, micro_batch_size=2, grad_accum=2)
    config["tracking"].update(registered_model="cluster-e2e", experiment="cluster-e2e")
    config["pipeline"].update(shards=1)
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_compiled_pipeline_runs_component_by_component_as_pods(tmp_path, monkeypatch):
    from kfp import components, local
    from kfp.local import subprocess_task_handler

    from pipelines.cli import compile_pipeline, remote_tracking_uri, submitted_arguments
    from unisd.cli import main
    from unisd.data import resolve_data_dir
    from unisd.runconfig import load_run_config

    try:
        data = resolve_data_dir()
    except FileNotFoundError:
        pytest.skip("benchmark data not found: set UNISD_DATA_DIR (the built-ins are staged from it)")
    monkeypatch.chdir(tmp_path)
    with MlflowServer(tmp_path / "mlflow") as server, S3Server() as s3:
        s3.use(monkeypatch)  # for `unisd data upload` here only: pods get no AWS_* from this process
        s3.fs().mkdir("unisd-data")
        assert main(["data", "upload", str(data), "s3://unisd-data/v1", "--only", "mbpp,commonsenseqa"]) == 0
        for key in s3.env:
            monkeypatch.delenv(key)
        clear_fsspec_cache()

        # compile and send as `unisd submit` does, with the cluster settings of the ConfigMap
        monkeypatch.setenv("UNISD_MLFLOW_TRACKING_URI", server.uri)
        for key, value in DATA.items():
            monkeypatch.setenv(key, value)
        config = tiny_config(tmp_path / "tiny.yaml")
        cfg = load_run_config(config, check_paths=False)
        arguments = submitted_arguments(cfg, remote_tracking_uri(cfg, None))
        package = compile_pipeline(tmp_path / "pipeline.yaml", rounds=1, cluster=True, config_path=config)
        spec, platform = ir_of(package)
        executors = spec["deploymentSpec"]["executors"]
        by_function: dict[str, dict] = {}
        for label, executor in executors.items():
            fn = function_of(executor["container"]["command"] + executor["container"]["args"])
            assert by_function.setdefault(fn, platform.get(label, {})) == platform.get(label, {}), fn
        PodTaskHandler.platform = by_function
        # the Secret holds what an operator puts there for MinIO / S3: keys, region, endpoint
        PodTaskHandler.secrets = {DATA["UNISD_DATA_ENV_FROM"]: s3.env}
        PodTaskHandler.volumes = tmp_path / "volumes"
        PodTaskHandler.pods = tmp_path / "pods"
        PodTaskHandler.rewrite = {IMAGE_VENV: sys.prefix, IMAGE_CODE: str(image_copy(tmp_path / "image"))}
        PodTaskHandler.fields = {"metadata.labels['workflows.argoproj.io/workflow']": "unisd-e2e-x7k2p"}
        PodTaskHandler.launched = []
        monkeypatch.setattr(subprocess_task_handler, "SubprocessTaskHandler", PodTaskHandler)
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
        pipeline = components.load_component_from_file(str(package))
        pipeline(**arguments)

        launched = PodTaskHandler.launched
        # the pods imported the image copy, not this checkout
        pod = launched[0]
        where = subprocess.run(
            ["python3", "-c", "import unisd, components; print(unisd.__file__, components.__file__)"],
            env=pod["env"],
            cwd=pod["cwd"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert all(w.startswith(PodTaskHandler.rewrite[IMAGE_CODE]) for w in where), where
        ran = [p["function"] for p in launched]
        assert all(p["rc"] == 0 for p in launched)
        # every executor of the IR ran (promote too: it moves the alias only when the gate says so), each in
        # its own empty cwd
        expected = set(by_function)
        assert expected <= set(ran), expected - set(ran)
        assert len({p["cwd"] for p in launched}) == len(launched)
        # only the prepare pod got the data location and the credentials (from the IR: env + Secret)
        for pod in launched:
            assert str(REPO / "src") not in pod["env"]["PYTHONPATH"]
            data_env = {k: v for k, v in pod["env"].items() if k.startswith("AWS_") or k == "UNISD_DATA_DIR"}
            if pod["function"] == "prepare_op":
                assert data_env["UNISD_DATA_DIR"] == "s3://unisd-data/v1"
                assert data_env["AWS_ENDPOINT_URL"] == s3.endpoint and data_env["AWS_ACCESS_KEY_ID"] == "test"
            else:
                assert not data_env, pod["function"]

        # model-written code ran only in the sandbox image's pods: negatives (once) and grade (per benchmark
        # and model), with that image's env
        sandboxed = [p for p in launched if p["function"] in ("grade_op", "negatives_op")]
        assert sorted(p["function"] for p in sandboxed) == ["grade_op"] * 4 + ["negatives_op"]
        assert {p["image"] for p in sandboxed} == {image("sandbox")}
        assert {p["image"] for p in launched if p not in sandboxed} == {image("train"), image("rollout")}
        assert all(p["env"]["PYTHONPATH"].endswith(PodTaskHandler.rewrite[IMAGE_CODE]) for p in sandboxed)

        # prepare read the built-ins from the bucket (there is no other copy in the pods' reach)
        (sources_file,) = (tmp_path / "root").glob("**/prepared/snapshot/sources.json")
        sources = json.loads(sources_file.read_text())
        assert sources["mbpp"]["source"] == "built-in (s3://unisd-data/v1)", sources["mbpp"]
        # the GPU pods' cache is the PVC folder, and so is their progress: run-scoped, per task; the train
        # output holds the finished adapter, not the checkpoints
        cache = PodTaskHandler.volumes / "unisd-cache"
        assert (cache / "unisd").is_dir()
        progress = cache / "progress" / "unisd-e2e-x7k2p"
        assert list((progress / "train-op").glob("train-*/checkpoints/step-*/trainer_state.json"))
        (model_dir,) = (tmp_path / "root").glob("**/train-op*/model")
        assert (model_dir / "adapter").is_dir() and not (model_dir / "checkpoints").exists()

        # MLflow over HTTP: the version registered (challenger), gate decided, the run ended FINISHED
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=server.uri, registry_uri=server.uri)
        version = client.get_model_version_by_alias("cluster-e2e", "challenger")
        assert version.version == "1"
        run = client.get_run(version.run_id)
        assert run.info.status == "FINISHED"
        assert any(k.startswith("eval/mbpp/") for k in run.data.metrics)
        (decision_file,) = (tmp_path / "root").glob("**/register-op*/executor_output.json")
        decision = json.loads(json.loads(decision_file.read_text())["parameterValues"]["decision"])
        assert decision["version"] == "1" and "promote" in decision
        aliases = client.get_registered_model(version.name).aliases
        assert ("champion" in aliases) == bool(decision["promote"])
        assert list((tmp_path / "root").glob("**/report-op*/html"))


def compiled_ir(tmp_path: Path, monkeypatch, **settings: str) -> tuple[dict, dict]:
    """(container env by function, platform spec by function) of `unisd compile` under these settings."""
    from pipelines.cli import compile_pipeline

    for key in ("UNISD_DATA_SOURCE", "UNISD_DATA_PVC", "UNISD_DATA_MOUNT_PATH", "UNISD_DATA_ENV_FROM"):
        monkeypatch.delenv(key, raising=False)
    for key, value in settings.items():
        monkeypatch.setenv(key, value)
    spec, platform = ir_of(compile_pipeline(tmp_path / "p.yaml", cluster=True))
    env, placement = {}, {}
    for label, executor in spec["deploymentSpec"]["executors"].items():
        fn = function_of(executor["container"]["command"] + executor["container"]["args"])
        env[fn] = {e["name"]: e["value"] for e in executor["container"].get("env", [])}
        placement[fn] = platform.get(label, {})
    return env, placement


def test_only_the_prepare_pod_gets_the_data_env_volume_and_secret(tmp_path, monkeypatch):
    env, placement = compiled_ir(
        tmp_path,
        monkeypatch,
        UNISD_DATA_SOURCE="benchmarks/v1",  # a path on the data PVC, relative to its mount
        UNISD_DATA_PVC="team-data",
        UNISD_DATA_MOUNT_PATH="/mnt/data",
        UNISD_DATA_ENV_FROM="team-data-s3",
    )
    assert env["prepare_op"]["UNISD_DATA_DIR"] == "/mnt/data/benchmarks/v1"
    assert {"constant": "team-data", "mountPath": "/mnt/data"}.items() <= placement["prepare_op"]["pvcMount"][
        0
    ].items()
    (data_secret,) = [s for s in placement["prepare_op"]["secretAsEnv"] if s["secretName"] == "team-data-s3"]
    assert data_secret["optional"] is True
    keys = {k["secretKey"]: k["envVar"] for k in data_secret["keyToEnv"]}
    assert keys["AWS_ACCESS_KEY_ID"] == "AWS_ACCESS_KEY_ID" and "AWS_ENDPOINT_URL" in keys
    for fn in set(env) - {"prepare_op"}:  # train, eval, contexts, …: they read the prepare snapshot
        assert "UNISD_DATA_DIR" not in env[fn], fn
        assert all(m["constant"] != "team-data" for m in placement[fn].get("pvcMount", [])), fn
        assert all(s["secretName"] != "team-data-s3" for s in placement[fn].get("secretAsEnv", [])), fn
    assert {"train_op", "eval_op", "contexts_op"} <= set(env)


def test_data_settings_defaults_and_refusals(tmp_path, monkeypatch):
    env, placement = compiled_ir(tmp_path, monkeypatch)  # no data settings: prepare uses the config's
    assert "UNISD_DATA_DIR" not in env["prepare_op"] and "pvcMount" not in placement["prepare_op"]
    assert {s["secretName"] for s in placement["prepare_op"]["secretAsEnv"]} == {"unisd-mlflow-auth"}

    env, _ = compiled_ir(tmp_path, monkeypatch, UNISD_DATA_SOURCE="gs://bucket/unisd-data/")
    assert env["prepare_op"]["UNISD_DATA_DIR"] == "gs://bucket/unisd-data/"
    with pytest.raises(ValueError, match=r"UNISD_DATA_SOURCE='/srv/data' is a path, but UNISD_DATA_PVC"):
        compiled_ir(tmp_path, monkeypatch, UNISD_DATA_SOURCE="/srv/data")
    with pytest.raises(
        ValueError, match=r"not under the data PVC's mount path UNISD_DATA_MOUNT_PATH='/data'"
    ):
        compiled_ir(tmp_path, monkeypatch, UNISD_DATA_SOURCE="/srv/data", UNISD_DATA_PVC="team-data")
