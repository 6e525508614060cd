"""Extending unisd where the structure says it is cheap: a new task kind is one module in `unisd.tasks`, a new
benchmark of an existing kind is one BenchmarkSpec entry plus its loader — nothing else changes."""

from __future__ import annotations

import sys
import textwrap

import pytest

from unisd import tasks
from unisd.data import benchmarks
from unisd.data.prompts import gold_completion, student_prompt
from unisd.data.records import Record

# A whole task kind in one file: "echo" — answer with the word in quotes; scored by exact match.
ECHO_KIND = """
KIND = "echo"


def validate(record):
    if not record.answer:
        raise ValueError(f"{record.id}: an echo record needs an answer")


def task_text(record):
    return record.question


def format_instruction(record):
    return "Reply with the quoted word only."


def gold_completion(record):
    return record.answer


fit_target = gold_completion
retrieval_text = task_text
solved_task = task_text


def score(records, samples, settings=None):
    per_item = [{"id": r.id, "score": float(s[0].strip() == r.answer)} for r, s in zip(records, samples)]
    return {"metric": "exact", "per_item": per_item, "aggregate": {}}


def negative_strategies(record, count, seed):
    return ["reversed"] * count


def negative_request(record, strategy):
    return [{"role": "user", "content": f"Write the word {record.answer!r} backwards."}]


def judge_negative(record, reasoning, answer, raw, cfg):
    text = (answer or raw).strip()
    if text == record.answer:
        return {"answer": text, "why": "the gold answer"}
    return {"answer": text, "text": text, "valid": True, "validated": True}


def fallback_negative(record, cfg):
    return {"text": record.answer[::-1], "answer": record.answer[::-1], "validated": True, "how": "reversed"}
"""


@pytest.fixture()
def echo_kind(tmp_path, monkeypatch):
    (tmp_path / "echo.py").write_text(textwrap.dedent(ECHO_KIND))
    monkeypatch.setattr(tasks, "__path__", [*tasks.__path__, str(tmp_path)])
    monkeypatch.setattr(tasks, "KINDS", dict(tasks.KINDS))
    tasks.discover()
    yield tasks.kind("echo")
    sys.modules.pop("unisd.tasks.echo", None)


def test_a_new_task_kind_is_one_module(echo_kind):
    from unisd.contexts import fallback_negative, judge_candidate
    from unisd.evaluate import EvalConfig, score_items

    rec = Record(
        id="e/1",
        benchmark="echo-words",
        split="train",
        question='Say "blue".',
        reference="blue",
        answer="blue",
        task_kind="echo",
    )
    assert Record.from_dict(rec.to_dict()).task_kind == "echo"
    assert student_prompt(rec) == 'Say "blue".\n\nReply with the quoted word only.'
    assert gold_completion(rec) == "blue"
    scored = score_items([rec, rec], [["blue"], ["red"]], EvalConfig())
    assert [r["score"] for r in scored["per_item"]] == [1.0, 0.0]
    assert judge_candidate(rec, "reversed", '{"reasoning": "", "answer": "eulb"}', None)["valid"]
    assert not judge_candidate(rec, "reversed", '{"reasoning": "", "answer": "blue"}', None)["valid"]
    assert fallback_negative(rec, None)["text"] == "eulb"


def test_a_new_benchmark_of_an_existing_kind_is_one_table_entry(monkeypatch, tmp_path):
    def load_capitals(split, data_dir, seed):
        rows = [("France", "Paris", ["Paris", "Rome"]), ("Italy", "Rome", ["Madrid", "Rome"])]
        return [
            Record(
                id=f"capitals/{i}",
                benchmark="capitals",
                split=benchmarks.assign_split(f"capitals/{i}"),
                question=f"What is the capital of {country}?",
                reference=f"Answer: {'AB'[choices.index(city)]}",
                answer="AB"[choices.index(city)],
                choices=choices,
            )
            for i, (country, city, choices) in enumerate(rows)
        ]

    spec = benchmarks.BenchmarkSpec(
        "capitals",
        "multiple_choice",
        ("train", "validation", "test", "all"),
        "test",
        load_capitals,
        seeded_split=True,
    )
    monkeypatch.setitem(benchmarks.BENCHMARK_SPECS, "capitals", spec)
    records = benchmarks.load_benchmark("capitals", "all")
    assert [r.task_kind for r in records] == ["multiple_choice"] * 2
    assert "Choices:\n(A) Paris\n(B) Rome" in student_prompt(records[0])
