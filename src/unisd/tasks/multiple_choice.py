"""Multiple choice (CommonsenseQA, ScienceQA, GPQA): the question with lettered options, answered as
"Reasoning: ...\nAnswer: X".

    task_text / format_instruction   the student prompt x (task + answer-format instruction)
    reference                        the gold demonstration c*: "Reasoning: {explanation}\nAnswer: {letter}"
    gold_completion / fit_target     the SFT target and the reference-fit text (both the reference)
    extract_choice_letter            the answer letter in a reply (None = unparseable)
    score                            accuracy; unparseable answers count as wrong and are also counted
    negatives                        "argue convincingly that the answer is {wrong letter}"; judged wrong when
                                     the letter differs from the gold one; fallback: the gold reference with
                                     a seeded wrong letter
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from unisd.data.records import Record
from unisd.tasks._shared import json_reply_instruction

KIND = "multiple_choice"
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def validate(record: Record) -> None:
    """The fields a multiple-choice record needs, named when missing."""
    if not record.choices:
        raise ValueError(f"{record.id}: a multiple-choice record needs choices")
    letters = LETTERS[: len(record.choices)]
    if record.answer not in letters:
        raise ValueError(
            f"{record.id}: field 'answer': {record.answer!r} is not one of the {len(record.choices)} choices "
            f"({', '.join(letters)})"
        )


# --------------------------------------------------------------------------------------------------
# prompt and references


def format_choices(choices: list[str]) -> str:
    """ "(A) first\\n(B) second ..." -- one line per option (an option may itself span lines)."""
    if len(choices) > len(LETTERS):
        raise ValueError(f"{len(choices)} choices is more than the {len(LETTERS)} letters A-Z")
    return "\n".join(f"({LETTERS[i]}) {text.strip()}" for i, text in enumerate(choices))


def _letters_phrase(n: int) -> str:
    letters = list(LETTERS[:n])
    return f"{', '.join(letters[:-1])} or {letters[-1]}" if n > 1 else letters[0]


def task_text(record: Record) -> str:
    """The question and its lettered choices (no answer-format instruction)."""
    if not record.choices:
        raise ValueError(f"{record.id}: a multiple-choice record needs choices")
    return f"Question: {record.question}\n\nChoices:\n{format_choices(record.choices)}"


def format_instruction(record: Record) -> str:
    n = len(record.choices or [])
    return (
        f'Reason briefly, then give your final answer on the last line as "Answer: X", where X is '
        f"{_letters_phrase(n)}. Use this format:\nReasoning: <a few short sentences>\nAnswer: <letter>"
    )


def reference(letter: str, explanation: str | None) -> str:
    """The gold demonstration c* for multiple choice: "Reasoning: {explanation}\\nAnswer: {letter}", or
    "Answer: {letter}" alone when the source has no explanation (ScienceQA here)."""
    if explanation and explanation.strip():
        return f"Reasoning: {explanation.strip()}\nAnswer: {letter}"
    return f"Answer: {letter}"


def gold_completion(record: Record) -> str:
    return record.reference.strip()


def fit_target(record: Record) -> str:
    """The text whose NLL the eval reports as reference fit."""
    return record.reference


retrieval_text = task_text
solved_task = task_text


# --------------------------------------------------------------------------------------------------
# answer extraction

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
# scoring


@dataclass(frozen=True)
class MCScore:
    """accuracy counts unparseable predictions as wrong; accuracy_parsed leaves them out."""

    accuracy: float
    correct: int
    n: int
    unparseable: int
    unparseable_rate: float
    accuracy_parsed: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def mc_item_scores(predictions: Sequence[str | None], golds: Sequence[str]) -> list[float]:
    """1.0 where the predicted letter equals the gold letter, else 0.0 (None is wrong)."""
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions but {len(golds)} gold answers")
    return [
        float(p is not None and p.strip().upper() == g.strip().upper()) for p, g in zip(predictions, golds)
    ]


def mc_accuracy(predictions: Sequence[str | None], golds: Sequence[str]) -> MCScore:
    """Multiple-choice accuracy from extracted letters (None = unparseable, counted separately)."""
    scores = mc_item_scores(predictions, golds)
    n = len(scores)
    if n == 0:
        raise ValueError("mc_accuracy: no items")
    correct = int(sum(scores))
    unparseable = sum(p is None for p in predictions)
    parsed = n - unparseable
    return MCScore(
        accuracy=correct / n,
        correct=correct,
        n=n,
        unparseable=unparseable,
        unparseable_rate=unparseable / n,
        accuracy_parsed=correct / parsed if parsed else float("nan"),
    )


def score(
    records: Sequence[Record], samples: Sequence[Sequence[str]], settings: Any = None
) -> dict[str, Any]:
    """score = 1 if the letter extracted from the first sample is the gold letter (unparseable: wrong, and
    counted on its own)."""
    letters = [extract_choice_letter(ss[0], len(r.choices or [])) for r, ss in zip(records, samples)]
    mc = mc_accuracy(letters, [r.answer for r in records])
    per_item = [
        {"id": r.id, "score": float(letter == r.answer), "predicted": letter}
        for r, letter in zip(records, letters)
    ]
    return {
        "metric": "accuracy",
        "per_item": per_item,
        "aggregate": {"unparseable": mc.unparseable, "accuracy_parsed": mc.accuracy_parsed},
    }


# --------------------------------------------------------------------------------------------------
# negative demonstrations


def negative_strategies(record: Record, count: int, seed: int) -> list[str]:
    """`count` wrong letters (≠ gold, seeded order, round-robin)."""
    letters = list(LETTERS[: len(record.choices or [])])
    wrong = [x for x in letters if x != record.answer]
    if not wrong:
        raise ValueError(
            f"{record.id}: no wrong choice letter exists (choices {letters}, gold {record.answer!r})"
        )
    random.Random(f"{seed}:letters:{record.id}").shuffle(wrong)
    return [wrong[i % len(wrong)] for i in range(count)]


def negative_request(record: Record, strategy: str) -> list[dict[str, str]]:
    """Ask for a confident, wrong argument for the letter `strategy`."""
    choice = (record.choices or [])[LETTERS.index(strategy)].strip()
    content = (
        "You are simulating a confident student who gets this multiple-choice question wrong.\n"
        f"Argue convincingly that the answer is {strategy} ({choice}).\n\n{task_text(record)}\n\n"
        f"Rules:\n- You MUST conclude that the answer is {strategy}.\n"
        "- The reasoning must sound plausible and knowledgeable.\n"
        "- Do not hint that you might be wrong or that another option could be better.\n"
        "- Keep the reasoning to 2-4 sentences.\n\n" + json_reply_instruction("<2-4 sentences>", strategy)
    )
    return [{"role": "user", "content": content}]


def _letter(answer: str | None, raw: str, n_choices: int) -> str | None:
    valid = LETTERS[:n_choices]
    if answer:
        m = re.fullmatch(r"\(?\s*([A-Za-z])\s*\)?(?:[.:)\s].*)?", answer.strip(), flags=re.S)
        if m and m.group(1).upper() in set(valid):
            return m.group(1).upper()
    letter = extract_choice_letter(raw, n_choices)
    return letter if letter is not None and letter in set(valid) else None


def judge_negative(record: Record, reasoning: str, answer: str | None, raw: str, cfg: Any) -> dict[str, Any]:
    """A negative is acceptable when its letter is a wrong one; the demonstration reads like c*."""
    letter = _letter(answer, raw, len(record.choices or []))
    if letter is None:
        return {"why": "no answer letter"}
    if letter == record.answer:
        return {"answer": letter, "why": "carries the gold letter"}
    # No structured reasoning (the model ignored the JSON format): its whole reply is the argument.
    text = reference(letter, reasoning or raw.strip())
    return {"answer": letter, "text": text, "valid": True, "validated": True}


def mc_fallback(record: Record, seed: int) -> tuple[str, str]:
    """(text, letter): the gold reference with its final answer letter replaced by a seeded wrong one."""
    wrong = negative_strategies(record, 1, seed)[0]
    text, n = re.subn(
        r"(Answer:\s*)\(?" + re.escape(record.answer) + r"\)?(\s*)$",
        rf"\g<1>{wrong}\g<2>",
        record.reference.rstrip(),
    )
    return (text if n else reference(wrong, None)), wrong


def fallback_negative(record: Record, cfg: Any) -> dict[str, Any]:
    text, letter = mc_fallback(record, cfg.seed)
    return {"text": text, "answer": letter, "validated": True, "how": "wrong letter"}
