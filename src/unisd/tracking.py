"""MLflow tracking: runs, step metrics, eval results, model versions, a gated promotion, rollback.

Every MLflow call goes through `_call`, a retry with exponential backoff: a tracking server that is
down, restarting or overloaded (connection refused, timeouts, 5xx/429, a locked sqlite file) is
retried for `retry_for_s` seconds (default 5 minutes; `retries` caps the number of retries when set),
sleeping backoff_s, 2·backoff_s, 4·backoff_s, … (each capped at max_backoff_s); after that a
`TrackingUnavailableError` names the URI. Errors that retrying cannot fix (a bad metric name, a missing
model version) are raised at once. MLflow's own HTTP retries (7 with backoff, ≈4 min) are switched off
unless the user set MLFLOW_HTTP_REQUEST_MAX_RETRIES, so the one budget here is the only one. A retried
call that had already reached the server may happen twice (e.g. two model versions); the logging calls
here are written to be harmless when repeated.

A server that blinks during a run loses nothing:

    probe(cfg)              before any expensive stage: is the server there? Fails in seconds
                            (probe_timeout_s) with one line naming the URI, instead of minutes later
    the outbox              when a logging call (metrics, params, tags, artifacts, end_run) still fails
                            after its retries, the call is appended to a JSONL outbox instead of
                            failing the stage: `cfg.outbox`, else `$UNISD_RUN_DIR/mlflow-outbox.jsonl`
                            (`unisd run` sets UNISD_RUN_DIR for its components); without either, the
                            error is raised as before. Once the outbox holds a call, later calls of the
                            run try only for probe_timeout_s before joining it (the server was already
                            found down: no minutes of waiting per call)
    run_or_defer            a whole step that needs the server (register + gate) is recorded as one
                            replayable call when the server is unreachable
    sync_outbox             replays the outbox in order (`unisd tracking sync RUN_DIR`); replayed
                            calls move to mlflow-outbox.done.jsonl, calls MLflow refuses to
                            mlflow-outbox.failed.jsonl (with the reason); replaying twice is harmless
    finish_run              the pipeline's exit step: replay what is pending, then end the run
                            FINISHED / FAILED / KILLED (with its real end time); while calls are still
                            pending, the end itself is queued behind them, so MLflow never shows a
                            FINISHED run that lacks metrics

Registry and promotion (aliases + tags; MLflow stages are deprecated):

    register_model_version  run artifacts `model/adapter` and/or `model/merged` → a new version of
                            `registered_model` whose source is those artifacts, lineage tags on the
                            version, alias `challenger` on it
    decide_promotion        paired bootstrap of the challenger's per-item scores against the
                            champion's (or, with no champion yet, the base model's) on the SAME item ids;
                            promote only when the CI's lower bound clears `promotion_margin`
    promote / rollback      move alias `champion`; tags on the versions say when and why

Where the champion's per-item scores come from: `register_model_version(..., item_scores=...)` stores
the version's pooled per-item eval scores ({"<benchmark>/<item id>": score}, see `pooled_item_scores`)
as the run artifact `registry/item_scores.json` and points the version tag `item_scores_artifact` at
it; `champion_item_scores` follows alias `champion` → version → run → that artifact. A later pipeline
run therefore compares its challenger with the champion on the items both evaluated, without
re-evaluating the champion. The comparison is only fair when both used the same eval settings (split,
greedy vs sampled, limit): the version tags `eval_metric` and `item_scores_n` record what was stored.

Metric names in MLflow: `eval/<benchmark>/<model_role>/<metric>` for eval aggregates, the train
stage's own keys (`loss`, `kd_loss`, `agreement/weight_mean`, `train/lr`, …) for step metrics; '@' is
written '_at_' and any other character MLflow rejects becomes '_'.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import Field, field_validator

from unisd.config import StrictModel, flatten

log = logging.getLogger(__name__)
T = TypeVar("T")

CHAMPION = "champion"
CHALLENGER = "challenger"
REQUIRED_LINEAGE = ("pipeline_run_id", "git_sha", "data_hash", "base_model", "preset")
ITEM_SCORES_ARTIFACT = "registry/item_scores.json"
MODEL_ARTIFACT_PATH = "model"
_LOGGED_ARTIFACTS_TAG = "mlflow.loggedArtifacts"  # what MLflow's UI reads to show a JSON file as a table

# MLflow's own limits (mlflow.utils.validation)
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAMS_PER_BATCH = 100
_MAX_PARAM_VALUE = 6000
_MAX_KEY_LENGTH = 250


class TrackingConfig(StrictModel):
    """Where runs and model versions go, and how promotion is gated."""

    # relative sqlite paths resolve against cwd when the config is built (the default too)
    tracking_uri: str = Field("sqlite:///mlflow.db", validate_default=True)
    experiment: str = "unisd"
    registered_model: str = "unisd-student"
    # where run artifacts go; None = the server's own store (http) or `<db dir>/mlartifacts` (sqlite)
    artifact_location: str | None = None
    promotion_margin: float = 0.0  # the challenger must beat the baseline by this much (CI lower bound)
    promotion_metric: str = "score"  # per-item field of results.json used by the gate
    promotion_min_items: int = Field(5, ge=1)  # fewer shared items than this: no decision, no promotion
    promotion_confidence: float = Field(0.95, gt=0, lt=1)
    promotion_resamples: int = Field(2000, ge=100)
    # Retention guards (None = off): a challenger that learns its data by forgetting is not promoted.
    promotion_max_retention_ppl: float | None = Field(None, gt=0)  # PPL_ret of any adapted eval above: refuse
    promotion_max_retention_jsd: float | None = Field(None, ge=0)  # JSD to the base above: refuse
    # per benchmark, challenger − baseline mean below −this: refuse (keep earlier data's held-out set among
    # the evals, e.g. in prepare.eval_only, so forgetting it shows here)
    promotion_max_regression: float | None = Field(None, ge=0)
    retries: int | None = Field(None, ge=0)  # cap on retries per call; None = until retry_for_s is spent
    retry_for_s: float = Field(300.0, ge=0)  # how long one call keeps retrying a server that is down
    backoff_s: float = Field(1.0, gt=0)
    max_backoff_s: float = Field(30.0, gt=0)
    probe_timeout_s: float = Field(
        10.0, gt=0
    )  # the check before a run; also the wait once the outbox is in use
    # JSONL file for calls that failed after every retry (replayed by `unisd tracking sync`);
    # None = $UNISD_RUN_DIR/mlflow-outbox.jsonl when that is set, else no outbox (errors are raised)
    outbox: str | None = None

    @field_validator("tracking_uri")
    @classmethod
    def _absolute_sqlite(cls, uri: str) -> str:
        return resolve_tracking_uri(uri)

    @field_validator("promotion_margin")
    @classmethod
    def _finite_margin(cls, margin: float) -> float:
        if not math.isfinite(margin):
            raise ValueError("promotion_margin must be a finite number")
        return margin


class TrackingUnavailableError(RuntimeError):
    """The tracking server (or sqlite file) stayed unreachable through every retry."""


def resolve_tracking_uri(uri: str) -> str:
    """`sqlite:///mlflow.db` → `sqlite:////<cwd>/mlflow.db` (relative sqlite paths would otherwise
    depend on whichever directory a later process happens to run in). Other URIs are returned as is."""
    uri = uri.strip()
    if not uri:
        raise ValueError("tracking_uri is empty")
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return uri
    path = uri[len(prefix) :]
    if path in ("", ":memory:") or path.startswith("/"):
        return uri
    return prefix + str((Path.cwd() / Path(path).expanduser()).resolve())


def _sqlite_path(uri: str) -> Path | None:
    if uri.startswith("sqlite:////"):
        return Path(uri[len("sqlite:///") :])
    return None


# ----------------------------------------------------------------------------------------------------------
# retries


_TRANSIENT_ERROR_CODES = {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"}
# What mlflow's REST layer says when the request never got an answer (connection refused, reset,
# timeout, too many 5xx), and what sqlite says when another writer holds the file.
_TRANSIENT_MESSAGE = re.compile(
    r"API request to \S+ failed with (timeout )?exception|database is locked|"
    r"status code (429|5\d\d)|Connection (refused|reset|aborted)",
    re.IGNORECASE,
)


def is_transient(err: BaseException) -> bool:
    """True for failures a retry can fix: unreachable or overloaded server, timeouts, a locked db."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(err, ConnectionError | TimeoutError):
        return True
    if isinstance(
        err,
        requests.exceptions.ConnectionError
        | requests.exceptions.Timeout
        | requests.exceptions.ChunkedEncodingError,
    ):
        return True
    if isinstance(err, requests.exceptions.HTTPError) and err.response is not None:
        return err.response.status_code >= 500 or err.response.status_code == 429
    if isinstance(err, MlflowException) and err.error_code in _TRANSIENT_ERROR_CODES:
        return True
    if isinstance(err, MlflowException) or type(err).__name__ == "OperationalError":
        return bool(_TRANSIENT_MESSAGE.search(str(err)))
    return False


