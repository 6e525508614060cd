"""What each KFP component does, as plain functions of strings and directories (no KFP imports).

A component body is `from unisd.pipeline_steps import X; X(...)` with its artifact paths, so everything
here is testable without KFP, and a cluster pod and a local `kfp.local` run execute the same code.
The resolved run config travels between components as YAML text (one pipeline parameter set in the UI
is merged into it once, by `resolve_config`).
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from unisd.artifacts import read_json, read_jsonl, write_json, write_jsonl
from unisd.config import apply_overrides, validate
from unisd.runconfig import RunConfig

log = logging.getLogger(__name__)


def resolve_config(config_yaml: str, overrides: Sequence[str]) -> str:
    """Merge UI parameters (`key.sub=value` strings) into the config YAML; validate; return YAML."""
    data = yaml.safe_load(config_yaml) or {}
    cfg = validate(RunConfig, apply_overrides(data, [o for o in overrides if o]), source="pipeline config")
    cfg.objective_config()
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def ui_overrides(
    *,
    model: str,
    preset: str,
    benchmarks: Sequence[str],
    num_shards: int,
    budget: float,
    max_new_tokens: int,
    lora: bool,
    mlflow_tracking_uri: str,
    registered_model: str,
    promotion_margin: float,
    extra: Sequence[str] = (),
) -> list[str]:
    """The pipeline's UI parameters as `key.sub=value` overrides of the run config."""
    return [
        f"model={model}",
        f"preset={preset}",
        f"prepare.benchmarks={json.dumps(list(benchmarks))}",
        f"pipeline.shards={int(num_shards)}",
        f"scoring.budget={float(budget)}",
        f"rollout.max_new_tokens={int(max_new_tokens)}",
        f"train.lora.enabled={str(bool(lora)).lower()}",
        f"tracking.tracking_uri={mlflow_tracking_uri}",
        f"tracking.registered_model={registered_model}",
        f"tracking.promotion_margin={float(promotion_margin)}",
        *[str(o) for o in extra],
    ]


def parse_config(config_yaml: str) -> RunConfig:
    return validate(RunConfig, yaml.safe_load(config_yaml) or {}, source="pipeline config")


def shard_indices(num_shards: int) -> list[int]:
    if num_shards < 1:
        raise ValueError(f"num_shards must be ≥ 1, got {num_shards}")
    return list(range(num_shards))


def student_spec(cfg: RunConfig, student_dir: str | None) -> str:
    """The model the rollout samples from: the base model in round 0, the last round's merged student after."""
    if student_dir and (Path(student_dir) / "merged" / "config.json").exists():
        return str(Path(student_dir) / "merged")
    return cfg.model


def prepare(config_yaml: str, out_dir: str) -> dict:
    from unisd.prepare import run_prepare

    cfg = parse_config(config_yaml)
    return run_prepare(cfg.prepare, model_spec=cfg.model, out_dir=out_dir)


def contexts(config_yaml: str, prepared_dir: str, out_dir: str) -> dict:
    from unisd.contexts import run_contexts

    cfg = parse_config(config_yaml)
    if not cfg.needs_contexts:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        write_jsonl(Path(out_dir) / "contexts.jsonl", [])
        write_json(
            Path(out_dir) / "manifest.json", {"stage": "contexts", "skipped": "objective uses no contexts"}
        )
        return {"skipped": True}
    return run_contexts(
        cfg.contexts_config(), model_spec=cfg.model, prepared_dir=prepared_dir, out_dir=out_dir
    )


def rollout(
    config_yaml: str,
    prepared_dir: str,
    out_dir: str,
    shard: int,
    num_shards: int,
    student_dir: str | None = None,
) -> dict:
    from unisd.rollout import run_rollout

    cfg = parse_config(config_yaml)
    rcfg = cfg.rollout.model_copy(update={"shard_index": int(shard), "num_shards": int(num_shards)})
    return run_rollout(
        rcfg, model_spec=student_spec(cfg, student_dir), prepared_dir=prepared_dir, out_dir=out_dir
    )


