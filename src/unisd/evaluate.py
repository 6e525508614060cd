"""Evaluation stage: does the distilled model solve held-out items better, and what did it forget?

Per benchmark (held-out split written by `prepare`):
- task score per item: pass@1 by sandboxed execution (MBPP, HumanEval; unbiased pass@k with n samples),
  letter accuracy (ScienceQA, CommonsenseQA, GPQA; unparseable answers counted separately), call match
  (ToolAlpaca: name-F1, argument-F1, exact match);
- retention (when a base model is given): mean_t log p_base(y_ft,t) on the adapted model's greedy
  completions, PPL_ret = exp(−that), token-level symmetric JSD(p_base, p_ft) ∈ [0, log 2], and the reverse
  direction (log p_ft on the base model's completions);
- reference fit: NLL / perplexity of the gold completion under teacher forcing.

Two stages, so that only one of them runs model-written code: `eval` (generate_samples: the model answers,
reference fit and retention; samples.jsonl + measures.json) and `grade` (grade_samples: the task scores;
`results.json` with aggregates, 95% bootstrap CIs and per-item scores for paired comparisons,
`completions.jsonl`, `table.md`). `run_eval` runs both in one process (CLI, experiments); the pipeline runs
them in two pods, the grade pod in the sandbox image with no shared volume.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, model_validator
from tqdm.auto import tqdm

from unisd.artifacts import (
    progress_dir,
    read_jsonl,
    read_partial_jsonl,
    write_json,
    write_jsonl,
    write_text,
)
from unisd.config import StrictModel
from unisd.data import encode_prompt, student_messages
from unisd.data.records import Record
from unisd.rollout import DecodePath
from unisd.sequences import (
    build_teacher_forcing_batch,
    completion_hidden,
    lm_head_of,
    logit_softcap_of,
    split_by_lengths,
)

log = logging.getLogger(__name__)


class EvalConfig(StrictModel):
    # items per benchmark (a prefix of the held-out split, which is already seeded); None = all
    limit: int | None = Field(None, ge=1)
    max_new_tokens: int = Field(512, ge=1)
    batch_size: int = Field(8, ge=1)
    decode: DecodePath = "hf"  # unisd.rollout.generate: "pruned" drops finished rows from the batch
    num_samples: int = Field(1, ge=1)  # n for pass@k; 1 = greedy pass@1
    sample_temperature: float = Field(0.8, ge=0.0)
    pass_k: list[int] = Field([1], min_length=1)  # each k in 1..num_samples
    sandbox_timeout_s: float = Field(10.0, gt=0.0)
    sandbox_memory_mb: int = Field(1024, ge=1)
    sandbox_workers: int | None = Field(None, ge=1)  # None = one per core
    retention: bool = True
    retention_reverse: bool = True  # also greedy-decode the base model to score log p_ft(y_base) (slower)
    reference_fit: bool = True
    bootstrap_samples: int = Field(1000, ge=100)  # fewer makes the 95% interval ends noise
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _pass_k_within_samples(self):
        bad = [k for k in self.pass_k if not 1 <= k <= self.num_samples]
        if bad:
            raise ValueError(
                f"pass_k {self.pass_k}: pass@k needs 1 <= k <= num_samples ({self.num_samples}); "
                f"{bad} cannot be estimated: raise eval.num_samples to {max(bad)} or drop them"
            )
        return self


# ----------------------------------------------------------------------------------------------------------
# generation


def generate_completions(
    model,
    tokenizer,
    prompts: Sequence[list[int]],
    cfg: EvalConfig,
    *,
    progress_file: Path,
    progress_key: str,
    sample: bool = False,
) -> list[tuple[list[int], bool]]:
    """Greedy (or sampled) completions in batches, with a progress bar.

    Every finished batch is appended to `progress_file` and a rerun skips the batches already in it (a
    killed eval loses at most one batch). A row is reused only if it was made from the same prompt under
    the same `progress_key` (the model) and decoding settings, so a changed run starts over.
    """
    from unisd.rollout import RolloutConfig, generate, prompts_per_call

    rcfg = RolloutConfig(
        temperature=cfg.sample_temperature if sample else 0.0,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        decode=cfg.decode,
    )
    settings = json.dumps([progress_key, rcfg.model_dump()])

    def row_key(index: int) -> str:
        return hashlib.sha256(json.dumps([settings, index, list(prompts[index])]).encode()).hexdigest()

    done: dict[int, tuple[list[int], bool]] = {}
    for row in read_partial_jsonl(progress_file):
        i = row["index"]
        if i < len(prompts) and row["key"] == row_key(i):
            done[i] = (row["ids"], row["finished"])
    progress_file.parent.mkdir(parents=True, exist_ok=True)
    with open(progress_file, "a") as sink:
        per_call = prompts_per_call(rcfg)
        for b in tqdm(range(0, len(prompts), per_call), desc="eval generate", unit="call"):
            batch = range(b, min(b + per_call, len(prompts)))
            if all(i in done for i in batch):
                continue
            results = generate(model, tokenizer, [prompts[i] for i in batch], rcfg, first_index=b)
            for i, (ids, finished, _) in zip(batch, results):
                done[i] = (ids, finished)
                sink.write(
                    json.dumps({"index": i, "key": row_key(i), "ids": ids, "finished": finished}) + "\n"
                )
            sink.flush()
    return [done[i] for i in range(len(prompts))]


# ----------------------------------------------------------------------------------------------------------
# retention and fit (teacher-forced, chunked over the vocabulary)


@torch.no_grad()
def sequence_logprobs(
    model, prompts: Sequence[list[int]], completions: Sequence[list[int]], *, pad_id: int, batch_size: int = 8
) -> list[list[float]]:
    """log p(y_t | x, y<t) for each completion token, batched."""
    from unisd.objective.losses import sampled_token_logprobs

    out: list[list[float]] = []
    head = lm_head_of(model).weight
    for b in range(0, len(prompts), batch_size):
        batch = build_teacher_forcing_batch(
            prompts[b : b + batch_size], completions[b : b + batch_size], pad_id=pad_id
        ).to(head.device)
        logps = sampled_token_logprobs(
            completion_hidden(model, batch), head, batch.completion_ids, logit_softcap=logit_softcap_of(model)
        )
        for row, n in enumerate(batch.completion_mask.sum(1).tolist()):
            out.append(logps[row, :n].tolist())
    return out


@torch.no_grad()
def symmetric_jsd(
    model_a,
    model_b,
    prompts: Sequence[list[int]],
    completions: Sequence[list[int]],
    *,
    pad_id: int,
    batch_size: int = 8,
) -> list[list[float]]:
    """Token-level JSD(p_a, p_b) with β = 0.5 (symmetric, ∈ [0, log 2]) along each completion."""
    from unisd.objective.losses import chunked_token_divergence

    out: list[list[float]] = []
    head_a, head_b = lm_head_of(model_a).weight, lm_head_of(model_b).weight
    for b in range(0, len(prompts), batch_size):
        batch = build_teacher_forcing_batch(
            prompts[b : b + batch_size], completions[b : b + batch_size], pad_id=pad_id
        ).to(head_a.device)
        mask = batch.completion_mask
        h_a = completion_hidden(model_a, batch)[mask]
        h_b = completion_hidden(model_b, batch)[mask]
        jsd = chunked_token_divergence(
            h_a, head_a, h_b, head_b, kind="jsd", beta=0.5, logit_softcap=logit_softcap_of(model_a)
        )
        out.extend(split_by_lengths(jsd, mask.sum(1).tolist()))
    return out


def _ci(ci) -> list[float]:
    return [float(ci.low), float(ci.high)]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _flat_mean(rows: Sequence[Sequence[float]]) -> float:
    return _mean([v for r in rows for v in r])


# ----------------------------------------------------------------------------------------------------------
# task scores


def score_items(
    records: Sequence[Record], samples: Sequence[Sequence[str]], cfg: EvalConfig
) -> dict[str, Any]:
    """Per-item primary scores ∈ [0, 1] for one benchmark (records of one task kind), by the task kind:
    code = pass@1 by sandboxed execution (+ pass@k), multiple choice = letter accuracy (unparseable
    counted), tool use = call F1 (+ name/argument F1, exact match)."""
    from unisd import tasks

    kinds = {r.task_kind for r in records}
    if len(kinds) != 1:
        raise ValueError(f"score_items needs records of one task kind, got {sorted(kinds)}")
    return tasks.kind(kinds.pop()).score(records, samples, cfg)


# ----------------------------------------------------------------------------------------------------------
# the stages: eval (the model answers and is measured; no model-written code runs) → grade (the answers are
# scored by the task kind; code answers run in the sandbox). A cluster runs them in separate pods, so only the
# grade pod — sandbox image, no shared volume, no credentials, egress denied — executes model-written code.

SAMPLES_FILE, MEASURES_FILE = "samples.jsonl", "measures.json"


def eval_source(prepared_dir: str | Path, benchmark: str) -> Path:
    return Path(prepared_dir) / "eval" / f"{benchmark}.jsonl"


def load_eval_records(source: Path, limit: int | None) -> list[Record]:
    records = [Record.from_dict(r, source=str(source), line=i + 1) for i, r in enumerate(read_jsonl(source))]
    records = records[:limit] if limit is not None else records
    if not records:
        raise ValueError(f"{source}: no evaluation items")
    return records


def sample_answers(model, tokenizer, prompts, cfg: EvalConfig, *, progress: Path, key: str):
    """(greedy ids + finished, [greedy text, n − 1 sampled texts] per prompt); every batch kept in `progress`."""
    generated = generate_completions(
        model, tokenizer, prompts, cfg, progress_file=progress / "greedy.jsonl", progress_key=key
    )
    samples = [[tokenizer.decode(ids, skip_special_tokens=True)] for ids, _ in generated]
    for j in range(cfg.num_samples - 1):
        extra = generate_completions(
            model,
            tokenizer,
            prompts,
            # generation seeds each batch with seed + first_index: offsets this far apart keep
            # every round's batches on distinct seeds (identical seeds = identical samples).
            cfg.model_copy(update={"seed": cfg.seed + 1_000_003 * (j + 1)}),
            sample=True,
            progress_file=progress / f"sample-{j + 1}.jsonl",
            progress_key=key,
        )
        for sample, (ids, _) in zip(samples, extra):
            sample.append(tokenizer.decode(ids, skip_special_tokens=True))
    return generated, samples


def reference_fit(model, tokenizer, records, prompts) -> dict[str, float]:
    """NLL / perplexity of each record's gold completion (the task kind's fit target) under teacher forcing."""
    from unisd import tasks

    gold = [
        tokenizer(tasks.of(r).fit_target(r), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        for r in records
    ]
    nll = _mean([-_mean(lp) for lp in sequence_logprobs(model, prompts, gold, pad_id=tokenizer.pad_token_id)])
    return {"reference_nll": nll, "reference_ppl": math.exp(nll)}


def retention(
    model, base_model, tokenizer, prompts, greedy_ids, cfg: EvalConfig, *, progress: Path, base_key: str
):
    """What the adapted model kept of the base: log p_base of its greedy answers (PPL_ret), the token-level
    symmetric JSD, and (retention_reverse) log p_ft of the base model's own greedy answers."""
    pad_id = tokenizer.pad_token_id
    logp_base = _flat_mean(sequence_logprobs(base_model, prompts, greedy_ids, pad_id=pad_id))
    out = {
        "retention_logp_base": logp_base,
        "retention_ppl": math.exp(-logp_base),
        "retention_jsd": _flat_mean(symmetric_jsd(base_model, model, prompts, greedy_ids, pad_id=pad_id)),
    }
    if cfg.retention_reverse:
        base_generated = generate_completions(
            base_model,
            tokenizer,
            prompts,
            cfg,
            progress_file=progress / "base-greedy.jsonl",
            progress_key=base_key,
        )
        base_ids = [ids or [tokenizer.eos_token_id] for ids, _ in base_generated]
        out["reverse_logp_ft_on_base"] = _flat_mean(
            sequence_logprobs(model, prompts, base_ids, pad_id=pad_id)
        )
    return out


