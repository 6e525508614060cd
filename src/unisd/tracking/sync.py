"""Using and emptying the outbox: a whole step run or queued as one call (`run_or_defer`), the replay
(`sync_outbox`, `unisd tracking sync`), and the pipeline's exit step (`finish_run`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from unisd.tracking.client import _call, _retrying, reachable
from unisd.tracking.config import TrackingConfig, TrackingUnavailableError, _first_line
from unisd.tracking.outbox import (
    _append_outbox,
    _deferral_enabled,
    _locked,
    _read_records,
    defer_call,
    outbox_path,
    outbox_pending,
)
from unisd.tracking.runs import _now_ms, _register_table, log_artifacts

log = logging.getLogger("unisd.tracking")  # the package's logger, as before the split
T = TypeVar("T")


def run_or_defer(cfg: TrackingConfig, what: str, fn: Callable[[], T], record: Mapping[str, Any]) -> T | None:
    """fn() as one unit that needs the tracking server (e.g. register + gate): its own calls are not
    buffered one by one. When the server is unreachable (a quick probe once calls are already queued,
    else fn's own retries), `record` is queued and None returned; without an outbox, the error is raised."""
    path = outbox_path(cfg)
    if path is not None and outbox_pending(path) and not reachable(cfg):
        defer_call(cfg, what, record, f"MLflow at {cfg.tracking_uri} is still unreachable")
        return None
    token = _deferral_enabled.set(False)
    try:
        return fn()
    except TrackingUnavailableError as err:
        if path is None:
            raise
        _append_outbox(path, cfg, what, dict(record), err)
        log.warning("MLflow unreachable: %s queued in %s (replay: unisd tracking sync)", what, path)
        return None
    finally:
        _deferral_enabled.reset(token)


def sync_outbox(
    path: str | Path,
    *,
    tracking_uri: str | None = None,
    retry_for_s: float = 60.0,
) -> dict[str, Any]:
    """Replay the outbox at `path` in order. Stops at the first call the server still cannot take (it and
    the rest stay queued); a call MLflow refuses for good goes to <outbox>.failed.jsonl with the reason.
    `tracking_uri` replaces the URI recorded with each call (a server that moved).
    Returns {"replayed", "remaining", "failed", "errors", "runs"}."""
    path = Path(path)
    done_path = path.with_name(path.name.replace(".jsonl", "") + ".done.jsonl")
    failed_path = path.with_name(path.name.replace(".jsonl", "") + ".failed.jsonl")
    summary: dict[str, Any] = {"replayed": 0, "remaining": 0, "failed": 0, "errors": [], "runs": []}
    if not path.exists():
        return summary
    with _locked(path):
        records = _read_records(path)
        remaining: list[dict] = []
        done: list[dict] = []
        failed: list[dict] = []
        for index, record in enumerate(records):
            cfg = TrackingConfig(
                tracking_uri=tracking_uri or record["uri"], retry_for_s=retry_for_s, outbox=None
            )
            token = _deferral_enabled.set(False)
            try:
                _replay(cfg, record)
            except TrackingUnavailableError as err:
                remaining = records[index:]
                summary["errors"].append(_first_line(err))
                break
            except Exception as err:  # refused for good: keep it, with the reason, out of the queue
                failed.append(record | {"replay_error": f"{type(err).__name__}: {_first_line(err)}"})
                summary["errors"].append(f"{record.get('what')}: {type(err).__name__}: {_first_line(err)}")
            else:
                done.append(record)
                if record.get("run_id") and record["run_id"] not in summary["runs"]:
                    summary["runs"].append(record["run_id"])
            finally:
                _deferral_enabled.reset(token)
        for target, rows in ((done_path, done), (failed_path, failed)):
            if rows:
                with open(target, "a") as f:
                    f.writelines(json.dumps(r, default=str, allow_nan=True) + "\n" for r in rows)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r, default=str, allow_nan=True) + "\n" for r in remaining))
        os.replace(tmp, path)
    summary.update(replayed=len(done), remaining=len(remaining), failed=len(failed))
    return summary


