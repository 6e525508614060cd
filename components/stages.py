"""One lightweight KFP component per stage.

Each runs in the project image (tag = package version), imports `unisd` inside its body and calls one
function of `unisd.pipeline_steps` with its artifact paths — no logic lives here. `install_kfp_package=False`
and no `packages_to_install`: the image already has kfp and unisd, and local runs use the current env.
KFP parses these signatures at import time: keep `typing.List` / `Optional` (its parser's forms) and no
`from __future__ import annotations`.
"""

from typing import List, NamedTuple, Optional

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output, PipelineTaskFinalStatus

from unisd.images import image

TRAIN_IMAGE = image("train")
ROLLOUT_IMAGE = image("rollout")
SANDBOX_IMAGE = image("sandbox")  # grade, negatives: CPU only, bubblewrap, no GPU libraries


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def resolve_config_op(
    config_yaml: str,
    model: str,
    preset: str,
    benchmarks: list,
    num_shards: int,
    budget: float,
    max_new_tokens: int,
    lora: bool,
    mlflow_tracking_uri: str,
    registered_model: str,
    promotion_margin: float,
    extra_overrides: list,
    ui_defaults: dict,
    config: Output[Artifact],
):
    """Merge the run parameters set in the UI into the run config (unisd.pipeline_steps.UI_PARAMETERS;
    a parameter left at its default does not override the config); validate it."""
    from unisd.pipeline_steps import resolve_config

    ui = dict(
        model=model,
        preset=preset,
        benchmarks=benchmarks,
        num_shards=num_shards,
        budget=budget,
        max_new_tokens=max_new_tokens,
        lora=lora,
        mlflow_tracking_uri=mlflow_tracking_uri,
        registered_model=registered_model,
        promotion_margin=promotion_margin,
    )
    with open(config.path, "w") as f:
        f.write(resolve_config(config_yaml, ui, ui_defaults, extra_overrides))


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def start_tracking_op(config: Input[Artifact], pipeline_run: str) -> NamedTuple("Tracking", run_id=str):
    """Check the MLflow server (seconds, one clear error), then open the run every later step logs to;
    returns its run id. Every expensive stage runs after this one."""
    import json
    import os
    from collections import namedtuple

    from unisd import tracking
    from unisd.pipeline_steps import parse_config

    config = open(config.path).read()  # the resolved run config (YAML)
    cfg = parse_config(config)
    tracking.probe(cfg.tracking)
    run_id = tracking.start_run(
        cfg.tracking,
        run_name=f"unisd-{cfg.preset}",
        tags={"pipeline_run_id": pipeline_run},
        params={"model": cfg.model, "preset": cfg.preset},
    )
    tracking.log_config(cfg.tracking, run_id, config)
    run_dir = os.environ.get(tracking.RUN_DIR_ENV)
    if run_dir:  # a local run: its exit step, `unisd run --resume` and `unisd tracking sync` read this
        info = {"run_id": run_id, "tracking_uri": cfg.tracking.tracking_uri, "pipeline_run": pipeline_run}
        with open(os.path.join(run_dir, "tracking.json"), "w") as f:
            json.dump(info, f)
    return namedtuple("Tracking", ["run_id"])(run_id)


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def end_tracking_op(
    config_yaml: str,
    model: str,
    preset: str,
    benchmarks: list,
    num_shards: int,
    budget: float,
    max_new_tokens: int,
    lora: bool,
    mlflow_tracking_uri: str,
    registered_model: str,
    promotion_margin: float,
    extra_overrides: list,
    ui_defaults: dict,
    pipeline_run: str,
    status: PipelineTaskFinalStatus,
):
    """The pipeline's exit step (dsl.ExitHandler): runs whatever happened inside. Replays what MLflow
    missed, then ends the run FINISHED / FAILED / KILLED with the pipeline's status. An exit task may not
    depend on other tasks, so it resolves the config from the run parameters itself and finds the run by
    its pipeline_run_id tag (a local run: tracking.json in the run folder)."""
    import json
    import os

    from unisd import tracking
    from unisd.pipeline_steps import parse_config, resolve_config

    ui = dict(
        model=model,
        preset=preset,
        benchmarks=benchmarks,
        num_shards=num_shards,
        budget=budget,
        max_new_tokens=max_new_tokens,
        lora=lora,
        mlflow_tracking_uri=mlflow_tracking_uri,
        registered_model=registered_model,
        promotion_margin=promotion_margin,
    )
    cfg = parse_config(resolve_config(config_yaml, ui, ui_defaults, extra_overrides)).tracking
    mlflow_status = {"SUCCEEDED": "FINISHED", "CANCELLED": "KILLED", "CANCELED": "KILLED"}.get(
        str(status.state).upper(), "FAILED"
    )
    run_dir = os.environ.get(tracking.RUN_DIR_ENV)
    info_file = os.path.join(run_dir, "tracking.json") if run_dir else None
    if info_file and os.path.exists(info_file):
        run_id = json.load(open(info_file))["run_id"]
    elif tracking.reachable(cfg):
        run_id = tracking.find_run(cfg, pipeline_run)
    else:
        print(f"MLflow at {cfg.tracking_uri} is unreachable and the run id is unknown: nothing to end")
        return
    if run_id is None:
        print(f"no MLflow run was opened for {pipeline_run} (the pipeline stopped before): nothing to end")
        return
    try:
        outcome = tracking.finish_run(cfg, run_id, mlflow_status)
    except tracking.TrackingUnavailableError as err:  # no outbox on this machine: say so, don't hide it
        print(f"MLflow run {run_id} could not be ended {mlflow_status}: {err}")
        return
    if outcome["ended"]:
        print(f"MLflow run {run_id}: {mlflow_status} (pipeline {status.state})")
    else:
        print(
            f"MLflow run {run_id}: {mlflow_status} is queued behind {outcome['pending']} call(s) in "
            f"{outcome['outbox']}: replay with `unisd tracking sync {os.path.dirname(outcome['outbox'])}`"
        )


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def prepare_op(config: Input[Artifact], prepared: Output[Dataset]):
    """Benchmarks → training records (student/teacher prompts) and held-out eval records."""
    from unisd.config import check_data_files
    from unisd.pipeline_steps import parse_config, prepare

    cfg = parse_config(open(config.path).read())
    check_data_files(cfg.prepare)
    prepared.metadata.update(prepare(cfg, prepared.path)["counts"])


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def data_check_op(config: Input[Artifact], prepared: Input[Dataset], run_id: str) -> str:
    """ "train", or "skip" when a scheduled run's data is what the champion was trained on."""
    from unisd.pipeline_steps import data_check, parse_config

    return data_check(parse_config(open(config.path).read()), prepared.path, run_id)


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def starting_model_op(config: Input[Artifact], run_id: str, model: Output[Model]):
    """The model round 0 starts from: the champion's weights, or a marker meaning the base model."""
    from unisd.pipeline_steps import parse_config, starting_model

    start = starting_model(parse_config(open(config.path).read()), run_id, model.path)
    model.metadata.update(start)


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def contexts_op(config: Input[Artifact], prepared: Input[Dataset], draft: Output[Dataset]):
    """K auxiliary contexts (random / retrieval / induced) and the model's negative candidates per item."""
    from unisd.pipeline_steps import contexts as run
    from unisd.pipeline_steps import parse_config

    cfg = parse_config(open(config.path).read())
    draft.metadata.update(run(cfg, prepared.path, draft.path).get("counts", {}))


