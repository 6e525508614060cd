"""The K auxiliary views of every item: their context texts (random donors, retrieval neighbours, induced
instructions) and their token ids (a_k in front of the student prompt x), dropping items whose view is over
the length limit (never truncated).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from unisd.contexts.induced import draw_induced
from unisd.contexts.retrieval import random_donors, retrieve
from unisd.data import context_messages, encode_prompt, solved_example
from unisd.data.records import Record


def build_view_texts(
    kind: str,
    records: list[Record],
    cfg,
    *,
    retriever: str,
    model_dir: Path | None,
    pool: Sequence[dict[str, Any]] | None,
) -> list[list[tuple[str, str | None]]]:
    """Per record (all of one benchmark): K (context text, context id) pairs."""
    ids = [r.id for r in records]
    if kind == "random":
        donors = random_donors(ids, cfg.num_views, cfg.seed)
        return [[(solved_example(records[d]), f"random:{records[d].id}") for d in ds] for ds in donors]
    if kind == "retrieval":
        neighbours = retrieve(records, cfg.num_views * cfg.demo_k, retriever, model_dir)
        out = []
        for nb in neighbours:
            views = []
            for k in range(cfg.num_views):
                chosen = nb[k * cfg.demo_k : (k + 1) * cfg.demo_k]
                text = "\n\n".join(solved_example(records[j], number=m + 1) for m, j in enumerate(chosen))
                views.append((text, "retrieval:" + "|".join(records[j].id for j in chosen)))
            out.append(views)
        return out
    entries = list(pool or [])
    out = []
    for item_id in ids:
        picks = draw_induced(item_id, entries, cfg.num_views, cfg.seed)
        out.append(
            [
                (entries[p]["instruction"], f"induced:{entries[p]['benchmark']}:{entries[p]['index']}")
                for p in picks
            ]
        )
    return out


def context_texts(
    cfg, by_benchmark: dict[str, list[Record]], *, retriever: str, model_dir: Path | None, pool
) -> dict[str, list[tuple[str, str | None]]]:
    """{item id: K (context text, context id)}, per benchmark (donors come from the item's own benchmark).

    A retrieval context id is kept only when several rows share it (then its KV prefix is worth caching)."""
    texts: dict[str, list[tuple[str, str | None]]] = {}
    for bench, recs in by_benchmark.items():
        bench_pool = [e for e in pool if e["benchmark"] == bench] if pool is not None else None
        views = build_view_texts(
            cfg.kind, recs, cfg, retriever=retriever or "", model_dir=model_dir, pool=bench_pool
        )
        texts.update({rec.id: v for rec, v in zip(recs, views)})
    if cfg.kind == "retrieval":
        uses = Counter(cid for views in texts.values() for _, cid in views)
        texts = {i: [(t, cid if uses[cid] > 1 else None) for t, cid in v] for i, v in texts.items()}
    return texts


def encode_views(
    cfg, records: Sequence[Record], texts: dict[str, list[tuple[str, str | None]]], tokenizer
) -> tuple[list[Record], dict[str, list[dict[str, Any]]], list[dict[str, Any]]]:
    """(kept records, {id: K view dicts with prompt_ids}, dropped rows) under max_context_prompt_tokens."""
    ctx_kind = "instruction" if cfg.kind == "induced" else "examples"
    kept, views_of, dropped = [], {}, []
    for rec in records:
        views = [
            {
                "kind": cfg.kind,
                "context_id": cid,
                "text": text,
                "prompt_ids": encode_prompt(tokenizer, context_messages(rec, text, kind=ctx_kind)),
            }
            for text, cid in texts[rec.id]
        ]
        too_long = [
            len(v["prompt_ids"]) for v in views if len(v["prompt_ids"]) > cfg.max_context_prompt_tokens
        ]
        if too_long:
            reasons = [
                f"context prompt {n} > max_context_prompt_tokens {cfg.max_context_prompt_tokens}"
                for n in too_long
            ]
            dropped.append({"id": rec.id, "stage": "contexts", "reasons": reasons})
            continue
        kept.append(rec)
        views_of[rec.id] = views
    return kept, views_of, dropped
