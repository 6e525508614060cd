"""Free form (user datasets): answer a prompt in your own words; scored against a reference answer with
ROUGE-L (`rouge-score`), chrF (`sacrebleu`) and exact match.

    task_text / format_instruction   the prompt, answered with a final line "Answer: <answer>"
    reference                        the gold demonstration c*: "Reasoning: {explanation}\\nAnswer: {answer}",
                                     or "Answer: {answer}" when the row has no explanation
    gold_completion / fit_target     the SFT target and the reference-fit text (both the reference)
    extract_answer                   the text after the last "Answer:" in a reply (else the whole reply)
    score                            per item the dataset's metric (meta["metric"]: rougeL | chrf |
                                     exact_match, default rougeL) in [0, 1]; the aggregate has all three
    negatives                        the model writes a plausible but wrong answer; it counts as wrong when
                                     its metric score against the reference is below WRONG_BELOW and it is
                                     not an exact match. Fallback: the row's own `wrong_answers`, then the
                                     reference's words in reverse order, then a fixed non-answer -- the
                                     first one the metric judges wrong

Metrics (each in [0, 1]):
    rougeL       ROUGE-L F-measure, rouge_score.rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True);
                 its tokenizer keeps only a-z and 0-9, so use chrF for text in other scripts
    chrf         sacrebleu's sentence-level chrF (character 6-grams, beta 2), divided by 100
    exact_match  1 when prediction and reference are equal after Unicode case folding and whitespace
                 collapsing (a string comparison: there is nothing for a library to add)
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from unisd.data.records import Record
from unisd.tasks._shared import json_reply_instruction

KIND = "free_form"
METRICS = ("rougeL", "chrf", "exact_match")
DEFAULT_METRIC = "rougeL"
# A negative demonstration must score below this against the reference under the dataset's metric.
WRONG_BELOW = 0.5
FALLBACK_NON_ANSWER = "The question cannot be answered from the information given."


def metric_of(record: Record) -> str:
    metric = record.meta.get("metric", DEFAULT_METRIC)
    if metric not in METRICS:
        raise ValueError(f"{record.id}: meta 'metric' is {metric!r}; expected one of {', '.join(METRICS)}")
    return metric


def validate(record: Record) -> None:
    if not record.answer or not record.answer.strip():
        raise ValueError(f"{record.id}: field 'answer': a free-form record needs a reference answer")
    metric_of(record)


# --------------------------------------------------------------------------------------------------
# prompt and references


def task_text(record: Record) -> str:
    return record.question


def format_instruction(record: Record) -> str:
    return (
        'Think briefly if you need to, then give your final answer after "Answer:" on its own line. '
        "Use this format:\nAnswer: <your answer>"
    )


def reference(answer: str, explanation: str | None = None) -> str:
    """The gold demonstration c*: "Reasoning: {explanation}\\nAnswer: {answer}", or "Answer: {answer}"."""
    if explanation and explanation.strip():
        return f"Reasoning: {explanation.strip()}\nAnswer: {answer.strip()}"
    return f"Answer: {answer.strip()}"


def gold_completion(record: Record) -> str:
    return record.reference.strip()


def fit_target(record: Record) -> str:
    return record.reference


retrieval_text = task_text
solved_task = task_text


# --------------------------------------------------------------------------------------------------
# extraction and metrics

_ANSWER = re.compile(r"(?:^|\n)[ \t>*_#]*(?:final\s+)?answer[ \t*_]*:[ \t*_]*", re.IGNORECASE)


def extract_answer(text: str) -> str:
    """The answer in a reply: what follows the last "Answer:" label (at a line start), else the whole
    reply; surrounding whitespace, markdown emphasis and quotes are stripped."""
    if not text:
        return ""
    matches = list(_ANSWER.finditer(text))
    answer = text[matches[-1].end() :] if matches else text
    return answer.strip().strip("*_`\"'").strip()


@lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


@lru_cache(maxsize=1)
def _chrf():
    from sacrebleu.metrics import CHRF

    return CHRF()


def _normalise(text: str) -> str:
    return " ".join(text.casefold().split())


def metric_scores(prediction: str, reference_answer: str) -> dict[str, float]:
    """{"rougeL", "chrf", "exact_match"} of one prediction against one reference answer, each in [0, 1]."""
    return {
        "rougeL": float(_rouge().score(reference_answer, prediction)["rougeL"].fmeasure),
        "chrf": float(_chrf().sentence_score(prediction, [reference_answer]).score) / 100.0,
        "exact_match": float(_normalise(prediction) == _normalise(reference_answer)),
    }


def score(
    records: Sequence[Record], samples: Sequence[Sequence[str]], settings: Any = None
) -> dict[str, Any]:
    """score = the dataset's metric (rougeL by default) of the answer in the first sample against the
    reference answer; the aggregate holds the mean of every metric."""
    metrics = {metric_of(r) for r in records}
    if len(metrics) > 1:
        raise ValueError(f"free-form records of one benchmark use different metrics: {sorted(metrics)}")
    metric = metrics.pop() if metrics else DEFAULT_METRIC
    per_item, totals = [], dict.fromkeys(METRICS, 0.0)
    for r, ss in zip(records, samples):
        predicted = extract_answer(ss[0])
        scores = metric_scores(predicted, r.answer)
        for name in METRICS:
            totals[name] += scores[name]
        per_item.append({"id": r.id, "score": scores[metric], "predicted": predicted, **scores})
    n = len(per_item)
    aggregate: dict[str, Any] = {f"mean_{name}": totals[name] / n if n else float("nan") for name in METRICS}
    aggregate["empty_answers"] = sum(1 for row in per_item if not row["predicted"])
    return {"metric": metric, "per_item": per_item, "aggregate": aggregate}


# --------------------------------------------------------------------------------------------------
# negative demonstrations

NEGATIVE_STYLES: dict[str, str] = {
    "plausible but wrong": "an answer that sounds right to a non-expert but is wrong",
    "common misconception": "the answer someone holding a common misconception about the topic would give",
    "wrong detail": "an answer close in form to the correct one but with the key fact, number or name wrong",
    "wrong conclusion": "an answer that starts from the right facts and reaches a wrong conclusion",
}


def negative_strategies(record: Record, count: int, seed: int) -> list[str]:
    """`count` styles of wrong answer (seeded order, round-robin)."""
    pool = list(NEGATIVE_STYLES)
    random.Random(f"{seed}:free_form:{record.id}").shuffle(pool)
    return [pool[i % len(pool)] for i in range(count)]


def negative_request(record: Record, strategy: str) -> list[dict[str, str]]:
    """Ask for a confident wrong answer of one style; the model is shown the correct answer so that it
    can avoid it."""
    content = (
        "You are simulating a confident student who answers this question wrongly.\n"
        f"Write {NEGATIVE_STYLES[strategy]}.\n\nQuestion:\n{task_text(record)}\n\n"
        f"The correct answer (do NOT give it, and do not paraphrase it): {record.answer.strip()}\n\n"
        "Rules:\n- The answer must be wrong, yet sound plausible and confident.\n"
        "- Keep it about as long as the correct answer.\n"
        "- Do not hint that it might be wrong.\n\n"
        + json_reply_instruction("<1-3 sentences of reasoning>", "<your wrong answer>")
    )
    return [{"role": "user", "content": content}]


def judged_wrong(record: Record, candidate: str) -> tuple[bool, str]:
    """(wrong, why): whether `candidate` counts as a wrong answer under the record's metric."""
    scores = metric_scores(candidate, record.answer)
    metric = metric_of(record)
    if scores["exact_match"]:
        return False, "matches the reference answer"
    if scores[metric] >= WRONG_BELOW:
        return False, f"too close to the reference ({metric} {scores[metric]:.2f} >= {WRONG_BELOW})"
    return True, f"{metric} {scores[metric]:.2f} < {WRONG_BELOW}"


