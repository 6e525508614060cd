"""Task kinds: one module per kind, each owning everything that differs between kinds.

    multiple_choice  CommonsenseQA, ScienceQA, GPQA
    code             MBPP, HumanEval
    tool_use         ToolAlpaca

A task kind module defines `KIND` (its name) and these functions of a `Record`:

    validate(record)                              raise ValueError naming the field that is wrong
    task_text(record) / format_instruction(record)  the student prompt x = task + answer-format instruction
    gold_completion(record)                       the gold answer in the student's answer format (SFT target)
    fit_target(record)                            the text whose NLL the eval reports as reference fit
    retrieval_text(record) / solved_task(record)  what retrieval embeds; how a donor is shown in a context
    score(records, samples, settings)             {"metric", "per_item": [{"id", "score", ...}], "aggregate"}
    negative_strategies(record, count, seed)      what each negative-demonstration request asks for
    negative_request(record, strategy)            the messages asking the model for one negative
    judge_negative(record, reasoning, answer, raw, cfg)  {"answer", "text", "valid", "validated", "why"}
    fallback_negative(record, cfg)                a deterministic wrong answer: {"text", "answer", "validated", "how"}

Adding a task kind is adding one module here: it is found by its file (any module not starting with "_").
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

from unisd.data.records import Record

KINDS: dict[str, ModuleType] = {}


def discover() -> dict[str, ModuleType]:
    """Import every task kind module on this package's path (run at import; again after extending it)."""
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            module = importlib.import_module(f"{__name__}.{info.name}")
            KINDS[module.KIND] = module
    return KINDS


discover()


def kind(name: str) -> ModuleType:
    """The task kind module called `name`."""
    if name not in KINDS:
        raise ValueError(f"unknown task kind {name!r}; known kinds: {', '.join(sorted(KINDS))}")
    return KINDS[name]


def of(record: Record) -> ModuleType:
    """The task kind module of `record`."""
    return kind(record.task_kind)
