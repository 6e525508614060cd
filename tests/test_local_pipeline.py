"""The whole DAG through real kfp.local (SubprocessRunner, this env) on a tiny random model.

The slowest tests in the suite (every component is a fresh Python process that imports torch):

    test_whole_pipeline_runs_locally_and_registers_a_model   `unisd run` end to end: MLflow version
        registered, alias set, report written, the MLflow run FINISHED by the exit step
    test_a_killed_run_resumes_from_the_stages_that_finished  the same run SIGKILLed as eval starts, then
        `unisd run --resume`: faster than the full run, the same results, one MLflow run, FINISHED
    test_mlflow_killed_as_training_starts_and_back_mid_run   a real server killed as training starts and
        restarted while eval runs: the run completes, train metrics replayed, FINISHED
    test_mlflow_down_until_the_end_then_tracking_sync        the server stays down to the end: eval, register
        and report still run on the saved model; `unisd tracking sync RUN_DIR` replays all of it
    test_a_failed_stage_ends_the_run_failed_in_one_line      a stage raises: one line naming it and its error,
        the log, the resume command; the MLflow run FAILED
    test_sigterm_stops_the_run_killed_with_a_resume_hint     SIGTERM: components stopped, MLflow run KILLED
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from mlflow_server import MlflowServer

from unisd.cli import main

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def demo_config(tmp_path: Path, **tracking) -> Path:
    """configs/demo.yaml on a tiny random model: 2 shards, MBPP + CommonsenseQA, UniSD*."""
    config = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    config["model"] = "tiny:llama"
    config["prepare"].update(train_limit=4, eval_limit=3)
    config["contexts"].update(negative_max_tokens=12, induced_max_tokens=12)
    config["rollout"]["max_new_tokens"] = 12
    config["eval"].update(limit=3, max_new_tokens=16, bootstrap_samples=200)
    config["train"].update(max_steps=1, micro_batch_size=2, grad_accum=2)
    config["tracking"]["tracking_uri"] = f"sqlite:///{tmp_path}/mlflow.db"
    config["tracking"].update(tracking)
    config["pipeline"].update(shards=2, pipeline_root=str(tmp_path / "kfp"))
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def small_config(tmp_path: Path, server: MlflowServer | None, name: str, **prepare) -> Path:
    """The smallest whole DAG: plain SD (no contexts, no views), one shard, CommonsenseQA only; MLflow: the
    server, else a sqlite file."""
    config = {
        "model": "tiny:llama",
        "preset": "sd",
        "prepare": {"benchmarks": ["commonsenseqa"], "train_limit": 4, "eval_limit": 6, **prepare},
        "rollout": {"max_new_tokens": 8, "batch_size": 4},
        "train": {
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "lr": 1e-3,
            "micro_batch_size": 2,
            "grad_accum": 1,
            "max_steps": 2,
            "checkpoint_every": 1,
        },
        "eval": {"limit": 6, "max_new_tokens": 8, "batch_size": 6, "bootstrap_samples": 100},
        "tracking": {
            "tracking_uri": server.uri if server else f"sqlite:///{tmp_path}/mlflow.db",
            "experiment": f"outage-{name}",
            "registered_model": f"outage-{name}",
            "retry_for_s": 20,
            "backoff_s": 1,
            "max_backoff_s": 5,
            "probe_timeout_s": 5,
        },
        "pipeline": {"rounds": 1, "shards": 1, "pipeline_root": str(tmp_path / "kfp")},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def log_text(path: Path) -> str:
    """A run log without kfp.local's colour codes (it colours task names)."""
    return re.sub(r"\x1b\[[0-9;]*m", "", path.read_text(errors="replace"))


def run_dir_of(tmp_path: Path) -> Path:
    (run_dir,) = (tmp_path / "kfp").glob("run-*")
    return run_dir


def tasks_of(run_dir: Path) -> Path:
    (tasks,) = run_dir.glob("unisd-self-distillation-*")
    return tasks


def mlflow_client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def eval_results(run_dir: Path) -> dict:
    """{(benchmark, role): (score, [(id, score, completion)…])} of a run's eval folders."""
    out = {}
    for path in sorted(run_dir.glob("**/results/results.json")):
        results = json.loads(path.read_text())
        agg = results["aggregate"]
        items = [
            (r["id"], r["score"], json.dumps(r.get("completions") or r.get("completion")))
            for r in results["per_item"]
        ]
        out[(agg["benchmark"], agg["role"])] = (agg["score"], sorted(items))
    return out


