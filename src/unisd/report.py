"""Run report: one self-contained HTML page (PNG plots embedded as base64; no scripts, no external
files, readable offline) and a Markdown summary with the same tables.

Sections, each of which says so when its input is missing (e.g. eval not run yet):

    run        run info / lineage (model, preset, git sha, data hash, pipeline run id, …)
    training   loss terms over optimizer steps (one line per term) + diagnostics (grad norm, lr,
               agreement weight mean with its min–max band per step)
    weights    reliability (agreement) weight distribution: histogram + min/mean/max; says when the
               weights are nearly uniform — then they are inert, because L_KD divides by Σ w (e.g. γ=0.001
               in UniSD* keeps every weight in [0.990, 1.0])
    eval       per benchmark, base vs adapted score with 95% CI error bars
    retention  PPL_ret and symmetric JSD(p_base, p_ft) per benchmark
    promotion  the gate's decision (promote or not, Δ, CI, items, reason)

Inputs are plain data (the artifacts' JSON), so the report can be rebuilt from any finished run:
train `metrics.jsonl` rows, a sample of per-token weights (`weights_sample(score_dirs)`), eval
`results.json["aggregate"]` dicts each with a `role` ("base" / "adapted"), the dict from
`unisd.tracking.decide_promotion`, and a flat-or-nested run-info dict.
"""

from __future__ import annotations

import base64
import html
import io
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from unisd.artifacts import write_text
from unisd.config import flatten
from unisd.objective import LOSS_TERMS

LOSS_ORDER = LOSS_TERMS  # unisd.objective: the one list of loss terms
# A weight set whose (max − min) / max is below this changes no token's share of the loss by more
# than ~2%: the agreement weighting is effectively off.
INERT_RELATIVE_SPREAD = 0.02
ROLE_ORDER = ("base", "adapted")
ROLE_COLORS = {"base": "#8c8c8c", "adapted": "#1f77b4"}
Table = tuple[list[str], list[list[Any]]]  # (header, rows)


# ----------------------------------------------------------------------------------------------------------
# inputs


def weights_sample(score_dirs: Sequence[str | Path], max_n: int = 200_000, seed: int = 0) -> np.ndarray:
    """Per-token agreement weights from scoring shards ([N] float64), at most `max_n` of them (a seeded
    uniform sample that always keeps the smallest and largest weight, so min/max stay exact)."""
    from unisd.scoring import load_scores

    scores = load_scores(score_dirs)
    parts = [entry["weights"].double().numpy().ravel() for entry in scores.values()]
    weights = np.concatenate(parts) if parts else np.zeros(0)
    if weights.size <= max_n:
        return weights
    rng = np.random.default_rng(seed)
    keep = rng.choice(weights.size, size=max_n - 2, replace=False)
    return np.concatenate([weights[[int(weights.argmin()), int(weights.argmax())]], weights[keep]])


def _as_array(weights: Any) -> np.ndarray:
    if weights is None:
        return np.zeros(0)
    if hasattr(weights, "detach"):  # a torch tensor, without importing torch here
        weights = weights.detach().cpu().double().numpy()
    array = np.asarray(weights, dtype=np.float64).ravel()
    return array


def _role(aggregate: Mapping[str, Any], index: int) -> str:
    role = aggregate.get("role") or aggregate.get("model_role")
    if not role:
        raise ValueError(
            f"eval_aggregates[{index}] ({aggregate.get('benchmark', '?')}): needs 'role' ('base' or 'adapted')"
        )
    return str(role)


def _ci(aggregate: Mapping[str, Any]) -> tuple[float, float] | None:
    """score_ci95 as [lo, hi], {"low", "high"} (metrics.ConfidenceInterval) or absent → None."""
    ci = aggregate.get("score_ci95")
    if isinstance(ci, Mapping) and "low" in ci and "high" in ci:
        return float(ci["low"]), float(ci["high"])
    if isinstance(ci, list | tuple) and len(ci) == 2:
        return float(ci[0]), float(ci[1])
    return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}f}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_fmt(v, digits) for v in value) + "]"
    return str(value)


# ----------------------------------------------------------------------------------------------------------
# summaries (pure: they feed both the tables and the plots)


