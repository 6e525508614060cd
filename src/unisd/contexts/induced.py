"""Induced contexts: the model writes a short general instruction from a few solved examples; a pool of such
instructions per benchmark (cached in `induced_pool.json` for the same inputs), each item's K views drawing
distinct ones.
"""

from __future__ import annotations

import logging
import random
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from unisd.artifacts import read_json, write_json
from unisd.data import encode_prompt, solved_example
from unisd.data.records import Record

if TYPE_CHECKING:
    from unisd.rollout import DecodePath

log = logging.getLogger(__name__)


def sample_texts(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    batch_size: int,
    seed: int,
    desc: str,
    decode: DecodePath = "hf",
    cache_model: str | None = None,
) -> list[str]:
    """One sampled completion per prompt, decoded. Prompts are batched by length (less padding); every
    batch's seed follows from its position, so the same prompts give the same texts. With `cache_model` (the
    model's fingerprint) every batch goes through the cross-run SampleCache: one already sampled is read back."""
    from unisd.contexts.sample_cache import SampleCache
    from unisd.rollout import RolloutConfig, generate, prompts_per_call

    cfg = RolloutConfig(
        backend="hf",
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        seed=seed,
        decode=decode,
    )
    # the weights' dtype is part of the key: bf16 weights sample other texts than fp32 ones (contexts.dtype)
    weights = str(next(model.parameters()).dtype).removeprefix("torch.")
    key = {**cfg.model_dump(mode="json"), "weights": weights}
    cache = SampleCache(cache_model, key) if cache_model else None
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    texts: list[str] = [""] * len(prompts)
    per_call = prompts_per_call(cfg)
    with tqdm(total=len(prompts), desc=desc, unit="prompt") as bar:
        for b in range(0, len(order), per_call):
            chunk = order[b : b + per_call]
            batch = [prompts[i] for i in chunk]
            written = cache.get(batch, b) if cache else None
            if written is None:
                results = generate(model, tokenizer, batch, cfg, first_index=b)
                written = [
                    tokenizer.decode(ids, skip_special_tokens=True) for ids, _finished, _logps in results
                ]
                if cache:
                    cache.put(batch, b, written)
            for i, text in zip(chunk, written):
                texts[i] = text
            bar.update(len(chunk))
    if cache and cache.hits:
        log.info(
            "%s: %d of %d batches read from the sample cache", desc, cache.hits, -(-len(order) // per_call)
        )
    return texts


def induction_messages(examples: Sequence[Record]) -> list[dict[str, str]]:
    """Ask the model for one general 3–4 sentence instruction from a few solved examples."""
    shown = "\n\n".join(solved_example(r, number=i + 1) for i, r in enumerate(examples))
    content = (
        "You are given several solved tasks of the same kind, each with its correct response.\n\n"
        "## Examples (reference only; do NOT solve them)\n\n"
        f"{shown}\n\n-----\n## Your task\n"
        "Write ONE concise, general instruction of 3-4 sentences that would help someone solve similar "
        "tasks correctly.\n"
        "- Give general rules for reasoning and for the format of the answer.\n"
        "- Do not mention names, values or details of these particular examples.\n"
        "- Do not write code, tool calls or an answer choice.\n\n"
        "Output only the instruction text, nothing else."
    )
    return [{"role": "user", "content": content}]


def clean_instruction(text: str) -> str:
    """Strip a generated instruction of wrapping quotes/fences and an "Instruction:" / "Output:" label."""
    text = text.strip().strip("`").strip()
    text = re.sub(
        r"^\s*(\*\*)?((general\s+)?instruction|output)(\*\*)?\s*:\s*(\*\*)?\s*", "", text, flags=re.I
    )
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1]
    return text.strip()


def induction_demo_sets(ids: Sequence[str], pool_size: int, num_demos: int, seed: int) -> list[list[int]]:
    """`pool_size` demo sets of `num_demos` indices: disjoint while the items last (as the reference does),
    then fresh random samples."""
    n = len(ids)
    k = min(num_demos, n)
    rng = random.Random(f"{seed}:induced")
    perm = rng.sample(range(n), n)
    sets = [perm[i * k : (i + 1) * k] for i in range(min(pool_size, n // k))]
    while len(sets) < pool_size:
        sets.append(rng.sample(range(n), k))
    return sets


def build_induced_pool(
    by_benchmark: dict[str, list[Record]], cfg, *, model, tokenizer
) -> list[dict[str, Any]]:
    """Generate the induced-instruction pool: [{"benchmark", "index", "donors", "instruction"}], with at
    least K entries per benchmark (so every item can get K different instructions) and at most
    induced_pool_size. Empty generations are discarded."""
    requests: list[tuple[str, list[int]]] = []
    for bench, recs in by_benchmark.items():
        size = min(cfg.induced_pool_size, max(cfg.num_views, len(recs) // cfg.induced_num_demos))
        for demo_set in induction_demo_sets([r.id for r in recs], size, cfg.induced_num_demos, cfg.seed):
            requests.append((bench, demo_set))
    prompts = [
        encode_prompt(tokenizer, induction_messages([by_benchmark[b][j] for j in demo_set]))
        for b, demo_set in requests
    ]
    texts = sample_texts(
        model,
        tokenizer,
        prompts,
        max_new_tokens=cfg.induced_max_tokens,
        temperature=cfg.temperature,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        desc="inducing instructions",
        decode=cfg.decode,
    )
    pool: list[dict[str, Any]] = []
    per_bench: Counter[str] = Counter()
    for (bench, demo_set), raw in zip(requests, texts):
        instruction = clean_instruction(raw)
        if not instruction:
            continue
        pool.append(
            {
                "benchmark": bench,
                "index": per_bench[bench],
                "donors": [by_benchmark[bench][j].id for j in demo_set],
                "instruction": instruction,
            }
        )
        per_bench[bench] += 1
    missing = [b for b in by_benchmark if per_bench[b] == 0]
    if missing:
        raise ValueError(f"instruction induction produced only empty instructions for {missing}")
    return pool


def draw_induced(item_id: str, entries: Sequence[dict[str, Any]], num_views: int, seed: int) -> list[int]:
    """K pool positions for one item: distinct when the pool allows; entries induced from this item itself
    are avoided (they could echo its gold answer) unless nothing else is left."""
    rng = random.Random(f"{seed}:induced-draw:{item_id}")
    clean = [i for i, e in enumerate(entries) if item_id not in e["donors"]] or list(range(len(entries)))
    if len(clean) >= num_views:
        return rng.sample(clean, num_views)
    return [rng.choice(clean) for _ in range(num_views)]


def load_or_build_pool(
    path: Path, pool_hash: str, by_benchmark: dict[str, list[Record]], cfg, *, get_model, tokenizer
) -> tuple[list[dict[str, Any]], bool]:
    """(pool, reused): induced_pool.json when it was written for the same inputs, else a new pool."""
    if path.exists():
        cached = read_json(path)
        if isinstance(cached, dict) and cached.get("inputs_hash") == pool_hash:
            return cached["entries"], True
        log.info("%s was built from other inputs; inducing a new pool", path)
    pool = build_induced_pool(by_benchmark, cfg, model=get_model(), tokenizer=tokenizer)
    write_json(path, {"inputs_hash": pool_hash, "entries": pool})
    return pool, False
