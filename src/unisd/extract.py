"""Pull the answer out of a model's free-form text: a multiple-choice letter, a program, tool calls.

All three are pure functions of the text. They never guess: a letter that cannot be located with
confidence is None (scored as wrong and counted as unparseable), code falls back to the text itself
(the sandbox then reports the syntax error), and text without recognisable calls gives [].
"""

from __future__ import annotations

import ast
import json
import re
import textwrap
from typing import Any

# --------------------------------------------------------------------------------------------------
# multiple choice

_OPEN = r"[\(\[\{]?"
_CLOSE = r"[\)\]\}]?"
# "answer is (B)", "correct answer is B", "the answer is option C", "**Answer:** D", "final answer: (a)",
# "the correct option is C"; the letter must be on the same line as the phrase
_ANSWER_PHRASE = re.compile(
    r"(?:answer|(?:correct|right|best)\s+(?:option|choice))\**[ \t]*"
    r"(?:is|:|=|would\s+be|should\s+be|will\s+be)?[ \t]*[:\-]?[ \t]*\**[ \t]*"
    r"(?:option[ \t]+|choice[ \t]+|letter[ \t]+)?"
    + _OPEN
    + r"[ \t]*([A-Za-z])[ \t]*"
    + _CLOSE
    + r"\**(?![A-Za-z0-9'])",
    re.IGNORECASE,
)
_BOXED = re.compile(r"\\boxed\{\s*(?:\\text\{)?\s*\(?([A-Za-z])\)?\s*\}?\s*\}")
_BOLD = re.compile(r"\*\*[ \t]*" + _OPEN + r"([A-Za-z])" + _CLOSE + r"[ \t]*[.:)]?[ \t]*\*\*")
_BARE_LINE = re.compile(
    r"^[ \t]*" + _OPEN + r"[ \t]*([A-Za-z])[ \t]*" + _CLOSE + r"[ \t]*\.?[ \t]*$", re.MULTILINE
)
_LEADING = re.compile(r"\A\s*" + _OPEN + r"([A-Za-z])(?:[\)\]\}.:]|\s*\Z)")


def extract_choice_letter(text: str, num_choices: int) -> str | None:
    """The chosen option letter (upper case, among the first `num_choices` letters), or None.

    Evidence tiers, strongest first; within the strongest tier that matches, the LAST occurrence wins
    (models restate and then correct themselves):
      1. an answer statement: "The answer is (X)", "The correct answer is X", "Answer: X",
         "answer: (x)", "the answer is option C", "the correct option is C", \\boxed{X}
      2. a bold letter: "**B**", "**(B)**"
      3. a line holding only the letter: "B", "(B)", "B."
      4. the reply starting with the letter: "C. Paris", "(C) Paris"
    In an answer statement a lower-case letter counts only when bracketed or followed by ".", ")" or
    the end of the line (so "the answer is a bird" is not "A"). Letters beyond `num_choices` are ignored.
    """
    if not 1 <= num_choices <= 26:
        raise ValueError(f"num_choices must be in 1..26, got {num_choices}")
    if not text:
        return None
    valid = {chr(ord("A") + i) for i in range(num_choices)}

    def accept(match: re.Match[str], *, strict_lower: bool) -> str | None:
        letter = match.group(1)
        if letter.islower() and strict_lower:
            bracketed = re.search(r"[\(\[\{][ \t]*" + letter + r"[ \t]*[\)\]\}]", match.group(0)) is not None
            after = text[match.end() : match.end() + 1]
            if not (bracketed or after in ("", ".", ")", "\n")):
                return None
        letter = letter.upper()
        return letter if letter in valid else None

    tiers = ((_ANSWER_PHRASE, _BOXED), (_BOLD,), (_BARE_LINE,))
    for tier in tiers:
        hits = sorted(
            (match.start(), letter)
            for pattern in tier
            for match in pattern.finditer(text)
            if (letter := accept(match, strict_lower=pattern is _ANSWER_PHRASE)) is not None
        )
        if hits:
            return hits[-1][1]
    match = _LEADING.match(text)
    return accept(match, strict_lower=False) if match else None


# --------------------------------------------------------------------------------------------------
# code

_FENCE = re.compile(r"^[ \t]*(```|~~~)[ \t]*([\w+#.-]*)[^\n]*\n(.*?)(?:^[ \t]*\1[ \t]*$|\Z)", re.S | re.M)
_PYTHON_LANGS = {"python", "py", "python3", "py3", "pycon", "ipython", ""}
_BEGIN_DONE = re.compile(r"\[BEGIN\]\s*?\n?(.*?)(?:\[DONE\]|\Z)", re.S)
_CODE_START = re.compile(
    r"^(?:def |async def |class |import |from \S+ import |@\w|if __name__|[A-Za-z_]\w*\s*=)"
)


