"""The experiment as a KFP pipeline: (model, seed) groups' shared stages in one ParallelFor, then every
variant × seed × model cell in another, then RESULTS.md (wiring only; no `from __future__ import annotations`).

    ParallelFor(groups): shared stages (prepare, contexts, rollout, scores) → barrier (Collected)
    → ParallelFor(cells): train + evaluate one variant → report (Collected results → RESULTS.md)

The cells are fixed at compile time from the experiment YAML (`unisd experiment --compile`). Shared stages and
variant folders live under `work_dir` — on a cluster a folder of the cache volume, so a retried pod finds its
finished stages — and each cell's result is also its output artifact.
"""

import argparse
import json
from pathlib import Path

import yaml
from kfp import dsl

from components.experiment import (
    experiment_barrier_op,
    experiment_cell_op,
    experiment_group_op,
    experiment_report_op,
)
from pipelines.unisd_pipeline import ClusterSettings, place

EXPERIMENT_PIPELINE = "unisd-experiment"


def build_experiment_pipeline(
    experiment_path: str | Path, *, cluster: bool = True, work_dir: str | None = None
):
    from unisd.experiment import experiment_cells, load_experiment

    cfg = load_experiment(experiment_path)
    groups, cells = experiment_cells(cfg)
    settings = ClusterSettings.from_env() if cluster else None
    default_work = work_dir or (
        f"{settings.cache_mount_path}/experiments/{cfg.experiment.name}" if settings else "runs/experiment"
    )
    experiment_yaml = json.dumps(
        yaml.safe_load(Path(experiment_path).read_text())
    )  # one line: see unisd_pipeline

    @dsl.pipeline(
        name=EXPERIMENT_PIPELINE, description="UniSD variants x seeds x models, trained and evaluated."
    )
    def experiment_pipeline(experiment: str = experiment_yaml, work_dir: str = default_work):
        with dsl.ParallelFor(groups, name="shared-stages") as group:
            shared = experiment_group_op(
                experiment_yaml=experiment, model=group.model, seed=group.seed, work_dir=work_dir
            )
            place(shared, "contexts", "Shared stages (model, seed)", settings)
        barrier = place(
            experiment_barrier_op(groups=dsl.Collected(shared.output)),
            "gather",
            "Shared stages done",
            settings,
        )
        with dsl.ParallelFor(cells, name="variants") as cell:
            run = experiment_cell_op(
                experiment_yaml=experiment,
                model=cell.model,
                seed=cell.seed,
                variant=cell.variant,
                work_dir=work_dir,
            )
            place(run.after(barrier), "eval", "Train + evaluate a variant", settings)
        report = experiment_report_op(results=dsl.Collected(run.outputs["result"]))
        place(report, "report", "RESULTS.md", settings)

    return experiment_pipeline


def _compile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="experiment YAML (e.g. configs/experiment-cpu.yaml)")
    p.add_argument("--output", default="experiment-pipeline.yaml")
    p.add_argument("--work-dir", default=None, help="default: <cache volume>/experiments/<name>")
    p.add_argument("--no-cluster", action="store_true", help="omit GPU/node/secret settings")


def _register() -> None:
    from unisd.cli import command

    @command(
        "compile-experiment",
        "compile the experiment (variants x seeds x models in ParallelFor) to KFP IR YAML",
        _compile_args,
    )
    def cmd_compile_experiment(args: argparse.Namespace) -> int:
        from kfp import compiler

        pipeline = build_experiment_pipeline(args.config, cluster=not args.no_cluster, work_dir=args.work_dir)
        compiler.Compiler().compile(pipeline, args.output)
        print(f"wrote {args.output}")
        return 0


_register()