def _replay(cfg: TrackingConfig, record: Mapping[str, Any]) -> None:
    from mlflow.entities import Metric, Param, RunTag

    op, run_id = record["op"], record.get("run_id")
    if op == "log_batch":
        metrics = [Metric(k, float(v), int(ts), int(step)) for k, v, ts, step in record.get("metrics", [])]
        params = [Param(k, v) for k, v in record.get("params", [])]
        tags = [RunTag(k, v) for k, v in record.get("tags", [])]
        _retrying(
            cfg,
            f"replay {record['what']}",
            lambda c: c.log_batch(run_id, metrics=metrics, params=params, tags=tags),
            cfg.retry_for_s,
        )
    elif op == "log_text":
        _retrying(
            cfg,
            f"replay {record['what']}",
            lambda c: c.log_text(run_id, record["text"], record["artifact_file"]),
            cfg.retry_for_s,
        )
    elif op == "log_artifacts":
        local = Path(record["local_path"])
        if not local.exists():
            raise FileNotFoundError(f"{local} is gone: cannot upload it to run {run_id}")
        log_artifacts(cfg, run_id, local, record.get("artifact_path"))
    elif op == "register_table":
        _register_table(cfg, run_id, record["artifact_file"])
    elif op == "set_terminated":
        _retrying(
            cfg,
            f"replay {record['what']}",
            lambda c: c.set_terminated(run_id, status=record["status"], end_time=record.get("end_time")),
            cfg.retry_for_s,
        )
    elif op == "register_and_gate":
        _replay_register_and_gate(cfg, record)
    else:
        raise ValueError(f"unknown outbox operation {op!r}")


def _replay_register_and_gate(cfg: TrackingConfig, record: Mapping[str, Any]) -> None:
    """The register step of a pipeline run that found MLflow down: register, gate, and promote when the
    gate says so (what the pipeline's If(gate) would have done)."""
    from unisd import pipeline_steps

    run_cfg = pipeline_steps.parse_config(record["config_yaml"])
    run_cfg = run_cfg.model_copy(
        update={
            "tracking": run_cfg.tracking.model_copy(update={"tracking_uri": cfg.tracking_uri, "outbox": None})
        }
    )
    original_sha = pipeline_steps.git_sha
    if record.get("git_sha"):  # the lineage is the run's, not that of the checkout running the sync
        pipeline_steps.git_sha = lambda: record["git_sha"]
    try:
        decision = pipeline_steps.register_and_gate(
            run_cfg,
            record["run_id"],
            record["model_dir"],
            record["eval_dirs"],
            record["prepared_dir"],
            record["pipeline_run"],
        )
    finally:
        pipeline_steps.git_sha = original_sha
    if record.get("promote_if_better") and decision["promote"]:
        pipeline_steps.promote(run_cfg, decision["version"])
    log.info("replayed register + gate: version %s, promote=%s", decision["version"], decision["promote"])


def finish_run(cfg: TrackingConfig, run_id: str, status: str = "FINISHED") -> dict[str, Any]:
    """End the run (the pipeline's exit step): first replay whatever is queued in the outbox, then mark the
    run `status` with this moment as its end time. If calls are still queued (the server is down), the end
    is queued behind them. Returns {"status", "ended": bool, "pending": int, "outbox": path or None}."""
    path = outbox_path(cfg)
    end_time = _now_ms()
    record = {"op": "set_terminated", "run_id": run_id, "status": status, "end_time": end_time}
    if path is not None and outbox_pending(path):
        if reachable(cfg):
            sync_outbox(path, retry_for_s=cfg.retry_for_s)
        if outbox_pending(path):
            defer_call(cfg, f"end run {run_id} ({status})", record, "earlier calls are still queued")
            return {"status": status, "ended": False, "pending": outbox_pending(path), "outbox": str(path)}
    ended = _call(
        cfg,
        f"end run {run_id} ({status})",
        lambda c: c.set_terminated(run_id, status=status, end_time=end_time) or True,
        defer=record,
    )
    pending = outbox_pending(path)
    return {"status": status, "ended": bool(ended), "pending": pending, "outbox": str(path) if path else None}
