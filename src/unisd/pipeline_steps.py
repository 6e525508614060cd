"""One function per stage, called by both `unisd <stage>` (commands.py) and the KFP component (components/):
a round run by hand computes exactly what the pipeline computes.

    prepare(cfg, out_dir)                                              benchmarks → records
    contexts(cfg, prepared_dir, out_dir)                               K views + negative candidates (skipped if unused)
    negatives(cfg, prepared_dir, draft_dir, out_dir)                   judged negatives → contexts.jsonl (runs model code)
    rollout(cfg, prepared_dir, out_dir, shard, num_shards, student)    student completions
    score(cfg, prepared_dir, contexts_dir, rollouts, out_dir, shard, num_shards, student)
                                                                       K-view log-probs (skipped if unused)
    train(cfg, prepared_dir, contexts_dir, rollouts, scores, out_dir, run_id, round_index, previous)
    evaluate(cfg, prepared_dir, benchmark, out_dir, student)           base model or student answers + is measured
    grade(cfg, prepared_dir, benchmark, samples_dir, out_dir)          the answers' task scores (runs model code)
    register_and_gate / promote / report                               MLflow registry, gate, run report

`cfg` is the resolved `RunConfig` (components parse the config artifact once; the CLI loads the YAML plus
overrides). `student` / `previous` are train-stage output folders (their `merged/` model, `adapter/`, EMA
teacher); `rollouts` / `scores` are a gathered folder (`shard-*/`), one stage folder, or a list of them. No
KFP imports here: everything is testable without KFP.

The Kubeflow UI parameters are one table, `UI_PARAMETERS` (name → config path); `resolve_config` merges the
values set in the UI into the run config with one precedence: the submitted config YAML is the base, a UI
parameter overrides it only when it differs from the pipeline's default, and `extra_overrides`
(`key.sub=value`) apply last.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from unisd.artifacts import read_json, read_jsonl, write_json, write_jsonl
from unisd.config import apply_overrides, validate
from unisd.runconfig import RunConfig
from unisd.train import NO_MODEL  # a starting-model folder that means the base model

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------
# the run config and the UI parameters


@dataclass(frozen=True)
class UIParameter:
    name: str  # the pipeline parameter shown in the Kubeflow UI
    path: str  # where it goes in the run config (`key.sub`)
    kind: type  # str | int | float | bool | list


UI_PARAMETERS: tuple[UIParameter, ...] = (
    UIParameter("model", "model", str),
    UIParameter("preset", "preset", str),
    UIParameter("benchmarks", "prepare.benchmarks", list),
    UIParameter("num_shards", "pipeline.shards", int),
    UIParameter("budget", "scoring.budget", float),
    UIParameter("max_new_tokens", "rollout.max_new_tokens", int),
    UIParameter("lora", "train.lora.enabled", bool),
    UIParameter("mlflow_tracking_uri", "tracking.tracking_uri", str),
    UIParameter("registered_model", "tracking.registered_model", str),
    UIParameter("promotion_margin", "tracking.promotion_margin", float),
)


def _get(data: Mapping[str, Any], path: str) -> Any:
    for part in path.split("."):
        data = data[part]
    return data


def ui_values(cfg: RunConfig) -> dict[str, Any]:
    """The UI parameters' values in a run config (what `unisd submit` sends, and the pipeline's defaults)."""
    data = cfg.model_dump(mode="json")
    return {p.name: p.kind(_get(data, p.path)) for p in UI_PARAMETERS}


def ui_overrides(values: Mapping[str, Any], defaults: Mapping[str, Any]) -> list[str]:
    """`key.sub=value` overrides for the UI parameters whose value differs from the pipeline default."""
    out = []
    for p in UI_PARAMETERS:
        value = p.kind(values[p.name])
        if value != p.kind(defaults[p.name]):
            out.append(f"{p.path}={json.dumps(value) if p.kind in (list, bool) else value}")
    return out


def resolve_config(
    config_yaml: str, ui: Mapping[str, Any], defaults: Mapping[str, Any], extra: Sequence[str] = ()
) -> str:
    """The run config of one pipeline run: `config_yaml`, then the UI parameters that differ from their
    defaults, then `extra` overrides; validated; returned as YAML."""
    data = yaml.safe_load(config_yaml) or {}
    overrides = [*ui_overrides(ui, defaults), *[o for o in extra if o]]
    cfg = validate(RunConfig, apply_overrides(data, overrides), source="pipeline config")
    cfg.objective_config()
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def parse_config(config_yaml: str) -> RunConfig:
    return validate(RunConfig, yaml.safe_load(config_yaml) or {}, source="pipeline config")


# ----------------------------------------------------------------------------------------------------------
# artifact helpers


def shard_indices(num_shards: int) -> list[int]:
    if num_shards < 1:
        raise ValueError(f"num_shards must be ≥ 1, got {num_shards}")
    return list(range(num_shards))


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


def stage_dirs(paths: str | Path | Sequence[str | Path] | None, payload: str) -> list[str]:
    """The stage folders behind `paths`: a gathered folder's `shard-*/`, else the folders themselves; only
    those holding `payload` (a skipped scoring stage writes none)."""
    if not paths:
        return []
    found = []
    for path in [paths] if isinstance(paths, str | Path) else paths:
        shards = sorted(Path(path).glob("shard-*"))
        found += [str(p) for p in (shards or [Path(path)]) if (p / payload).exists()]
    return found


def student_spec(cfg: RunConfig, student_dir: str | None) -> str:
    """The model a stage runs: the base model, or a train folder's merged student (a model folder as is)."""
    if not student_dir or (Path(student_dir) / NO_MODEL).exists():
        return cfg.model
    merged = Path(student_dir) / "merged"
    if (merged / "config.json").exists():
        return str(merged)
    if (Path(student_dir) / "config.json").exists():
        return str(student_dir)
    raise FileNotFoundError(
        f"{student_dir} holds no trained model (no merged/config.json): not a train output"
    )


