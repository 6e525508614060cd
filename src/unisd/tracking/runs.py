"""Runs: metric/param names and values as MLflow takes them, experiments, runs (start, end, find,
reopen), params, step metrics, eval results, artifacts, the run config.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from unisd.config import flatten
from unisd.tracking.client import _call
from unisd.tracking.config import (
    _LOGGED_ARTIFACTS_TAG,
    _MAX_KEY_LENGTH,
    _MAX_METRICS_PER_BATCH,
    _MAX_PARAM_VALUE,
    _MAX_PARAMS_PER_BATCH,
    TrackingConfig,
    _sqlite_path,
)

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
