"""Promotion: the gate (paired bootstrap of challenger vs champion/base per-item scores, retention guards),
recording its decision, moving alias `champion` (promote, rollback), downloading a version's model.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from unisd.tracking.client import _call
from unisd.tracking.config import CHAMPION, MODEL_ARTIFACT_PATH, TrackingConfig
from unisd.tracking.registry import (
    _set_version_tags,
    alias_version,
    current_champion,
    set_alias,
    version_item_scores,
    version_tags,
)
from unisd.tracking.runs import _log_json, _log_metric_batch, _now_ms, set_tags


def _refusal(reason: str, **extra: Any) -> dict[str, Any]:
    nan = float("nan")
    return {
        "promote": False,
        "reason": reason,
        "delta": nan,
        "ci_low": nan,
        "ci_high": nan,
        "n_items": 0,
    } | extra


def promotion_decision(
    champion_items: Mapping[str, float] | None,
    challenger_items: Mapping[str, float] | None,
    *,
    margin: float,
    min_items: int = 5,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Should the challenger replace the champion (or the base model, when there is no champion)?

    champion_items / challenger_items  {item id: per-item score}; None or empty = that eval is missing
    or failed. Compared on the intersection of ids (paired bootstrap of challenger − champion, from
    `unisd.metrics.paired_bootstrap`). Promote only when the CI's lower bound is > margin; never on
    NaN/inf scores, never with fewer than `min_items` shared items.
    returns {promote, reason, delta, ci_low, ci_high, p_better, n_items, n_only_champion,
             n_only_challenger, margin, per_benchmark: {prefix: {delta, n}}}
    """
    from unisd.metrics import paired_bootstrap

    if not math.isfinite(margin):
        raise ValueError(f"margin must be finite, got {margin}")
    if not champion_items:
        return _refusal("no baseline per-item scores (champion/base eval missing or failed): not promoting")
    if not challenger_items:
        return _refusal("no challenger per-item scores (its eval is missing or failed): not promoting")
    shared = sorted(set(champion_items) & set(challenger_items))
    counts = {
        "n_only_champion": len(set(champion_items) - set(shared)),
        "n_only_challenger": len(set(challenger_items) - set(shared)),
        "margin": margin,
    }
    refused = _unpaired_refusal(champion_items, challenger_items, shared, min_items)
    if refused:
        return _refusal(refused, **counts)
    baseline = {i: float(champion_items[i]) for i in shared}
    candidate = {i: float(challenger_items[i]) for i in shared}
    cmp = paired_bootstrap(baseline, candidate, confidence=confidence, n_resamples=n_resamples, seed=seed)
    promote = cmp.ci_low > margin
    return {
        "promote": bool(promote),
        "reason": _decision_reason(cmp, confidence=confidence, margin=margin, promote=promote),
        "delta": cmp.delta,
        "ci_low": cmp.ci_low,
        "ci_high": cmp.ci_high,
        "p_better": cmp.p_better,
        "n_items": cmp.n,
        "confidence": confidence,
        **counts,
        "per_benchmark": _per_benchmark_deltas(shared, baseline, candidate),
    }


def _unpaired_refusal(
    champion_items: Mapping[str, float],
    challenger_items: Mapping[str, float],
    shared: list[str],
    min_items: int,
) -> str | None:
    """Why the shared items cannot decide (none, NaN/inf scores, fewer than `min_items`), or None."""
    if not shared:
        return "the two evals share no item ids: they cannot be compared"
    bad = [i for i in shared if not (math.isfinite(champion_items[i]) and math.isfinite(challenger_items[i]))]
    if bad:
        return f"{len(bad)} shared item(s) have NaN/inf scores (e.g. {bad[:3]}): not promoting"
    if len(shared) < min_items:
        return f"only {len(shared)} shared items (< min_items={min_items}): too few to decide"
    return None


def _decision_reason(cmp, *, confidence: float, margin: float, promote: bool) -> str:
    """The decision's reason: the paired delta of `cmp` (a PairedComparison), its CI, whether its lower
    bound clears the margin."""
    level = f"{confidence:.0%}"
    verdict = "clears" if promote else "does not clear"
    return (
        f"challenger − baseline = {cmp.delta:+.4f} on {cmp.n} shared items, {level} CI "
        f"[{cmp.ci_low:+.4f}, {cmp.ci_high:+.4f}]: the lower bound {verdict} the margin {margin:+.4f}"
    )


def _per_benchmark_deltas(
    shared: list[str], baseline: dict[str, float], candidate: dict[str, float]
) -> dict[str, dict[str, float]]:
    """{benchmark (the id's prefix before '/', else ""): {mean challenger − baseline delta, n items}}."""
    per_benchmark: dict[str, dict[str, float]] = {}
    for item in shared:
        group = item.split("/", 1)[0] if "/" in item else ""
        entry = per_benchmark.setdefault(group, {"sum": 0.0, "n": 0})
        entry["sum"] += candidate[item] - baseline[item]
        entry["n"] += 1
    return {g: {"delta": e["sum"] / e["n"], "n": e["n"]} for g, e in per_benchmark.items()}