def loss_terms(rows: Sequence[Mapping[str, Any]]) -> dict[str, tuple[list[int], list[float]]]:
    """{term: (steps, values)} for `loss` and every `*_loss` key, in a fixed order then first-seen."""
    names: list[str] = []
    for row in rows:
        names.extend(k for k in row if (k in LOSS_ORDER or k.endswith("_loss")) and k not in names)
    first_seen = {name: i for i, name in enumerate(names)}
    names = sorted(
        names, key=lambda n: (LOSS_ORDER.index(n) if n in LOSS_ORDER else len(LOSS_ORDER), first_seen[n])
    )
    return {name: _series(rows, name) for name in names}


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for index, row in enumerate(rows):
        value = _number(row.get(key))
        if value is None:
            continue
        step = row.get("step")
        if isinstance(step, bool) or not isinstance(step, int):
            raise ValueError(f"train_metrics[{index}]: 'step' must be an integer, got {step!r}")
        steps.append(step)
        values.append(value)
    return steps, values


def weight_stats(weights: np.ndarray) -> dict[str, Any]:
    """n, non-finite count, min/mean/max, 1/50/99th percentiles, relative spread, and `inert`."""
    finite = weights[np.isfinite(weights)]
    stats: dict[str, Any] = {"n": int(weights.size), "non_finite": int(weights.size - finite.size)}
    if finite.size == 0:
        return stats
    low, high = float(finite.min()), float(finite.max())
    spread = (high - low) / high if high > 0 else 0.0
    stats |= {
        "min": low,
        "mean": float(finite.mean()),
        "max": high,
        "p01": float(np.quantile(finite, 0.01)),
        "p50": float(np.quantile(finite, 0.5)),
        "p99": float(np.quantile(finite, 0.99)),
        "relative_spread": spread,
        "inert": spread < INERT_RELATIVE_SPREAD,
    }
    return stats


def eval_by_benchmark(aggregates: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Mapping[str, Any]]]:
    """{benchmark: {role: aggregate}}; one aggregate per (benchmark, role)."""
    grouped: dict[str, dict[str, Mapping[str, Any]]] = {}
    for index, aggregate in enumerate(aggregates):
        benchmark = aggregate.get("benchmark")
        if not benchmark:
            raise ValueError(f"eval_aggregates[{index}]: no 'benchmark'")
        role = _role(aggregate, index)
        if role in grouped.setdefault(str(benchmark), {}):
            raise ValueError(f"eval_aggregates[{index}]: a second {role!r} result for {benchmark!r}")
        grouped[str(benchmark)][role] = aggregate
    return grouped


def _roles(grouped: Mapping[str, Mapping[str, Any]]) -> list[str]:
    seen = {role for by_role in grouped.values() for role in by_role}
    return [r for r in ROLE_ORDER if r in seen] + sorted(seen - set(ROLE_ORDER))


# ----------------------------------------------------------------------------------------------------------
# plots (matplotlib's object API with the Agg canvas: no pyplot, no global backend switch)


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def plot_losses(terms: Mapping[str, tuple[list[int], list[float]]]) -> str:
    fig = _figure(8, 4)
    ax = fig.add_subplot()
    positive = True
    for name, (steps, values) in terms.items():
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=name)
        positive &= all(v > 0 for v in values if math.isfinite(v))
    if positive:
        ax.set_yscale("log")  # the terms differ by orders of magnitude (L_FM ≪ L_KD)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss" + (" (log scale)" if positive else ""))
    ax.set_title("Loss terms per step")
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def plot_diagnostics(rows: Sequence[Mapping[str, Any]]) -> str | None:
    panels = [
        ("train/grad_norm", "gradient norm (before clipping)"),
        ("train/lr", "learning rate"),
        ("agreement/weight_mean", "agreement weight (mean, min–max band)"),
    ]
    present = [(k, title) for k, title in panels if _series(rows, k)[0]]
    if not present:
        return None
    fig = _figure(4 * len(present), 3.2)
    axes = fig.subplots(1, len(present), squeeze=False)[0]
    for ax, (key, title) in zip(axes, present):
        steps, values = _series(rows, key)
        ax.plot(steps, values, color="#1f77b4")
        if key == "agreement/weight_mean":
            lo_steps, lo = _series(rows, "agreement/weight_min")
            hi_steps, hi = _series(rows, "agreement/weight_max")
            if lo_steps == steps and hi_steps == steps:
                ax.fill_between(steps, lo, hi, alpha=0.25, color="#1f77b4")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    return _png(fig)