@dsl.component(base_image=SANDBOX_IMAGE, install_kfp_package=False)
def negatives_op(
    config: Input[Artifact], prepared: Input[Dataset], draft: Input[Dataset], contexts: Output[Dataset]
):
    """The negative candidates judged (code: must fail the tests, in the sandbox), one per item: the final
    contexts. Runs model-written code: the sandbox image, no shared volume, egress denied."""
    from unisd.pipeline_steps import negatives, parse_config

    cfg = parse_config(open(config.path).read())
    contexts.metadata.update(negatives(cfg, prepared.path, draft.path, contexts.path).get("counts", {}))


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def shard_indices_op(num_shards: int) -> list:
    """[0, …, num_shards − 1]: the fan-out of rollout and scoring.

    Its output keeps the default name "Output" (kfp.local cannot iterate a named output), so every other
    parameter output is named: kfp.local confuses two upstream outputs that are both called "Output"."""
    from unisd.pipeline_steps import shard_indices

    return shard_indices(int(num_shards))


@dsl.component(base_image=ROLLOUT_IMAGE, install_kfp_package=False)
def rollout_op(
    config: Input[Artifact],
    prepared: Input[Dataset],
    shard: int,
    num_shards: int,
    rollout: Output[Dataset],
    student: Optional[Input[Model]] = None,
):
    """On-policy completions of one shard (vLLM on GPU, HF generate otherwise)."""
    from unisd.pipeline_steps import parse_config
    from unisd.pipeline_steps import rollout as run

    manifest = run(
        parse_config(open(config.path).read()),
        prepared.path,
        rollout.path,
        int(shard),
        int(num_shards),
        student.path if student is not None else None,
    )
    rollout.metadata.update(manifest["counts"])


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def merge_shards_op(parts: Input[List[Dataset]], filenames: list, merged: Output[Dataset]) -> int:
    """Gather the shards of a fan-out into one artifact."""
    from unisd.pipeline_steps import merge_shards

    return merge_shards([p.path for p in parts], merged.path, [str(f) for f in filenames])


