"""Upload a compiled unisd pipeline to Kubeflow Pipelines and keep its recurring run in step.

The Helm chart's post-install/post-upgrade Job runs `unisd compile --output /tmp/pipeline.yaml` and
then this script (mounted from a ConfigMap). It works the same from a workstation:

    unisd compile --output pipeline.yaml
    python charts/unisd/files/upload_pipeline.py --package pipeline.yaml --host http://localhost:8888

Idempotent, so `helm upgrade` can run it every time:
- the pipeline is found by name, created on first use; each upload is a new *version* named
  "<unisd version>-<sha256 of the compiled YAML, 12 hex>", and an existing version with that name is
  reused instead of uploading the same content again (the very first version is the one KFP creates
  with the pipeline, named after it);
- with --schedule-cron, one recurring run of that name exists in the experiment, pointing at that
  version with those settings: it is kept when it already matches, else replaced (KFP has no update);
  without --schedule-cron an existing recurring run of that name is disabled, never deleted.

Every option can also come from the environment (names in the --help), which is how the Job passes them,
so no value is ever spliced into a shell command line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The recurring-run cron format of KFP (robfig/cron with seconds): 6 fields, seconds first.
CRON_FIELDS = 6


@dataclass(frozen=True)
class Schedule:
    """A recurring run as the chart's values describe it."""

    name: str
    cron: str
    max_concurrency: int
    no_catchup: bool
    params: dict[str, Any]
    service_account: str | None


def version_name(package_version: str, package: bytes) -> str:
    """Pipeline-version name for a compiled package: "<package version>-<sha256[:12]>"."""
    return f"{package_version}-{hashlib.sha256(package).hexdigest()[:12]}"


def check_cron(expr: str) -> str:
    """Return `expr` if it has KFP's 6 fields (seconds first), else raise ValueError naming it."""
    fields = expr.split()
    if len(fields) != CRON_FIELDS:
        raise ValueError(
            f"schedule cron {expr!r} has {len(fields)} fields; KFP needs {CRON_FIELDS} "
            '(seconds first, e.g. "0 0 2 * * *" for 02:00 every day)'
        )
    return " ".join(fields)


def _name_filter(name: str) -> str:
    """KFP list filter: display_name equals `name` (1 = EQUALS in filter.proto)."""
    return json.dumps({"predicates": [{"operation": 1, "key": "display_name", "stringValue": name}]})


def ensure_pipeline_version(
    client: Any, package_path: str, pipeline_name: str, vname: str, namespace: str | None
) -> tuple[str, str, bool]:
    """Make sure `pipeline_name` has a version with this package; return (pipeline_id, version_id, uploaded)."""
    description = f"unisd pipeline, version {vname}"
    pipeline_id = client.get_pipeline_id(pipeline_name)
    if pipeline_id is None:
        pipeline = client.upload_pipeline(
            package_path, pipeline_name=pipeline_name, description=description, namespace=namespace
        )
        versions = client.list_pipeline_versions(pipeline.pipeline_id, page_size=1, sort_by="created_at desc")
        if not versions.pipeline_versions:
            raise RuntimeError(f"KFP created pipeline {pipeline_name!r} but lists no version of it")
        return pipeline.pipeline_id, versions.pipeline_versions[0].pipeline_version_id, True

    found = client.list_pipeline_versions(pipeline_id, page_size=1, filter=_name_filter(vname))
    if found.pipeline_versions:
        return pipeline_id, found.pipeline_versions[0].pipeline_version_id, False
    version = client.upload_pipeline_version(
        package_path, pipeline_version_name=vname, pipeline_id=pipeline_id, description=description
    )
    return pipeline_id, version.pipeline_version_id, True


def _find_recurring_run(client: Any, experiment_id: str, name: str) -> Any | None:
    runs = client.list_recurring_runs(experiment_id=experiment_id, page_size=10, filter=_name_filter(name))
    matches = [r for r in (runs.recurring_runs or []) if r.display_name == name]
    if len(matches) > 1:
        raise RuntimeError(
            f"{len(matches)} recurring runs are named {name!r}; delete the extra ones in the UI"
        )
    return matches[0] if matches else None


def _matches(run: Any, schedule: Schedule, pipeline_id: str, version_id: str) -> bool:
    """Whether an existing recurring run already is what `schedule` asks for."""
    ref = run.pipeline_version_reference
    cron = run.trigger.cron_schedule.cron if run.trigger and run.trigger.cron_schedule else None
    params = (run.runtime_config.parameters if run.runtime_config else None) or {}
    return (
        ref is not None
        and ref.pipeline_id == pipeline_id
        and ref.pipeline_version_id == version_id
        and cron == schedule.cron
        and int(run.max_concurrency or 0) == schedule.max_concurrency
        and bool(run.no_catchup) == schedule.no_catchup
        and (run.service_account or None) == schedule.service_account
        and params == schedule.params
        and run.mode == "ENABLE"
    )


def ensure_recurring_run(
    client: Any,
    experiment_id: str,
    schedule: Schedule,
    pipeline_id: str,
    version_id: str,
) -> str:
    """Create or replace the recurring run; return what was done: "kept", "created" or "replaced"."""
    existing = _find_recurring_run(client, experiment_id, schedule.name)
    if existing is not None and _matches(existing, schedule, pipeline_id, version_id):
        return "kept"
    if existing is not None:
        client.delete_recurring_run(existing.recurring_run_id)
    client.create_recurring_run(
        experiment_id=experiment_id,
        job_name=schedule.name,
        description="unisd scheduled run (managed by the unisd Helm chart)",
        cron_expression=schedule.cron,
        max_concurrency=schedule.max_concurrency,
        no_catchup=schedule.no_catchup,
        params=schedule.params,
        pipeline_id=pipeline_id,
        version_id=version_id,
        enabled=True,
        service_account=schedule.service_account,
    )
    return "created" if existing is None else "replaced"


