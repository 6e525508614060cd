"""The compiled pipeline (IR YAML) and the KFP client calls of `unisd submit` / `unisd schedule`."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import yaml

from unisd.cli import main
from unisd.images import image

STAGES = [
    "resolve-config-op",
    "start-tracking-op",
    "end-tracking-op",
    "prepare-op",
    "data-check-op",
    "starting-model-op",
    "contexts-op",
    "shard-indices-op",
    "rollout-op",
    "merge-shards-op",
    "score-op",
    "train-op",
    "eval-op",
    "register-op",
    "promote-op",
    "report-op",
]


def body_tasks(spec: dict) -> dict:
    """The tasks inside the ExitHandler (everything but the exit task), the data-changed If's included."""
    tasks = dict(spec["components"]["comp-exit-handler-1"]["dag"]["tasks"])
    for name, comp in spec["components"].items():
        if name.startswith("comp-condition-") and "dag" in comp:
            tasks |= comp["dag"]["tasks"]
    return tasks


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("ir") / "pipeline.yaml"
    assert main(["compile", "--output", str(out), "--rounds", "2"]) == 0
    docs = list(yaml.safe_load_all(out.read_text()))
    return out.read_text(), docs[0], (docs[1] if len(docs) > 1 else {})


def test_every_stage_is_in_the_dag(compiled):
    text, spec, _ = compiled
    for stage in STAGES:
        assert f"comp-{stage}" in spec["components"], stage
    # Two rounds unrolled: rollout / score / train appear once per round.
    tasks = json.dumps(body_tasks(spec))
    assert tasks.count('"train-op') >= 2 or "train-op-2" in text