def _client(cfg: TrackingConfig):
    from mlflow.tracking import MlflowClient

    # Our retry loop owns the retry budget (see module docstring); a user's explicit setting wins.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return MlflowClient(tracking_uri=cfg.tracking_uri, registry_uri=cfg.tracking_uri)


def _call(
    cfg: TrackingConfig,
    what: str,
    fn: Callable[[Any], T],
    *,
    defer: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None,
) -> T | None:
    """fn(client) with retries on transient failures; then TrackingUnavailableError naming the URI.

    `defer`: the outbox record of this call (a dict, or a function making it). With an outbox in use (see
    module docstring) an unreachable server does not raise: the record is appended and None returned."""
    outbox = _deferral_target(cfg) if defer is not None else None
    budget = cfg.retry_for_s
    if outbox is not None and outbox_pending(outbox):
        budget = min(budget, cfg.probe_timeout_s)  # already found down in this run: don't wait minutes
    try:
        return _retrying(cfg, what, fn, budget)
    except TrackingUnavailableError as err:
        if outbox is None:
            raise
        record = defer() if callable(defer) else defer
        _append_outbox(outbox, cfg, what, dict(record), err)
        log.warning("MLflow unreachable: %s buffered in %s (replay: unisd tracking sync)", what, outbox)
        return None


def _retrying(cfg: TrackingConfig, what: str, fn: Callable[[Any], T], budget_s: float) -> T:
    started = time.monotonic()
    delay = cfg.backoff_s
    last: BaseException | None = None
    attempt = 0
    while True:
        try:
            return fn(_client(cfg))
        except Exception as err:
            if not is_transient(err):
                raise
            last = err
            attempt += 1
            remaining = budget_s - (time.monotonic() - started)
            pause = min(delay, cfg.max_backoff_s, remaining)
            out_of_retries = cfg.retries is not None and attempt > cfg.retries
            if out_of_retries or remaining <= 0:
                break
            log.warning(
                "MLflow at %s: %s failed (attempt %d%s): %s; retrying in %.1fs",
                cfg.tracking_uri,
                what,
                attempt,
                f"/{cfg.retries + 1}" if cfg.retries is not None else f", retrying for {budget_s:.0f}s",
                _first_line(err),
                pause,
            )
            time.sleep(pause)
            delay *= 2
    raise TrackingUnavailableError(
        f"MLflow tracking at {cfg.tracking_uri} is unreachable: {what} failed {attempt} time(s) "
        f"over {time.monotonic() - started:.1f}s (retry_for_s={budget_s:g}, retries={cfg.retries}). "
        f"Is the tracking server running and is tracking.tracking_uri right? Last error: {_first_line(last)}"
    ) from last


def _first_line(err: BaseException | None) -> str:
    text = str(err).strip().splitlines()
    return text[0][:400] if text else type(err).__name__


# ----------------------------------------------------------------------------------------------------------
# probing the server