def _skipped(out_dir: str, stage: str, why: str, files: Mapping[str, Any] | None = None) -> dict:
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    for name, rows in (files or {}).items():
        write_jsonl(Path(out_dir) / name, rows)
    manifest = {"stage": stage, "skipped": why, "counts": {}}
    write_json(Path(out_dir) / "manifest.json", manifest)
    log.info("%s: skipped (%s)", stage, why)
    return manifest


# ----------------------------------------------------------------------------------------------------------
# the stages


def prepare(cfg: RunConfig, out_dir: str) -> dict:
    from unisd.prepare import run_prepare

    return run_prepare(cfg.prepare, model_spec=cfg.model, out_dir=out_dir)


def contexts(cfg: RunConfig, prepared_dir: str, out_dir: str) -> dict:
    """Contexts stage: K views per item and the model's negative candidates, not yet judged (a draft that
    `negatives` completes). Runs no model-written code."""
    from unisd.contexts import write_contexts

    if not cfg.needs_contexts:
        return _skipped(out_dir, "contexts", "objective uses no contexts", {"views.jsonl": []})
    return write_contexts(
        cfg.contexts_config(), model_spec=cfg.model, prepared_dir=prepared_dir, out_dir=out_dir
    )


def negatives(cfg: RunConfig, prepared_dir: str, draft_dir: str, out_dir: str) -> dict:
    """Negatives stage: the candidates judged by their task kind (code: run against the tests in the
    sandbox), one negative per item, the final contexts.jsonl. Loads no model; on a cluster it runs in the
    sandbox pod, like grade."""
    from unisd.contexts import check_negatives

    if not cfg.needs_contexts:
        return _skipped(out_dir, "negatives", "objective uses no contexts", {"contexts.jsonl": []})
    return check_negatives(
        cfg.contexts_config(),
        model_spec=cfg.model,
        prepared_dir=prepared_dir,
        draft_dir=draft_dir,
        out_dir=out_dir,
    )


def rollout(
    cfg: RunConfig,
    prepared_dir: str,
    out_dir: str,
    shard: int = 0,
    num_shards: int = 1,
    student: str | None = None,
) -> dict:
    from unisd.rollout import run_rollout

    if not cfg.objective_config().uses_rollouts:
        return _skipped(
            out_dir, "rollout", "the objective trains on gold completions", {"completions.jsonl": []}
        )
    if cfg.train.mode == "online":  # the train step generates with the current student itself
        return _skipped(out_dir, "rollout", "train.mode=online", {"completions.jsonl": []})
    rcfg = cfg.rollout.model_copy(update={"shard_index": int(shard), "num_shards": int(num_shards)})
    return run_rollout(
        rcfg, model_spec=student_spec(cfg, student), prepared_dir=prepared_dir, out_dir=out_dir
    )


