"""`unisd experiment`: the paper's comparison, small — base, SFT, plain SD, each UniSD component and UniSD*,
for several models and seeds, trained and evaluated on held-out splits; one small JSON file per result.

    experiment:                       # configs/experiment-cpu.yaml
      plans:
        - {model: smollm2-135m-instruct, seeds: [0, 1, 2], variants: [base, sft, sd, unisd_star, ...]}
      eval_overrides: {mbpp: {limit: 32, max_new_tokens: 384}}
    run: {...}                        # a run config (prepare / rollout / scoring / train / eval sections)

A variant is `base` (the model untouched), an objective preset, or a named variant (a preset plus train /
objective overrides, under `experiment.variants`). Per (model, seed) the stages every variant
starts from are computed once and shared: prepare (the seed draws the training sample; the held-out sample
is fixed by `prepare.eval_seed`), one rollout of the base student, one contexts folder per context kind the
variants use (negatives only in the retrieval one, which every contrastive variant reads), and one scoring
folder per kind. Each variant then trains from those and is evaluated on every held-out benchmark, with
retention against the base model. The base model is evaluated once per model (greedy, fixed items).

Resumable at every level: each stage skips when its output exists for the same inputs, a killed train or eval
resumes mid-way, and a finished variant is its result file `results/<model>/seed-<s>/<variant>.json`, kept
unless its settings changed (it records them; a setting unisd gained since, left at its default, is no change,
so committed results outlive new settings). The heavy folders (models, rollouts) live under `work_dir`; only the small result
files are meant to be committed. `unisd experiment-report` turns them into docs/RESULTS.md with plots.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import shutil
import time
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from unisd.artifacts import read_json, write_json
from unisd.config import StrictModel, read_yaml, validate

log = logging.getLogger(__name__)

BASE = "base"
RESULT_VERSION = 1
NEGATIVES_KIND = (
    "retrieval"  # the contexts folder whose negatives every contrastive variant reads (UniSD*'s kind)
)


class VariantSpec(StrictModel):
    """A named variant: a preset plus train/objective overrides (e.g. an lr, online mode)."""

    preset: str
    overrides: list[str] = []

    @model_validator(mode="after")
    def _only_what_variants_may_change(self) -> VariantSpec:
        # The shared stages (prepare, contexts, rollout, scores) are computed once for all variants, so a
        # variant may only change what happens after them.
        bad = [o for o in self.overrides if not o.split("=", 1)[0].startswith(("train.", "objective."))]
        if bad:
            raise ValueError(
                f"variant overrides may set train.* and objective.* only (shared stages), got {bad}"
            )
        return self


class ModelPlan(StrictModel):
    model: str
    seeds: list[int] = Field([0], min_length=1)
    variants: list[str] = Field(..., min_length=1)  # "base", preset names, or names in experiment.variants


class ExperimentSettings(StrictModel):
    name: str = "unisd-comparison"
    plans: list[ModelPlan] = Field(..., min_length=1)
    variants: dict[str, VariantSpec] = {}

    @model_validator(mode="after")
    def _known_variants(self) -> ExperimentSettings:
        from unisd.objective import PRESETS

        for name, spec in self.variants.items():
            if spec.preset not in PRESETS:
                raise ValueError(f"variant {name!r}: unknown preset {spec.preset!r}")
        known = {BASE, *PRESETS, *self.variants}
        unknown = sorted({v for plan in self.plans for v in plan.variants} - known)
        if unknown:
            raise ValueError(
                f"unknown variant(s) {unknown}: 'base', a preset ({', '.join(sorted(PRESETS))}) or a name "
                "defined under experiment.variants"
            )
        return self

    # per held-out benchmark: EvalConfig fields that differ (e.g. code needs more tokens, fewer items)
    eval_overrides: dict[str, dict[str, Any]] = {}
    keep_models: bool = False  # keep each variant's merged weights after its eval (large)


class ExperimentConfig(StrictModel):
    experiment: ExperimentSettings
    run: dict[str, Any] = {}  # a RunConfig without model/preset: what every variant shares


def load_experiment(path: str | Path) -> ExperimentConfig:
    cfg = validate(ExperimentConfig, read_yaml(path), source=str(path))
    for plan in cfg.experiment.plans:  # fail before any model loads
        for seed in plan.seeds:
            for variant in plan.variants:
                variant_config(cfg, plan.model, seed, variant)
    return cfg


def variant_config(cfg: ExperimentConfig, model: str, seed: int, variant: str):
    """The RunConfig of one cell: the shared run settings, the model, the variant's preset and the seed."""
    from unisd.config import apply_overrides
    from unisd.runconfig import RunConfig

    spec = cfg.experiment.variants.get(variant) or VariantSpec(preset="sd" if variant == BASE else variant)
    data = apply_overrides(
        cfg.run,
        [
            f"model={model}",
            f"preset={spec.preset}",
            f"prepare.seed={seed}",
            f"contexts.seed={seed}",
            f"rollout.seed={seed}",
            f"train.seed={seed}",
            *spec.overrides,
        ],
    )
    data.setdefault("prepare", {}).setdefault("eval_seed", 0)
    run = validate(RunConfig, data, source=f"experiment run config ({model}, seed {seed}, {variant})")
    run.objective_config()
    return run