def run_eval(
    cfg: EvalConfig,
    *,
    model_spec: str,
    benchmark: str,
    prepared_dir: str | Path,
    out_dir: str | Path,
    base_spec: str | None = None,
    model=None,
    tokenizer=None,
    base_model=None,
) -> dict[str, Any]:
    """Both stages in this process: eval into `out_dir/samples/`, then grade into `out_dir` (results.json,
    completions.jsonl, table.md). The CLI and experiments use this; the pipeline runs the two in two pods."""
    samples_dir = Path(out_dir) / "samples"
    generate_samples(
        cfg,
        model_spec=model_spec,
        benchmark=benchmark,
        prepared_dir=prepared_dir,
        out_dir=samples_dir,
        base_spec=base_spec,
        model=model,
        tokenizer=tokenizer,
        base_model=base_model,
    )
    return grade_samples(
        cfg, benchmark=benchmark, prepared_dir=prepared_dir, samples_dir=samples_dir, out_dir=out_dir
    )


def generate_samples(
    cfg: EvalConfig,
    *,
    model_spec: str,
    benchmark: str,
    prepared_dir: str | Path,
    out_dir: str | Path,
    base_spec: str | None = None,
    model=None,
    tokenizer=None,
    base_model=None,
) -> dict[str, Any]:
    """Eval stage: `model_spec` answers `prepared_dir/eval/<benchmark>.jsonl` (greedy + n − 1 samples), and
    is measured by reference fit and retention (against `base_spec`). Runs no model-written code.

    Writes samples.jsonl ({id, samples, finished}) and measures.json (model, benchmark, fit, retention, eval_s);
    returns the measures."""
    from unisd.artifacts import begin_stage, model_fingerprint, read_json
    from unisd.models import load_model, load_tokenizer

    out_dir = Path(out_dir)
    source = eval_source(prepared_dir, benchmark)
    config = {
        **cfg.model_dump(),
        "model": model_spec,
        "base": base_spec,
        "base_fingerprint": model_fingerprint(base_spec) if base_spec else None,
        "benchmark": benchmark,
    }
    stage = begin_stage("eval", out_dir, config=config, inputs=[source], model=model_spec)
    if stage.done and (out_dir / MEASURES_FILE).exists():
        log.info("eval %s: %s is complete for these inputs", benchmark, out_dir)
        return read_json(out_dir / MEASURES_FILE)
    timer = stage.timer
    records = load_eval_records(source, cfg.limit)
    with timer("load"):
        tokenizer = tokenizer or load_tokenizer(model_spec)
        model = (model or load_model(model_spec)).eval()
    prompts = [encode_prompt(tokenizer, student_messages(r)) for r in records]
    # per-batch progress: a killed eval resumes where it stopped (on a cluster: on the cache PVC)
    progress = progress_dir(out_dir, f"eval-{stage.inputs_hash[:16]}") / "progress"
    with timer("generate"):
        generated, samples = sample_answers(model, tokenizer, prompts, cfg, progress=progress, key=model_spec)
    measures = {
        "benchmark": benchmark,
        "model": model_spec,
        **measure_answers(
            model,
            tokenizer,
            records,
            prompts,
            generated,
            cfg,
            timer=timer,
            progress=progress,
            model_spec=model_spec,
            base_spec=base_spec,
            base_model=base_model,
        ),
    }
    measures["eval_s"] = round(sum(timer.timings.values()), 1)  # this process's wall time (load → retention)
    rows = [
        {"id": r.id, "samples": s, "finished": done} for r, s, (_, done) in zip(records, samples, generated)
    ]
    write_jsonl(out_dir / SAMPLES_FILE, rows)
    write_json(out_dir / MEASURES_FILE, measures)
    stage.finish(counts={"items": len(records)})
    shutil.rmtree(progress, ignore_errors=True)  # everything it held is in samples.jsonl now
    return measures


