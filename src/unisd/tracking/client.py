"""The MLflow client and every call's retry (`_call`, `_retrying`), and the probe before a run (`probe`,
`reachable`). A call that still fails after its retries joins the outbox (`unisd.tracking.outbox`) when
one is in use. ("module docstring" in the text below: the package's, `unisd.tracking`.)
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from unisd.tracking.config import TrackingConfig, TrackingUnavailableError, _first_line, _sqlite_path
from unisd.tracking.outbox import _append_outbox, _deferral_target, outbox_pending

log = logging.getLogger("unisd.tracking")  # the package's logger, as before the split
T = TypeVar("T")


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
