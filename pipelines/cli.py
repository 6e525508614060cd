"""`unisd compile | run | submit | schedule`: the KFP side of the CLI (registered into `unisd` lazily, so the
library in src/unisd never imports kfp).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from pipelines.progress import expected_tasks, log_tail, quiet_kfp, summary_lines
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
    p.add_argument("overrides", nargs="*", help="config overrides, key.sub=value")


@command("run", "run the whole pipeline locally (kfp.local, this machine's env)", _run_args)
def cmd_run(args: argparse.Namespace) -> int:
    from kfp import local

    from pipelines.unisd_pipeline import build_pipeline

    config_path = Path(args.config or CONFIG_DIR / "demo.yaml")
    cfg = load_run_config(config_path, args.overrides)
    rounds = args.rounds or cfg.pipeline.rounds
    root = Path(cfg.pipeline.pipeline_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    tracking_uri = absolute_sqlite_uri(cfg.tracking.tracking_uri, Path.cwd())
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # kfp.local runs ParallelFor iterations at the same time (rollout/scoring shards, the evals): with
    # torch's default of one thread per core each, they oversubscribe the cores and spin against each
    # other. One thread per component process keeps a small machine busy without thrashing.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    pipeline = build_pipeline(rounds=rounds, cluster=False, config_path=config_path)
    # The resolved config (overrides applied, paths absolute: components run in other directories) is the
    # run's config_yaml; the UI parameters carry the same values, so none of them overrides it.
    arguments = submitted_arguments(cfg, tracking_uri)
    total = expected_tasks(rounds=rounds, shards=cfg.pipeline.shards, benchmarks=len(cfg.prepare.benchmarks))
    log_path = root / "logs" / f"run-{time.strftime('%Y%m%d-%H%M%S')}.log"
    print(
        f"unisd run: {cfg.model}, preset {cfg.preset}, {rounds} round(s), {cfg.pipeline.shards} shard(s); log: {log_path}"
    )
    started = time.perf_counter()
    before = {p.name for p in root.iterdir()}
    try:
        with quiet_kfp(log_path, root, total, verbose=getattr(args, "verbose", False)):
            pipeline(**arguments)
    except Exception:
        if not getattr(args, "verbose", False):
            print(
                f"\nThe run failed. The end of its log ({log_path}):\n{log_tail(log_path)}", file=sys.stderr
            )
        raise
    elapsed = time.perf_counter() - started
    run_dirs = sorted(
        (p for p in root.iterdir() if p.name not in before and p.is_dir()), key=lambda p: p.stat().st_mtime
    )
    run_dir = run_dirs[-1] if run_dirs else root
    summary = local_run_summary(run_dir, tracking_uri=tracking_uri, elapsed_s=elapsed)
    write_json(run_dir / "summary.json", summary)
    print("\n".join(summary_lines(summary)))
    print(f"\nfinished in {elapsed / 60:.1f} min; summary: {run_dir / 'summary.json'}")
    print(f"report:    {summary.get('report_html')}")
    print(
        f"MLflow UI: mlflow ui --backend-store-uri {tracking_uri} --port 5000   (then open http://127.0.0.1:5000)"
    )
    return 0


def local_run_summary(run_dir: Path, *, tracking_uri: str, elapsed_s: float) -> dict:
    """What a local run produced: report paths, eval aggregates, the gate decision."""
    from unisd.artifacts import read_json

    html = sorted(run_dir.glob("report-op*/html"))
    md = sorted(run_dir.glob("report-op*/markdown"))
    evals = [read_json(p) for p in sorted(run_dir.glob("**/results/results.json"))]
    gate = sorted(run_dir.glob("register-op*/executor_output.json"))
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
    cfg = load_run_config(config_path, args.overrides)
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