@dsl.component(base_image=ROLLOUT_IMAGE, install_kfp_package=False)
def score_op(
    config: Input[Artifact],
    prepared: Input[Dataset],
    contexts: Input[Dataset],
    rollouts: Input[Dataset],
    shard: int,
    num_shards: int,
    scores: Output[Dataset],
    student: Optional[Input[Model]] = None,
):
    """K-view sampled-token log-probs and agreement weights for one shard (adaptive budget)."""
    from unisd.config import check_consistent
    from unisd.pipeline_steps import parse_config, score, stage_dirs

    check_consistent(
        prepared.path, contexts=contexts.path, rollouts=stage_dirs(rollouts.path, "completions.jsonl")
    )
    manifest = score(
        parse_config(open(config.path).read()),
        prepared.path,
        contexts.path,
        rollouts.path,
        scores.path,
        int(shard),
        int(num_shards),
        student.path if student is not None else None,
    )
    scores.metadata.update(manifest.get("counts", {}))


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def train_op(
    config: Input[Artifact],
    prepared: Input[Dataset],
    contexts: Input[Dataset],
    rollouts: Input[Dataset],
    scores: Input[Dataset],
    run_id: str,
    round_index: int,
    model: Output[Model],
    metrics: Output[Metrics],
    previous: Optional[Input[Model]] = None,
    launch: dict = {},  # noqa: B006 (KFP parameter default): unisd.launch.LaunchSpec, set at compile time
):
    """Distillation training (UniSD objective): `unisd train` as one process, torchrun ranks in this pod, or a
    Kubeflow TrainJob across nodes (unisd.launch); checkpoints, resumes; every loss term to MLflow."""
    import json
    import math

    from unisd.config import check_consistent
    from unisd.launch import LaunchSpec, train_step
    from unisd.objective import LOSS_TERMS
    from unisd.pipeline_steps import stage_dirs

    check_consistent(
        prepared.path,
        contexts=contexts.path,
        rollouts=stage_dirs(rollouts.path, "completions.jsonl"),
        scores=stage_dirs(scores.path, "scores.safetensors"),
    )
    manifest = train_step(
        LaunchSpec.from_dict(launch),
        config.path,
        prepared=prepared.path,
        contexts=contexts.path,
        rollouts=[rollouts.path],
        scores=[scores.path],
        out=model.path,
        previous=previous.path if previous is not None else None,
        run_id=run_id,
        round_index=int(round_index),
    )
    final = manifest["counts"].get("final", {})
    for key in LOSS_TERMS:
        if key in final and math.isfinite(float(final[key])):  # KFP metadata cannot hold NaN
            metrics.log_metric(key, float(final[key]))
    with open(metrics.path, "w") as f:  # kfp.local keeps metrics as metadata only; its cache wants a file
        json.dump(metrics.metadata, f)
    counts = manifest["counts"]
    model.metadata.update(
        {"steps": counts["steps"], "round": int(round_index), "ranks": counts.get("ranks", 1)}
    )


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def eval_op(
    config: Input[Artifact],
    prepared: Input[Dataset],
    benchmark: str,
    samples: Output[Dataset],
    model: Optional[Input[Model]] = None,
):
    """One benchmark: the model's answers (greedy + samples), retention and reference fit. No model-written
    code runs here: grade_op scores the answers."""
    from unisd.pipeline_steps import evaluate, parse_config

    cfg = parse_config(open(config.path).read())
    evaluate(cfg, prepared.path, benchmark, samples.path, model.path if model is not None else None)