def score(
    cfg: RunConfig,
    prepared_dir: str,
    contexts_dir: str,
    rollouts: str | Sequence[str],
    out_dir: str,
    shard: int = 0,
    num_shards: int = 1,
    student: str | None = None,
) -> dict:
    from unisd.scoring import run_scoring

    obj = cfg.objective_config()
    if not obj.uses_views:
        return _skipped(out_dir, "score", "objective uses no views")
    if cfg.train.mode == "online":  # the train step scores its own completions with the views
        return _skipped(out_dir, "score", "train.mode=online")
    scfg = cfg.scoring.model_copy(update={"shard_index": int(shard), "num_shards": int(num_shards)})
    # Views are teacher views: θ0 for a frozen teacher; the latest student approximates the EMA teacher.
    model_spec = student_spec(cfg, student) if obj.teacher == "ema" else cfg.model
    return run_scoring(
        scfg,
        model_spec=model_spec,
        prepared_dir=prepared_dir,
        contexts_dir=contexts_dir,
        rollout_dirs=stage_dirs(rollouts, "completions.jsonl"),
        out_dir=out_dir,
        objective=obj,
    )


def train(
    cfg: RunConfig,
    prepared_dir: str,
    contexts_dir: str | None,
    rollouts: str | Sequence[str] | None,
    scores: str | Sequence[str] | None,
    out_dir: str,
    run_id: str | None = None,
    round_index: int = 0,
    previous: str | None = None,
    restart: bool = False,
) -> dict:
    """Train one round; `previous` (the last round's train folder) continues its adapter and EMA teacher.
    With an MLflow `run_id` the step metrics are logged (round r's steps offset by r · 10,000)."""
    from unisd.train import previous_round, run_train

    obj = cfg.objective_config()
    if obj.uses_negative and not contexts_dir:
        raise ValueError(
            f"preset {cfg.preset!r} trains against negative demonstrations: pass the contexts folder"
        )
    # The previous round's LoRA adapter, or (full fine-tuning) its merged weights, and its EMA teacher.
    tcfg = cfg.train.model_copy(update=previous_round(previous, cfg.train, obj))
    manifest = run_train(
        tcfg,
        obj,
        model_spec=cfg.model,
        prepared_dir=prepared_dir,
        contexts_dir=contexts_dir if cfg.needs_contexts else None,
        rollout_dirs=stage_dirs(rollouts, "completions.jsonl"),
        score_dirs=stage_dirs(scores, "scores.safetensors"),
        out_dir=out_dir,
        restart=restart,
    )
    if run_id:
        log_train_metrics(cfg, run_id, out_dir, round_index)
    return manifest


def log_train_metrics(cfg: RunConfig, run_id: str, out_dir: str | Path, round_index: int = 0) -> int:
    """A train folder's step metrics (metrics.jsonl) to the MLflow run, round r's steps offset by r · 10,000."""
    from unisd import tracking

    rows = [
        {**r, "step": r["step"] + round_index * 10_000} if round_index else r
        for r in read_jsonl(Path(out_dir) / "metrics.jsonl")
    ]
    return tracking.log_step_metrics(cfg.tracking, run_id, rows)


def evaluate(
    cfg: RunConfig, prepared_dir: str, benchmark: str, out_dir: str, student: str | None = None
) -> dict:
    """Eval stage: the base model (student None) or the trained student answers one benchmark's held-out
    items and is measured (reference fit; retention against the base). Runs no model-written code: `grade`
    scores the answers. Returns the measures, with the model's role ("base" / "adapted")."""
    from unisd.evaluate import MEASURES_FILE, generate_samples

    measures = generate_samples(
        cfg.eval,
        model_spec=student_spec(cfg, student),
        benchmark=_benchmark_name(benchmark),
        prepared_dir=prepared_dir,
        out_dir=out_dir,
        base_spec=cfg.model if student else None,
    )
    measures["role"] = "adapted" if student else "base"
    write_json(Path(out_dir) / MEASURES_FILE, measures)
    return measures