def disable_recurring_run(client: Any, experiment_id: str, name: str) -> str:
    """Disable the recurring run `name` if it exists and runs; return "disabled" or "absent"/"kept"."""
    existing = _find_recurring_run(client, experiment_id, name)
    if existing is None:
        return "absent"
    if existing.mode == "DISABLE":
        return "kept"
    client.disable_recurring_run(existing.recurring_run_id)
    return "disabled"


def _env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    if value.lower() in ("1", "true", "yes"):
        return True
    if value.lower() in ("0", "false", "no"):
        return False
    raise ValueError(f"environment variable {name}={value!r} is not a boolean (true/false)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--package", required=True, help="compiled pipeline YAML (unisd compile --output)")
    p.add_argument("--host", default=env("UNISD_KFP_HOST"), help="KFP API URL [UNISD_KFP_HOST]")
    p.add_argument(
        "--namespace",
        default=env("UNISD_KFP_NAMESPACE") or None,
        help="multi-user namespace [UNISD_KFP_NAMESPACE]",
    )
    p.add_argument(
        "--pipeline-name", default=env("UNISD_PIPELINE_NAME", "unisd"), help="[UNISD_PIPELINE_NAME]"
    )
    p.add_argument(
        "--package-version",
        default=env("UNISD_PACKAGE_VERSION"),
        help="unisd version [UNISD_PACKAGE_VERSION]",
    )
    p.add_argument("--experiment", default=env("UNISD_EXPERIMENT", "unisd"), help="[UNISD_EXPERIMENT]")
    p.add_argument(
        "--schedule-cron",
        default=env("UNISD_SCHEDULE_CRON") or None,
        help="6-field cron [UNISD_SCHEDULE_CRON]",
    )
    p.add_argument("--schedule-name", default=env("UNISD_SCHEDULE_NAME", "unisd-scheduled"))
    p.add_argument("--max-concurrency", type=int, default=int(env("UNISD_SCHEDULE_MAX_CONCURRENCY", "1")))
    p.add_argument(
        "--catchup",
        action=argparse.BooleanOptionalAction,
        default=not _env_bool("UNISD_SCHEDULE_NO_CATCHUP", True),
        help="backfill missed intervals [UNISD_SCHEDULE_NO_CATCHUP=false]",
    )
    p.add_argument(
        "--params",
        default=env("UNISD_SCHEDULE_PARAMS", "{}"),
        help="JSON pipeline parameters [UNISD_SCHEDULE_PARAMS]",
    )
    p.add_argument(
        "--service-account",
        default=env("UNISD_RUNNER_SERVICE_ACCOUNT") or None,
        help="service account of scheduled runs [UNISD_RUNNER_SERVICE_ACCOUNT]",
    )
    p.add_argument(
        "--token-path",
        default=env("KF_PIPELINES_SA_TOKEN_PATH") or None,
        help="projected service-account token for a multi-user KFP [KF_PIPELINES_SA_TOKEN_PATH]",
    )
    args = p.parse_args(argv)
    if not args.host:
        p.error(
            "--host (or UNISD_KFP_HOST) is required, e.g. http://ml-pipeline.kubeflow.svc.cluster.local:8888"
        )
    if args.max_concurrency < 1:
        p.error(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    return args


def _package_version() -> str:
    from unisd import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    package = Path(args.package)
    if not package.is_file():
        print(
            f"error: compiled pipeline {package} does not exist (did `unisd compile` run?)", file=sys.stderr
        )
        return 2
    try:
        params = json.loads(args.params)
    except json.JSONDecodeError as exc:
        print(f"error: --params / UNISD_SCHEDULE_PARAMS is not JSON: {exc}", file=sys.stderr)
        return 2
    if not isinstance(params, dict):
        print("error: --params / UNISD_SCHEDULE_PARAMS must be a JSON object", file=sys.stderr)
        return 2
    cron = check_cron(args.schedule_cron) if args.schedule_cron else None

    import kfp  # imported late: argument errors above need no kfp

    credentials = None
    if args.token_path:
        credentials = kfp.client.ServiceAccountTokenVolumeCredentials(path=args.token_path)
    client = kfp.Client(host=args.host, namespace=args.namespace or "kubeflow", credentials=credentials)

    vname = version_name(args.package_version or _package_version(), package.read_bytes())
    pipeline_id, version_id, uploaded = ensure_pipeline_version(
        client, str(package), args.pipeline_name, vname, args.namespace
    )
    print(
        f"pipeline {args.pipeline_name!r} ({pipeline_id}) version {version_id}: {'uploaded' if uploaded else 'unchanged'}"
    )

    experiment = client.create_experiment(args.experiment, namespace=args.namespace)
    if cron is not None:
        schedule = Schedule(
            name=args.schedule_name,
            cron=cron,
            max_concurrency=args.max_concurrency,
            no_catchup=not args.catchup,
            params=params,
            service_account=args.service_account,
        )
        outcome = ensure_recurring_run(client, experiment.experiment_id, schedule, pipeline_id, version_id)
        print(f"recurring run {schedule.name!r} ({cron}): {outcome}")
    else:
        outcome = disable_recurring_run(client, experiment.experiment_id, args.schedule_name)
        print(f"recurring run {args.schedule_name!r}: no schedule requested, {outcome}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