def probe(cfg: TrackingConfig) -> None:
    """Is the tracking store usable right now? Raises TrackingUnavailableError (one line: the URI, what
    failed, what to do) within about `probe_timeout_s`. http(s): GET /health and one API call (a server
    that answers 401/403 fails too); sqlite: its folder can be created and written."""
    uri = cfg.tracking_uri
    db = _sqlite_path(uri)
    if db is not None:
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise TrackingUnavailableError(
                f"MLflow tracking at {uri}: cannot create {db.parent} ({err.strerror}); "
                "set tracking.tracking_uri to a writable sqlite path or a server"
            ) from None
        if not os.access(db.parent, os.W_OK) or (db.exists() and not os.access(db, os.W_OK)):
            raise TrackingUnavailableError(
                f"MLflow tracking at {uri}: {db if db.exists() else db.parent} is not writable; "
                "set tracking.tracking_uri to a writable sqlite path or a server"
            )
        return
    if not uri.startswith(("http://", "https://")):
        return  # other stores (databricks, file:) are checked by their first call
    import requests

    started = time.monotonic()
    reason, attempts = "", 0
    auth = None
    if os.environ.get("MLFLOW_TRACKING_USERNAME"):
        auth = (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ.get("MLFLOW_TRACKING_PASSWORD", ""))
    headers = {}
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"
    while True:
        attempts += 1
        left = cfg.probe_timeout_s - (time.monotonic() - started)
        try:
            health = requests.get(f"{uri.rstrip('/')}/health", timeout=max(1.0, min(5.0, left)))
            if health.status_code == 200:
                api = requests.get(
                    f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search",
                    params={"max_results": 1},
                    auth=auth,
                    headers=headers,
                    timeout=max(1.0, min(10.0, left)),
                )
                if api.status_code == 200:
                    return
                if api.status_code in (401, 403):
                    raise TrackingUnavailableError(
                        f"MLflow tracking server {uri} refuses requests ({api.status_code} {api.reason}): "
                        "check MLFLOW_TRACKING_USERNAME/PASSWORD or TOKEN, and the server's --allowed-hosts"
                    )
                reason = f"its API answers {api.status_code} {api.reason}"
            else:
                reason = f"/health answers {health.status_code} {health.reason}"
        except requests.exceptions.RequestException as err:
            reason = _connection_reason(err)
        if time.monotonic() - started + 1.0 > cfg.probe_timeout_s:
            break
        time.sleep(1.0)
    raise TrackingUnavailableError(
        f"MLflow tracking server {uri} is not reachable ({reason}; {attempts} tries over "
        f"{time.monotonic() - started:.0f}s): start it (mlflow server --backend-store-uri ... --port ...) "
        "or set tracking.tracking_uri to a running server"
    )


def reachable(cfg: TrackingConfig) -> bool:
    try:
        probe(cfg)
    except TrackingUnavailableError:
        return False
    return True


def _connection_reason(err: BaseException) -> str:
    text = str(err)
    for needle, reason in (
        ("Connection refused", "connection refused"),
        ("Name or service not known", "unknown host"),
        ("nodename nor servname", "unknown host"),
        ("timed out", "timed out"),
        ("Connection reset", "connection reset"),
    ):
        if needle in text:
            return reason
    return _first_line(err)


# ----------------------------------------------------------------------------------------------------------
# the outbox: calls that could not be made, kept for later


OUTBOX_NAME = "mlflow-outbox.jsonl"
RUN_DIR_ENV = "UNISD_RUN_DIR"
_deferral_enabled: ContextVar[bool] = ContextVar("unisd_tracking_deferral", default=True)


def outbox_path(cfg: TrackingConfig) -> Path | None:
    """The outbox file in use: cfg.outbox, else $UNISD_RUN_DIR/mlflow-outbox.jsonl, else None."""
    if cfg.outbox:
        return Path(cfg.outbox)
    run_dir = os.environ.get(RUN_DIR_ENV)
    return Path(run_dir) / OUTBOX_NAME if run_dir else None


def _deferral_target(cfg: TrackingConfig) -> Path | None:
    return outbox_path(cfg) if _deferral_enabled.get() else None


def outbox_pending(path: str | Path | None) -> int:
    """How many calls wait in the outbox (0 when there is none)."""
    if path is None or not Path(path).exists():
        return 0
    return len(_read_records(Path(path)))


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _append_outbox(path: Path, cfg: TrackingConfig, what: str, record: dict, err: BaseException) -> None:
    import uuid

    entry = {
        "v": 1,
        "id": uuid.uuid4().hex,
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "uri": cfg.tracking_uri,
        "what": what,
        "error": _first_line(err),
        **record,
    }
    line = json.dumps(entry, default=str, allow_nan=True) + "\n"
    with _locked(path), open(path, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def _read_records(path: Path) -> list[dict[str, Any]]:
    """The outbox's records; a torn last line (a process killed mid-append) is ignored."""
    records = []
    lines = path.read_text().split("\n")
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if lineno < len(lines) - 1 or lines[-1] == "":
                raise ValueError(f"{path}, line {lineno}: not a JSON record; the outbox is damaged") from None
            log.warning("%s: ignoring a torn last line (an interrupted append)", path)
    return records


def defer_call(cfg: TrackingConfig, what: str, record: Mapping[str, Any], reason: str) -> Path:
    """Queue `record` in the outbox without trying the server (the server is known to be down, or
    earlier calls are still queued and this one must come after them)."""
    path = outbox_path(cfg)
    if path is None:
        raise TrackingUnavailableError(f"{what}: {reason}, and no outbox is set (tracking.outbox)")
    _append_outbox(path, cfg, what, dict(record), TrackingUnavailableError(reason))
    return path


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


def find_run(cfg: TrackingConfig, pipeline_run: str) -> str | None:
    """The id of the run `start_run` opened for pipeline run `pipeline_run` (tag pipeline_run_id), newest
    first; None when there is none (the pipeline failed before its run was opened)."""
    experiment = _call(
        cfg, f"get experiment {cfg.experiment!r}", lambda c: c.get_experiment_by_name(cfg.experiment)
    )
    if experiment is None:
        return None
    escaped = pipeline_run.replace("'", "\\'")
    runs = _call(
        cfg,
        f"find the run of pipeline run {pipeline_run}",
        lambda c: c.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.pipeline_run_id = '{escaped}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        ),
    )
    return runs[0].info.run_id if runs else None


def run_status(cfg: TrackingConfig, run_id: str) -> str:
    return _call(cfg, f"get run {run_id}", lambda c: c.get_run(run_id).info.status)


def reopen_run(cfg: TrackingConfig, run_id: str) -> str:
    """Mark an ended run RUNNING again (a resumed pipeline continues its MLflow run); returns the status
    it had."""
    before = run_status(cfg, run_id)
    if before != "RUNNING":
        _call(cfg, f"reopen run {run_id}", lambda c: c.update_run(run_id, status="RUNNING"))
    return before


# ----------------------------------------------------------------------------------------------------------
# names and values


_INVALID_NAME_CHARS = re.compile(r"[^A-Za-z0-9_\-. :/]")


def sanitize_metric_name(name: str) -> str:
    """A name MLflow accepts: '@' → '_at_', other invalid characters → '_', no empty/'.'/'..' path parts.

    "pass@1" → "pass_at_1"; "eval/mbpp/base/score" unchanged; "kd/ratio(clip)" → "kd/ratio_clip_".
    """
    text = _INVALID_NAME_CHARS.sub("_", str(name).replace("@", "_at_"))
    parts = [p.strip() for p in text.split("/")]
    parts = [p for p in parts if p not in ("", ".", "..")]
    clean = "/".join(parts) or "_"
    if len(clean) > _MAX_KEY_LENGTH:
        raise ValueError(f"metric/param name {name!r} is longer than MLflow's {_MAX_KEY_LENGTH} characters")
    return clean


def _name_part(text: Any) -> str:
    """One path component of a metric name (slashes inside it would add levels)."""
    return sanitize_metric_name(str(text).replace("/", "_"))


def _numeric(value: Any) -> float | None:
    """float for numbers and bools, None for None; anything else is not a metric."""
    if value is None:
        return None
    if isinstance(value, bool | int | float):
        return float(value)
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        return _numeric(value.item())
    raise TypeError(f"not a number: {value!r}")


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if len(text) > _MAX_PARAM_VALUE:
        text = text[: _MAX_PARAM_VALUE - 15] + "…[truncated]"
    return text


def _tag_dict(tags: Mapping[str, Any] | None) -> dict[str, str]:
    return {str(k): v if isinstance(v, str) else json.dumps(v, default=str) for k, v in (tags or {}).items()}


def _now_ms() -> int:
    return int(time.time() * 1000)


# ----------------------------------------------------------------------------------------------------------
# runs


def ensure_experiment(cfg: TrackingConfig) -> str:
    """The id of experiment `cfg.experiment`, created when missing (sqlite: artifacts next to the db)."""
    from mlflow.exceptions import MlflowException

    artifact_location = cfg.artifact_location
    db = _sqlite_path(cfg.tracking_uri)
    if artifact_location is None and db is not None:
        artifact_location = str(db.parent / "mlartifacts")
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)

    def get_or_create(client) -> str:
        experiment = client.get_experiment_by_name(cfg.experiment)
        if experiment is None:
            try:
                return client.create_experiment(cfg.experiment, artifact_location=artifact_location)
            except MlflowException as err:
                if err.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment = client.get_experiment_by_name(cfg.experiment)  # created concurrently
        if experiment.lifecycle_stage == "deleted":
            raise ValueError(
                f"MLflow experiment {cfg.experiment!r} at {cfg.tracking_uri} is deleted; restore it "
                "(mlflow experiments restore) or set tracking.experiment to another name"
            )
        return experiment.experiment_id

    return _call(cfg, f"get/create experiment {cfg.experiment!r}", get_or_create)