def settings_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _slug(model: str) -> str:
    return model.replace("/", "_").replace(":", "_")


def machine() -> dict[str, Any]:
    import os

    import torch

    from unisd.allocator import active

    return {
        "node": platform.node(),
        "allocator": active(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
    }


class Cell:
    """Where one (model, seed) group keeps its shared stages and one variant its own."""

    def __init__(self, work_dir: Path, results_dir: Path, model: str, seed: int):
        self.model, self.seed = model, seed
        self.root = work_dir / _slug(model) / f"seed-{seed}"
        self.base_eval_root = work_dir / _slug(model) / "base-eval"
        self.results = results_dir / _slug(model) / f"seed-{seed}"

    @property
    def prepared(self) -> Path:
        return self.root / "prepared"

    def contexts(self, kind: str) -> Path:
        return self.root / f"contexts-{kind}"

    @property
    def rollout(self) -> Path:
        return self.root / "rollout"

    def scores(self, kind: str) -> Path:
        return self.root / f"scores-{kind}"

    def variant(self, variant: str) -> Path:
        return self.root / "variants" / variant

    def result_file(self, variant: str) -> Path:
        return self.results / f"{variant}.json"


# --------------------------------------------------------------------------------------------------
# shared stages of one (model, seed)


def shared_stages(
    cell: Cell, cfg: ExperimentConfig, variants: list[str], needed_by: str | None = None
) -> dict[str, float]:
    """prepare → contexts per kind → rollout → scores per kind, for the variants of this cell (each skips
    when done). The stages' settings come from all `variants` (e.g. the most views any of them reads), so a
    stage computed for one variant is the one every other variant reads; with `needed_by`, only the stages
    that variant reads run (the base reads none, SFT only prepare), so a cheap variant's result does not wait
    for an expensive one's stages. Returns stage wall times of this call."""
    from unisd.contexts import run_contexts
    from unisd.prepare import run_prepare
    from unisd.rollout import run_rollout
    from unisd.scoring import run_scoring

    timings: dict[str, float] = {}
    run = variant_config(cfg, cell.model, cell.seed, BASE)

    def timed(name, fn, **kwargs):
        start = time.perf_counter()
        fn(**kwargs)
        timings[name] = round(time.perf_counter() - start, 1)

    timed("prepare", run_prepare, cfg=run.prepare, model_spec=cell.model, out_dir=cell.prepared)
    objectives = {
        v: variant_config(cfg, cell.model, cell.seed, v).objective_config() for v in variants if v != BASE
    }
    view_kinds = sorted({o.context_kind for o in objectives.values() if o.uses_views})
    wants_negatives = any(o.uses_negative for o in objectives.values())
    kinds = sorted(set(view_kinds) | ({NEGATIVES_KIND} if wants_negatives else set()))
    needed = objectives if needed_by is None else {v: o for v, o in objectives.items() if v == needed_by}
    needed_views = {o.context_kind for o in needed.values() if o.uses_views}
    needed_kinds = needed_views | (
        {NEGATIVES_KIND} if any(o.uses_negative for o in needed.values()) else set()
    )
    for kind in [k for k in kinds if k in needed_kinds]:
        ctx = run.contexts.model_copy(
            update={
                "kind": kind,
                "num_views": max([o.num_views for o in objectives.values()] + [2]),
                "negatives": wants_negatives and kind == NEGATIVES_KIND,
            }
        )
        timed(
            f"contexts-{kind}",
            run_contexts,
            cfg=ctx,
            model_spec=cell.model,
            prepared_dir=cell.prepared,
            out_dir=cell.contexts(kind),
        )
    if any(o.uses_rollouts for o in needed.values()):
        timed(
            "rollout",
            run_rollout,
            cfg=run.rollout,
            model_spec=cell.model,
            prepared_dir=cell.prepared,
            out_dir=cell.rollout,
        )
    for kind in [k for k in view_kinds if k in needed_views]:
        agreement = next(o for o in objectives.values() if o.uses_views and o.context_kind == kind)
        timed(
            f"scores-{kind}",
            run_scoring,
            cfg=run.scoring,
            model_spec=cell.model,
            prepared_dir=cell.prepared,
            contexts_dir=cell.contexts(kind),
            rollout_dirs=[cell.rollout],
            out_dir=cell.scores(kind),
            objective=agreement,
        )
    return timings


# --------------------------------------------------------------------------------------------------
# one variant


def eval_benchmarks(prepared: Path) -> list[str]:
    return sorted(p.stem for p in (prepared / "eval").glob("*.jsonl"))


def evaluate_model(
    cfg: ExperimentConfig, run, *, model_spec: str, base_spec: str | None, prepared: Path, out_root: Path
) -> dict[str, Any]:
    """Every held-out benchmark of `prepared`: {benchmark: {aggregate, per_item}} (per_item: id + score)."""
    from unisd.evaluate import run_eval

    out: dict[str, Any] = {}
    for benchmark in eval_benchmarks(prepared):
        ecfg = run.eval.model_copy(update=cfg.experiment.eval_overrides.get(benchmark, {}))
        results = run_eval(
            ecfg,
            model_spec=model_spec,
            benchmark=benchmark,
            prepared_dir=prepared,
            out_dir=out_root / benchmark,
            base_spec=base_spec,
        )
        out[benchmark] = {
            "aggregate": results["aggregate"],
            "per_item": [
                {"id": r["id"], "score": r["score"], **_item_extras(r)} for r in results["per_item"]
            ],
        }
    return out


def _item_extras(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in ("predicted",) if k in row}


def _train_summary(manifest: dict[str, Any], train_dir: Path) -> dict[str, Any]:
    from unisd.artifacts import read_jsonl

    metrics = read_jsonl(train_dir / "metrics.jsonl") if (train_dir / "metrics.jsonl").exists() else []
    counts = manifest["counts"]
    return {
        "steps": counts["steps"],
        "items": counts["items"],
        "tokens": counts.get("tokens"),
        "final": counts.get("final", {}),
        "loss_curve": [m.get("loss") for m in metrics],
        "seconds": round(sum(manifest.get("timings_s", {}).values()), 1),
    }


def run_variant(cell: Cell, cfg: ExperimentConfig, variant: str, shared_timings: dict[str, float]) -> dict:
    """Train (unless base) and evaluate one variant; write and return its result."""
    from unisd.train import run_train

    run = variant_config(cfg, cell.model, cell.seed, variant)
    started = time.perf_counter()
    train = None
    if variant == BASE:
        model_spec, base_spec, eval_root = cell.model, None, cell.base_eval_root
    else:
        obj = run.objective_config()
        out = cell.variant(variant)
        manifest = run_train(
            run.train,
            obj,
            model_spec=cell.model,
            prepared_dir=cell.prepared,
            contexts_dir=cell.contexts(NEGATIVES_KIND) if obj.uses_negative else None,
            rollout_dirs=[cell.rollout] if obj.uses_rollouts else [],
            score_dirs=[cell.scores(obj.context_kind)] if obj.uses_views else [],
            out_dir=out / "train",
        )
        train = _train_summary(manifest, out / "train")
        model_spec, base_spec, eval_root = str(out / "train" / "merged"), cell.model, out / "eval"
    eval_started = time.perf_counter()
    evals = evaluate_model(
        cfg, run, model_spec=model_spec, base_spec=base_spec, prepared=cell.prepared, out_root=eval_root
    )
    result = {
        "version": RESULT_VERSION,
        "experiment": cfg.experiment.name,
        "model": cell.model,
        "seed": cell.seed,
        "variant": variant,
        "settings_hash": cell_hash(cfg, cell.model, cell.seed, variant),
        "settings": cell_settings(cfg, cell.model, cell.seed, variant),
        "objective": None if variant == BASE else run.objective_config().model_dump(),
        "train": train,
        "eval": evals,
        "seconds": {
            "train": train["seconds"] if train else 0.0,
            "eval": round(time.perf_counter() - eval_started, 1),
            "variant_total": round(time.perf_counter() - started, 1),
            "shared": shared_timings,
        },
        "machine": machine(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json(cell.result_file(variant), result)
    if variant != BASE and not cfg.experiment.keep_models:
        # The merged weights are large; without them the train folder is no longer a finished stage (its
        # manifest goes too), so a later rerun of this variant retrains instead of evaluating nothing.
        train_dir = cell.variant(variant) / "train"
        (train_dir / "manifest.json").unlink(missing_ok=True)
        for heavy in ("merged", "checkpoints"):
            shutil.rmtree(train_dir / heavy, ignore_errors=True)
    return result


def cell_settings(cfg: ExperimentConfig, model: str, seed: int, variant: str) -> dict[str, Any]:
    """What a result depends on: the base model only on the held-out data and eval settings; a trained
    variant on everything but tracking and pipeline wiring."""
    run = variant_config(cfg, model, seed, variant)
    if variant == BASE:
        prepare = run.prepare.model_dump(mode="json", exclude={"seed", "train_limit", "train_split"})
        relevant = {"model": run.model, "prepare": prepare, "eval": run.eval.model_dump(mode="json")}
    else:
        relevant = run.model_dump(mode="json", exclude={"tracking", "pipeline"})
    return {"run": relevant, "eval_overrides": cfg.experiment.eval_overrides, "v": RESULT_VERSION}


def cell_hash(cfg: ExperimentConfig, model: str, seed: int, variant: str) -> str:
    return settings_hash(cell_settings(cfg, model, seed, variant))


def _leaves(tree: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """{path: value} of a settings tree; an empty mapping is a value."""
    if isinstance(tree, dict) and tree:
        return {k: v for key, sub in tree.items() for k, v in _leaves(sub, (*prefix, key)).items()}
    return {prefix: tree}


_NO_DEFAULT = object()


def _run_defaults() -> dict[tuple[str, ...], Any]:
    """{setting path: RunConfig default} in the shape cell_settings records ("run", section, field)."""
    from unisd.runconfig import RunConfig

    return _leaves({"run": RunConfig().model_dump(mode="json")})


def settings_changes(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """How the settings of a result differ from the current ones, as 'path: old -> new'. A setting added to
    unisd since the result was written is no change while it is at its default: a new setting's default
    keeps what unisd did before it existed (the rule every new setting follows)."""
    old, new = _leaves(stored), _leaves(current)
    defaults = _run_defaults()
    changes = []
    for path in sorted(old.keys() | new.keys()):
        name = ".".join(path)
        if path not in new:
            changes.append(f"{name}: {old[path]!r} -> (no longer a setting)")
        elif path not in old:
            if new[path] != defaults.get(path, _NO_DEFAULT):
                changes.append(f"{name}: (not a setting then) -> {new[path]!r}")
        elif old[path] != new[path]:
            changes.append(f"{name}: {old[path]!r} -> {new[path]!r}")
    return changes


def finished(cell: Cell, cfg: ExperimentConfig, variant: str) -> bool:
    """Whether this variant's result file is for the current settings (else it is rerun, saying why)."""
    path = cell.result_file(variant)
    if not path.exists():
        return False
    result = read_json(path)
    if result.get("settings_hash") == cell_hash(cfg, cell.model, cell.seed, variant):
        return True
    if "settings" not in result:
        log.info("%s: written with other settings (the file does not say which); rerunning it", path)
        return False
    changes = settings_changes(result["settings"], cell_settings(cfg, cell.model, cell.seed, variant))
    if changes:
        shown = "; ".join(changes[:5]) + (f"; and {len(changes) - 5} more" if len(changes) > 5 else "")
        log.info("%s: settings changed (%s); rerunning it", path, shown)
    return not changes


def run_experiment(
    cfg: ExperimentConfig,
    *,
    work_dir: str | Path,
    results_dir: str | Path,
    only_models: list[str] | None = None,
    only_variants: list[str] | None = None,
) -> list[Path]:
    """Every (model, seed, variant) of the plans, in order, skipping finished ones; returns the result files."""
    work_dir, results_dir = Path(work_dir), Path(results_dir)
    written = []
    for plan in cfg.experiment.plans:
        if only_models and plan.model not in only_models:
            continue
        variants = [v for v in plan.variants if not only_variants or v in only_variants]
        for seed in plan.seeds:
            cell = Cell(work_dir, results_dir, plan.model, seed)
            todo = [v for v in variants if not finished(cell, cfg, v)]
            log.info(
                "%s seed %d: %d of %d variants to run (%s)", plan.model, seed, len(todo), len(variants), todo
            )
            if not todo:
                written += [cell.result_file(v) for v in variants]
                continue
            shared: dict[str, float] = {}  # the stage times of this cell, as its variants computed them
            for variant in variants:
                if variant in todo:
                    read = shared_stages(cell, cfg, todo, needed_by=variant)
                    for stage, seconds in read.items():
                        shared[stage] = max(shared.get(stage, 0.0), seconds)  # a later call only skips it
                    log.info("%s seed %d: %s", plan.model, seed, variant)
                    # the result names the shared stages this variant read, each with its computed time
                    run_variant(cell, cfg, variant, {stage: shared[stage] for stage in read})
                written.append(cell.result_file(variant))
    return written


# --------------------------------------------------------------------------------------------------
# the pieces the KFP experiment pipeline runs (pipelines/experiment_pipeline.py)


def experiment_cells(cfg: ExperimentConfig) -> tuple[list[dict], list[dict]]:
    """([{model, seed}] groups, [{model, seed, variant}] cells) of the plans, in plan order."""
    groups = [{"model": p.model, "seed": seed} for p in cfg.experiment.plans for seed in p.seeds]
    cells = [
        {"model": p.model, "seed": seed, "variant": v}
        for p in cfg.experiment.plans
        for seed in p.seeds
        for v in p.variants
    ]
    return groups, cells


def run_group_stages(experiment_yaml: str, model: str, seed: int, work_dir: str) -> dict[str, float]:
    """The shared stages of one (model, seed) for all its plan's variants, under `work_dir` (a cluster run's
    cache volume folder): what every variant of that group starts from."""
    import yaml

    cfg = validate(ExperimentConfig, yaml.safe_load(experiment_yaml), source="experiment config")
    variants = next(p.variants for p in cfg.experiment.plans if p.model == model and seed in p.seeds)
    cell = Cell(Path(work_dir), Path(work_dir) / "results", model, int(seed))
    return shared_stages(cell, cfg, [v for v in variants if v != BASE])


def run_cell(
    experiment_yaml: str, model: str, seed: int, variant: str, work_dir: str, result_file: str
) -> dict:
    """One variant of one (model, seed), after its group's shared stages; the result also goes to
    `result_file` (the KFP output artifact)."""
    import yaml

    cfg = validate(ExperimentConfig, yaml.safe_load(experiment_yaml), source="experiment config")
    cell = Cell(Path(work_dir), Path(work_dir) / "results", model, int(seed))
    result = (
        read_json(cell.result_file(variant))
        if finished(cell, cfg, variant)
        else run_variant(cell, cfg, variant, {})
    )
    write_json(result_file, result)
    return result
