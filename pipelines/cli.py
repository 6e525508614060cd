"""`unisd compile | run | submit | schedule`: the KFP side of the CLI (registered into `unisd` lazily, so the
library in src/unisd never imports kfp).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from pipelines.progress import _ANSI, TITLES, expected_tasks, quiet_kfp, summary_lines
from unisd.artifacts import write_json
from unisd.cli import command
from unisd.runconfig import CONFIG_DIR, load_run_config


def compile_pipeline(
    output: str | Path, *, rounds: int = 1, cluster: bool = True, config_path: str | Path | None = None
) -> Path:
    from kfp import compiler

    from pipelines.unisd_pipeline import DEFAULT_CONFIG, build_pipeline

    pipeline = build_pipeline(rounds=rounds, cluster=cluster, config_path=config_path or DEFAULT_CONFIG)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline, str(output))
    return output


def _compile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", default="pipeline.yaml")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument(
        "--config", default=None, help="run config embedded as the default (default: configs/demo.yaml)"
    )
    p.add_argument("--no-cluster", action="store_true", help="omit GPU/node/secret settings (local runs)")


@command("compile", "compile the KFP pipeline to IR YAML (upload it in the Kubeflow UI)", _compile_args)
def cmd_compile(args: argparse.Namespace) -> int:
    out = compile_pipeline(
        args.output, rounds=args.rounds, cluster=not args.no_cluster, config_path=args.config
    )
    print(f"wrote {out}")
    return 0


def pipeline_arguments(cfg, *, tracking_uri: str | None = None) -> dict:
    """Run parameters (what a user sets in the UI) from a run config: unisd.pipeline_steps.UI_PARAMETERS."""
    from unisd.pipeline_steps import ui_values

    values = ui_values(cfg)
    if tracking_uri:
        values["mlflow_tracking_uri"] = tracking_uri
    return values


LOCAL_TRACKING_SCHEMES = ("sqlite:", "file:")


def remote_tracking_uri(cfg, explicit: str | None, env=os.environ) -> str:
    """The MLflow URI a cluster run logs to: --mlflow-uri, else the cluster settings' UNISD_MLFLOW_TRACKING_URI,
    else the config's when it is a server URI. A local file URI would point the run at this machine: refused."""
    uri = explicit or env.get("UNISD_MLFLOW_TRACKING_URI") or cfg.tracking.tracking_uri
    if uri.startswith(LOCAL_TRACKING_SCHEMES) or "://" not in uri:
        raise ValueError(
            f"MLflow tracking URI {uri!r} is a local file: a cluster run cannot reach it, and its registry and "
            "promotion history would be lost. Pass --mlflow-uri http://<mlflow service>:5000 or set "
            "UNISD_MLFLOW_TRACKING_URI (the unisd-pipeline-settings ConfigMap holds it)"
        )
    return uri


def submitted_arguments(cfg, tracking_uri: str) -> dict:
    """What `unisd submit` / `schedule` send: the whole resolved run config as `config_yaml` (so every
    key=value override reaches the run) and the UI parameters at the same values."""
    import yaml

    cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"tracking_uri": tracking_uri})})
    return {
        "config_yaml": yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False),
        **pipeline_arguments(cfg, tracking_uri=tracking_uri),
        "extra_overrides": [],
    }