def start_run(
    cfg: TrackingConfig,
    *,
    run_name: str,
    tags: Mapping[str, Any] | None = None,
    params: Mapping[str, Any] | None = None,
) -> str:
    """Create a run in `cfg.experiment` (created if missing); log `params`; return the run id."""
    experiment_id = ensure_experiment(cfg)
    run = _call(
        cfg,
        f"create run {run_name!r}",
        lambda c: c.create_run(experiment_id, run_name=run_name, tags=_tag_dict(tags)),
    )
    if params:
        log_params(cfg, run.info.run_id, params)
    return run.info.run_id


def end_run(cfg: TrackingConfig, run_id: str, status: str = "FINISHED") -> None:
    """Mark the run FINISHED / FAILED / KILLED (runs created by id stay RUNNING otherwise). The pipeline's
    exit step uses `finish_run`, which replays the outbox first."""
    end_time = _now_ms()
    _call(
        cfg,
        f"end run {run_id} ({status})",
        lambda c: c.set_terminated(run_id, status=status, end_time=end_time),
        defer={"op": "set_terminated", "run_id": run_id, "status": status, "end_time": end_time},
    )


def set_tags(cfg: TrackingConfig, run_id: str, tags: Mapping[str, Any]) -> None:
    from mlflow.entities import RunTag

    items = [RunTag(k, v) for k, v in _tag_dict(tags).items()]
    for i in range(0, len(items), _MAX_PARAMS_PER_BATCH):
        chunk = items[i : i + _MAX_PARAMS_PER_BATCH]
        _call(
            cfg,
            f"set {len(chunk)} tags on run {run_id}",
            lambda c, chunk=chunk: c.log_batch(run_id, tags=chunk),
            defer={"op": "log_batch", "run_id": run_id, "tags": [[t.key, t.value] for t in chunk]},
        )


def log_params(cfg: TrackingConfig, run_id: str, params: Mapping[str, Any]) -> int:
    """Log params (nested dicts flattened with '.'); values as strings (JSON for non-strings),
    truncated to MLflow's 6000 characters. MLflow refuses to change a logged param's value.
    Returns the number of params logged."""
    from mlflow.entities import Param

    flat = flatten(params)
    items: dict[str, Param] = {}
    for key, value in flat.items():
        name = sanitize_metric_name(key)
        if name in items and items[name].value != _param_value(value):
            raise ValueError(f"params {key!r} and another key both become {name!r} after sanitising")
        items[name] = Param(name, _param_value(value))
    batch = list(items.values())
    for i in range(0, len(batch), _MAX_PARAMS_PER_BATCH):
        chunk = batch[i : i + _MAX_PARAMS_PER_BATCH]
        _call(
            cfg,
            f"log {len(chunk)} params",
            lambda c, chunk=chunk: c.log_batch(run_id, params=chunk),
            defer={"op": "log_batch", "run_id": run_id, "params": [[p.key, p.value] for p in chunk]},
        )
    return len(batch)


def _log_metric_batch(cfg: TrackingConfig, run_id: str, metrics: list, what: str) -> None:
    for i in range(0, len(metrics), _MAX_METRICS_PER_BATCH):
        chunk = metrics[i : i + _MAX_METRICS_PER_BATCH]
        _call(
            cfg,
            f"log {len(chunk)} {what}",
            lambda c, chunk=chunk: c.log_batch(run_id, metrics=chunk),
            defer={
                "op": "log_batch",
                "run_id": run_id,
                "metrics": [[m.key, m.value, m.timestamp, m.step] for m in chunk],
            },
        )