def grade(cfg: RunConfig, prepared_dir: str, benchmark: str, samples_dir: str, out_dir: str) -> dict:
    """Grade stage: the task scores of an eval stage's answers (code: sandboxed execution) next to its
    measures. Loads no model and makes no MLflow calls: on a cluster it is the one pod that executes
    model-written code (sandbox image, egress denied, no shared volume, no credentials); the register step
    logs the results. Returns the aggregate."""
    from unisd.evaluate import grade_samples

    results = grade_samples(
        cfg.eval,
        benchmark=_benchmark_name(benchmark),
        prepared_dir=prepared_dir,
        samples_dir=samples_dir,
        out_dir=out_dir,
    )
    return results["aggregate"]


def _benchmark_name(benchmark: str) -> str:
    """A pipeline's benchmark entry as the eval file's name: a bare data-source URI by its dataset name."""
    from unisd.data.sources import dataset_name, is_source

    return dataset_name(benchmark) if is_source(benchmark) else benchmark


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


RETRAIN, SKIP = "train", "skip"  # data_check's answer (one string: kfp.local's If reads single outputs only)


def data_check(cfg: RunConfig, prepared_dir: str, run_id: str) -> str:
    """Before any expensive stage of a (scheduled) run: SKIP when `retrain.skip_unchanged_data` and the
    champion was trained on this very data (the reason tagged on the MLflow run), else RETRAIN."""
    from unisd import tracking

    if not cfg.retrain.skip_unchanged_data:
        return RETRAIN
    data_hash = read_json(Path(prepared_dir) / "manifest.json")["counts"].get("data_hash", "")
    champion = tracking.current_champion(cfg.tracking)
    if champion is None or tracking.version_tags(cfg.tracking, champion).get("data_hash") != data_hash:
        return RETRAIN
    reason = (
        f"data unchanged since champion version {champion} was trained (data_hash {data_hash[:12]}): "
        "not retraining"
    )
    tracking.set_tags(cfg.tracking, run_id, {"skipped": "true", "skipped_reason": reason})
    log.info("data check: %s", reason)
    return SKIP


def starting_model(cfg: RunConfig, run_id: str, out_dir: str) -> dict:
    """The model round 0 starts from, as a train-output folder: the champion's registered weights
    (`retrain.continue_from_champion`, tagged on the run) or a NO_MODEL marker (the base model)."""
    from unisd import tracking

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    champion = tracking.current_champion(cfg.tracking) if cfg.retrain.continue_from_champion else None
    if champion is not None:
        tags = tracking.download_version_model(cfg.tracking, champion, out)
        start = {
            "champion": champion,
            "reason": f"continuing from champion version {champion} (trained on data_hash "
            f"{tags.get('data_hash', '')[:12]})",
        }
        tracking.set_tags(cfg.tracking, run_id, {"continued_from_version": champion})
    else:
        start = {"champion": "", "reason": "round 0 starts from the base model"}
        write_json(out / NO_MODEL, start)
    write_json(out / "start.json", start)
    # train-output shaped (`unisd train --previous` checks the stage): the round before round 0
    write_json(out / "manifest.json", {"stage": "train", "counts": {}, "starting_model": start})
    log.info("starting model: %s", start["reason"])
    return start


def register_and_gate(
    cfg: RunConfig,
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
    guard = tracking.retention_refusal(
        cfg.tracking,
        [r["aggregate"] for r in results if r["aggregate"].get("role") == "adapted"],
        decision.get("per_benchmark", {}),
    )
    if guard and decision["promote"]:
        decision |= {
            "promote": False,
            "reason": f"{decision['reason']}; but {guard}",
            "retention_guard": guard,
        }
    elif guard:
        decision["retention_guard"] = guard
    decision["version"] = version
    tracking.log_promotion(cfg.tracking, run_id, decision, version=version)
    return decision


def promote(cfg: RunConfig, version: str) -> None:
    from unisd import tracking

    tracking.promote(cfg.tracking, version, alias="champion")


def report(
    cfg: RunConfig,
    run_id: str,
    train_dir: str,
    scores: str | Sequence[str] | None,
    eval_dirs: Sequence[str],
    decision_json: str,
    out_html: str,
    out_md: str,
) -> None:
    from unisd.report import build_report, weights_sample

    metrics_file = Path(train_dir) / "metrics.jsonl"
    score_dirs = stage_dirs(scores, "scores.safetensors")
    out = Path(out_html).parent / "report_build"
    paths = build_report(
        out,
        train_metrics=read_jsonl(metrics_file) if metrics_file.exists() else [],
        weights=weights_sample(score_dirs) if score_dirs else [],
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
