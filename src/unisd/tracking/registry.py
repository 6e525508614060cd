"""The model registry: per-item scores stored with a version, registering a model version (lineage tags,
alias `challenger`), aliases, version tags. ("module docstring" in the text below: the package's, `unisd.tracking`.)
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from unisd.tracking.client import _call
from unisd.tracking.config import (
    CHALLENGER,
    CHAMPION,
    ITEM_SCORES_ARTIFACT,
    MODEL_ARTIFACT_PATH,
    REQUIRED_LINEAGE,
    TrackingConfig,
)
from unisd.tracking.runs import _log_json, _numeric, _tag_dict, log_artifacts, set_tags


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
