"""The outbox: the JSONL file of calls that could not be made, kept for later (where it is, appending,
reading, queueing a call without trying the server). Replaying it: `unisd.tracking.sync`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from unisd.tracking.config import TrackingConfig, TrackingUnavailableError, _first_line

log = logging.getLogger("unisd.tracking")  # the package's logger, as before the split


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