def merge_shards(part_dirs: Sequence[str], out_dir: str, filenames: Sequence[str]) -> int:
    """Collect shard outputs into one directory: out/shard-<i>/<files> (keeps each shard's manifest)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for i, part in enumerate(sorted(part_dirs)):
        dest = out / f"shard-{i:05d}"
        dest.mkdir(exist_ok=True)
        for name in [*filenames, "manifest.json"]:
            if (Path(part) / name).exists():
                shutil.copy2(Path(part) / name, dest / name)
    return len(part_dirs)


def shard_dirs(merged_dir: str) -> list[str]:
    return [str(p) for p in sorted(Path(merged_dir).glob("shard-*"))]


def score(
    config_yaml: str,
    prepared_dir: str,
    contexts_dir: str,
    rollouts_dir: str,
    out_dir: str,
    shard: int,
    num_shards: int,
    student_dir: str | None = None,
) -> dict:
    from unisd.scoring import run_scoring

    cfg = parse_config(config_yaml)
    obj = cfg.objective_config()
    if not obj.uses_views:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        write_json(Path(out_dir) / "manifest.json", {"stage": "score", "skipped": "objective uses no views"})
        return {"skipped": True}
    scfg = cfg.scoring.model_copy(update={"shard_index": int(shard), "num_shards": int(num_shards)})
    # Views are teacher views: θ0 for a frozen teacher; the latest student approximates the EMA teacher.
    model_spec = student_spec(cfg, student_dir) if obj.teacher == "ema" else cfg.model
    return run_scoring(
        scfg,
        model_spec=model_spec,
        prepared_dir=prepared_dir,
        contexts_dir=contexts_dir,
        rollout_dirs=shard_dirs(rollouts_dir),
        out_dir=out_dir,
        objective=obj,
    )


def train(
    config_yaml: str,
    prepared_dir: str,
    contexts_dir: str,
    rollouts_dir: str,
    scores_dir: str,
    out_dir: str,
    run_id: str,
    round_index: int,
    previous_dir: str | None = None,
) -> dict:
    from unisd.train import EMA_TEACHER_FILE, run_train

    cfg = parse_config(config_yaml)
    obj = cfg.objective_config()
    tcfg = cfg.train
    if previous_dir and (Path(previous_dir) / "adapter").exists():
        tcfg = tcfg.model_copy(update={"init_adapter": str(Path(previous_dir) / "adapter")})
    if previous_dir and (Path(previous_dir) / EMA_TEACHER_FILE).exists() and obj.teacher == "ema":
        tcfg = tcfg.model_copy(update={"init_teacher": str(Path(previous_dir) / EMA_TEACHER_FILE)})
    score_dirs = [d for d in shard_dirs(scores_dir) if (Path(d) / "scores.safetensors").exists()]
    manifest = run_train(
        tcfg,
        obj,
        model_spec=cfg.model,
        prepared_dir=prepared_dir,
        contexts_dir=contexts_dir if cfg.needs_contexts else None,
        rollout_dirs=shard_dirs(rollouts_dir),
        score_dirs=score_dirs,
        out_dir=out_dir,
    )
    if run_id:
        from unisd import tracking

        rows = [
            {**r, "step": r["step"] + round_index * 10_000} if round_index else r
            for r in read_jsonl(Path(out_dir) / "metrics.jsonl")
        ]
        tracking.log_step_metrics(cfg.tracking, run_id, rows)
    return manifest


def evaluate(
    config_yaml: str, prepared_dir: str, benchmark: str, out_dir: str, model_dir: str | None = None
) -> dict:
    """Evaluate the base model (model_dir None) or the trained student (model_dir = train output).

    No MLflow calls here: eval pods run model-written code and have no network egress; the register step
    logs the eval results."""
    from unisd.evaluate import run_eval

    cfg = parse_config(config_yaml)
    role = "adapted" if model_dir else "base"
    spec = student_spec(cfg, model_dir) if model_dir else cfg.model
    results = run_eval(
        cfg.eval,
        model_spec=spec,
        benchmark=benchmark,
        prepared_dir=prepared_dir,
        out_dir=out_dir,
        base_spec=cfg.model if model_dir else None,
    )
    results["aggregate"]["role"] = role
    write_json(Path(out_dir) / "results.json", results)
    return results["aggregate"]


def git_sha() -> str:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
                cwd=Path(__file__).parent,
            ).stdout.strip()
            or "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def load_eval_dirs(eval_dirs: Sequence[str]) -> list[dict[str, Any]]:
    return [read_json(Path(d) / "results.json") for d in eval_dirs if (Path(d) / "results.json").exists()]


def register_and_gate(
    config_yaml: str,
    run_id: str,
    model_dir: str,
    eval_dirs: Sequence[str],
    prepared_dir: str,
    pipeline_run: str,
) -> dict:
    """Log the evals, register the student (alias `challenger`), and decide promotion: a paired bootstrap
    on the same items against the champion's stored per-item scores, or the base model's when there is no
    champion yet."""
    from unisd import tracking

    cfg = parse_config(config_yaml)
    results = load_eval_dirs(eval_dirs)
    for res in results:
        tracking.log_eval(cfg.tracking, run_id, res)
    challenger = tracking.pooled_item_scores([r for r in results if r["aggregate"].get("role") == "adapted"])
    base = tracking.pooled_item_scores([r for r in results if r["aggregate"].get("role") == "base"])
    lineage = {
        "pipeline_run_id": pipeline_run,
        "git_sha": git_sha(),
        "data_hash": read_json(Path(prepared_dir) / "manifest.json")["counts"].get("data_hash", ""),
        "base_model": cfg.model,
        "preset": cfg.preset,
    }
    version = tracking.register_model_version(
        cfg.tracking, run_id, model_dir, lineage=lineage, item_scores=challenger
    )
    decision = tracking.decide_promotion(
        cfg.tracking, challenger, base_items=base, challenger_version=version
    )
    decision["version"] = version
    tracking.log_promotion(cfg.tracking, run_id, decision, version=version)
    return decision


def promote(config_yaml: str, version: str) -> None:
    from unisd import tracking

    tracking.promote(parse_config(config_yaml).tracking, version, alias="champion")


def report(
    config_yaml: str,
    run_id: str,
    train_dir: str,
    scores_dir: str,
    eval_dirs: Sequence[str],
    decision_json: str,
    out_html: str,
    out_md: str,
) -> None:
    from unisd.report import build_report, weights_sample

    cfg = parse_config(config_yaml)
    metrics_file = Path(train_dir) / "metrics.jsonl"
    score_dirs = [d for d in shard_dirs(scores_dir) if (Path(d) / "scores.safetensors").exists()]
    weights = weights_sample(score_dirs) if score_dirs else []
    out = Path(out_html).parent / "report_build"
    paths = build_report(
        out,
        train_metrics=read_jsonl(metrics_file) if metrics_file.exists() else [],
        weights=weights,
        eval_aggregates=[r["aggregate"] for r in load_eval_dirs(eval_dirs)],
        promotion=json.loads(decision_json) if decision_json else None,
        run_info={
            "model": cfg.model,
            "preset": cfg.preset,
            "gamma": cfg.objective_config().agreement_gamma,
            "mlflow_run_id": run_id,
            "git_sha": git_sha(),
        },
    )
    Path(out_html).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(paths["html"], out_html)
    Path(out_md).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(paths["markdown"], out_md)
    if run_id:
        from unisd import tracking

        tracking.log_artifacts(cfg.tracking, run_id, str(out), "report")