def absolute_sqlite_uri(uri: str, base: Path) -> str:
    """Local runs execute components in other working directories: pin a relative sqlite path."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        path = (base / uri[len(prefix) :]).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return prefix + str(path)
    return uri


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="run config YAML (default: configs/demo.yaml)")
    p.add_argument(
        "-v", "--verbose", action="store_true", help="show kfp.local's own output (else: the log file)"
    )
    p.add_argument("--rounds", type=int, default=None, help="default: the config's pipeline.rounds")
    p.add_argument(
        "--resume",
        default=None,
        metavar="RUN_DIR",
        help="continue a killed or failed run from the stages that finished (same config, same MLflow run)",
    )
    p.add_argument("overrides", nargs="*", help="config overrides, key.sub=value")


# A local run's folder, RUN_DIR = <pipeline_root>/run-<time>-<suffix>/:
#   run.json          what was run (the resolved config, the pipeline arguments) and each attempt
#   config.yaml       the resolved run config the pipeline is built from (a resume rebuilds the same DAG)
#   run.log           kfp.local's output, every attempt appended
#   tracking.json     the MLflow run (written by the start-tracking step)
#   driver.pid        the `unisd run` process while it runs
#   mlflow-outbox.jsonl  calls MLflow missed (unisd tracking sync RUN_DIR)
#   .kfp_cache/       kfp.local's task cache: a finished task is not run again on --resume
#   <pipeline>-<run>/ the task folders (the same on every attempt: an unfinished stage resumes inside its
#                     folder, e.g. training from its last checkpoint)
#   summary.json      what the run produced
RUN_STATE = "run.json"


class RunStopped(KeyboardInterrupt):
    """SIGTERM: stop like Ctrl-C (end the MLflow run KILLED, keep the run folder resumable). A
    KeyboardInterrupt, so kfp.local's `except Exception` around its tasks does not swallow it."""


