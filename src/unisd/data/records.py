"""The one record type every benchmark loads into, and the stages pass along.

A `Record` is plain data (JSON-serialisable through `to_dict` / `from_dict`) so that stage artifacts
are JSONL files a user can read.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class Record:
    """One benchmark item.

    id          stable id, unique within the benchmark (e.g. "mbpp/601", "HumanEval/0")
    benchmark   a built-in benchmark (unisd.data.benchmarks.BENCHMARK_SPECS) or a user dataset's name
    split       "train" | "validation" | "test"
    question    the task as the student sees it (no chat formatting; `unisd.data.prompts` formats it)
    reference   the gold demonstration c* shown to the teacher (ALGORITHM.md: "Reasoning: ...\\nAnswer: X"
                for multiple choice, the gold code for code tasks, the gold calls for tool use)
    answer      the gold answer: a letter for multiple choice, code for code tasks, the gold calls
                rendered as text for tool use
    choices     multiple choice only: option texts, in the order shown (letters A, B, ...)
    tests       code only: MBPP asserts, or HumanEval's `test` source (one string)
    setup_code  code only: MBPP test_setup_code / imports needed by the tests
    entry_point code only: the function name the tests call
    gold_calls  tool use only: [{"name": str, "arguments": dict | None, "arguments_raw": str}]
    meta        anything else worth keeping (source file, line, subject, API docs, ...)
    task_kind   a module of unisd.tasks (multiple_choice, code, tool_use, ...); for a built-in benchmark
                it follows from the benchmark when left empty
    """

    id: str
    benchmark: str
    split: str
    question: str
    reference: str
    answer: str
    choices: list[str] | None = None
    tests: list[str] | None = None
    setup_code: str = ""
    entry_point: str | None = None
    gold_calls: list[dict[str, Any]] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    task_kind: str = ""

    def __post_init__(self) -> None:
        if not self.task_kind:
            from unisd.data.benchmarks import BENCHMARK_SPECS

            if self.benchmark not in BENCHMARK_SPECS:
                raise ValueError(
                    f"{self.id}: benchmark {self.benchmark!r} is not built in ({', '.join(BENCHMARK_SPECS)}), "
                    "so the record needs a task_kind"
                )
            self.task_kind = BENCHMARK_SPECS[self.benchmark].task_kind

    @property
    def answer_letter(self) -> str | None:
        return self.answer if self.task_kind == "multiple_choice" else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, row: dict[str, Any], *, source: str = "<dict>", line: int | None = None) -> Record:
        """Build a record from a dict, naming the source, line and field on bad input."""
        where = f"{source}" + (f", line {line}" if line is not None else "")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(row) - known)
        if unknown:
            raise ValueError(
                f"{where}: unknown record field(s) {unknown}; expected a subset of {sorted(known)}"
            )
        for name in ("id", "benchmark", "split", "question", "reference", "answer"):
            if name not in row:
                raise ValueError(f"{where}: missing required field '{name}'")
            if not isinstance(row[name], str):
                raise ValueError(f"{where}: field '{name}' must be a string, got {type(row[name]).__name__}")
        from unisd.data.benchmarks import BENCHMARK_SPECS
        from unisd.tasks import KINDS

        kind = row.get("task_kind") or ""
        if kind and kind not in KINDS:
            raise ValueError(f"{where}: field 'task_kind' is {kind!r}; expected one of {sorted(KINDS)}")
        if not kind and row["benchmark"] not in BENCHMARK_SPECS:
            raise ValueError(
                f"{where}: field 'benchmark' is {row['benchmark']!r}, not a built-in benchmark "
                f"({', '.join(BENCHMARK_SPECS)}); a user dataset's record needs a task_kind"
            )
        return cls(**row)