def test_an_exit_handler_ends_the_mlflow_run_and_mlflow_is_checked_first(compiled):
    """Every run ends FINISHED / FAILED / KILLED: the whole DAG sits in an ExitHandler whose exit task
    (uncached, so it runs on every attempt) gets the pipeline's final status. Prepare waits for the MLflow
    check, so a dead server stops the run before any expensive stage."""
    _, spec, _ = compiled
    root = spec["root"]["dag"]["tasks"]
    assert set(root) == {"exit-handler-1", "end-tracking-op"}
    end = root["end-tracking-op"]
    assert end["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    assert end["dependentTasks"] == ["exit-handler-1"]
    assert end["inputs"]["parameters"]["status"] == {"taskFinalStatus": {"producerTask": "exit-handler-1"}}
    assert end["cachingOptions"].get("enableCache", False) is False
    assert "start-tracking-op" in body_tasks(spec)["prepare-op"]["dependentTasks"]


def test_parallel_for_fanouts(compiled):
    _, spec, _ = compiled
    loops = {name: task for name, task in body_tasks(spec).items() if "parameterIterator" in task}
    names = " ".join(t["taskInfo"]["name"] for t in loops.values())
    assert "rollout-round-0" in names and "score-round-0" in names and "rollout-round-1" in names
    assert "eval-benchmarks" in names
    bench_loop = next(t for t in loops.values() if t["taskInfo"]["name"] == "eval-benchmarks")
    assert bench_loop["parameterIterator"]["items"]["inputParameter"].endswith("benchmarks")


def test_gpu_requests_tolerations_secrets_and_sandbox_label(compiled):
    text, spec, platform = compiled
    resources = [e["container"].get("resources", {}) for e in spec["deploymentSpec"]["executors"].values()]
    gpus = [r["accelerator"] for r in resources if "accelerator" in r]
    assert gpus and all(g["resourceType"] == "nvidia.com/gpu" for g in gpus)
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    train = next(v for k, v in k8s.items() if "train-op" in k)
    assert train["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert train["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
    assert {s["secretName"] for s in train["secretAsEnv"]} == {"unisd-mlflow-auth"}
    assert train["pvcMount"][0]["constant"] == "unisd-cache"  # manifests/base: the model cache PVC
    assert any(m["mountPath"] == "/dev/shm" for m in train.get("emptyDirMounts", []))
    # Model-written code runs only in the grade and negatives pods: sandbox image, sandbox label (egress
    # denied), non-root, no volume, no credentials, no GPU. The eval and contexts pods (GPU, model cache) run
    # none of it.
    executors = spec["deploymentSpec"]["executors"]
    sandboxed = {k: v for k, v in k8s.items() if "grade-op" in k or "negatives-op" in k}
    assert len(sandboxed) == 3 and not any("podMetadata" in v for k, v in k8s.items() if k not in sandboxed)
    for label, pod in sandboxed.items():
        assert pod["podMetadata"]["labels"] == {
            "unisd.ai/sandbox": "true",
            "unisd.ai/sandbox-kfp-launcher": "true",
        }
        assert pod["securityContext"] == {"runAsUser": "10001", "runAsGroup": "10001", "runAsNonRoot": True}
        assert not {"pvcMount", "secretAsEnv", "emptyDirMounts", "fieldPathAsEnv"} & set(pod), label
        container = executors[label]["container"]
        assert container["image"] == image("sandbox") and "accelerator" not in container.get("resources", {})
        assert not any(e["name"] == "UNISD_SANDBOX_BACKEND" for e in container.get("env", []))  # fail closed
    assert {e["container"]["image"] for k, e in executors.items() if k not in sandboxed} <= {
        image("train"),
        image("rollout"),
    }
    evals = [v for k, v in k8s.items() if "eval-op" in k]
    assert len(evals) == 2 and all(v["pvcMount"][0]["constant"] == "unisd-cache" for v in evals)
    # Credentials only as secret references: no container env var with a secret-like name has a value.
    for executor in spec["deploymentSpec"]["executors"].values():
        for env in executor["container"].get("env", []):
            assert not any(w in env["name"].upper() for w in ("PASSWORD", "SECRET", "TOKEN", "KEY")), env


def test_cluster_settings_come_from_the_settings_configmap_env(tmp_path, monkeypatch):
    monkeypatch.setenv("UNISD_CACHE_PVC", "team-cache")
    monkeypatch.setenv("UNISD_GPU_NODE_SELECTOR", '{"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}')
    monkeypatch.setenv(
        "UNISD_GPU_TOLERATIONS",
        '[{"key": "gpu", "operator": "Equal", "value": "h100", "effect": "NoSchedule"}]',
    )
    monkeypatch.setenv("UNISD_MLFLOW_TRACKING_URI", "http://mlflow.team:5000")
    out = tmp_path / "p.yaml"
    assert main(["compile", "--output", str(out)]) == 0
    spec, platform = list(yaml.safe_load_all(out.read_text()))
    train = next(
        v
        for k, v in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"].items()
        if "train-op" in k
    )
    assert train["pvcMount"][0]["constant"] == "team-cache"
    assert train["nodeSelector"]["labels"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert train["tolerations"][0]["value"] == "h100"
    assert spec["root"]["inputDefinitions"]["parameters"]["mlflow_tracking_uri"]["defaultValue"] == (
        "http://mlflow.team:5000"
    )


def test_the_sandbox_backend_setting_reaches_only_the_sandbox_pods(tmp_path, monkeypatch, capsys):
    """UNISD_SANDBOX_BACKEND=rlimit (the pod is the boundary) is for the hardened grade/negatives pods only; a value the
    sandbox does not know is refused at compile time, naming the setting."""
    monkeypatch.setenv("UNISD_SANDBOX_BACKEND", "rlimit")
    out = tmp_path / "p.yaml"
    assert main(["compile", "--output", str(out)]) == 0
    spec, _ = list(yaml.safe_load_all(out.read_text()))
    backend = {
        label: {e["name"]: e["value"] for e in ex["container"].get("env", [])}.get("UNISD_SANDBOX_BACKEND")
        for label, ex in spec["deploymentSpec"]["executors"].items()
    }
    assert {k for k, v in backend.items() if v} == {
        k for k in backend if "grade-op" in k or "negatives-op" in k
    }
    assert set(v for v in backend.values() if v) == {"rlimit"}
    monkeypatch.setenv("UNISD_SANDBOX_BACKEND", "none")
    assert main(["compile", "--output", str(out)]) != 0
    assert (
        "UNISD_SANDBOX_BACKEND must be one of auto, bwrap, unshare, rlimit, got 'none'"
        in capsys.readouterr().err
    )


def test_ui_parameters(compiled):
    _, spec, _ = compiled
    params = spec["root"]["inputDefinitions"]["parameters"]
    for name in (
        "model",
        "preset",
        "benchmarks",
        "num_shards",
        "budget",
        "max_new_tokens",
        "lora",
        "mlflow_tracking_uri",
        "registered_model",
        "promotion_margin",
        "config_yaml",
    ):
        assert name in params, name
    assert params["preset"]["defaultValue"] == "unisd_star"


class _Recorder(BaseHTTPRequestHandler):
    """A stand-in KFP API server: records every request and answers with the minimal valid JSON."""

    requests: list[dict] = []

    def _reply(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        type(self).requests.append({"method": self.command, "path": self.path, "body": body})
        if "/experiments" in self.path and self.command == "GET":
            self._reply(
                {"experiments": [{"experiment_id": "exp-1", "display_name": "unisd"}], "total_size": 1}
            )
        elif "/experiments" in self.path:
            self._reply({"experiment_id": "exp-1", "display_name": (body or {}).get("display_name", "unisd")})
        elif "/recurringruns" in self.path:
            self._reply({"recurring_run_id": "rr-1", **(body or {})})
        elif "/runs" in self.path:
            self._reply({"run_id": "run-1", **(body or {})})
        else:
            self._reply({})

    do_GET = do_POST = do_PUT = do_DELETE = _handle

    def log_message(self, *args):  # keep test output quiet
        pass


@pytest.fixture()
def kfp_api():
    _Recorder.requests = []
    server = HTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", _Recorder.requests
    server.shutdown()


def _posted(requests, fragment):
    return [r for r in requests if r["method"] == "POST" and fragment in r["path"]]


CLUSTER_MLFLOW = "http://unisd-mlflow.unisd.svc.cluster.local:5000"


def test_submit_sends_pipeline_spec_and_parameters(kfp_api, capsys):
    host, requests = kfp_api
    args = ["submit", "--host", host, "--run-name", "nightly", "--mlflow-uri", CLUSTER_MLFLOW]
    assert main([*args, "preset=sd", "train.lr=3e-5", "eval.limit=5"]) == 0
    runs = _posted(requests, "/runs")
    assert len(runs) == 1
    body = runs[0]["body"]
    print(json.dumps(body["runtime_config"], indent=2))  # the request body (pasted in the closing note)
    assert body["display_name"] == "nightly" and body["experiment_id"] == "exp-1"
    # With kubernetes platform settings the client sends {pipeline_spec, platform_spec}.
    spec = body["pipeline_spec"]["pipeline_spec"]
    assert spec["pipelineInfo"]["name"] == "unisd-self-distillation"
    assert "comp-train-op" in spec["components"]
    assert "kubernetes" in body["pipeline_spec"]["platform_spec"]["platforms"]
    params = body["runtime_config"]["parameters"]
    assert params["preset"] == "sd" and params["model"] == "smollm2-135m-instruct"
    assert params["benchmarks"] == ["mbpp", "commonsenseqa"]
    assert params["mlflow_tracking_uri"] == CLUSTER_MLFLOW  # never the laptop's sqlite file
    submitted = yaml.safe_load(params["config_yaml"])  # every override reaches the run, UI or not
    assert submitted["train"]["lr"] == 3e-5 and submitted["eval"]["limit"] == 5
    assert submitted["tracking"]["tracking_uri"] == CLUSTER_MLFLOW


def test_submit_refuses_a_local_tracking_uri(kfp_api, capsys, monkeypatch):
    host, requests = kfp_api
    monkeypatch.delenv("UNISD_MLFLOW_TRACKING_URI", raising=False)
    assert main(["submit", "--host", host]) == 2
    assert "is a local file: a cluster run cannot reach it" in capsys.readouterr().err
    assert not _posted(requests, "/runs")  # refused before anything was sent
    monkeypatch.setenv("UNISD_MLFLOW_TRACKING_URI", CLUSTER_MLFLOW)  # the cluster settings ConfigMap
    assert main(["submit", "--host", host]) == 0
    assert (
        _posted(requests, "/runs")[0]["body"]["runtime_config"]["parameters"]["mlflow_tracking_uri"]
        == CLUSTER_MLFLOW
    )


def test_ui_parameters_at_their_default_do_not_override_the_config():
    from unisd.pipeline_steps import UI_PARAMETERS, resolve_config, ui_values
    from unisd.runconfig import load_run_config

    defaults = ui_values(load_run_config())
    submitted = yaml.safe_dump({"model": "tiny:llama", "train": {"max_steps": 7}, "preset": "sd"})
    resolved = yaml.safe_load(resolve_config(submitted, defaults, defaults))  # the UI left alone
    assert (
        resolved["model"] == "tiny:llama"
        and resolved["train"]["max_steps"] == 7
        and resolved["preset"] == "sd"
    )
    changed = {**defaults, "preset": "ema", "num_shards": 3}  # set in the UI: wins over the config
    resolved = yaml.safe_load(resolve_config(submitted, changed, defaults, ["train.max_steps=9"]))
    assert (resolved["preset"], resolved["pipeline"]["shards"], resolved["train"]["max_steps"]) == (
        "ema",
        3,
        9,
    )
    assert {p.name for p in UI_PARAMETERS} == set(defaults)


def test_pipeline_signature_and_config_op_follow_the_ui_parameter_table(compiled):
    from unisd.pipeline_steps import UI_PARAMETERS

    _, spec, _ = compiled
    names = {p.name for p in UI_PARAMETERS}
    assert set(spec["root"]["inputDefinitions"]["parameters"]) == names | {"config_yaml", "extra_overrides"}
    op_inputs = set(spec["components"]["comp-resolve-config-op"]["inputDefinitions"]["parameters"])
    assert op_inputs == names | {"config_yaml", "extra_overrides", "ui_defaults"}
    exit_inputs = set(spec["components"]["comp-end-tracking-op"]["inputDefinitions"]["parameters"])
    assert names <= exit_inputs
    # KFP needs literal signatures, so both ops spell the table out again: the dict each passes to
    # resolve_config must name every UI parameter, each from its own argument.
    import ast
    import inspect

    from components import stages

    for op in (stages.resolve_config_op, stages.end_tracking_op):
        tree = ast.parse(inspect.getsource(op.python_func))
        calls = [
            n for n in ast.walk(tree)
            if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) == "ui"
        ]  # fmt: skip
        assert len(calls) == 1, op.name
        keywords = calls[0].value.keywords
        assert {k.arg for k in keywords} == names, op.name
        assert all(isinstance(k.value, ast.Name) and k.value.id == k.arg for k in keywords), op.name


def test_schedule_sends_cron_and_parameters(kfp_api):
    host, requests = kfp_api
    args = [
        "schedule",
        "--host",
        host,
        "--cron",
        "0 0 2 * * *",
        "--max-concurrency",
        "1",
        "--mlflow-uri",
        CLUSTER_MLFLOW,
    ]
    assert main(args) == 0
    recurring = _posted(requests, "/recurringruns")
    assert len(recurring) == 1
    body = recurring[0]["body"]
    assert body["trigger"]["cron_schedule"]["cron"] == "0 0 2 * * *"
    assert body["max_concurrency"] in ("1", 1) and body["no_catchup"] is True
    assert body["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "unisd-self-distillation"
    assert body["runtime_config"]["parameters"]["preset"] == "unisd_star"
    assert body["runtime_config"]["parameters"]["mlflow_tracking_uri"] == CLUSTER_MLFLOW


def test_schedule_rejects_five_field_cron(kfp_api):
    host, _ = kfp_api
    assert main(["schedule", "--host", host, "--cron", "0 2 * * *"]) == 2


def test_the_failed_components_error_is_found_in_the_run_log():
    from pipelines.cli import failure_line

    log = (
        "\x1b[96m'prepare-op'\x1b[0m\n"
        "            Traceback (most recent call last):\n"
        '              File "x.py", line 3, in run\n'
        "                raise ValueError(\n"
        "            ValueError: no training items left after the length limits (4 dropped); see report\n"
        "    Task 'prepare-op' finished with status FAILURE\n"
    )
    assert failure_line(log) == (
        "ValueError",
        "no training items left after the length limits (4 dropped); see report",
    )
    assert failure_line("no traceback here") is None


def test_stage_lines_count_the_shard_that_finished(tmp_path):
    """A ParallelFor task's folder is inside for-loop-*-iteration-*: its stage line still shows its counts."""
    import io
    import os

    from pipelines.progress import StageConsole, _key_counts
    from unisd.artifacts import write_json

    for i, items in ((0, 8), (1, 5)):
        write_json(
            tmp_path / f"for-loop-3-iteration-{i}" / "rollout-op" / "rollout" / "manifest.json",
            {
                "stage": "rollout",
                "counts": {"items": items, "completion_tokens": 10 * items, "tokens_per_s": 3},
            },
        )
    newest = tmp_path / "for-loop-3-iteration-0" / "rollout-op" / "rollout" / "manifest.json"
    os.utime(newest, (newest.stat().st_mtime + 5,) * 2)
    terminal = io.StringIO()
    console = StageConsole(io.StringIO(), terminal, tmp_path, total=1)
    assert _key_counts(console._task_dir("rollout-op")) == "8 completions, 80 tokens (3 tok/s)"
    assert _key_counts(console._task_dir("score-op")) == ""  # not run: no folder, no counts
    console.write("12:00:00.000 - INFO - Task 'rollout-op' finished with status SUCCESS\n")
    console.close()
    assert "✓ rollout 1/2" in terminal.getvalue()  # the shard that finished, of how many