@contextlib.contextmanager
def _stable_task_folders(resource_name: str) -> Iterator[None]:
    """kfp.local names each run's task folder <pipeline>-<timestamp>; a resume must find the folders of the
    attempt before (its finished tasks are cache hits pointing there, its unfinished one resumes inside
    its folder), so the name is pinned to the run for the duration of the call (kfp 2.17's
    executor_input_utils.get_local_pipeline_resource_name; without it, finished tasks are still reused
    through the cache and only an unfinished stage starts over)."""
    from kfp.local import executor_input_utils

    original = getattr(executor_input_utils, "get_local_pipeline_resource_name", None)
    if original is None:
        yield
        return
    executor_input_utils.get_local_pipeline_resource_name = lambda pipeline_name: resource_name
    try:
        yield
    finally:
        executor_input_utils.get_local_pipeline_resource_name = original


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _sigterm_stops() -> Iterator[None]:
    def stop(signum, frame):
        raise RunStopped(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _descendants(pid: int) -> list[int]:
    """Child processes of `pid`, recursively (Linux /proc; [] elsewhere): the component processes."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _stop_components() -> None:
    for child in _descendants(os.getpid()):
        with contextlib.suppress(OSError):
            os.kill(child, signal.SIGTERM)


def _new_run_dir(root: Path) -> Path:
    import secrets

    for _ in range(10):
        run_dir = root / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        try:
            run_dir.mkdir(parents=True)
            return run_dir
        except FileExistsError:
            continue
    raise FileExistsError(f"could not make a new run folder under {root}")


def _prepare_new_run(args: argparse.Namespace) -> tuple[Path, dict]:
    """Load and check everything a run needs (config ranges, model, data files, pipeline_root, MLflow) —
    seconds, nothing loaded — then make the run folder."""
    import yaml

    from unisd import tracking
    from unisd.config import check_data_files, check_model_spec, check_output_dir

    config_path = Path(args.config or CONFIG_DIR / "demo.yaml")
    cfg = load_run_config(config_path, args.overrides, check_paths=False)
    tracking_uri = absolute_sqlite_uri(cfg.tracking.tracking_uri, Path.cwd())
    cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"tracking_uri": tracking_uri})})
    tracking.probe(cfg.tracking)  # first: the one check that needs no heavy import
    check_model_spec(cfg.model)
    check_data_files(cfg.prepare)
    check_output_dir(cfg.pipeline.pipeline_root, "pipeline.pipeline_root")
    run_dir = _new_run_dir(Path(cfg.pipeline.pipeline_root).resolve())
    config_text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    (run_dir / "config.yaml").write_text(config_text)
    state = {
        "run_name": run_dir.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "config_path": str(config_path),
        "overrides": list(args.overrides),
        "rounds": args.rounds or cfg.pipeline.rounds,
        "tracking_uri": tracking_uri,
        "arguments": submitted_arguments(cfg, tracking_uri),
        "attempts": [],
    }
    write_json(run_dir / RUN_STATE, state)
    return run_dir, state


def _load_resumed_run(args: argparse.Namespace) -> tuple[Path, dict]:
    from unisd import tracking
    from unisd.artifacts import read_json
    from unisd.tracking import TrackingConfig

    run_dir = Path(args.resume).expanduser().resolve()
    if args.config or args.overrides or args.rounds:
        raise ValueError(
            "--resume continues a run with its own config: drop --config / --rounds / overrides "
            "(start a new run to change them)"
        )
    if not (run_dir / RUN_STATE).is_file():
        raise FileNotFoundError(f"--resume {run_dir}: no {RUN_STATE} there (not a run folder of `unisd run`)")
    state = read_json(run_dir / RUN_STATE)
    last = state["attempts"][-1] if state["attempts"] else {}
    if last.get("status") == "running" and _pid_alive(last.get("pid")):
        raise ValueError(f"--resume {run_dir}: the run is still going (pid {last['pid']})")
    if last.get("status") == "running":  # its driver died without a word (SIGKILL, OOM, power loss)
        last["status"] = "lost"
    if last.get("status") == "succeeded":
        raise ValueError(
            f"--resume {run_dir}: the run already finished (summary: {run_dir / 'summary.json'})"
        )
    cfg = TrackingConfig(tracking_uri=state["tracking_uri"])
    tracking.probe(cfg)
    info = run_dir / "tracking.json"
    if info.is_file():
        run_id = read_json(info)["run_id"]
        state["reopened"] = {"run_id": run_id, "was": tracking.reopen_run(cfg, run_id)}
    return run_dir, state


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, TypeError, ValueError):
        return False
    return True


_EXCEPTION_LINE = re.compile(r"^(?:[\w.]+\.)?(\w*(?:Error|Exception|Unavailable\w*)): (.+)$")
_USER_EXCEPTIONS = {
    "ValueError", "ConfigError", "InputError", "FileNotFoundError", "NotADirectoryError", "IsADirectoryError",
    "FileExistsError", "TrackingUnavailableError", "UnknownModelError", "BadInputError", "UnicodeDecodeError",
}  # fmt: skip


def failure_line(log_text: str) -> tuple[str, str] | None:
    """(exception type, message) of the last traceback in the run log: what the failed component raised.
    kfp.local indents a component's output; the exception line has the indent of its "Traceback" line."""
    found = None
    lines = _ANSI.sub("", log_text).splitlines()
    for i, line in enumerate(lines):
        head = line.lstrip()
        if not head.startswith("Traceback (most recent call last)"):
            continue
        indent = len(line) - len(head)
        for after in lines[i + 1 :]:
            if len(after) - len(after.lstrip()) == indent and (m := _EXCEPTION_LINE.match(after.strip())):
                found = (m.group(1), m.group(2).strip())
                break
    return found


def _failed_tasks(err: BaseException) -> list[str]:
    """The stages kfp.local names in "Pipeline 'p' finished with status FAILURE. Inner task failed: 't' inside
    'exit-handler-1'", by their titles."""
    names = re.findall(r"'([^']+)'", _ANSI.sub("", str(err)))[1:]
    return [
        TITLES.get(re.sub(r"-\d+$", "", n), n)
        for n in names
        if not n.startswith(("exit-handler", "for-loop"))
    ]


@command(
    "run", "run the whole pipeline locally (kfp.local, this machine's env); --resume continues one", _run_args
)
def cmd_run(args: argparse.Namespace) -> int:
    from kfp import local

    from pipelines.unisd_pipeline import PIPELINE_NAME, build_pipeline
    from unisd import tracking

    run_dir, state = _load_resumed_run(args) if args.resume else _prepare_new_run(args)
    reopened = state.pop("reopened", None)
    args._log_path = log_path = run_dir / "run.log"
    cfg = load_run_config(run_dir / "config.yaml", check_paths=False)
    rounds = state["rounds"]
    resource_name = f"{PIPELINE_NAME}-{state['run_name']}"
    tasks_dir = run_dir / resource_name
    attempt = _start_attempt(run_dir, state)
    _set_component_env()
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(run_dir),
        raise_on_error=True,
        enable_caching=True,
        cache_root=str(run_dir / ".kfp_cache"),
    )
    pipeline = build_pipeline(rounds=rounds, cluster=False, config_path=run_dir / "config.yaml")
    total = expected_tasks(rounds=rounds, shards=cfg.pipeline.shards, benchmarks=len(cfg.prepare.benchmarks))
    _announce_attempt(cfg, run_dir, log_path, attempt, reopened, rounds=rounds, resume=bool(args.resume))
    started = time.perf_counter()
    outcome, code = "succeeded", 0
    try:
        with (
            _env(**{tracking.RUN_DIR_ENV: str(run_dir)}),
            _stable_task_folders(resource_name),
            _sigterm_stops(),
            quiet_kfp(log_path, tasks_dir, total, verbose=getattr(args, "verbose", False)),
        ):
            pipeline(**state["arguments"])
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (RunStopped)
        outcome, code = "killed", 130
        _stop_killed_run(run_dir, state)
    except Exception as err:
        if not str(err).startswith("Pipeline"):
            raise
        outcome, code = "failed", _report_pipeline_failure(err, log_path, run_dir)
    finally:
        elapsed = time.perf_counter() - started
        _finish_attempt(run_dir, state, attempt, outcome, elapsed)
    if outcome == "succeeded":
        _print_finished_run(run_dir, state, tasks_dir, elapsed)
    return code


