"""docs/RESULTS.md from the experiment's result files: per model, every variant's score per held-out benchmark,
the macro score, paired-bootstrap 95% CIs of the difference to the base model and to plain SD, retention,
reference fit, compute; plots (differences with CIs, score vs compute); an automatic verdict per model.

    unisd experiment-report --results docs/results/csqa [docs/results/scienceqa ...] --out docs/RESULTS.md \
        [--notes docs/results/notes.md]

One section per experiment × model (experiments never pool: their items and settings differ).

Differences are paired on the same items and stratified by benchmark (each benchmark weighs the same, as
the paper's average does); seeds of a variant are pooled as more paired items (the base model is greedy and
seed-independent, so each seed's items pair with the same base answers).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from unisd.artifacts import read_json, write_text
from unisd.experiment import BASE
from unisd.metrics import paired_bootstrap_stratified

REFERENCE_VARIANTS = ("sft", "sd")  # the baselines UniSD* must beat, listed first in a table
BASELINE_PRESETS = ("sft", "sd")  # every variant of these presets (more steps, online, ...) is a baseline
STAR_PRESET = "unisd_star"


def load_results(results_dir: str | Path) -> dict[tuple[str, str], dict[str, list[dict[str, Any]]]]:
    """{(experiment, model): {variant: [result per seed, by seed]}} from results/<model>/seed-*/<variant>.json."""
    out: dict[tuple[str, str], dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    files = sorted(Path(results_dir).glob("*/seed-*/*.json"))
    if not files:
        raise FileNotFoundError(f"no result files under {results_dir} (<model>/seed-<s>/<variant>.json)")
    for path in files:
        result = read_json(path)
        out[(result["experiment"], result["model"])][result["variant"]].append(result)
    for variants in out.values():
        for runs in variants.values():
            runs.sort(key=lambda r: r["seed"])
    return out


def item_scores(results: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """{benchmark: {"<seed>/<item id>": score}} pooled over the seeds of one variant."""
    out: dict[str, dict[str, float]] = defaultdict(dict)
    for result in results:
        for benchmark, ev in result["eval"].items():
            for row in ev["per_item"]:
                out[benchmark][f"{result['seed']}/{row['id']}"] = float(row["score"])
    return out


def _base_for(base_runs: Sequence[Mapping[str, Any]], seeds: Sequence[int]) -> dict[str, dict[str, float]]:
    """The base model's item scores keyed like the candidate's seeds (base is seed-independent)."""
    template = item_scores(base_runs[:1])
    out: dict[str, dict[str, float]] = defaultdict(dict)
    for benchmark, scores in template.items():
        for key, value in scores.items():
            item = key.split("/", 1)[1]
            for seed in seeds:
                out[benchmark][f"{seed}/{item}"] = value
    return out


def compare(
    baseline: Mapping[str, Mapping[str, float]], candidate: Mapping[str, Mapping[str, float]]
) -> dict[str, float] | None:
    """Stratified paired comparison on the benchmarks and items both have; None when nothing is shared."""
    groups = {}
    for benchmark in sorted(set(baseline) & set(candidate)):
        shared = sorted(set(baseline[benchmark]) & set(candidate[benchmark]))
        if shared:
            groups[benchmark] = (
                {k: baseline[benchmark][k] for k in shared},
                {k: candidate[benchmark][k] for k in shared},
            )
    if not groups:
        return None
    c = paired_bootstrap_stratified(groups, n_resamples=4000)
    return {"delta": c.delta, "low": c.ci_low, "high": c.ci_high, "p_better": c.p_better, "n": c.n}


def _mean(values: Sequence[float]) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def preset_of(result: Mapping[str, Any]) -> str:
    """The preset a variant trained with (the base model has none)."""
    return result.get("settings", {}).get("run", {}).get("preset") or result["variant"]


def summarize_variant(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-benchmark score (mean over seeds), macro score, retention, fit, compute of one variant."""
    benchmarks = sorted({b for r in runs for b in r["eval"]})

    def agg(key: str, benchmark: str) -> float:
        return _mean([r["eval"][benchmark]["aggregate"].get(key) for r in runs if benchmark in r["eval"]])

    per_bench = {b: agg("score", b) for b in benchmarks}
    unparseable = sum(
        r["eval"][b]["aggregate"].get("unparseable") or 0 for r in runs for b in r["eval"]
    ) / max(1, len(runs))
    train_tokens = [r["train"]["tokens"] for r in runs if r.get("train") and r["train"].get("tokens")]
    return {
        "seeds": [r["seed"] for r in runs],
        "preset": preset_of(runs[0]),
        "per_benchmark": per_bench,
        "macro": _mean(list(per_bench.values())),
        "unparseable": unparseable,
        "retention_ppl": _mean([agg("retention_ppl", b) for b in benchmarks]),
        "retention_jsd": _mean([agg("retention_jsd", b) for b in benchmarks]),
        "reference_nll": _mean([agg("reference_nll", b) for b in benchmarks]),
        "train_s": _mean([r["seconds"]["train"] for r in runs]),
        "eval_s": _mean([r["seconds"]["eval"] for r in runs]),
        "train_tokens": _mean(train_tokens) if train_tokens else float("nan"),
        "items": {b: len(runs[0]["eval"][b]["per_item"]) for b in benchmarks if b in runs[0]["eval"]},
    }


