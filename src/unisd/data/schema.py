"""The dataset format of user datasets: one pydantic model per task kind (schema version `SCHEMA_VERSION`).

Every row of a user dataset is validated against the model of its kind, after the dataset's column
mapping (`columns: {field: your_column}`), then turned into a `Record` (`to_record`). docs/datasets.md
documents the fields; docs/schemas/<kind>.v<version>.schema.json are these models as JSON Schema
(`json_schemas`, kept in sync by a test).

    multiple_choice  question, choices, answer (letter, 0-based index or the choice's text), explanation?
    code             prompt, entry_point, tests, reference_solution?, setup_code?
    tool_use         tools, request, gold_calls [{name, arguments}]
    free_form        prompt, answer (the reference answer), explanation?, wrong_answers?

Every kind also takes an optional `id` (unique in the dataset; default: a hash of the task fields) and
an optional `split` (train | validation | test; dev, val and valid mean validation). Columns that are no
field of the kind are ignored. A CSV cell can hold a list field as a JSON array (`["sea", "sky"]`).
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from unisd.data.records import Record
from unisd.tasks.multiple_choice import LETTERS
from unisd.tasks.multiple_choice import reference as mc_reference_text

SCHEMA_VERSION = 1
SPLITS = ("train", "validation", "test")
SPLIT_ALIASES = {"dev": "validation", "val": "validation", "valid": "validation"}
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _text(value: Any, *, allow_empty: bool = False) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = str(value)  # a number in a text column (CSV and Parquet readers type such columns)
    if not isinstance(value, str):
        raise ValueError(f"must be text, got {type(value).__name__} {_short(value)}")
    if not allow_empty and not value.strip():
        raise ValueError("is empty")
    return value


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _maybe_json_list(value: Any) -> Any:
    """A CSV cell holding a JSON array ("[\\"a\\", \\"b\\"]") as the list it spells."""
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(f"looks like a JSON array but is not valid JSON ({err.msg})") from None
    return value


def _text_list(value: Any, *, min_len: int = 0) -> list[str]:
    value = _maybe_json_list(value)
    if not isinstance(value, list | tuple):
        raise ValueError(f"must be a list of texts, got {type(value).__name__} {_short(value)}")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"item {i} must be non-empty text, got {_short(item)}")
        out.append(item)
    if len(out) < min_len:
        raise ValueError(f"must have at least {min_len} items, got {len(out)}")
    return out


class UserRow(BaseModel):
    """Fields every kind shares."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    KIND: ClassVar[str] = ""
    TASK_FIELDS: ClassVar[tuple[str, ...]] = ()  # what the default id hashes

    id: str | int | None = Field(
        None, description="unique within the dataset; default: a hash of the task fields"
    )
    split: str | None = Field(
        None, description="train | validation | test (dev, val, valid = validation); default: the seeded rule"
    )

    @field_validator("id", mode="before")
    @classmethod
    def _id(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise ValueError(f"must be text or an integer, got {type(value).__name__} {_short(value)}")
        text = str(value).strip()
        if not text:
            raise ValueError("is empty")
        return text

    @field_validator("split", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        if not isinstance(value, str):
            raise ValueError(f"must be text, got {_short(value)}")
        name = SPLIT_ALIASES.get(value.strip().lower(), value.strip().lower())
        if name not in SPLITS:
            raise ValueError(
                f"{value!r} is not a split; expected one of {', '.join(SPLITS)} (or dev / val / valid)"
            )
        return name

    def content_id(self) -> str:
        """The default id: sha256 of the task fields, 12 hex digits (stable under reordering rows)."""
        payload = json.dumps([getattr(self, f) for f in self.TASK_FIELDS], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]

    def local_id(self) -> str:
        return self.id if self.id is not None else self.content_id()


class MultipleChoiceRow(UserRow):
    """A question with lettered options and one correct option."""

    KIND: ClassVar[str] = "multiple_choice"
    TASK_FIELDS: ClassVar[tuple[str, ...]] = ("question", "choices")

    question: str = Field(description="the question, without the options")
    choices: list[str] = Field(description="the option texts, shown as (A), (B), ... in this order (2-26)")
    answer: str | int = Field(
        description="the correct option: its letter (A, B, ...), its 0-based index, or its exact text"
    )
    explanation: str | None = Field(None, description="why the answer is right (the teacher's reasoning)")

    @field_validator("question", mode="before")
    @classmethod
    def _question(cls, value: Any) -> str:
        return _text(value)

    @field_validator("choices", mode="before")
    @classmethod
    def _choices(cls, value: Any) -> list[str]:
        choices = _text_list(value, min_len=2)
        if len(choices) > len(LETTERS):
            raise ValueError(f"has {len(choices)} options, more than the {len(LETTERS)} letters A-Z")
        if len({c.strip() for c in choices}) != len(choices):
            raise ValueError("has the same option twice")
        return choices

    @field_validator("answer", mode="before")
    @classmethod
    def _answer(cls, value: Any, info: ValidationInfo) -> str:
        choices = info.data.get("choices")
        if choices is None:
            return value  # the choices are invalid (reported on their own): nothing to check against
        return answer_letter(value, choices)

    @field_validator("explanation", mode="before")
    @classmethod
    def _explanation(cls, value: Any) -> str | None:
        return None if value is None else _text(value, allow_empty=True).strip() or None


def answer_letter(value: Any, choices: list[str]) -> str:
    """The letter of the correct option: a 0-based index (an int or digits) is an index; one capital letter is
    a letter; otherwise the text of exactly one option; otherwise one lower-case letter is a letter."""
    n = len(choices)
    letters = LETTERS[:n]
    if isinstance(value, bool):
        raise ValueError(f"must be a letter, an index or an option's text, got {value!r}")
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        index = int(value)
        if not 0 <= index < n:
            raise ValueError(f"{value!r} is not an index of the {n} choices (0-{n - 1})")
        return letters[index]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"must be a letter, an index or an option's text, got {_short(value)}")
    text = value.strip()
    matches = [i for i, c in enumerate(choices) if c.strip() == text]
    is_letter = len(text) == 1 and text.upper() in LETTERS
    if is_letter and (text.isupper() or not matches):
        if text.upper() not in letters:
            raise ValueError(f"{value!r} is not one of the {n} choices ({', '.join(letters)})")
        return text.upper()
    if len(matches) == 1:
        return letters[matches[0]]
    raise ValueError(
        f"{_short(value)} is neither a letter ({', '.join(letters)}), an index, nor one of the choices"
    )


class CodeRow(UserRow):
    """A Python function to write, checked by running tests."""

    KIND: ClassVar[str] = "code"
    TASK_FIELDS: ClassVar[tuple[str, ...]] = ("prompt", "entry_point")

    prompt: str = Field(description="the task, as the model sees it")
    entry_point: str = Field(description="the name of the function the tests call")
    tests: list[str] = Field(
        description="Python statements (e.g. asserts) run after the solution; all must pass. "
        "One string is one test program"
    )
    reference_solution: str | None = Field(
        None, description="a correct solution defining entry_point (needed to train on the row)"
    )
    setup_code: str = Field(
        "", description="code run after the solution and before the tests (imports, fixtures)"
    )
    show_tests: bool = Field(True, description="whether the prompt lists the tests (as MBPP does)")

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value: Any) -> str:
        return _text(value)

    @field_validator("entry_point", mode="before")
    @classmethod
    def _entry_point(cls, value: Any) -> str:
        name = _text(value).strip()
        if not IDENTIFIER.match(name):
            raise ValueError(f"{name!r} is not a Python function name")
        return name

    @field_validator("tests", mode="before")
    @classmethod
    def _tests(cls, value: Any) -> list[str]:
        value = _maybe_json_list(value)
        tests = [_text(value)] if isinstance(value, str) else _text_list(value, min_len=1)
        for i, test in enumerate(tests):
            where = f"test {i}" if len(tests) > 1 else "the test program"
            _check_python(test, where)
        return [t.replace("\r\n", "\n") for t in tests]

    @field_validator("reference_solution", mode="before")
    @classmethod
    def _solution(cls, value: Any, info: ValidationInfo) -> str | None:
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        code = _text(value).replace("\r\n", "\n")
        _check_python(code, "the solution")
        name = info.data.get("entry_point")
        if name and not re.search(rf"^(?:async\s+)?def\s+{re.escape(name)}\s*\(", code, re.M):
            raise ValueError(f"does not define the entry point {name}()")
        return code

    @field_validator("setup_code", mode="before")
    @classmethod
    def _setup(cls, value: Any) -> str:
        if value is None:
            return ""
        code = _text(value, allow_empty=True).replace("\r\n", "\n")
        if code.strip():
            _check_python(code, "the setup code")
        return code


