"""Statistics over per-item scores: bootstrap confidence intervals and paired comparisons (plain and
stratified by benchmark) — what every eval aggregate, the promotion gate and RESULTS.md stand on.

The task-specific scoring that used to live here moved to the task kinds (`unisd.tasks.code`: test programs,
pass@k; `unisd.tasks.multiple_choice`: letter accuracy; `unisd.tasks.tool_use`: call match); those names stay
importable from here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from unisd.data.benchmarks import humaneval_record_from_problem  # noqa: F401  (kept importable here)
from unisd.tasks.code import (  # noqa: F401  (moved; kept importable from unisd.metrics)
    check_completions,
    code_checked_program,
    code_program,
    humaneval_program,
    mbpp_program,
    pass_at_k,
    prompt_before_def,
)
from unisd.tasks.multiple_choice import MCScore, mc_accuracy, mc_item_scores  # noqa: F401
from unisd.tasks.tool_use import (  # noqa: F401
    WILDCARD,
    ToolCallCounts,
    parse_gold_arguments,
    score_tool_calls,
    tool_call_scores,
)

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