def plot_weights(weights: np.ndarray, stats: Mapping[str, Any]) -> str:
    finite = weights[np.isfinite(weights)]
    fig = _figure(8, 3.6)
    ax = fig.add_subplot()
    ax.hist(finite, bins=50, color="#2ca02c", alpha=0.8)
    for key, style in (("min", ":"), ("mean", "-"), ("max", "--")):
        ax.axvline(stats[key], color="black", linestyle=style, linewidth=1, label=f"{key} {stats[key]:.4f}")
    ax.set_xlabel("per-token reliability weight w_t")
    ax.set_ylabel("tokens")
    ax.set_title(f"Reliability-weight distribution ({stats['n']:,} tokens)")
    ax.legend()
    return _png(fig)


def plot_eval(grouped: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    benchmarks = list(grouped)
    roles = _roles(grouped)
    width = 0.8 / len(roles)
    fig = _figure(max(6, 1.6 * len(benchmarks) + 2), 4)
    ax = fig.add_subplot()
    x = np.arange(len(benchmarks))
    for r, role in enumerate(roles):
        scores, errors = [], [[], []]
        for benchmark in benchmarks:
            aggregate = grouped[benchmark].get(role, {})
            score = _number(aggregate.get("score"))
            ci = _ci(aggregate)
            scores.append(np.nan if score is None else score)
            below = max(0.0, score - ci[0]) if score is not None and ci else 0.0
            above = max(0.0, ci[1] - score) if score is not None and ci else 0.0
            errors[0].append(below)
            errors[1].append(above)
        offset = (r - (len(roles) - 1) / 2) * width
        ax.bar(
            x + offset,
            scores,
            width,
            yerr=errors,
            capsize=4,
            label=role,
            color=ROLE_COLORS.get(role),
            edgecolor="black",
            linewidth=0.5,
        )
    ax.set_xticks(x, benchmarks)
    ax.set_ylabel("score (primary metric)")
    ax.set_ylim(0, 1.05)
    ax.set_title("Base vs adapted, per benchmark (error bars: 95% bootstrap CI)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    return _png(fig)


def plot_retention(rows: Sequence[tuple[str, float | None, float | None]]) -> str:
    fig = _figure(9, 3.6)
    left, right = fig.subplots(1, 2)
    names = [r[0] for r in rows]
    for ax, values, title, color in (
        (
            left,
            [np.nan if r[1] is None else r[1] for r in rows],
            "PPL_ret (base PPL of adapted outputs)",
            "#9467bd",
        ),
        (right, [np.nan if r[2] is None else r[2] for r in rows], "symmetric JSD(p_base, p_ft)", "#d62728"),
    ):
        ax.bar(names, values, color=color, edgecolor="black", linewidth=0.5)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    right.axhline(math.log(2), color="black", linestyle=":", linewidth=1)  # JSD's upper bound
    return _png(fig)


# ----------------------------------------------------------------------------------------------------------
# rendering


def _md_table(table: Table) -> str:
    header, rows = table

    def cell(value: Any) -> str:
        return _fmt(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _html_table(table: Table) -> str:
    header, rows = table
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class _Section:
    """One report section, written to both outputs at once."""

    def __init__(self, anchor: str, title: str) -> None:
        self.anchor, self.title = anchor, title
        self.html: list[str] = []
        self.md: list[str] = []

    def text(self, text: str, *, css: str = "") -> None:
        cls = f' class="{css}"' if css else ""
        self.html.append(f"<p{cls}>{html.escape(text)}</p>")
        self.md.append(("> " if css else "") + text + "\n")

    def table(self, table: Table) -> None:
        self.html.append(_html_table(table))
        self.md.append(_md_table(table))

    def image(self, png_b64: str | None, alt: str) -> None:
        if png_b64 is not None:
            self.html.append(f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{png_b64}">')
            self.md.append(f"*(plot in the HTML report: {alt})*\n")


_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1100px; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #1f77b4; padding-bottom: .2em; }
h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
nav a { margin-right: 1em; }
table { border-collapse: collapse; margin: .8em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: .3em .6em; text-align: right; }
th { background: #f3f6fa; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; display: block; margin: .8em 0; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: .5em .8em; }
.missing { color: #777; font-style: italic; }
.promote { background: #e6f4ea; border-left: 4px solid #2ca02c; padding: .5em .8em; font-weight: bold; }
.refuse { background: #fdecea; border-left: 4px solid #d62728; padding: .5em .8em; font-weight: bold; }
"""


def build_report(
    out_dir: str | Path,
    *,
    train_metrics: Sequence[Mapping[str, Any]] = (),
    weights: Any = None,
    eval_aggregates: Sequence[Mapping[str, Any]] = (),
    promotion: Mapping[str, Any] | None = None,
    run_info: Mapping[str, Any] | None = None,
    title: str = "unisd run report",
) -> dict[str, str]:
    """Write `out_dir/report.html` (self-contained) and `out_dir/report.md`; return their paths.

    train_metrics    metrics.jsonl rows ({"step", "loss", "kd_loss", …, "agreement/weight_mean", …})
    weights          [N] per-token agreement weights (list, numpy array or torch tensor), or None
    eval_aggregates  results.json "aggregate" dicts, each with "role": "base" | "adapted"
    promotion        tracking.decide_promotion's dict, or None when the gate has not run
    run_info         lineage and settings (nested dicts are flattened with '.')
    """
    out_dir = Path(out_dir)
    sections = [
        _run_section(run_info or {}),
        _training_section(list(train_metrics)),
        _weights_section(_as_array(weights), run_info or {}),
        *_eval_sections(list(eval_aggregates)),
        _promotion_section(promotion),
    ]
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    nav = " ".join(f'<a href="#{s.anchor}">{html.escape(s.title)}</a>' for s in sections)
    body = "\n".join(
        f'<section id="{s.anchor}"><h2>{html.escape(s.title)}</h2>\n' + "\n".join(s.html) + "</section>"
        for s in sections
    )
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1><p>generated {stamp}</p><nav>{nav}</nav>\n{body}\n</body></html>\n"
    )
    markdown = f"# {title}\n\ngenerated {stamp}\n\n" + "\n".join(
        f"## {s.title}\n\n" + "\n".join(s.md) for s in sections
    )
    html_path, md_path = out_dir / "report.html", out_dir / "report.md"
    write_text(html_path, page)
    write_text(md_path, markdown)
    return {"html": str(html_path), "markdown": str(md_path)}


def _run_section(run_info: Mapping[str, Any]) -> _Section:
    section = _Section("run", "Run info and lineage")
    if not run_info:
        section.text("No run info was given.", css="missing")
    else:
        section.table((["field", "value"], [[k, v] for k, v in flatten(dict(run_info)).items()]))
    return section


def _training_section(rows: list[Mapping[str, Any]]) -> _Section:
    section = _Section("training", "Training")
    terms = {k: v for k, v in loss_terms(rows).items() if v[0]}
    if not terms:
        section.text(
            "No training metrics yet (the train stage has not run, or logged no loss terms).", css="missing"
        )
        return section
    table_rows = []
    for name, (steps, values) in terms.items():
        finite = [v for v in values if math.isfinite(v)]
        table_rows.append(
            [
                name,
                len(steps),
                values[0],
                values[-1],
                min(finite) if finite else None,
                len(values) - len(finite),
            ]
        )
    section.table((["term", "steps", "first", "last", "min", "non-finite"], table_rows))
    section.image(plot_losses(terms), "loss terms per optimizer step")
    section.image(plot_diagnostics(rows), "training diagnostics")
    return section


def _weights_section(weights: np.ndarray, run_info: Mapping[str, Any]) -> _Section:
    section = _Section("weights", "Reliability weights")
    stats = weight_stats(weights)
    if "min" not in stats:
        section.text(
            "No agreement weights (agreement is off in this preset, or the scoring stage has not run).",
            css="missing",
        )
        return section
    keys = ["n", "min", "mean", "max", "p01", "p50", "p99", "non_finite"]
    section.table((keys, [[stats[k] for k in keys]]))
    gamma = run_info.get("gamma", (run_info.get("objective") or {}).get("agreement_gamma"))
    if stats["inert"]:
        gamma_text = f"this run has γ = {gamma}" if gamma is not None else "γ of this run not given"
        section.text(
            f"Nearly inert: every weight lies in [{stats['min']:.4f}, {stats['max']:.4f}] (relative spread "
            f"{stats['relative_spread']:.2%}). L_KD divides by Σ w, so near-uniform weights leave the loss "
            f"almost unchanged. A small γ does this ({gamma_text}; UniSD* uses 0.001).",
            css="note",
        )
    section.image(plot_weights(weights, stats), "reliability-weight histogram")
    return section


def _eval_sections(aggregates: list[Mapping[str, Any]]) -> list[_Section]:
    scores = _Section("eval", "Evaluation: base vs adapted")
    retention = _Section("retention", "Retention")
    if not aggregates:
        scores.text("No evaluation results yet (the eval stage has not run).", css="missing")
        retention.text("No retention measurements yet (the eval stage has not run).", css="missing")
        return [scores, retention]
    grouped = eval_by_benchmark(aggregates)
    roles = _roles(grouped)
    header = ["benchmark", "metric", "items"]
    for role in roles:
        header += [role, f"{role} 95% CI"]
    if {"base", "adapted"} <= set(roles):
        header.append("Δ adapted − base")
    rows = []
    for benchmark, by_role in grouped.items():
        first = next(iter(by_role.values()))
        row: list[Any] = [benchmark, first.get("metric"), first.get("items")]
        for role in roles:
            aggregate = by_role.get(role, {})
            row += [_number(aggregate.get("score")), _ci(aggregate)]
        if {"base", "adapted"} <= set(roles):
            base, adapted = (_number(by_role.get(r, {}).get("score")) for r in ("base", "adapted"))
            row.append(adapted - base if base is not None and adapted is not None else None)
        rows.append(row)
    scores.table((header, rows))
    scores.image(plot_eval(grouped), "per-benchmark score with 95% CI")

    ret_rows = []
    for benchmark, by_role in grouped.items():
        for role, aggregate in by_role.items():
            ppl, jsd = _number(aggregate.get("retention_ppl")), _number(aggregate.get("retention_jsd"))
            if ppl is not None or jsd is not None:
                ret_rows.append([benchmark, role, ppl, jsd, _number(aggregate.get("reference_nll"))])
    if not ret_rows:
        retention.text(
            "No retention measurements (eval ran without a base model to compare with).", css="missing"
        )
    else:
        retention.text(
            "PPL_ret = exp(−mean log p_base) on the adapted model's greedy outputs (1 = the base model would "
            "have written them too); JSD ∈ [0, log 2 ≈ 0.693], token-level, symmetric."
        )
        retention.table((["benchmark", "model", "PPL_ret", "JSD", "reference NLL"], ret_rows))
        label = [(f"{r[0]}" if r[1] == "adapted" else f"{r[0]} ({r[1]})", r[2], r[3]) for r in ret_rows]
        retention.image(plot_retention(label), "retention per benchmark")
    return [scores, retention]


def _promotion_section(promotion: Mapping[str, Any] | None) -> _Section:
    section = _Section("promotion", "Promotion decision")
    if promotion is None:
        section.text("No promotion decision (the gate has not run).", css="missing")
        return section
    promoted = bool(promotion.get("promote"))
    verdict = "PROMOTED to champion" if promoted else "NOT promoted"
    section.text(f"{verdict}: {promotion.get('reason', '')}", css="promote" if promoted else "refuse")
    fields = [
        "baseline",
        "champion_version",
        "delta",
        "ci_low",
        "ci_high",
        "p_better",
        "n_items",
        "margin",
        "n_only_champion",
        "n_only_challenger",
    ]
    section.table((["field", "value"], [[k, promotion[k]] for k in fields if k in promotion]))
    per_benchmark = promotion.get("per_benchmark") or {}
    if per_benchmark:
        section.table(
            (
                ["benchmark", "Δ challenger − baseline", "items"],
                [[name, v.get("delta"), v.get("n")] for name, v in per_benchmark.items()],
            )
        )
    return section