def _defines(code: str, name: str) -> bool:
    return re.search(rf"^\s*(?:async\s+)?def\s+{re.escape(name)}\s*\(", code, re.M) is not None


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
                if _defines(code, entry_point):
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
# tool calls

_ACTION = re.compile(r"^[ \t]*Action\s*(?:\d+)?\s*:[ \t]*(.+?)[ \t]*$", re.M)
_ACTION_INPUT = re.compile(r"^[ \t]*Action\s*Input\s*(?:\d+)?\s*:[ \t]*", re.M)
_REACT_STOP = re.compile(r"^[ \t]*(?:Observation|Thought|Action|Final Answer)\s*(?:\d+)?\s*:", re.M)


def parse_tool_calls(text: str) -> list[dict[str, Any]]:
    """Tool calls in a model reply, in order: [{"name", "arguments", "arguments_raw"}].

    Understands ReAct steps ("Action: name" then "Action Input: {json}", any number of steps; the
    input runs to the next Observation/Thought/Action line) and JSON function calls: a list or a
    single object with "name" and "arguments"/"parameters"/"args" (arguments may be a JSON string),
    {"tool_calls": [...]}, OpenAI-style {"function": {...}}, also inside ```json fences or
    <tool_call> tags. `arguments` is a dict, or None when the input is not a JSON/Python mapping
    (then `arguments_raw` still holds it).
    """
    if not text:
        return []
    if _ACTION.search(text) and _ACTION_INPUT.search(text) or re.search(r"^[ \t]*Action\s*:", text, re.M):
        calls = _parse_react(text)
        if calls:
            return calls
    return _parse_json_calls(text)


def _parse_react(text: str) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []
    for match in _ACTION.finditer(text):
        line_start = text.rfind("\n", 0, match.start()) + 1
        if _ACTION_INPUT.match(text, line_start):
            continue  # this "Action ...:" line is an Action Input line
        name = match.group(1).strip().strip("`*\"'")
        name = re.sub(r"\(.*\)$", "", name).strip()
        rest = text[match.end() :]
        raw = ""
        following = _ACTION_INPUT.search(rest)
        next_action = _next_action(rest)
        if following and (next_action is None or following.start() <= next_action):
            body = rest[following.end() :]
            stop = _REACT_STOP.search(body)
            raw = (body[: stop.start()] if stop else body).strip()
        if not name or name.lower() in ("none", "n/a", "finish", "final answer"):
            continue
        calls.append({"name": name, "arguments": _parse_arguments(raw), "arguments_raw": raw})
    return calls


def _next_action(rest: str) -> int | None:
    for match in _ACTION.finditer(rest):
        line_start = rest.rfind("\n", 0, match.start()) + 1
        if not _ACTION_INPUT.match(rest, line_start):
            return match.start()
    return None


def _parse_arguments(raw: str) -> dict[str, Any] | None:
    raw = raw.strip()
    if raw.startswith("```"):
        raw = re.sub(r"^```\w*\s*|\s*```$", "", raw)
    if not raw:
        return {}
    start = raw.find("{")
    if start >= 0:
        try:
            value, _ = json.JSONDecoder().raw_decode(raw[start:])
            if isinstance(value, dict):
                return value
        except json.JSONDecodeError:
            pass
        end = raw.rfind("}")
        if end > start:
            try:
                value = ast.literal_eval(raw[start : end + 1])
                if isinstance(value, dict):
                    return value
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                pass
    return None


def _parse_json_calls(text: str) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []
    decoder = json.JSONDecoder()
    i = 0
    while i < len(text):
        if text[i] not in "[{":
            i += 1
            continue
        try:
            value, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            i += 1
            continue
        found = _calls_from_json(value)
        if found:
            calls.extend(found)
            i = end
        else:
            i += 1
    return calls


def _calls_from_json(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, list):
        out: list[dict[str, Any]] = []
        for item in value:
            out.extend(_calls_from_json(item))
        return out
    if not isinstance(value, dict):
        return []
    if isinstance(value.get("tool_calls"), list):
        return _calls_from_json(value["tool_calls"])
    if isinstance(value.get("function"), dict):
        return _calls_from_json(value["function"])
    name = value.get("name")
    if not isinstance(name, str) or not name:
        return []
    args: Any = next((value[k] for k in ("arguments", "parameters", "args") if k in value), {})
    if isinstance(args, str):
        raw = args
        args = _parse_arguments(args)
    else:
        raw = json.dumps(args, ensure_ascii=False)
    return [{"name": name, "arguments": args if isinstance(args, dict) else None, "arguments_raw": raw}]