# --------------------------------------------------------------------------------------------------
# the whole run, and the same run killed and resumed


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("full")
    config = demo_config(tmp_path)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        started = time.monotonic()
        code = main(["run", "--config", str(config)])
        elapsed = time.monotonic() - started
    finally:
        os.chdir(cwd)
    print(f"full run: {elapsed:.1f}s")
    return {
        "code": code,
        "tmp": tmp_path,
        "config": config,
        "elapsed": elapsed,
        "run_dir": run_dir_of(tmp_path),
    }


def test_whole_pipeline_runs_locally_and_registers_a_model(full_run):
    assert full_run["code"] == 0
    tmp_path, run_dir = full_run["tmp"], full_run["run_dir"]
    summary = json.loads((run_dir / "summary.json").read_text())
    report_html = open(summary["report_html"]).read()
    assert "<img" in report_html
    assert "gamma" in report_html and "0.001" in report_html  # the run's γ (UniSD*) is in the run table
    roles = {(e["benchmark"], e["role"]) for e in summary["eval"]}
    assert roles == {(b, r) for b in ("mbpp", "commonsenseqa") for r in ("base", "adapted")}
    decision = summary["decision"]
    assert decision["version"] == "1" and isinstance(decision["promote"], bool)

    config = yaml.safe_load(full_run["config"].read_text())
    client = mlflow_client(f"sqlite:///{tmp_path}/mlflow.db")
    version = client.get_model_version_by_alias(config["tracking"]["registered_model"], "challenger")
    assert str(version.version) == "1"
    assert {"pipeline_run_id", "git_sha", "data_hash", "base_model"} <= set(version.tags)
    run = client.get_run(version.run_id)
    assert any(k.startswith("eval/mbpp/") for k in run.data.metrics)
    assert "kd_loss" in run.data.metrics and "loss" in run.data.metrics
    # the exit step ended the run: never left RUNNING
    assert run.info.status == "FINISHED" and run.info.end_time is not None
    assert summary["mlflow"] == {"run_id": version.run_id, "outbox_pending": 0, "status": "FINISHED"}
    assert json.loads((run_dir / "run.json").read_text())["attempts"][-1]["status"] == "succeeded"
    # The terminal's stage lines read each stage's own counts: every stage that has some shows them whole.
    from pipelines.progress import _key_counts

    lines = {d.name: _key_counts(d) for d in sorted(tasks_of(run_dir).glob("**/*-op*")) if d.is_dir()}
    assert lines["contexts-op"].startswith("8 items × 3 retrieval views, 8 negative candidates"), lines
    assert lines["negatives-op"].endswith("fallbacks") and lines["eval-op"].endswith(": 3 answers"), lines
    assert not [line for line in lines.values() if "None" in line], lines