def model_table(
    variants: Mapping[str, Sequence[Mapping[str, Any]]],
) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per variant (summary + Δ vs base and vs sd), and the benchmarks."""
    order = [BASE, *REFERENCE_VARIANTS]
    names = [v for v in order if v in variants] + sorted(v for v in variants if v not in order)
    base_runs = variants.get(BASE, [])
    sd_scores = item_scores(variants["sd"]) if "sd" in variants else None
    rows, benchmarks = [], set()
    for name in names:
        runs = variants[name]
        summary = summarize_variant(runs)
        benchmarks |= set(summary["per_benchmark"])
        scores = item_scores(runs)
        row = {"variant": name, **summary}
        if base_runs and name != BASE:
            row["vs_base"] = compare(_base_for(base_runs, summary["seeds"]), scores)
        if sd_scores is not None and name not in (BASE, "sd"):
            row["vs_sd"] = compare(sd_scores, scores)
        rows.append(row)
    return rows, sorted(benchmarks)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _delta(c: Mapping[str, float] | None) -> str:
    if not c:
        return "–"
    sign = "**" if c["low"] > 0 or c["high"] < 0 else ""
    return f"{sign}{c['delta']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]{sign}"


def markdown_table(rows: Sequence[Mapping[str, Any]], benchmarks: Sequence[str]) -> str:
    head = [
        "variant",
        "seeds",
        *benchmarks,
        "macro",
        "Δ vs base [95% CI]",
        "Δ vs sd [95% CI]",
        "unparseable/run",
        "PPL_ret",
        "JSD",
        "ref NLL",
        "train s",
        "eval s",
        "train tokens",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            f"`{r['variant']}`",
            ",".join(map(str, r["seeds"])),
            *[_fmt(r["per_benchmark"].get(b)) for b in benchmarks],
            _fmt(r["macro"]),
            _delta(r.get("vs_base")),
            _delta(r.get("vs_sd")),
            _fmt(r["unparseable"], 1),
            _fmt(r["retention_ppl"], 2),
            _fmt(r["retention_jsd"], 4),
            _fmt(r["reference_nll"], 3),
            _fmt(r["train_s"], 0),
            _fmt(r["eval_s"], 0),
            _fmt(r["train_tokens"], 0),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


ACTIVITY = (
    ("agreement/weight_min", "agreement weight min", 4),
    ("agreement/weight_mean", "agreement weight mean", 4),
    ("kd/clip_frac", "clipped token share", 4),
    ("cl/violation_frac", "contrastive hinge active", 3),
    ("fm_loss", "L_FM", 4),
    ("ema/teacher_moved", "EMA teacher moved ‖φ−φ₀‖", 4),
    ("ema/teacher_student_gap", "teacher–student gap", 4),
)


def activity_table(variants: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """What each component did during training (the last step's stats, mean over seeds): an inert
    component shows here as weights of 1, no clipped tokens, a teacher that never moved."""
    rows = []
    for name, runs in variants.items():
        finals = [r["train"]["final"] for r in runs if r.get("train")]
        if not finals:
            continue
        cells = [_fmt(_mean([f.get(key) for f in finals if key in f]), d) for key, _, d in ACTIVITY]
        if any(c != "–" for c in cells):
            rows.append(f"| `{name}` | " + " | ".join(cells) + " |")
    if not rows:
        return ""
    head = "| variant | " + " | ".join(title for _, title, _ in ACTIVITY) + " |"
    return "\n".join([head, "|" + "---|" * (len(ACTIVITY) + 1), *sorted(rows)]) + "\n"


def verdict(model: str, rows: Sequence[Mapping[str, Any]], variants: Mapping[str, Sequence[Mapping]]) -> str:
    """Every UniSD* variant against the base and the strongest baseline (the SFT or SD variant with the best
    macro score), said plainly: the CIs decide, not the point estimates, and no UniSD* row is left out."""
    stars = [r for r in rows if r["preset"] == STAR_PRESET]
    if not stars:
        return f"- **{model}**: no UniSD* result yet."

    def said(c: Mapping[str, float] | None, other: str) -> str:
        if not c:
            return f"not compared with {other}"
        ci = f"Δ {c['delta']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}], {c['n']} paired items"
        if c["low"] > 0:
            return f"better than {other} with 95% confidence ({ci})"
        if c["high"] < 0:
            return f"worse than {other} with 95% confidence ({ci})"
        return f"not distinguishable from {other} ({ci}: the CI spans 0)"

    baselines = [r for r in rows if r["preset"] in BASELINE_PRESETS and math.isfinite(r["macro"])]
    strongest = max(baselines, key=lambda r: r["macro"])["variant"] if baselines else None
    lines = []
    for star in stars:
        parts = [said(star.get("vs_base"), "the base model")]
        if strongest:
            versus = compare(item_scores(variants[strongest]), item_scores(variants[star["variant"]]))
            parts.append(said(versus, f"the strongest baseline, `{strongest}`"))
        seeds = ("seeds " if len(star["seeds"]) > 1 else "seed ") + ",".join(map(str, star["seeds"]))
        lines.append(f"  - `{star['variant']}` ({seeds}: {star['macro']:.3f}): {'; '.join(parts)}.")
    best = max(rows, key=lambda r: r["macro"] if math.isfinite(r["macro"]) else -1)
    head = f"- **{model}**: best macro score `{best['variant']}` ({best['macro']:.3f}). UniSD*:"
    return "\n".join([head, *lines])


def _plot_deltas(model: str, rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    from matplotlib.figure import Figure

    shown = [r for r in rows if r.get("vs_base")]
    fig = Figure(figsize=(max(6, 0.7 * len(shown) + 2), 3.8), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(shown))
    d = [r["vs_base"]["delta"] for r in shown]
    err = [
        [r["vs_base"]["delta"] - r["vs_base"]["low"] for r in shown],
        [r["vs_base"]["high"] - r["vs_base"]["delta"] for r in shown],
    ]
    colors = [
        "#2ca02c" if r["vs_base"]["low"] > 0 else "#d62728" if r["vs_base"]["high"] < 0 else "#7f7f7f"
        for r in shown
    ]
    ax.bar(x, d, yerr=err, capsize=4, color=colors, edgecolor="black", linewidth=0.5)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x, [r["variant"] for r in shown], rotation=35, ha="right")
    ax.set_ylabel("macro score − base (95% CI)")
    ax.set_title(f"{model}: difference to the base model (green/red: CI excludes 0)")
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path)


def _plot_compute(model: str, rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    for r in rows:
        cost = (r["train_s"] if math.isfinite(r["train_s"]) else 0.0) / 60
        ax.scatter(cost, r["macro"], s=30)
        ax.annotate(r["variant"], (cost, r["macro"]), fontsize=8, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("training wall time per run (min, this machine)")
    ax.set_ylabel("macro score")
    ax.set_title(f"{model}: score vs training compute")
    ax.grid(alpha=0.3)
    fig.savefig(path)


def _slug(model: str) -> str:
    return model.replace("/", "_").replace(":", "_")


def build_results_report(
    results_dirs: str | Path | Sequence[str | Path], out_md: str | Path, *, notes: str | Path | None = None
) -> Path:
    """Write RESULTS.md (and PNG plots next to it under results/) from the result files of one or more
    experiments' folders."""
    dirs = [results_dirs] if isinstance(results_dirs, (str, Path)) else list(results_dirs)
    groups: dict[tuple[str, str], dict[str, list[dict[str, Any]]]] = {}
    for results_dir in dirs:
        for key, variants in load_results(results_dir).items():
            if key in groups:
                raise ValueError(
                    f"experiment {key[0]!r}, model {key[1]!r}: result files in two folders ({dirs})"
                )
            groups[key] = variants
    out_md = Path(out_md)
    plots = out_md.parent / "results"
    plots.mkdir(parents=True, exist_ok=True)
    all_runs = [r for variants in groups.values() for runs in variants.values() for r in runs]
    total_s = sum(r["seconds"]["variant_total"] for r in all_runs)
    # a shared stage's time is in the file of every variant that used it: count it once per seed
    shared: dict[tuple[str, str, int, str], float] = {}
    for r in all_runs:
        for stage, seconds in r["seconds"]["shared"].items():
            shared[(r["experiment"], r["model"], r["seed"], stage)] = seconds
    shared_s = sum(shared.values())
    dates = sorted(r["finished_at"] for r in all_runs)
    machines = sorted(
        {
            f"{m['cores']} cores, {m['cpu']}" + (f", {m['cuda']}" if m.get("cuda") else "")
            for m in (r["machine"] for r in all_runs)
        }
    )
    lines = [
        "# Results: does UniSD improve a small model?",
        "",
        f"Generated by `unisd experiment-report --results {' '.join(map(str, dirs))} --out {out_md}` from the",
        "committed result files (one per experiment × model × seed × variant, written by `unisd experiment`).",
        "Scores are on held-out items only. **Bold** differences have a 95% paired-bootstrap CI (stratified by",
        "benchmark) that excludes 0.",
        "",
        f"- machine: {'; '.join(machines)}",
        f"- finished: {dates[0]} … {dates[-1]}",
        f"- compute: {len(all_runs)} result files, {total_s / 3600:.2f} h of variant time + {shared_s / 3600:.2f} h"
        " of shared stages (prepare, contexts, rollout, scores: once per experiment × model × seed)",
        "",
    ]
    if notes and Path(notes).exists():
        lines += [Path(notes).read_text().strip(), ""]
    verdicts = []
    for (experiment, model), variants in groups.items():
        rows, benchmarks = model_table(variants)
        items = rows[0]["items"]
        slug = f"{_slug(experiment)}-{_slug(model)}"
        title = f"{model} · {', '.join(benchmarks)}"
        lines += [
            f"## {title}",
            "",
            f"Experiment `{experiment}`. Held-out items per benchmark: "
            + ", ".join(f"{b} {n}" for b, n in items.items())
            + ".",
            "",
            markdown_table(rows, benchmarks),
        ]
        if any(r.get("vs_base") for r in rows):
            _plot_deltas(title, rows, plots / f"{slug}-delta.png")
            _plot_compute(title, rows, plots / f"{slug}-compute.png")
            lines += [
                f"![{title}: difference to base](results/{slug}-delta.png)",
                f"![{title}: score vs compute](results/{slug}-compute.png)",
                "",
            ]
        activity = activity_table(variants)
        if activity:
            lines += ["What each component did in training (last step, mean over seeds):", "", activity]
        verdicts.append(verdict(title, rows, variants))
    lines += ["## Verdict", "", *verdicts, ""]
    write_text(out_md, "\n".join(lines))
    return out_md