def _start_attempt(run_dir: Path, state: dict) -> dict:
    """Record a new attempt as running (the run state, driver.pid); returns the attempt."""
    attempt = {
        "n": len(state["attempts"]) + 1,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "pid": os.getpid(),
    }
    state["attempts"].append(attempt | {"status": "running"})
    write_json(run_dir / RUN_STATE, state)
    (run_dir / "driver.pid").write_text(f"{os.getpid()}\n")
    return attempt


def _set_component_env() -> None:
    """Default the environment the component processes inherit (unless the user set it)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # kfp.local runs ParallelFor iterations at the same time (rollout/scoring shards, the evals): with
    # torch's default of one thread per core each, they oversubscribe the cores and spin against each
    # other. One thread per component process keeps a small machine busy without thrashing.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def _announce_attempt(
    cfg, run_dir: Path, log_path: Path, attempt: dict, reopened: dict | None, *, rounds: int, resume: bool
) -> None:
    """Print what runs and where (and a reopened MLflow run); mark the attempt's start in the run log."""
    verb = f"resuming (attempt {attempt['n']})" if resume else "run"
    print(
        f"unisd {verb}: {cfg.model}, preset {cfg.preset}, {rounds} round(s), {cfg.pipeline.shards} shard(s)\n"
        f"  run folder: {run_dir}\n  log: {log_path}"
    )
    if reopened and reopened["was"] != "RUNNING":
        print(f"  MLflow run {reopened['run_id']} was {reopened['was']}: reopened (RUNNING) to finish it")
    with open(log_path, "a") as log:
        log.write(f"\n===== attempt {attempt['n']} ({attempt['started']}, pid {os.getpid()}) =====\n")


def _stop_killed_run(run_dir: Path, state: dict) -> None:
    """Stop the components, end the MLflow run KILLED, and say how to resume."""
    _stop_components()
    _end_mlflow_run(run_dir, state, "KILLED")
    print(
        f"\nunisd run: stopped. Finished stages are kept; continue with:\n  unisd run --resume {run_dir}",
        file=sys.stderr,
    )


def _finish_attempt(run_dir: Path, state: dict, attempt: dict, outcome: str, elapsed: float) -> None:
    """Record the attempt's outcome and time in the run state; remove driver.pid."""
    state["attempts"][-1] = attempt | {
        "status": outcome,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "elapsed_s": round(elapsed, 1),
    }
    write_json(run_dir / RUN_STATE, state)
    (run_dir / "driver.pid").unlink(missing_ok=True)


