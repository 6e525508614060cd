"""Negative demonstrations c⁻: plausible but wrong answers written by the model itself, judged by the task
kind (multiple choice: a wrong letter; code: fails the tests in the sandbox; tool use: calls that differ from
the gold ones). One acceptable candidate per item is drawn with a fixed seed; when none is acceptable, the
task kind's deterministic corruption of the gold answer is used instead (`"source": "fallback"`).
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from unisd import tasks
from unisd.contexts.induced import sample_texts
from unisd.data import encode_prompt, negative_messages
from unisd.data.records import Record
from unisd.tasks._shared import parse_structured


def judge_candidate(record: Record, strategy: str, raw: str, cfg) -> dict[str, Any]:
    """Parse one generated negative and let the task kind decide whether it is an acceptable negative.

    Returns {"strategy", "raw", "reasoning", "answer", "text", "valid", "validated", "why"}: `text` is the
    demonstration shown to the negative teacher, formatted like the gold reference; validated is True when
    checked wrong, None when no check was possible (the sandbox could not run the tests)."""
    reasoning, answer = parse_structured(raw)
    verdict: dict[str, Any] = {
        "strategy": strategy,
        "raw": raw,
        "reasoning": reasoning,
        "answer": None,
        "text": None,
        "valid": False,
        "validated": None,
        "why": "",
    }
    verdict.update(tasks.of(record).judge_negative(record, reasoning, answer, raw, cfg))
    return verdict


def fallback_negative(record: Record, cfg) -> dict[str, Any]:
    """A deterministic corrupted gold answer (the task kind's), for items with no acceptable candidate."""
    return tasks.of(record).fallback_negative(record, cfg)


def choose_negative(item_id: str, candidates: Sequence[dict[str, Any]], seed: int) -> dict[str, Any] | None:
    """One acceptable candidate drawn with a per-item seed (fixed for the whole run), or None."""
    valid = [c for c in candidates if c["valid"]]
    return random.Random(f"{seed}:negative:{item_id}").choice(valid) if valid else None


def generate_candidates(
    records: Sequence[Record], cfg, *, model, tokenizer, cache_model: str | None = None
) -> list[tuple[Record, str, str]]:
    """(record, strategy, raw reply) for `negatives_per_item` requests per record, sampled in batches (through
    the cross-run sample cache when `cache_model`, the model's fingerprint, is given)."""
    requests = [
        (rec, s)
        for rec in records
        for s in tasks.of(rec).negative_strategies(rec, cfg.negatives_per_item, cfg.seed)
    ]
    prompts = [encode_prompt(tokenizer, tasks.of(rec).negative_request(rec, s)) for rec, s in requests]
    raws = sample_texts(
        model,
        tokenizer,
        prompts,
        max_new_tokens=cfg.negative_max_tokens,
        temperature=cfg.temperature,
        batch_size=cfg.batch_size,
        seed=cfg.seed + 1,
        desc="negative demonstrations",
        decode=cfg.decode,
        cache_model=cache_model,
    )
    return [(rec, s, raw) for (rec, s), raw in zip(requests, raws)]


def pick_negatives(
    records: Sequence[Record], generated: Sequence[tuple[Record, str, str]], cfg, tokenizer
) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Judge every candidate, choose one per record (or the fallback), encode its negative-teacher prompt.

    Returns ({id: negative}, candidate rows for inspection, rows dropped for max_negative_prompt_tokens)."""
    by_item: dict[str, list[dict[str, Any]]] = defaultdict(list)
    candidate_rows = []
    for rec, strategy, raw in tqdm(generated, desc="checking negatives", unit="cand"):
        verdict = judge_candidate(rec, strategy, raw, cfg)
        by_item[rec.id].append(verdict)
        candidate_rows.append({"id": rec.id, **verdict})
    negatives, dropped = {}, []
    for rec in records:
        chosen = choose_negative(rec.id, by_item[rec.id], cfg.seed)
        if chosen is not None:
            neg = {
                "text": chosen["text"],
                "answer": chosen["answer"],
                "validated": chosen["validated"],
                "source": "model",
                "strategy": chosen["strategy"],
            }
        else:
            fb = fallback_negative(rec, cfg)
            neg = {
                "text": fb["text"],
                "answer": fb["answer"],
                "validated": fb["validated"],
                "source": "fallback",
                "strategy": fb["how"],
            }
        neg["prompt_ids"] = encode_prompt(tokenizer, negative_messages(rec, neg["text"]))
        if len(neg["prompt_ids"]) > cfg.max_negative_prompt_tokens:
            reason = f"negative prompt {len(neg['prompt_ids'])} > max_negative_prompt_tokens {cfg.max_negative_prompt_tokens}"
            dropped.append({"id": rec.id, "stage": "contexts", "reasons": [reason]})
            continue
        negatives[rec.id] = neg
    return negatives, candidate_rows, dropped