def _demonstration(record: Record, answer: str, reasoning: str | None) -> str:
    """A negative shaped like the gold reference: with reasoning only when the gold one has it."""
    return reference(answer, reasoning if record.meta.get("explanation") else None)


def judge_negative(record: Record, reasoning: str, answer: str | None, raw: str, cfg: Any) -> dict[str, Any]:
    """Acceptable when the answer is not empty and the metric judges it wrong against the reference."""
    candidate = (answer or "").strip() or (extract_answer(raw) if answer is None else "")
    if not candidate:
        return {"why": "no answer"}
    wrong, why = judged_wrong(record, candidate)
    if not wrong:
        return {"answer": candidate, "why": why}
    text = _demonstration(record, candidate, reasoning or None)
    return {"answer": candidate, "text": text, "valid": True, "validated": True, "why": why}


def fallback_candidates(record: Record, seed: int) -> list[tuple[str, str]]:
    """(how, answer) in the order the fallback tries them."""
    wrong_answers = [w for w in record.meta.get("wrong_answers") or [] if isinstance(w, str) and w.strip()]
    random.Random(f"{seed}:free_form_fallback:{record.id}").shuffle(wrong_answers)
    out = [("wrong_answers", w.strip()) for w in wrong_answers]
    words = record.answer.split()
    if len(words) >= 3:
        out.append(("reversed words", " ".join(reversed(words))))
    out.append(("non-answer", FALLBACK_NON_ANSWER))
    return out


def fallback_negative(record: Record, cfg: Any) -> dict[str, Any]:
    """The first fallback candidate the metric judges wrong; if none is, the last one, validated False."""
    candidates = fallback_candidates(record, cfg.seed)
    for how, answer in candidates:
        if judged_wrong(record, answer)[0]:
            return {
                "text": _demonstration(record, answer, None),
                "answer": answer,
                "validated": True,
                "how": how,
            }
    how, answer = candidates[-1]
    return {"text": _demonstration(record, answer, None), "answer": answer, "validated": False, "how": how}
