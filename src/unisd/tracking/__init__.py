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

The package, in import order (each submodule imports only those above it):
    config      TrackingConfig, TrackingUnavailableError, alias and artifact names, MLflow's limits
    outbox      the outbox file: where it is, appending, reading, `defer_call`
    client      the MLflow client, `_call` and its retries, `probe` / `reachable`
    runs        names and values; experiments, runs, params, step metrics, eval results, artifacts
    sync        `run_or_defer`, `sync_outbox` (the replay), `finish_run`
    registry    per-item scores, `register_model_version`, aliases, version tags
    promotion   the gate (`promotion_decision`, `decide_promotion`, `retention_refusal`), `log_promotion`,
                `promote` / `rollback`, `download_version_model`
Every name is importable from `unisd.tracking` itself.
"""

from __future__ import annotations

from unisd.tracking.client import (
    is_transient,
    probe,
    reachable,
)
from unisd.tracking.config import (
    CHALLENGER,
    CHAMPION,
    ITEM_SCORES_ARTIFACT,
    MODEL_ARTIFACT_PATH,
    REQUIRED_LINEAGE,
    TrackingConfig,
    TrackingUnavailableError,
    resolve_tracking_uri,
)
from unisd.tracking.outbox import (
    OUTBOX_NAME,
    RUN_DIR_ENV,
    defer_call,
    outbox_path,
    outbox_pending,
)
from unisd.tracking.outbox import _read_records as _read_records  # used by `unisd tracking sync`
from unisd.tracking.promotion import (
    decide_promotion,
    download_version_model,
    log_promotion,
    promote,
    promotion_decision,
    retention_refusal,
    rollback,
)
from unisd.tracking.registry import (
    alias_version,
    champion_item_scores,
    current_champion,
    pooled_item_scores,
    register_model_version,
    set_alias,
    version_item_scores,
    version_tags,
)
from unisd.tracking.runs import (
    end_run,
    ensure_experiment,
    find_run,
    get_metric_history,
    log_artifacts,
    log_config,
    log_eval,
    log_params,
    log_step_metrics,
    reopen_run,
    run_status,
    sanitize_metric_name,
    set_tags,
    start_run,
)
from unisd.tracking.sync import (
    finish_run,
    run_or_defer,
    sync_outbox,
)

__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "ITEM_SCORES_ARTIFACT",
    "MODEL_ARTIFACT_PATH",
    "OUTBOX_NAME",
    "REQUIRED_LINEAGE",
    "RUN_DIR_ENV",
    "TrackingConfig",
    "TrackingUnavailableError",
    "alias_version",
    "champion_item_scores",
    "current_champion",
    "decide_promotion",
    "defer_call",
    "download_version_model",
    "end_run",
    "ensure_experiment",
    "find_run",
    "finish_run",
    "get_metric_history",
    "is_transient",
    "log_artifacts",
    "log_config",
    "log_eval",
    "log_params",
    "log_promotion",
    "log_step_metrics",
    "outbox_path",
    "outbox_pending",
    "pooled_item_scores",
    "probe",
    "promote",
    "promotion_decision",
    "reachable",
    "register_model_version",
    "reopen_run",
    "resolve_tracking_uri",
    "retention_refusal",
    "rollback",
    "run_or_defer",
    "run_status",
    "sanitize_metric_name",
    "set_alias",
    "set_tags",
    "start_run",
    "sync_outbox",
    "version_item_scores",
    "version_tags",
]
