"""Tracking settings and shared pieces: `TrackingConfig`, `TrackingUnavailableError`, the alias and artifact
names, MLflow's own limits, the tracking URI helpers.
"""

from __future__ import annotations

import math
from pathlib import Path

from pydantic import Field, field_validator

from unisd.config import StrictModel

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


def _first_line(err: BaseException | None) -> str:
    text = str(err).strip().splitlines()
    return text[0][:400] if text else type(err).__name__
