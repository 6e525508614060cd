"""Stage subcommands: `unisd prepare|contexts|negatives|rollout|score|train|eval|grade`, each one library call.

Every stage takes `--config <run config YAML>` (default configs/demo.yaml) plus `key.sub=value` overrides,
and directories for its inputs and output — the same directories KFP passes as artifact paths.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from unisd.artifacts import write_text
from unisd.cli import command


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="run config YAML (default: configs/demo.yaml)")
    p.add_argument("--model", default=None, help="model spec (default: the config's `model`)")
    p.add_argument("overrides", nargs="*", help="config overrides, key.sub=value")


def _load(args: argparse.Namespace):
    """The run config of a stage command: the YAML, the overrides, and --model as the `model` override."""
    from unisd.runconfig import CONFIG_DIR, load_run_config

    overrides = list(args.overrides) + ([f"model={args.model}"] if getattr(args, "model", None) else [])
    return load_run_config(args.config or CONFIG_DIR / "demo.yaml", overrides)


def _print(manifest: dict) -> int:
    print(
        json.dumps(
            {k: manifest.get(k) for k in ("stage", "skipped", "counts", "timings_s") if k in manifest},
            indent=2,
            default=str,
        )
    )
    return 0


def _stage_args(*inputs: str, shards: bool = False, student: bool = False):
    """argparse builder: --config/--model/overrides, the input folders, --out (+ shard / student options)."""

    def add(p: argparse.ArgumentParser) -> None:
        _config_args(p)
        for name in inputs:
            many = name in ("rollouts", "scores")
            p.add_argument(
                f"--{name}",
                required=name == "prepared",
                nargs="+" if many else None,
                default=[] if many else None,
            )
        if shards:
            p.add_argument("--shard-index", type=int, default=0)
            p.add_argument("--num-shards", type=int, default=1)
        if student:
            p.add_argument("--student", default=None, help="a train output folder: use its trained student")
        p.add_argument("--out", required=True)

    return add


@command(
    "prepare",
    "benchmarks → training records (student/teacher prompts) and held-out eval records",
    _stage_args(),
)
def cmd_prepare(args):
    from unisd import pipeline_steps

    return _print(pipeline_steps.prepare(_load(args), args.out))


@command(
    "contexts",
    "K auxiliary contexts per item + negative demonstrations: the contexts stage (views, the model's "
    "candidates; into OUT/draft/) then the negatives stage (candidates judged, code in the sandbox)",
    _stage_args("prepared"),
)
def cmd_contexts(args):
    from unisd import pipeline_steps

    cfg, draft = _load(args), str(Path(args.out) / "draft")
    pipeline_steps.contexts(cfg, args.prepared, draft)
    return _print(pipeline_steps.negatives(cfg, args.prepared, draft, args.out))


@command(
    "negatives",
    "the negatives stage alone: judge a contexts stage's candidates (--draft: its output folder)",
    _stage_args("prepared", "draft"),
)
def cmd_negatives(args):
    from unisd import pipeline_steps

    if not args.draft:
        raise ValueError(
            "--draft: the contexts stage's output folder (views.jsonl, candidates.jsonl) is required"
        )
    return _print(pipeline_steps.negatives(_load(args), args.prepared, args.draft, args.out))


@command(
    "rollout",
    "on-policy completions of the student (sharded, resumable)",
    _stage_args("prepared", shards=True, student=True),
)
def cmd_rollout(args):
    from unisd import pipeline_steps

    manifest = pipeline_steps.rollout(
        _load(args), args.prepared, args.out, args.shard_index, args.num_shards, args.student
    )
    return _print(manifest)


@command(
    "score",
    "multi-view scoring: K views' sampled-token log-probs and agreement weights",
    _stage_args("prepared", "contexts", "rollouts", shards=True, student=True),
)
def cmd_score(args):
    from unisd import pipeline_steps

    cfg = _load(args)
    return _print(
        pipeline_steps.score(
            cfg,
            args.prepared,
            args.contexts,
            args.rollouts,
            args.out,
            args.shard_index,
            args.num_shards,
            args.student,
        )
    )


def _train_args(p):
    _stage_args("prepared", "contexts", "rollouts", "scores")(p)
    p.add_argument(
        "--previous", default=None, help="the previous round's train folder (continue its adapter)"
    )
    p.add_argument(
        "--restart", action="store_true", help="discard checkpoints of an unfinished earlier run in --out"
    )


@command("train", "distillation training (resumes from the last checkpoint in --out)", _train_args)
def cmd_train(args):
    from unisd import pipeline_steps

    cfg = _load(args)
    manifest = pipeline_steps.train(
        cfg,
        args.prepared,
        args.contexts,
        args.rollouts,
        args.scores,
        args.out,
        previous=args.previous,
        restart=args.restart,
    )
    return _print(manifest)


def _eval_args(p):
    _stage_args("prepared", student=True)(p)
    p.add_argument(
        "--benchmark",
        required=True,
        help="a benchmark, a comma-separated list, or 'all' (every eval file in --prepared); "
        "with more than one, results go to OUT/<benchmark>/ and OUT/table.md",
    )


@command(
    "eval",
    "benchmark evaluation: the eval stage (answers, retention, fit) then the grade stage (sandboxed "
    "execution, MCQ, tool calls), in this process; OUT/samples/ holds the eval stage's answers",
    _eval_args,
)
def cmd_eval(args):
    from unisd import pipeline_steps
    from unisd.evaluate import results_table

    cfg = _load(args)
    if args.benchmark == "all":
        benchmarks = sorted(p.stem for p in (Path(args.prepared) / "eval").glob("*.jsonl"))
    else:
        benchmarks = [b.strip() for b in args.benchmark.split(",") if b.strip()]
    if not benchmarks:
        raise ValueError(f"--benchmark {args.benchmark!r}: no benchmarks (is {args.prepared}/eval empty?)")
    aggregates = []
    for b in benchmarks:
        out = Path(args.out) if len(benchmarks) == 1 else Path(args.out) / b
        pipeline_steps.evaluate(cfg, args.prepared, b, str(out / "samples"), args.student)
        aggregates.append(pipeline_steps.grade(cfg, args.prepared, b, str(out / "samples"), str(out)))
    table = results_table(aggregates)
    if len(benchmarks) > 1:
        write_text(Path(args.out) / "table.md", table)
    print(table)
    return 0


def _grade_args(p):
    _stage_args("prepared", "samples")(p)
    p.add_argument("--benchmark", required=True, help="the benchmark the eval stage answered")


@command(
    "grade",
    "the grade stage alone: task scores of an eval stage's answers (--samples: its output folder)",
    _grade_args,
)
def cmd_grade(args):
    from unisd import pipeline_steps
    from unisd.evaluate import results_table

    if not args.samples:
        raise ValueError(
            "--samples: the eval stage's output folder (samples.jsonl, measures.json) is required"
        )
    aggregate = pipeline_steps.grade(_load(args), args.prepared, args.benchmark, args.samples, args.out)
    print(results_table([aggregate]))
    return 0


def _promote_args(p):
    p.add_argument("--config", default=None)
    p.add_argument("--model", default=None, help="registered model name (default: the config's)")
    p.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI"),
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the config's)",
    )
    p.add_argument("--version", required=True, help="registered model version")
    p.add_argument("--alias", default="champion")
    p.add_argument("--reason", default="manual promotion")
    p.add_argument(
        "--rollback", action="store_true", help="move `champion` back to --version (tagged as rollback)"
    )
    p.add_argument("overrides", nargs="*")


@command(
    "promote", "move a registry alias (champion by default) to a model version, or roll back", _promote_args
)
def cmd_promote(args):
    from unisd import tracking

    overrides = list(args.overrides)
    if args.model:
        overrides.append(f"tracking.registered_model={args.model}")
    if args.tracking_uri:
        overrides.append(f"tracking.tracking_uri={args.tracking_uri}")
    cfg = _load(argparse.Namespace(config=args.config, model=None, overrides=overrides))
    if args.rollback:
        result = tracking.rollback(cfg.tracking, args.version, reason=args.reason)
        print(
            f"{cfg.tracking.registered_model}: champion {result['previous']} → {result['champion']} (rollback)"
        )
    else:
        previous = tracking.promote(cfg.tracking, args.version, alias=args.alias, reason=args.reason)
        print(f"{cfg.tracking.registered_model}: {args.alias} {previous} → {args.version}")
    return 0


def _objective_diff_args(p):
    p.add_argument("--model", default="tiny:llama", help="model spec (default: a tiny random Llama)")
    p.add_argument(
        "--presets", default=None, help="comma-separated presets (default: every distillation one)"
    )
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--items", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--faithful", action="store_true", help="compare the reference-code forms (faithful: true)"
    )


@command(
    "objective-diff",
    "how far each preset's loss, gradient and trajectory are from plain sd on the same batch",
    _objective_diff_args,
)
def cmd_objective_diff(args):
    from unisd.objective.diff import diff_table, objective_diff

    presets = [p.strip() for p in args.presets.split(",") if p.strip()] if args.presets else None
    rows = objective_diff(
        args.model,
        presets,
        steps=args.steps,
        items=args.items,
        seed=args.seed,
        overrides={"faithful": True} if args.faithful else None,
    )
    print(diff_table(rows))
    return 0


def _experiment_args(p):
    p.add_argument("--config", required=True, help="experiment YAML (e.g. configs/experiment-cpu.yaml)")
    p.add_argument("--work", default="runs/experiment", help="heavy stage folders (models, rollouts, evals)")
    p.add_argument("--results", default=None, help="small per-variant result files (default: WORK/results)")
    p.add_argument("--models", default=None, help="comma-separated subset of the plans' models")
    p.add_argument("--variants", default=None, help="comma-separated subset of the variants")


@command(
    "experiment",
    "train + evaluate variants x seeds x models (sequential, resumable); one result file per variant",
    _experiment_args,
)
def cmd_experiment(args):
    from unisd.experiment import load_experiment, run_experiment

    def split(text):
        return [t.strip() for t in text.split(",") if t.strip()] if text else None

    cfg = load_experiment(args.config)
    files = run_experiment(
        cfg,
        work_dir=args.work,
        results_dir=args.results or Path(args.work) / "results",
        only_models=split(args.models),
        only_variants=split(args.variants),
    )
    print(f"{len(files)} result files under {args.results or Path(args.work) / 'results'}")
    return 0


def _experiment_report_args(p):
    p.add_argument(
        "--results",
        required=True,
        nargs="+",
        help="one or more experiments' result folders (<model>/seed-<s>/<variant>.json)",
    )
    p.add_argument("--out", default="docs/RESULTS.md")
    p.add_argument("--notes", default=None, help="a Markdown file included after the header (interpretation)")


@command(
    "experiment-report",
    "docs/RESULTS.md (tables, CIs, plots, verdict) from experiment result files",
    _experiment_report_args,
)
def cmd_experiment_report(args):
    from unisd.results_report import build_results_report

    print(f"wrote {build_results_report(args.results, args.out, notes=args.notes)}")
    return 0