def log_step_metrics(cfg: TrackingConfig, run_id: str, rows: Iterable[Mapping[str, Any]]) -> int:
    """Log train-stage rows (metrics.jsonl: {"step": int, "loss": .., "kd_loss": .., "agreement/…": ..})
    as one metric history per key, at each row's step. None values are skipped; NaN is logged (a
    diverging loss must show). Returns the number of metric points logged."""
    from mlflow.entities import Metric

    metrics: list[Metric] = []
    names: dict[str, str] = {}
    timestamp = _now_ms()
    for index, row in enumerate(rows):
        step = row.get("step")
        if isinstance(step, bool) or not isinstance(step, int):
            raise ValueError(f"metrics row {index}: 'step' must be an integer, got {step!r}")
        for key, value in row.items():
            if key == "step":
                continue
            try:
                number = _numeric(value)
            except TypeError:
                raise ValueError(
                    f"metrics row {index} (step {step}): field {key!r} is not a number: {value!r}"
                ) from None
            if number is None:
                continue
            name = sanitize_metric_name(key)
            if names.setdefault(name, key) != key:
                raise ValueError(
                    f"metric keys {names[name]!r} and {key!r} both become {name!r} after sanitising"
                )
            metrics.append(Metric(name, number, timestamp, step))
    _log_metric_batch(cfg, run_id, metrics, "step metrics")
    return len(metrics)


def _aggregate_metrics(aggregate: Mapping[str, Any]) -> dict[str, float]:
    """Numeric aggregate fields; `score_ci95: [lo, hi]` → score_ci95_low/high, nested dicts → a_b."""
    out: dict[str, float] = {}
    for key, value in aggregate.items():
        if isinstance(value, Mapping):
            for sub, number in _aggregate_metrics(value).items():
                out[f"{key}_{sub}"] = number
        elif isinstance(value, list | tuple):
            if len(value) == 2 and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
                out[f"{key}_low"], out[f"{key}_high"] = float(value[0]), float(value[1])
        elif isinstance(value, bool | int | float):
            out[key] = float(value)
    return out


def _table(rows: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Rows → {"columns", "data"}: the pandas 'split' JSON that MLflow's table view reads."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    data = []
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column)
            is_scalar = value is None or isinstance(value, str | bool | int | float)
            cells.append(value if is_scalar else json.dumps(value, default=str))
        data.append(cells)
    return {"columns": columns, "data": data}


def log_eval(
    cfg: TrackingConfig, run_id: str, results: Mapping[str, Any], *, model_role: str | None = None
) -> dict[str, float]:
    """Log one results.json ({"aggregate": {benchmark, score, score_ci95, …}, "per_item": [...]}).

    Aggregates become metrics `eval/<benchmark>/<model_role>/<metric>`; the per-item rows a table
    artifact `eval/<benchmark>/<model_role>/per_item.json` (shown as a table in the MLflow UI) and the
    aggregate `…/aggregate.json`. model_role ("base", "adapted", …) defaults to aggregate["role"].
    Returns the metrics logged.
    """
    from mlflow.entities import Metric

    aggregate = results.get("aggregate")
    if not isinstance(aggregate, Mapping):
        raise ValueError("eval results have no 'aggregate' mapping (is this a results.json?)")
    benchmark = aggregate.get("benchmark")
    if not benchmark:
        raise ValueError("eval results: aggregate has no 'benchmark'")
    role = model_role or aggregate.get("role")
    if not role:
        raise ValueError(f"eval results for {benchmark!r}: pass model_role= (e.g. 'base' or 'adapted')")
    per_item = results.get("per_item")
    if per_item is None or not isinstance(per_item, list):
        raise ValueError(f"eval results for {benchmark!r}: 'per_item' must be a list of rows")
    prefix = f"eval/{_name_part(benchmark)}/{_name_part(role)}"
    metrics = {f"{prefix}/{sanitize_metric_name(k)}": v for k, v in _aggregate_metrics(aggregate).items()}
    timestamp = _now_ms()
    _log_metric_batch(cfg, run_id, [Metric(k, v, timestamp, 0) for k, v in metrics.items()], "eval metrics")
    table_path = f"{prefix}/per_item.json"
    _log_json(cfg, run_id, _table(per_item), table_path)
    _log_json(cfg, run_id, dict(aggregate), f"{prefix}/aggregate.json")
    _register_table(cfg, run_id, table_path)
    return metrics