def test_a_killed_run_resumes_from_the_stages_that_finished(full_run, tmp_path, capsys):
    """The same config as the full run, SIGKILLed (driver and components) as eval starts, then resumed:
    the finished stages are not run again (kfp.local cache hits in the same task folders), the resumed
    attempt takes less time than the full run, the results are the same, and it is one MLflow run that
    ends FINISHED."""
    config = demo_config(tmp_path, experiment="resume", registered_model="resume-student")
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    driver = subprocess.Popen(
        [sys.executable, "-m", "unisd", "run", "--config", str(config)],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 1500
    log = None
    while time.monotonic() < deadline and driver.poll() is None:
        logs = list((tmp_path / "kfp").glob("run-*/run.log"))
        if logs and "Executing task 'eval-op" in log_text(logs[0]):
            log = logs[0]
            break
        time.sleep(1)
    assert log is not None and driver.poll() is None, "the run never reached eval"
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and every component process: a crash, no cleanup
    driver.wait(timeout=60)
    run_dir = log.parent
    killed_at = json.loads((run_dir / "run.json").read_text())["attempts"][-1]
    assert killed_at["status"] == "running"  # nobody could write anything else
    tracking_info = json.loads((run_dir / "tracking.json").read_text())
    client = mlflow_client(tracking_info["tracking_uri"])
    assert client.get_run(tracking_info["run_id"]).info.status == "RUNNING"

    started = time.monotonic()
    assert main(["run", "--resume", str(run_dir)]) == 0
    resumed = time.monotonic() - started
    err = capsys.readouterr().err
    with capsys.disabled():
        print(f"\nfull run {full_run['elapsed']:.1f}s; resumed attempt {resumed:.1f}s")
    assert resumed < full_run["elapsed"]
    done_before = [line for line in err.splitlines() if "↺" in line and "done before" in line]
    assert any("train" in line for line in done_before) and any("prepare" in line for line in done_before)
    assert not [line for line in err.splitlines() if "▶ train" in line or "▶ prepare" in line]

    assert eval_results(run_dir) == eval_results(full_run["run_dir"])  # same scores, same completions
    train_a = (tasks_of(full_run["run_dir"]) / "train-op" / "model" / "metrics.jsonl").read_text()
    train_b = (tasks_of(run_dir) / "train-op" / "model" / "metrics.jsonl").read_text()
    assert [json.loads(x)["loss"] for x in train_a.splitlines()] == [
        json.loads(x)["loss"] for x in train_b.splitlines()
    ]
    experiment = client.get_experiment_by_name("resume")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [tracking_info["run_id"]]  # the resumed run, not a second one
    assert runs[0].info.status == "FINISHED"
    state = json.loads((run_dir / "run.json").read_text())
    assert [a["status"] for a in state["attempts"]] == ["lost", "succeeded"]


# --------------------------------------------------------------------------------------------------
# MLflow blinks during a run


@pytest.fixture
def server(tmp_path):
    srv = MlflowServer(tmp_path / "mlflow").start()
    yield srv
    srv.stop()


def _watch(tmp_path: Path, server: MlflowServer, *, restart: bool, events: dict) -> threading.Thread:
    """Kill the server the moment the train task starts; with `restart`, start it again once training
    has given up on it and buffered its metrics (the outbox has a record)."""

    def watch():
        deadline = time.monotonic() + 1500
        while time.monotonic() < deadline:
            if list((tmp_path / "kfp").glob("run-*/unisd-self-distillation-*/train-op")):
                server.stop()
                events["killed"] = time.monotonic()
                break
            time.sleep(0.2)
        if not restart:
            return
        while time.monotonic() < deadline:
            outbox = list((tmp_path / "kfp").glob("run-*/mlflow-outbox.jsonl"))
            if outbox and outbox[0].read_text().strip():
                server.start(wait=False)
                events["restarted"] = time.monotonic()
                events["startup_s"] = server.wait_healthy(180)
                return
            time.sleep(0.2)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_mlflow_killed_as_training_starts_and_back_mid_run(tmp_path, server, capsys, monkeypatch):
    """Was: the model is saved but eval / register / report never run. Now: training buffers its metrics,
    eval runs, the server comes back, and the exit step replays the outbox and ends the run FINISHED."""
    monkeypatch.chdir(tmp_path)
    config = small_config(tmp_path, server, "midrun")
    events: dict = {}
    watcher = _watch(tmp_path, server, restart=True, events=events)
    started = time.monotonic()
    assert main(["run", "--config", str(config)]) == 0
    watcher.join(timeout=300)
    out = capsys.readouterr().out
    with capsys.disabled():
        print(
            f"\nrun {time.monotonic() - started:.1f}s; server killed at {events['killed'] - started:.1f}s, "
            f"restarted at {events['restarted'] - started:.1f}s (healthy after {events['startup_s']:.1f}s)"
        )
    run_dir = run_dir_of(tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    client = mlflow_client(server.uri)
    run = client.get_run(summary["mlflow"]["run_id"])
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2]  # the train metrics, logged while the server was dead
    assert any(k.startswith("eval/commonsenseqa/adapted/") for k in run.data.metrics)
    assert summary["mlflow"]["outbox_pending"] == 0 and f"MLflow run {run.info.run_id}: FINISHED" in out
    done = [json.loads(x) for x in (run_dir / "mlflow-outbox.done.jsonl").read_text().splitlines()]
    assert done[0]["op"] == "log_batch" and any(m[0] == "loss" for m in done[0]["metrics"])
    assert {e["role"] for e in summary["eval"]} == {"base", "adapted"}  # eval ran on the saved model
    assert Path(summary["report_html"]).is_file()


def test_mlflow_down_until_the_end_then_tracking_sync(tmp_path, server, capsys, monkeypatch):
    """The server dies as training starts and stays down: eval, register and report still run on the saved
    model, every MLflow call waits in the outbox, and `unisd tracking sync RUN_DIR` replays all of it once
    the server is back: metrics, eval results, the model version, the report, and the end (FINISHED)."""
    monkeypatch.chdir(tmp_path)
    config = small_config(tmp_path, server, "sync")
    events: dict = {}
    watcher = _watch(tmp_path, server, restart=False, events=events)
    assert main(["run", "--config", str(config)]) == 0
    watcher.join(timeout=60)
    out = capsys.readouterr().out
    run_dir = run_dir_of(tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    pending = summary["mlflow"]["outbox_pending"]
    assert pending >= 4 and summary["decision"]["deferred"] is True and summary["decision"]["version"] == ""
    assert (
        f"MLflow was unreachable: {pending} call(s) wait in {run_dir / 'mlflow-outbox.jsonl'}; replay them with: "
        f"unisd tracking sync {run_dir}"
    ) in out
    ops = [json.loads(x)["op"] for x in (run_dir / "mlflow-outbox.jsonl").read_text().splitlines()]
    assert ops[0] == "log_batch" and "register_and_gate" in ops and ops[-1] == "set_terminated"
    assert {e["role"] for e in summary["eval"]} == {"base", "adapted"} and Path(
        summary["report_html"]
    ).is_file()

    server.start()
    assert main(["tracking", "sync", str(run_dir)]) == 0
    out = capsys.readouterr().out
    with capsys.disabled():
        print(f"\n{pending} calls queued during the run; sync: {out.strip()}")
    assert f"{run_dir}: {pending} call(s) waited; replayed {pending}, 0 still waiting, 0 refused" in out
    client = mlflow_client(server.uri)
    run = client.get_run(json.loads((run_dir / "tracking.json").read_text())["run_id"])
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == [1, 2]
    assert any(k.startswith("eval/commonsenseqa/base/") for k in run.data.metrics)
    version = client.get_model_version_by_alias("outage-sync", "challenger")
    assert version.run_id == run.info.run_id and version.tags["pipeline_run_id"]
    assert any(a.path == "report" for a in client.list_artifacts(run.info.run_id))
    assert main(["tracking", "sync", str(run_dir)]) == 0  # again: nothing left, harmless


# --------------------------------------------------------------------------------------------------
# a stage that fails, a run that is stopped: one line, a resume hint, the MLflow run closed


def test_a_failed_stage_ends_the_run_failed_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = small_config(
        tmp_path, None, "fails", max_prompt_tokens=1
    )  # every item is too long: prepare raises
    assert main(["run", "--config", str(config)]) == 2
    run_dir = run_dir_of(tmp_path)
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip() and not x.startswith("pipeline:")]
    error = [x for x in lines if "error:" in x]
    assert error == [
        "unisd run: error: prepare failed: ValueError: no training items left after the length limits "
        "(4 dropped); see report"
    ]  # was: the error at line 1,059 of 1,094 under a kfp traceback
    assert f"  log: {run_dir / 'run.log'}" in lines
    assert f"  to retry the stages that did not finish: unisd run --resume {run_dir}" in lines
    info = json.loads((run_dir / "tracking.json").read_text())
    assert mlflow_client(info["tracking_uri"]).get_run(info["run_id"]).info.status == "FAILED"
    assert json.loads((run_dir / "run.json").read_text())["attempts"][-1]["status"] == "failed"


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return found


def test_sigterm_stops_the_run_killed_with_a_resume_hint(tmp_path):
    config = small_config(tmp_path, None, "stopped")
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    driver = subprocess.Popen(
        [sys.executable, "-m", "unisd", "run", "--config", str(config)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and driver.poll() is None:
        logs = list((tmp_path / "kfp").glob("run-*/run.log"))
        if logs and "Executing task 'prepare-op'" in log_text(logs[0]):
            break
        time.sleep(0.5)
    assert driver.poll() is None, "the run ended before prepare started"
    time.sleep(3)  # the prepare component is running
    driver.send_signal(signal.SIGTERM)  # the driver only, as `kill PID` does
    out, err = driver.communicate(timeout=300)
    run_dir = run_dir_of(tmp_path)
    assert driver.returncode == 130, err[-3000:]
    assert (
        f"unisd run: stopped. Finished stages are kept; continue with:\n  unisd run --resume {run_dir}" in err
    )
    info = json.loads((run_dir / "tracking.json").read_text())
    assert mlflow_client(info["tracking_uri"]).get_run(info["run_id"]).info.status == "KILLED"
    assert json.loads((run_dir / "run.json").read_text())["attempts"][-1]["status"] == "killed"
    time.sleep(2)
    assert _processes_mentioning(run_dir.name) == []  # the component processes were stopped too