def _check_python(code: str, what: str) -> None:
    try:
        ast.parse(code)
    except SyntaxError as err:
        raise ValueError(f"{what} is not valid Python (line {err.lineno}: {err.msg})") from None


class GoldCall(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="the tool called")
    arguments: dict[str, Any] = Field(
        default_factory=dict, description="the call's arguments (a JSON object)"
    )

    @field_validator("name", mode="before")
    @classmethod
    def _name(cls, value: Any) -> str:
        return _text(value).strip()

    @field_validator("arguments", mode="before")
    @classmethod
    def _arguments(cls, value: Any) -> dict[str, Any]:
        if value is None:
            return {}
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() else {}
            except json.JSONDecodeError as err:
                raise ValueError(f"is text but not a JSON object ({err.msg})") from None
        if not isinstance(value, dict):
            raise ValueError(f"must be a JSON object, got {type(value).__name__}")
        return value


class ToolUseRow(UserRow):
    """A request to answer by calling documented tools."""

    KIND: ClassVar[str] = "tool_use"
    TASK_FIELDS: ClassVar[tuple[str, ...]] = ("tools", "request")

    tools: str | list[dict[str, Any] | str] = Field(
        description="the tool documentation: text, or a list of tools ({name, description, parameters}, "
        "OpenAI function objects, or texts)"
    )
    request: str = Field(description="the user's request")
    gold_calls: list[GoldCall] = Field(description="the calls that answer the request, in order")
    api_name: str | None = Field(
        None, description="a name for the API (shown to retrieval); default: the dataset"
    )

    @field_validator("tools", mode="before")
    @classmethod
    def _tools(cls, value: Any) -> Any:
        value = _maybe_json_list(value)
        if isinstance(value, str):
            return _text(value)
        if not isinstance(value, list) or not value:
            raise ValueError(f"must be text or a non-empty list of tools, got {_short(value)}")
        for i, tool in enumerate(value):
            if isinstance(tool, dict):
                spec = tool.get("function", tool)
                if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
                    raise ValueError(f"tool {i} has no 'name'")
            elif not isinstance(tool, str) or not tool.strip():
                raise ValueError(f"tool {i} must be an object or non-empty text")
        return value

    @field_validator("request", mode="before")
    @classmethod
    def _request(cls, value: Any) -> str:
        return _text(value)

    @field_validator("gold_calls", mode="before")
    @classmethod
    def _calls(cls, value: Any) -> Any:
        value = _maybe_json_list(value)
        if not isinstance(value, list) or not value:
            raise ValueError(f"must be a non-empty list of calls, got {_short(value)}")
        return value

    def tool_docs(self) -> str:
        return render_tool_docs(self.tools)


