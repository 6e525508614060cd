"""Helpers every task kind's negative demonstrations use (private: not a task kind)."""

from __future__ import annotations

import json
import re


def json_reply_instruction(reasoning_hint: str, answer_hint: str) -> str:
    """The structured-output request appended to every negative-demonstration prompt."""
    return (
        "Reply with only this JSON object, nothing before or after it:\n"
        f'{{"reasoning": "{reasoning_hint}", "answer": "{answer_hint}"}}'
    )


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