def measure_answers(
    model,
    tokenizer,
    records,
    prompts,
    generated,
    cfg: EvalConfig,
    *,
    timer,
    progress: Path,
    model_spec: str,
    base_spec,
    base_model,
) -> dict[str, Any]:
    """Reference fit (the gold completions' NLL) and retention against `base_spec` (of the greedy answers)."""
    from unisd.models import load_model

    out: dict[str, Any] = {}
    if cfg.reference_fit:
        with timer("fit"):
            out.update(reference_fit(model, tokenizer, records, prompts))
    if cfg.retention and base_spec and base_spec != model_spec:
        with timer("retention"):
            base_model = (base_model or load_model(base_spec)).eval()
            greedy_ids = [ids or [tokenizer.eos_token_id] for ids, _ in generated]
            out.update(
                retention(
                    model,
                    base_model,
                    tokenizer,
                    prompts,
                    greedy_ids,
                    cfg,
                    progress=progress,
                    base_key=base_spec,
                )
            )
    return out


def grade_samples(
    cfg: EvalConfig,
    *,
    benchmark: str,
    prepared_dir: str | Path,
    samples_dir: str | Path,
    out_dir: str | Path,
) -> dict[str, Any]:
    """Grade stage: score the eval stage's samples by the task kind (code: pass@1 by sandboxed execution),
    with a bootstrap CI, next to its measures. Loads no model.

    Writes results.json ({aggregate, per_item, sandbox}), completions.jsonl, table.md; returns the results."""
    from unisd.artifacts import begin_stage, read_json
    from unisd.metrics import bootstrap_ci

    out_dir, samples_dir = Path(out_dir), Path(samples_dir)
    source = eval_source(prepared_dir, benchmark)
    samples_file, measures_file = samples_dir / SAMPLES_FILE, samples_dir / MEASURES_FILE
    stage = begin_stage(
        "grade",
        out_dir,
        config={**cfg.model_dump(), "benchmark": benchmark},
        inputs=[source, samples_file, measures_file],
    )
    if stage.done and (out_dir / "results.json").exists():
        log.info("grade %s: %s is complete for these inputs", benchmark, out_dir)
        return read_json(out_dir / "results.json")
    records = load_eval_records(source, cfg.limit)
    samples = _samples_of(records, samples_file)
    measures = read_json(measures_file)
    with stage.timer("score"):
        scored = score_items(records, samples, cfg)
    per_item = scored["per_item"]  # [{id, score, ...}], score ∈ [0, 1] (primary metric)
    primary = [row["score"] for row in per_item]
    aggregate: dict[str, Any] = {
        "benchmark": benchmark,
        "model": measures["model"],
        "items": len(records),
        "metric": scored["metric"],
        "score": _mean(primary),
        "score_ci95": _ci(bootstrap_ci(primary, n_resamples=cfg.bootstrap_samples, seed=cfg.seed)),
        **scored.get("aggregate", {}),
        **{k: v for k, v in measures.items() if k not in ("benchmark", "model")},
    }
    rows = [
        {"id": r.id, "samples": s, **{k: v for k, v in row.items() if k != "id"}}
        for r, s, row in zip(records, samples, per_item)
    ]
    write_jsonl(out_dir / "completions.jsonl", rows)
    results = {"aggregate": aggregate, "per_item": per_item, "sandbox": scored.get("sandbox")}
    write_json(out_dir / "results.json", results)
    write_text(out_dir / "table.md", results_table([aggregate]))
    stage.finish(counts={"items": len(records)})
    return results


def _samples_of(records: Sequence[Record], samples_file: Path) -> list[list[str]]:
    """The samples of each record, in the records' order; refuses a file that answers other items."""
    by_id = {row["id"]: row["samples"] for row in read_jsonl(samples_file)}
    missing = [r.id for r in records if r.id not in by_id]
    if missing:
        raise ValueError(
            f"{samples_file}: no samples for item(s) {missing[:5]} (made for another eval split?)"
        )
    return [by_id[r.id] for r in records]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    if isinstance(v, list | tuple) and len(v) == 2:
        return f"[{_fmt(v[0])}, {_fmt(v[1])}]"
    return str(v)


def results_table(aggregates: Sequence[dict[str, Any]]) -> str:
    """Markdown table of eval aggregates (one row per benchmark × model)."""
    cols = [
        "benchmark",
        "model",
        "items",
        "metric",
        "score",
        "score_ci95",
        "unparseable",
        "reference_nll",
        "retention_ppl",
        "retention_jsd",
        "eval_s",
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for agg in aggregates:
        lines.append("| " + " | ".join(_fmt(agg.get(c, "")) for c in cols) + " |")
    return "\n".join(lines) + "\n"