def _report_pipeline_failure(err: Exception, log_path: Path, run_dir: Path) -> int:
    """One line naming the failed stages and the first user-facing error of the log; returns the exit code
    (2: bad input or a full disk, 1: a bug)."""
    failure = failure_line(log_path.read_text(errors="replace")) if log_path.exists() else None
    tasks = ", ".join(_failed_tasks(err)) or "a stage"
    kind, message = failure or ("", "see the log")
    code = 2 if kind in _USER_EXCEPTIONS or "No space left" in message else 1
    if "No space left" in message:
        free = shutil.disk_usage(run_dir).free / 2**20
        message = f"no space left on device ({free:.0f} MiB free in {run_dir}): free some space, then resume"
    print(f"\nunisd run: error: {tasks} failed: {kind + ': ' if kind else ''}{message}", file=sys.stderr)
    print(f"  log: {log_path}", file=sys.stderr)
    print(f"  to retry the stages that did not finish: unisd run --resume {run_dir}", file=sys.stderr)
    return code


def _print_finished_run(run_dir: Path, state: dict, tasks_dir: Path, elapsed: float) -> None:
    """summary.json, the results table, and where the report and the MLflow run are."""
    from unisd import tracking

    summary = local_run_summary(tasks_dir, tracking_uri=state["tracking_uri"], elapsed_s=elapsed)
    summary["run_dir"], summary["attempts"] = str(run_dir), len(state["attempts"])
    summary["mlflow"] = _mlflow_state(run_dir, state)
    write_json(run_dir / "summary.json", summary)
    print("\n".join(summary_lines(summary)))
    print(f"\nfinished in {elapsed / 60:.1f} min; summary: {run_dir / 'summary.json'}")
    print(f"report:    {summary.get('report_html')}")
    pending = summary["mlflow"]["outbox_pending"]
    if pending:
        print(
            f"MLflow was unreachable: {pending} call(s) wait in {run_dir / tracking.OUTBOX_NAME}; "
            f"replay them with: unisd tracking sync {run_dir}"
        )
    else:
        print(f"MLflow run {summary['mlflow'].get('run_id')}: {summary['mlflow'].get('status')}")
    if state["tracking_uri"].startswith("sqlite:"):
        print(
            f"MLflow UI: mlflow ui --backend-store-uri {state['tracking_uri']} --port 5000   "
            "(then open http://127.0.0.1:5000)"
        )


def _mlflow_state(run_dir: Path, state: dict) -> dict:
    from unisd import tracking
    from unisd.artifacts import read_json

    info = read_json(run_dir / "tracking.json") if (run_dir / "tracking.json").is_file() else {}
    out = {
        "run_id": info.get("run_id"),
        "outbox_pending": tracking.outbox_pending(run_dir / tracking.OUTBOX_NAME),
        "status": None,
    }
    if info and not out["outbox_pending"]:
        cfg = tracking.TrackingConfig(tracking_uri=state["tracking_uri"], retry_for_s=10)
        with contextlib.suppress(tracking.TrackingUnavailableError):
            out["status"] = tracking.run_status(cfg, info["run_id"])
    return out


def _end_mlflow_run(run_dir: Path, state: dict, status: str) -> None:
    """The exit step cannot run when the driver itself is stopped: end the run here (queued in the outbox
    when MLflow is down)."""
    from unisd import tracking
    from unisd.artifacts import read_json

    info = run_dir / "tracking.json"
    if not info.is_file():
        return
    cfg = tracking.TrackingConfig(
        tracking_uri=state["tracking_uri"], retry_for_s=10, outbox=str(run_dir / tracking.OUTBOX_NAME)
    )
    run_id = read_json(info)["run_id"]
    with contextlib.suppress(tracking.TrackingUnavailableError):
        outcome = tracking.finish_run(cfg, run_id, status)
        print(
            f"MLflow run {run_id}: {status}" if outcome["ended"] else f"MLflow run {run_id}: {status} queued",
            file=sys.stderr,
        )