def render_tool_docs(tools: str | list[dict[str, Any] | str]) -> str:
    """Tool documentation as text: "name: description\\nParameters: {json}" per tool."""
    if isinstance(tools, str):
        return tools.strip()
    blocks = []
    for tool in tools:
        if isinstance(tool, str):
            blocks.append(tool.strip())
            continue
        spec = tool.get("function", tool)
        line = f"{spec['name']}: {str(spec.get('description') or '').strip()}".rstrip(": ")
        params = spec.get("parameters")
        blocks.append(line + (f"\nParameters: {json.dumps(params, ensure_ascii=False)}" if params else ""))
    return "\n".join(blocks)


class FreeFormRow(UserRow):
    """A prompt answered in free text, scored against a reference answer."""

    KIND: ClassVar[str] = "free_form"
    TASK_FIELDS: ClassVar[tuple[str, ...]] = ("prompt",)

    prompt: str = Field(description="the task, as the model sees it")
    answer: str = Field(description="the reference answer")
    explanation: str | None = Field(
        None, description="reasoning leading to the answer (shown to the teacher)"
    )
    wrong_answers: list[str] = Field(
        default_factory=list, description="plausible wrong answers (used when the model writes none)"
    )

    @field_validator("prompt", "answer", mode="before")
    @classmethod
    def _required_text(cls, value: Any) -> str:
        return _text(value)

    @field_validator("explanation", mode="before")
    @classmethod
    def _explanation(cls, value: Any) -> str | None:
        return None if value is None else _text(value, allow_empty=True).strip() or None

    @field_validator("wrong_answers", mode="before")
    @classmethod
    def _wrong(cls, value: Any) -> list[str]:
        return [] if value is None else _text_list(value)


ROW_MODELS: dict[str, type[UserRow]] = {
    m.KIND: m for m in (MultipleChoiceRow, CodeRow, ToolUseRow, FreeFormRow)
}
KINDS: tuple[str, ...] = tuple(ROW_MODELS)


def row_model(kind: str) -> type[UserRow]:
    if kind not in ROW_MODELS:
        raise ValueError(f"unknown dataset kind {kind!r}; expected one of {', '.join(KINDS)}")
    return ROW_MODELS[kind]


def fields_of(kind: str) -> tuple[str, ...]:
    return tuple(row_model(kind).model_fields)


def required_fields(kind: str) -> tuple[str, ...]:
    return tuple(n for n, f in row_model(kind).model_fields.items() if f.is_required())


def infer_kind(columns: list[str] | set[str]) -> str:
    """The kind a table's columns (after the column mapping) spell, by the first rule that matches:
    `choices` → multiple_choice; `entry_point` or `tests` → code; `gold_calls` or `tools` → tool_use;
    `prompt` and `answer` → free_form. Raises ValueError when none does."""
    cols = set(columns)
    if "choices" in cols:
        return "multiple_choice"
    if cols & {"entry_point", "tests"}:
        return "code"
    if cols & {"gold_calls", "tools"}:
        return "tool_use"
    if {"prompt", "answer"} <= cols:
        return "free_form"
    raise ValueError(
        f"cannot tell the task kind from the columns {sorted(cols)}: set `kind:` "
        f"({', '.join(KINDS)}) and map your columns with `columns: {{field: your_column}}` "
        "(see docs/datasets.md)"
    )