def decide_promotion(
    cfg: TrackingConfig,
    challenger_items: Mapping[str, float] | None,
    *,
    base_items: Mapping[str, float] | None,
    challenger_version: str | None = None,
) -> dict[str, Any]:
    """The gate: compare the challenger with the current champion's stored per-item scores, or with the
    base model's (same run, same items) when there is no champion yet. A champion registered without
    scores cannot be compared: no promotion (promote by hand after checking). Adds `baseline`
    ("champion"/"base") and `champion_version` to `promotion_decision`'s dict."""
    champion = current_champion(cfg)
    if champion is not None and champion != challenger_version:
        reference = version_item_scores(cfg, champion)
        if reference is None:
            return _refusal(
                f"champion version {champion} has no stored per-item scores; cannot compare (not promoting)",
                baseline="champion",
                champion_version=champion,
            )
        baseline = "champion"
    else:
        reference, baseline = base_items, "base"
    decision = promotion_decision(
        reference,
        challenger_items,
        margin=cfg.promotion_margin,
        min_items=cfg.promotion_min_items,
        confidence=cfg.promotion_confidence,
        n_resamples=cfg.promotion_resamples,
    )
    return decision | {"baseline": baseline, "champion_version": champion}


def retention_refusal(
    cfg: TrackingConfig,
    adapted: Sequence[Mapping[str, Any]],
    per_benchmark: Mapping[str, Mapping[str, float]],
) -> str | None:
    """Why the retention guards refuse a challenger (None: they pass or are off). `adapted`: the adapted
    model's eval aggregates; `per_benchmark`: promotion_decision's {benchmark: {delta, n}}."""
    broken = []
    for agg in adapted:
        name = agg.get("benchmark", "?")
        for key, bound in (
            ("retention_ppl", cfg.promotion_max_retention_ppl),
            ("retention_jsd", cfg.promotion_max_retention_jsd),
        ):
            value = agg.get(key)
            if bound is not None and isinstance(value, int | float) and not value <= bound:  # NaN breaks too
                broken.append(f"{name}: {key} {value:.4g} > {bound:g}")
    if cfg.promotion_max_regression is not None:
        for name, entry in sorted(per_benchmark.items()):
            if entry["delta"] < -cfg.promotion_max_regression:
                broken.append(
                    f"{name or 'items'}: {entry['delta']:+.4f} vs the baseline (regression bound "
                    f"-{cfg.promotion_max_regression:g})"
                )
    if not broken:
        return None
    return "retention guard: " + "; ".join(broken) + ": not promoting"


def download_version_model(cfg: TrackingConfig, version: str, dst: str | Path) -> dict[str, str]:
    """The registered `version`'s model (`model/adapter`, `model/merged`) into `dst` (a train-output layout:
    dst/adapter, dst/merged). Returns its version tags."""
    import shutil

    mv = _call(
        cfg, f"get version {version}", lambda c: c.get_model_version(cfg.registered_model, str(version))
    )
    dst = Path(dst)
    with tempfile.TemporaryDirectory() as tmp:
        local = _call(
            cfg,
            f"download version {version}'s model",
            lambda c: c.download_artifacts(mv.run_id, MODEL_ARTIFACT_PATH, dst_path=tmp),
        )
        for part in Path(local).iterdir():
            shutil.move(str(part), dst / part.name)
    return dict(mv.tags)


def log_promotion(
    cfg: TrackingConfig, run_id: str, decision: Mapping[str, Any], *, version: str | None
) -> None:
    """Record a gate decision: run artifact `promotion/decision.json`, run tags and metrics, and tags
    `gate_*` on the challenger version."""
    from mlflow.entities import Metric

    _log_json(cfg, run_id, dict(decision) | {"version": version}, "promotion/decision.json")
    set_tags(
        cfg,
        run_id,
        {"promotion.promote": str(bool(decision["promote"])), "promotion.reason": decision["reason"]},
    )
    numbers = {k: decision.get(k) for k in ("delta", "ci_low", "ci_high", "p_better", "n_items")}
    metrics = [
        Metric(f"promotion/{k}", float(v), _now_ms(), 0)
        for k, v in numbers.items()
        if isinstance(v, int | float) and math.isfinite(v)
    ]
    if metrics:
        _log_metric_batch(cfg, run_id, metrics, "promotion metrics")
    if version is not None:
        _set_version_tags(
            cfg,
            version,
            {
                "gate_promote": str(bool(decision["promote"])),
                "gate_reason": decision["reason"],
                "gate_baseline": decision.get("baseline", ""),
                "gate_delta": decision.get("delta"),
                "gate_ci": [decision.get("ci_low"), decision.get("ci_high")],
            },
        )


def promote(cfg: TrackingConfig, version: str, alias: str = CHAMPION, *, reason: str = "") -> str | None:
    """Point `alias` at `version`; tag it with when and what it replaced. Returns the previous holder."""
    version = str(version)
    version_tags(cfg, version)  # a missing version fails here, clearly, before any alias moves
    previous = alias_version(cfg, alias)
    set_alias(cfg, version, alias)
    _set_version_tags(
        cfg,
        version,
        {
            f"{alias}_since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            f"{alias}_replaced": previous or "none",
        }
        | ({f"{alias}_reason": reason} if reason else {}),
    )
    return previous


def rollback(
    cfg: TrackingConfig, to_version: str, *, reason: str = "manual rollback"
) -> dict[str, str | None]:
    """Move `champion` back to `to_version` (which must exist); the demoted version gets tag
    `rolled_back` with the reason, the restored one `restored_reason`. Returns {previous, champion}."""
    to_version = str(to_version)
    previous = current_champion(cfg)
    if previous == to_version:
        raise ValueError(f"version {to_version} is already the champion; nothing to roll back")
    promote(cfg, to_version, CHAMPION, reason=f"rollback: {reason}")
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    _set_version_tags(cfg, to_version, {"restored_reason": reason, "restored_at": stamp})
    if previous is not None:
        _set_version_tags(cfg, previous, {"rolled_back": f"{stamp}: replaced by {to_version}: {reason}"})
    return {"previous": previous, "champion": to_version}
