"""KFP components of the experiment pipeline (pipelines/experiment_pipeline.py): thin calls of unisd.experiment.

Signatures use KFP's parser forms (typing.List, no `from __future__ import annotations`); `seed` is a str
because fields of ParallelFor items arrive as strings."""

from typing import List

from kfp import dsl
from kfp.dsl import Dataset, Input, Markdown, Output

from unisd.images import image

TRAIN_IMAGE = image("train")


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def experiment_group_op(experiment_yaml: str, model: str, seed: str, work_dir: str) -> str:
    """Shared stages of one (model, seed): prepare, contexts per kind, rollout, scores per kind."""
    import json

    from unisd.experiment import run_group_stages

    return json.dumps(run_group_stages(experiment_yaml, model, int(seed), work_dir))


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def experiment_barrier_op(groups: list) -> int:
    """Every group's shared stages are done (a fan-in the variant fan-out waits for)."""
    return len(groups)


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def experiment_cell_op(
    experiment_yaml: str, model: str, seed: str, variant: str, work_dir: str, result: Output[Dataset]
):
    """Train (unless base) and evaluate one variant; its result file is the output."""
    from unisd.experiment import run_cell

    run_cell(experiment_yaml, model, int(seed), variant, work_dir, result.path)


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def experiment_report_op(results: Input[List[Dataset]], report: Output[Markdown]):
    """RESULTS.md (tables with paired CIs, plots' data, verdict) from every variant's result."""
    import json
    import shutil
    import tempfile
    from pathlib import Path

    from unisd.results_report import build_results_report

    with tempfile.TemporaryDirectory() as tmp:
        for r in results:
            row = json.loads(Path(r.path).read_text())
            dest = (
                Path(tmp)
                / "results"
                / row["model"].replace("/", "_").replace(":", "_")
                / f"seed-{row['seed']}"
            )
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy(r.path, dest / f"{row['variant']}.json")
        out = build_results_report(Path(tmp) / "results", Path(tmp) / "RESULTS.md")
        shutil.copy(out, report.path)