def local_run_summary(run_dir: Path, *, tracking_uri: str, elapsed_s: float) -> dict:
    """What a local run produced: report paths, eval aggregates, the gate decision."""
    from unisd.artifacts import read_json

    html = sorted(run_dir.glob("report-op*/html"))
    md = sorted(run_dir.glob("report-op*/markdown"))
    evals = [read_json(p) for p in sorted(run_dir.glob("**/results/results.json"))]
    gate = sorted(run_dir.glob("register-op*/executor_output.json"))
    check = sorted(run_dir.glob("**/data-check-op/executor_output.json"))
    start = sorted(run_dir.glob("**/starting-model-op/**/start.json"))
    prepared = [p for p in run_dir.glob("**/prepare-op/**/manifest.json")]
    return {
        "run_dir": str(run_dir),
        "elapsed_s": round(elapsed_s, 1),
        "report_html": str(html[-1]) if html else None,
        "report_markdown": str(md[-1]) if md else None,
        "eval": [
            {k: r["aggregate"].get(k) for k in ("benchmark", "role", "score", "score_ci95")} for r in evals
        ],
        "decision": json.loads(read_json(gate[-1])["parameterValues"]["decision"]) if gate else None,
        "tracking_uri": tracking_uri,
        "retrain_check": {
            "train": read_json(check[-1])["parameterValues"]["Output"] == "train",
            **(read_json(start[-1]) if start else {"champion": "", "reason": "skipped (see the MLflow run)"}),
            "data_hash": read_json(prepared[-1])["counts"].get("data_hash", "") if prepared else "",
        }
        if check
        else None,
    }


def _client(host: str):
    import kfp

    return kfp.Client(host=host, existing_token=os.environ.get("KFP_TOKEN"))


def _submit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--host", required=True, help="Kubeflow Pipelines API endpoint, e.g. http://ml-pipeline-ui:80"
    )
    p.add_argument("--config", default=None)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--experiment", default="unisd")
    p.add_argument("--run-name", default=None)
    p.add_argument("--service-account", default=None)
    p.add_argument(
        "--mlflow-uri",
        default=None,
        help="MLflow server the run logs to (default: $UNISD_MLFLOW_TRACKING_URI from the cluster settings)",
    )
    p.add_argument("overrides", nargs="*")


@command("submit", "create a run on a Kubeflow Pipelines endpoint", _submit_args)
def cmd_submit(args: argparse.Namespace) -> int:
    cfg, arguments, package = _compiled(args)
    client = _client(args.host)
    run = client.create_run_from_pipeline_package(
        str(package),
        arguments=arguments,
        run_name=args.run_name or f"unisd-{cfg.preset}",
        experiment_name=args.experiment,
        service_account=args.service_account,
    )
    print(f"created run {run.run_id}")
    return 0


def _compiled(args) -> tuple:
    """(run config, the arguments to send, the compiled package) for submit / schedule; the MLflow URI is
    checked before anything is compiled."""
    config_path = Path(args.config or CONFIG_DIR / "demo.yaml")
    cfg = load_run_config(config_path, args.overrides, check_paths=False)  # cluster paths need not exist here
    arguments = submitted_arguments(cfg, remote_tracking_uri(cfg, args.mlflow_uri))
    package = Path(os.environ.get("TMPDIR", "/tmp")) / f"unisd-pipeline-{os.getpid()}.yaml"
    compile_pipeline(
        package, rounds=args.rounds or cfg.pipeline.rounds, cluster=True, config_path=config_path
    )
    return cfg, arguments, package


def _schedule_args(p: argparse.ArgumentParser) -> None:
    _submit_args(p)
    p.add_argument(
        "--cron", required=True, help='6-field cron, seconds first: "0 0 2 * * *" = daily at 02:00'
    )
    p.add_argument("--job-name", default="unisd-scheduled-retraining")
    p.add_argument("--max-concurrency", type=int, default=1)


@command("schedule", "create a recurring run (scheduled retraining) on Kubeflow Pipelines", _schedule_args)
def cmd_schedule(args: argparse.Namespace) -> int:
    if len(args.cron.split()) != 6:
        raise ValueError(f"--cron {args.cron!r}: KFP wants 6 fields (seconds first), e.g. '0 0 2 * * *'")
    cfg, arguments, package = _compiled(args)
    client = _client(args.host)
    experiment = client.create_experiment(name=args.experiment)
    job = client.create_recurring_run(
        experiment_id=experiment.experiment_id,
        job_name=args.job_name,
        cron_expression=args.cron,
        max_concurrency=args.max_concurrency,
        no_catchup=True,
        pipeline_package_path=str(package),
        params=arguments,
        service_account=args.service_account,
    )
    print(f"created recurring run {job.recurring_run_id} ({args.cron})")
    return 0