@dsl.component(base_image=SANDBOX_IMAGE, install_kfp_package=False)
def grade_op(
    config: Input[Artifact],
    prepared: Input[Dataset],
    benchmark: str,
    samples: Input[Dataset],
    results: Output[Dataset],
    metrics: Output[Metrics],
):
    """One benchmark's task scores: sandboxed execution / letter accuracy / call match of eval_op's answers.
    The only step that runs model-written code: the sandbox image, no shared volume, egress denied."""
    import json
    import math

    from unisd.pipeline_steps import grade, parse_config

    cfg = parse_config(open(config.path).read())
    aggregate = grade(cfg, prepared.path, benchmark, samples.path, results.path)
    for key, value in aggregate.items():
        # KFP metadata cannot hold NaN (e.g. accuracy over zero parseable answers); results.json keeps it.
        if isinstance(value, int | float) and math.isfinite(value):
            metrics.log_metric(f"{aggregate['role']}_{key}", float(value))
    with open(metrics.path, "w") as f:  # kfp.local keeps metrics as metadata only; its cache wants a file
        json.dump(metrics.metadata, f)


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def register_op(
    config: Input[Artifact],
    run_id: str,
    model: Input[Model],
    evals: Input[List[Dataset]],
    base_evals: Input[List[Dataset]],
    prepared: Input[Dataset],
    pipeline_run: str,
) -> NamedTuple("Gate", version=str, promote=bool, decision=str):
    """Register the student in MLflow (alias `challenger`) and decide promotion (paired bootstrap). With
    MLflow unreachable, the whole step is queued in the run's outbox (`unisd tracking sync` registers,
    gates and promotes later) and the pipeline goes on to the report: nothing is promoted meanwhile."""
    import json
    from collections import namedtuple

    from unisd import tracking
    from unisd.pipeline_steps import git_sha, parse_config, register_and_gate

    config_yaml = open(config.path).read()
    cfg = parse_config(config_yaml)
    eval_dirs = [e.path for e in [*evals, *base_evals]]
    decision = tracking.run_or_defer(
        cfg.tracking,
        "register + gate",
        lambda: register_and_gate(cfg, run_id, model.path, eval_dirs, prepared.path, pipeline_run),
        record={
            "op": "register_and_gate",
            "run_id": run_id,
            "config_yaml": config_yaml,
            "model_dir": model.path,
            "eval_dirs": eval_dirs,
            "prepared_dir": prepared.path,
            "pipeline_run": pipeline_run,
            "promote_if_better": True,
            "git_sha": git_sha(),
        },
    )
    if decision is None:
        decision = {
            "promote": False,
            "deferred": True,
            "version": "",
            "reason": f"MLflow at {cfg.tracking.tracking_uri} was unreachable: registration and the promotion "
            "gate are queued in the run's outbox (unisd tracking sync RUN_DIR registers, gates and promotes)",
        }
    gate = namedtuple("Gate", ["version", "promote", "decision"])
    return gate(str(decision["version"]), bool(decision["promote"]), json.dumps(decision, default=str))


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def promote_op(config: Input[Artifact], version: str, decision: str):
    """Move the `champion` alias to this version when the gate's decision says so (a step that always runs:
    kfp.local 2.17 never enters a dsl.If on one field of a multi-output task, so promotion is decided here)."""
    import json
    import logging

    from unisd.pipeline_steps import parse_config, promote

    gate = json.loads(decision)
    if gate.get("promote"):
        promote(parse_config(open(config.path).read()), version)
    else:
        logging.getLogger("unisd").info("not promoting version %s: %s", version or "-", gate.get("reason"))


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def report_op(
    config: Input[Artifact],
    run_id: str,
    model: Input[Model],
    scores: Input[Dataset],
    evals: Input[List[Dataset]],
    base_evals: Input[List[Dataset]],
    decision: str,
    html: Output[HTML],
    markdown: Output[Markdown],
):
    """HTML report with plots (loss terms, reliability weights, base vs adapted with CIs, retention)."""
    from unisd.pipeline_steps import parse_config, report

    report(
        parse_config(open(config.path).read()),
        run_id,
        model.path,
        scores.path,
        [e.path for e in [*evals, *base_evals]],
        decision,
        html.path,
        markdown.path,
    )