def _log_json(cfg: TrackingConfig, run_id: str, obj: Any, artifact_file: str) -> None:
    """Write obj as JSON to artifact_file (overwrites: safe to repeat, unlike MlflowClient.log_table,
    which appends rows when the file exists)."""
    directory, name = os.path.split(artifact_file)
    text = json.dumps(obj, default=str, allow_nan=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(text)
        _call(
            cfg,
            f"log {artifact_file}",
            lambda c: c.log_artifact(run_id, str(path), directory or None),
            defer={"op": "log_text", "run_id": run_id, "text": text, "artifact_file": artifact_file},
        )


def _register_table(cfg: TrackingConfig, run_id: str, artifact_file: str) -> None:
    def add(client) -> None:
        tags = client.get_run(run_id).data.tags
        entries = json.loads(tags.get(_LOGGED_ARTIFACTS_TAG, "[]"))
        entry = {"path": artifact_file, "type": "table"}
        if entry not in entries:
            client.set_tag(run_id, _LOGGED_ARTIFACTS_TAG, json.dumps([*entries, entry]))

    _call(
        cfg,
        f"mark {artifact_file} as a table",
        add,
        defer={"op": "register_table", "run_id": run_id, "artifact_file": artifact_file},
    )


def log_artifacts(
    cfg: TrackingConfig, run_id: str, path: str | Path, artifact_path: str | None = None
) -> None:
    """Upload a file or a directory (recursively) under `artifact_path` of the run."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"cannot log artifacts: {path} does not exist")
    record = {
        "op": "log_artifacts",
        "run_id": run_id,
        "local_path": str(path.resolve()),
        "artifact_path": artifact_path,
    }
    if path.is_dir():
        _call(
            cfg,
            f"log directory {path}",
            lambda c: c.log_artifacts(run_id, str(path), artifact_path),
            defer=record,
        )
    else:
        _call(
            cfg, f"log file {path}", lambda c: c.log_artifact(run_id, str(path), artifact_path), defer=record
        )


def log_config(cfg: TrackingConfig, run_id: str, config_yaml_text: str) -> int:
    """Log the resolved run config: the YAML text as artifact `config/run_config.yaml` and every leaf
    as a param `config.<section>.<key>` (searchable in the UI). Returns the number of params."""
    try:
        data = yaml.safe_load(config_yaml_text) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"run config text is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"run config must be a mapping at the top level, got {type(data).__name__}")
    _call(
        cfg,
        "log run_config.yaml",
        lambda c: c.log_text(run_id, config_yaml_text, "config/run_config.yaml"),
        defer={
            "op": "log_text",
            "run_id": run_id,
            "text": config_yaml_text,
            "artifact_file": "config/run_config.yaml",
        },
    )
    return log_params(cfg, run_id, {"config": data})


def get_metric_history(cfg: TrackingConfig, run_id: str, key: str) -> list[tuple[int, float]]:
    """[(step, value)] of one metric, in step order."""
    history = _call(cfg, f"metric history {key}", lambda c: c.get_metric_history(run_id, key))
    return sorted((m.step, m.value) for m in history)


# ----------------------------------------------------------------------------------------------------------
# registry


def pooled_item_scores(results: Iterable[Mapping[str, Any]], metric: str = "score") -> dict[str, float]:
    """Per-item scores of ONE model across benchmarks: {"<benchmark>/<item id>": per_item[metric]}.

    results  results.json dicts (one per benchmark) of the same model. The benchmark prefix keeps ids
    from different benchmarks apart; NaN is kept (the gate refuses it, loudly).
    """
    pooled: dict[str, float] = {}
    for results_one in results:
        aggregate = results_one.get("aggregate") or {}
        benchmark = aggregate.get("benchmark")
        if not benchmark:
            raise ValueError("eval results without aggregate.benchmark: cannot key its items")
        for index, row in enumerate(results_one.get("per_item") or []):
            if "id" not in row or metric not in row:
                raise ValueError(f"{benchmark}: per_item[{index}] lacks 'id' or {metric!r}: {sorted(row)}")
            key = f"{benchmark}/{row['id']}"
            if key in pooled:
                raise ValueError(f"{benchmark}: item id {row['id']!r} appears twice")
            try:
                value = _numeric(row[metric])
            except TypeError:
                raise ValueError(
                    f"{benchmark}: per_item[{index}] ({row['id']}) {metric}={row[metric]!r} is not a number"
                ) from None
            pooled[key] = float("nan") if value is None else value
    return pooled


def _model_files(model_dir: Path) -> dict[str, Path]:
    """{artifact subpath: local dir}: the folder itself if it is an HF save_pretrained folder, else its
    `adapter/` and `merged/` subfolders (the train stage's output; checkpoints are not registered)."""

    def is_hf(d: Path) -> bool:
        return (d / "config.json").is_file() or (d / "adapter_config.json").is_file()

    if not model_dir.is_dir():
        raise FileNotFoundError(f"model folder {model_dir} does not exist")
    if is_hf(model_dir):
        kind = "adapter" if (model_dir / "adapter_config.json").is_file() else "merged"
        return {kind: model_dir}
    found = {name: model_dir / name for name in ("adapter", "merged") if is_hf(model_dir / name)}
    if not found:
        raise ValueError(
            f"{model_dir} holds no model: expected config.json/adapter_config.json there or in "
            "adapter/ or merged/ (the train stage's save_pretrained output)"
        )
    return found


def register_model_version(
    cfg: TrackingConfig,
    run_id: str,
    model_dir: str | Path,
    *,
    lineage: Mapping[str, Any],
    item_scores: Mapping[str, float] | None = None,
    alias: str = CHALLENGER,
) -> str:
    """Log the trained model as run artifacts `model/adapter` and/or `model/merged`, create a version of
    `cfg.registered_model` (created if missing) whose source is `model/`, tag it with `lineage` (must
    hold pipeline_run_id, git_sha, data_hash, base_model, preset), store `item_scores` for later gates
    (see module docstring) and point `alias` at it. Returns the version number as a string."""
    from mlflow.exceptions import MlflowException

    missing = [k for k in REQUIRED_LINEAGE if lineage.get(k) in (None, "")]
    if missing:
        raise ValueError(f"lineage lacks {missing}; a registered model must say where it came from")
    parts = _model_files(Path(model_dir))
    for name, local in parts.items():
        log_artifacts(cfg, run_id, local, f"{MODEL_ARTIFACT_PATH}/{name}")
    tags = {**_tag_dict(lineage), "model_format": "+".join(sorted(parts)), "run_id": run_id}
    if item_scores is not None:
        _log_json(
            cfg, run_id, {"metric": cfg.promotion_metric, "scores": dict(item_scores)}, ITEM_SCORES_ARTIFACT
        )
        tags |= {
            "item_scores_artifact": ITEM_SCORES_ARTIFACT,
            "item_scores_n": str(len(item_scores)),
            "eval_metric": cfg.promotion_metric,
        }

    def ensure_registered(client) -> None:
        try:
            client.create_registered_model(cfg.registered_model)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise

    _call(cfg, f"create registered model {cfg.registered_model!r}", ensure_registered)
    artifact_uri = _call(cfg, f"get run {run_id}", lambda c: c.get_run(run_id).info.artifact_uri)
    source = f"{artifact_uri.rstrip('/')}/{MODEL_ARTIFACT_PATH}"
    version = _call(
        cfg,
        f"create a version of {cfg.registered_model!r}",
        lambda c: c.create_model_version(cfg.registered_model, source=source, run_id=run_id, tags=tags),
    ).version
    set_tags(cfg, run_id, {"registered_model": cfg.registered_model, "model_version": str(version)})
    set_alias(cfg, str(version), alias)
    return str(version)


def set_alias(cfg: TrackingConfig, version: str, alias: str) -> None:
    _call(
        cfg,
        f"set alias {alias!r} → version {version}",
        lambda c: c.set_registered_model_alias(cfg.registered_model, alias, str(version)),
    )


def alias_version(cfg: TrackingConfig, alias: str) -> str | None:
    """The version `alias` points at, or None (no such alias, or no registered model yet)."""
    from mlflow.exceptions import MlflowException

    def read(client) -> str | None:
        try:
            model = client.get_registered_model(cfg.registered_model)
        except MlflowException as err:
            if err.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        version = model.aliases.get(alias)
        return None if version is None else str(version)

    return _call(cfg, f"read alias {alias!r}", read)


def current_champion(cfg: TrackingConfig) -> str | None:
    return alias_version(cfg, CHAMPION)


def version_tags(cfg: TrackingConfig, version: str) -> dict[str, str]:
    mv = _call(
        cfg, f"get version {version}", lambda c: c.get_model_version(cfg.registered_model, str(version))
    )
    return dict(mv.tags)


def _set_version_tags(cfg: TrackingConfig, version: str, tags: Mapping[str, Any]) -> None:
    for key, value in _tag_dict(tags).items():
        _call(
            cfg,
            f"tag version {version} {key}",
            lambda c, key=key, value=value: c.set_model_version_tag(
                cfg.registered_model, str(version), key, value
            ),
        )


def version_item_scores(cfg: TrackingConfig, version: str) -> dict[str, float] | None:
    """The per-item scores stored with `version` at registration, or None when it has none."""
    mv = _call(
        cfg, f"get version {version}", lambda c: c.get_model_version(cfg.registered_model, str(version))
    )
    artifact = mv.tags.get("item_scores_artifact")
    if not artifact or not mv.run_id:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        local = _call(
            cfg, f"download {artifact}", lambda c: c.download_artifacts(mv.run_id, artifact, dst_path=tmp)
        )
        payload = json.loads(Path(local).read_text())
    scores = payload.get("scores")
    if not isinstance(scores, dict):
        raise ValueError(f"version {version}: {artifact} has no 'scores' mapping")
    return {str(k): float(v) for k, v in scores.items()}


def champion_item_scores(cfg: TrackingConfig) -> dict[str, float] | None:
    """Per-item scores of the current champion ({"<benchmark>/<id>": score}); None when there is no
    champion or it was registered without scores."""
    champion = current_champion(cfg)
    return None if champion is None else version_item_scores(cfg, champion)


# ----------------------------------------------------------------------------------------------------------
# promotion


def _refusal(reason: str, **extra: Any) -> dict[str, Any]:
    nan = float("nan")
    return {
        "promote": False,
        "reason": reason,
        "delta": nan,
        "ci_low": nan,
        "ci_high": nan,
        "n_items": 0,
    } | extra


def promotion_decision(
    champion_items: Mapping[str, float] | None,
    challenger_items: Mapping[str, float] | None,
    *,
    margin: float,
    min_items: int = 5,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Should the challenger replace the champion (or the base model, when there is no champion)?

    champion_items / challenger_items  {item id: per-item score}; None or empty = that eval is missing
    or failed. Compared on the intersection of ids (paired bootstrap of challenger − champion, from
    `unisd.metrics.paired_bootstrap`). Promote only when the CI's lower bound is > margin; never on
    NaN/inf scores, never with fewer than `min_items` shared items.
    returns {promote, reason, delta, ci_low, ci_high, p_better, n_items, n_only_champion,
             n_only_challenger, margin, per_benchmark: {prefix: {delta, n}}}
    """
    from unisd.metrics import paired_bootstrap

    if not math.isfinite(margin):
        raise ValueError(f"margin must be finite, got {margin}")
    if not champion_items:
        return _refusal("no baseline per-item scores (champion/base eval missing or failed): not promoting")
    if not challenger_items:
        return _refusal("no challenger per-item scores (its eval is missing or failed): not promoting")
    shared = sorted(set(champion_items) & set(challenger_items))
    counts = {
        "n_only_champion": len(set(champion_items) - set(shared)),
        "n_only_challenger": len(set(challenger_items) - set(shared)),
        "margin": margin,
    }
    refused = _unpaired_refusal(champion_items, challenger_items, shared, min_items)
    if refused:
        return _refusal(refused, **counts)
    baseline = {i: float(champion_items[i]) for i in shared}
    candidate = {i: float(challenger_items[i]) for i in shared}
    cmp = paired_bootstrap(baseline, candidate, confidence=confidence, n_resamples=n_resamples, seed=seed)
    promote = cmp.ci_low > margin
    return {
        "promote": bool(promote),
        "reason": _decision_reason(cmp, confidence=confidence, margin=margin, promote=promote),
        "delta": cmp.delta,
        "ci_low": cmp.ci_low,
        "ci_high": cmp.ci_high,
        "p_better": cmp.p_better,
        "n_items": cmp.n,
        "confidence": confidence,
        **counts,
        "per_benchmark": _per_benchmark_deltas(shared, baseline, candidate),
    }


def _unpaired_refusal(
    champion_items: Mapping[str, float],
    challenger_items: Mapping[str, float],
    shared: list[str],
    min_items: int,
) -> str | None:
    """Why the shared items cannot decide (none, NaN/inf scores, fewer than `min_items`), or None."""
    if not shared:
        return "the two evals share no item ids: they cannot be compared"
    bad = [i for i in shared if not (math.isfinite(champion_items[i]) and math.isfinite(challenger_items[i]))]
    if bad:
        return f"{len(bad)} shared item(s) have NaN/inf scores (e.g. {bad[:3]}): not promoting"
    if len(shared) < min_items:
        return f"only {len(shared)} shared items (< min_items={min_items}): too few to decide"
    return None


def _decision_reason(cmp, *, confidence: float, margin: float, promote: bool) -> str:
    """The decision's reason: the paired delta of `cmp` (a PairedComparison), its CI, whether its lower
    bound clears the margin."""
    level = f"{confidence:.0%}"
    verdict = "clears" if promote else "does not clear"
    return (
        f"challenger − baseline = {cmp.delta:+.4f} on {cmp.n} shared items, {level} CI "
        f"[{cmp.ci_low:+.4f}, {cmp.ci_high:+.4f}]: the lower bound {verdict} the margin {margin:+.4f}"
    )


def _per_benchmark_deltas(
    shared: list[str], baseline: dict[str, float], candidate: dict[str, float]
) -> dict[str, dict[str, float]]:
    """{benchmark (the id's prefix before '/', else ""): {mean challenger − baseline delta, n items}}."""
    per_benchmark: dict[str, dict[str, float]] = {}
    for item in shared:
        group = item.split("/", 1)[0] if "/" in item else ""
        entry = per_benchmark.setdefault(group, {"sum": 0.0, "n": 0})
        entry["sum"] += candidate[item] - baseline[item]
        entry["n"] += 1
    return {g: {"delta": e["sum"] / e["n"], "n": e["n"]} for g, e in per_benchmark.items()}


def decide_promotion(
    cfg: TrackingConfig,
    challenger_items: Mapping[str, float] | None,
    *,
    base_items: Mapping[str, float] | None,
    challenger_version: str | None = None,
) -> dict[str, Any]:
    """The gate: compare the challenger with the current champion's stored per-item scores, or with the
    base model's (same run, same items) when there is no champion yet. A champion registered without
    scores cannot be compared: no promotion (promote by hand after checking). Adds `baseline`
    ("champion"/"base") and `champion_version` to `promotion_decision`'s dict."""
    champion = current_champion(cfg)
    if champion is not None and champion != challenger_version:
        reference = version_item_scores(cfg, champion)
        if reference is None:
            return _refusal(
                f"champion version {champion} has no stored per-item scores; cannot compare (not promoting)",
                baseline="champion",
                champion_version=champion,
            )
        baseline = "champion"
    else:
        reference, baseline = base_items, "base"
    decision = promotion_decision(
        reference,
        challenger_items,
        margin=cfg.promotion_margin,
        min_items=cfg.promotion_min_items,
        confidence=cfg.promotion_confidence,
        n_resamples=cfg.promotion_resamples,
    )
    return decision | {"baseline": baseline, "champion_version": champion}


def retention_refusal(
    cfg: TrackingConfig,
    adapted: Sequence[Mapping[str, Any]],
    per_benchmark: Mapping[str, Mapping[str, float]],
) -> str | None:
    """Why the retention guards refuse a challenger (None: they pass or are off). `adapted`: the adapted
    model's eval aggregates; `per_benchmark`: promotion_decision's {benchmark: {delta, n}}."""
    broken = []
    for agg in adapted:
        name = agg.get("benchmark", "?")
        for key, bound in (
            ("retention_ppl", cfg.promotion_max_retention_ppl),
            ("retention_jsd", cfg.promotion_max_retention_jsd),
        ):
            value = agg.get(key)
            if bound is not None and isinstance(value, int | float) and not value <= bound:  # NaN breaks too
                broken.append(f"{name}: {key} {value:.4g} > {bound:g}")
    if cfg.promotion_max_regression is not None:
        for name, entry in sorted(per_benchmark.items()):
            if entry["delta"] < -cfg.promotion_max_regression:
                broken.append(
                    f"{name or 'items'}: {entry['delta']:+.4f} vs the baseline (regression bound "
                    f"-{cfg.promotion_max_regression:g})"
                )
    if not broken:
        return None
    return "retention guard: " + "; ".join(broken) + ": not promoting"


def download_version_model(cfg: TrackingConfig, version: str, dst: str | Path) -> dict[str, str]:
    """The registered `version`'s model (`model/adapter`, `model/merged`) into `dst` (a train-output layout:
    dst/adapter, dst/merged). Returns its version tags."""
    import shutil

    mv = _call(
        cfg, f"get version {version}", lambda c: c.get_model_version(cfg.registered_model, str(version))
    )
    dst = Path(dst)
    with tempfile.TemporaryDirectory() as tmp:
        local = _call(
            cfg,
            f"download version {version}'s model",
            lambda c: c.download_artifacts(mv.run_id, MODEL_ARTIFACT_PATH, dst_path=tmp),
        )
        for part in Path(local).iterdir():
            shutil.move(str(part), dst / part.name)
    return dict(mv.tags)


def log_promotion(
    cfg: TrackingConfig, run_id: str, decision: Mapping[str, Any], *, version: str | None
) -> None:
    """Record a gate decision: run artifact `promotion/decision.json`, run tags and metrics, and tags
    `gate_*` on the challenger version."""
    from mlflow.entities import Metric

    _log_json(cfg, run_id, dict(decision) | {"version": version}, "promotion/decision.json")
    set_tags(
        cfg,
        run_id,
        {"promotion.promote": str(bool(decision["promote"])), "promotion.reason": decision["reason"]},
    )
    numbers = {k: decision.get(k) for k in ("delta", "ci_low", "ci_high", "p_better", "n_items")}
    metrics = [
        Metric(f"promotion/{k}", float(v), _now_ms(), 0)
        for k, v in numbers.items()
        if isinstance(v, int | float) and math.isfinite(v)
    ]
    if metrics:
        _log_metric_batch(cfg, run_id, metrics, "promotion metrics")
    if version is not None:
        _set_version_tags(
            cfg,
            version,
            {
                "gate_promote": str(bool(decision["promote"])),
                "gate_reason": decision["reason"],
                "gate_baseline": decision.get("baseline", ""),
                "gate_delta": decision.get("delta"),
                "gate_ci": [decision.get("ci_low"), decision.get("ci_high")],
            },
        )


def promote(cfg: TrackingConfig, version: str, alias: str = CHAMPION, *, reason: str = "") -> str | None:
    """Point `alias` at `version`; tag it with when and what it replaced. Returns the previous holder."""
    version = str(version)
    version_tags(cfg, version)  # a missing version fails here, clearly, before any alias moves
    previous = alias_version(cfg, alias)
    set_alias(cfg, version, alias)
    _set_version_tags(
        cfg,
        version,
        {
            f"{alias}_since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            f"{alias}_replaced": previous or "none",
        }
        | ({f"{alias}_reason": reason} if reason else {}),
    )
    return previous


def rollback(
    cfg: TrackingConfig, to_version: str, *, reason: str = "manual rollback"
) -> dict[str, str | None]:
    """Move `champion` back to `to_version` (which must exist); the demoted version gets tag
    `rolled_back` with the reason, the restored one `restored_reason`. Returns {previous, champion}."""
    to_version = str(to_version)
    previous = current_champion(cfg)
    if previous == to_version:
        raise ValueError(f"version {to_version} is already the champion; nothing to roll back")
    promote(cfg, to_version, CHAMPION, reason=f"rollback: {reason}")
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    _set_version_tags(cfg, to_version, {"restored_reason": reason, "restored_at": stamp})
    if previous is not None:
        _set_version_tags(cfg, previous, {"rolled_back": f"{stamp}: replaced by {to_version}: {reason}"})
    return {"previous": previous, "champion": to_version}