def to_record(
    row: UserRow, *, dataset: str, split: str, meta: dict[str, Any], metric: str | None = None
) -> Record:
    """The `Record` of one validated row of dataset `dataset` (its id: "<dataset>/<row id>")."""
    ids = {"id": f"{dataset}/{row.local_id()}", "benchmark": dataset, "split": split}
    meta = dict(meta)  # each kind adds its own keys; the caller's dict stays as it was
    if isinstance(row, MultipleChoiceRow):
        return _multiple_choice_record(row, ids, meta)
    if isinstance(row, CodeRow):
        return _code_record(row, ids, meta)
    if isinstance(row, ToolUseRow):
        return _tool_use_record(row, ids, meta)
    if isinstance(row, FreeFormRow):
        return _free_form_record(row, ids, meta, metric)
    raise TypeError(f"no record conversion for {type(row).__name__}")


def _multiple_choice_record(row: MultipleChoiceRow, ids: dict[str, str], meta: dict[str, Any]) -> Record:
    """The Record of a multiple_choice row: the answer letter, the reference with its explanation."""
    if row.explanation:
        meta["explanation"] = row.explanation
    return Record(
        **ids,
        question=row.question.strip(),
        reference=mc_reference_text(str(row.answer), row.explanation),
        answer=str(row.answer),
        choices=[c.strip() for c in row.choices],
        meta=meta,
        task_kind=row.KIND,
    )


def _code_record(row: CodeRow, ids: dict[str, str], meta: dict[str, Any]) -> Record:
    """The Record of a code row: the prompt (with the tests when `show_tests`), the reference solution."""
    shown = ([row.setup_code.strip()] if row.setup_code.strip() else []) + row.tests
    question = row.prompt.strip()
    if row.show_tests:
        question += "\nYour code should pass these tests:\n\n" + "\n".join(t.strip() for t in shown)
    solution = row.reference_solution or ""
    meta["has_reference_solution"] = bool(solution)
    return Record(
        **ids,
        question=question,
        reference=solution,
        answer=solution,
        tests=list(row.tests),
        setup_code=row.setup_code,
        entry_point=row.entry_point,
        meta=meta,
        task_kind=row.KIND,
    )


def _tool_use_record(row: ToolUseRow, ids: dict[str, str], meta: dict[str, Any]) -> Record:
    """The Record of a tool_use row: the API's tool docs and the request, the gold calls rendered."""
    from unisd.tasks.tool_use import render_tool_calls

    calls = [
        {
            "name": c.name,
            "arguments": dict(c.arguments),
            "arguments_raw": json.dumps(c.arguments, ensure_ascii=False),
        }
        for c in row.gold_calls
    ]
    rendered = render_tool_calls(calls)
    api = row.api_name or ids["benchmark"]  # default: the dataset's name
    meta.update(api_name=api, instruction=row.request.strip())
    return Record(
        **ids,
        question=f"API: {api}\nTools:\n{row.tool_docs()}\n\nUser request: {row.request.strip()}",
        reference=rendered,
        answer=rendered,
        gold_calls=calls,
        meta=meta,
        task_kind=row.KIND,
    )


def _free_form_record(
    row: FreeFormRow, ids: dict[str, str], meta: dict[str, Any], metric: str | None
) -> Record:
    """The Record of a free_form row: the reference answer, its metric (default: free_form's)."""
    from unisd.tasks.free_form import DEFAULT_METRIC
    from unisd.tasks.free_form import reference as ff_reference

    meta["metric"] = metric or DEFAULT_METRIC
    if row.explanation:
        meta["explanation"] = row.explanation
    if row.wrong_answers:
        meta["wrong_answers"] = list(row.wrong_answers)
    return Record(
        **ids,
        question=row.prompt.strip(),
        reference=ff_reference(row.answer, row.explanation),
        answer=row.answer.strip(),
        meta=meta,
        task_kind=row.KIND,
    )


def json_schemas() -> dict[str, dict[str, Any]]:
    """{file name: JSON Schema} of every kind's row model (docs/schemas/)."""
    out = {}
    for kind, model in ROW_MODELS.items():
        schema = model.model_json_schema()
        schema = {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": f"urn:unisd:dataset:{kind}:v{SCHEMA_VERSION}",
            "x-unisd-kind": kind,
            "x-unisd-schema-version": SCHEMA_VERSION,
            **schema,
        }
        out[f"{kind}.v{SCHEMA_VERSION}.schema.json"] = schema
    return out
