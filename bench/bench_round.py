"""A whole round per preset, side by side: wall time and peak memory of every stage (prepare → contexts → negatives →
rollout → score → train) through `unisd.pipeline_steps` — exactly what the pipeline's pods run — for each
preset, in fresh folders, presets alternated within each repeat.

Each stage runs in its own child process, as it does in its pod, so a stage's peak resident memory (VmHWM,
model load included) is its own and not what an earlier stage left in the heap.

    python bench/bench_round.py                                  # demo settings, sd vs unisd_star, 3 repeats
    python bench/bench_round.py --presets sd sft unisd_star --repeats 1 rollout.decode=pruned
    python bench/bench_round.py --negatives warm                  # a later round: negatives already sampled
    python bench/bench_round.py --presets sd unisd_star unisd_star@contexts.dtype=bfloat16   # preset@overrides

Negatives go through the cross-run sample cache (unisd/contexts/sample_cache.py). `--negatives cold` (the
default) gives every round an empty cache of its own: the first round of a run. `--negatives warm` fills one
cache per preset in an untimed round first: every later round of a run, or a rerun of the same items.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

STAGES = ("prepare", "contexts", "negatives", "rollout", "score", "train")  # as the pipeline runs them


def peak_rss_gib() -> float:
    """This process's peak resident set, GiB (as bench_step measures it: ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_stage(stage: str, config: str, overrides: list[str], root: Path) -> None:
    """Child: one stage of the round in `root`, then one JSON line {seconds, peak_gib}."""
    from unisd import pipeline_steps as steps
    from unisd.runconfig import load_run_config

    cfg = load_run_config(config, overrides)
    p, d, c, r, s, t = (str(root / n) for n in STAGES)  # d: the contexts stage's draft, c: the final contexts
    calls = {
        "prepare": lambda: steps.prepare(cfg, p),
        "contexts": lambda: steps.contexts(cfg, p, d),
        "negatives": lambda: steps.negatives(cfg, p, d, c),
        "rollout": lambda: steps.rollout(cfg, p, r),
        "score": lambda: steps.score(cfg, p, c, r, s),
        "train": lambda: steps.train(cfg, p, c, r, s, t),
    }
    start = time.perf_counter()
    calls[stage]()
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_gib": peak_rss_gib()}))


def one_round(
    config: str, overrides: list[str], root: Path, sample_cache: Path, stages=STAGES
) -> dict[str, dict]:
    out = {}
    env = {**os.environ, "UNISD_SAMPLE_CACHE": str(sample_cache)}
    for stage in stages:
        cmd = [
            sys.executable,
            __file__,
            "--config",
            config,
            "--stage",
            stage,
            "--root",
            str(root),
            *overrides,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode:
            sys.exit(f"stage {stage} failed:\n{done.stderr[-3000:]}")
        out[stage] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def round_overrides(entry: str, common: list[str]) -> list[str]:
    """`preset` or `preset@key=value,key=value` → the run overrides of that row."""
    preset, _, extra = entry.partition("@")
    return [*common, *(extra.split(",") if extra else []), f"preset={preset}", "pipeline.shards=1"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--presets", nargs="+", default=["sd", "unisd_star"], help="preset or preset@k=v,k=v")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--negatives", choices=("cold", "warm"), default="cold", help="see the module docstring")
    ap.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="run config overrides, key.sub=value")
    args = ap.parse_args()
    if args.stage:
        return run_stage(args.stage, args.config, args.overrides, Path(args.root))
    if args.repeats < 1:
        sys.exit(f"--repeats must be at least 1, got {args.repeats}")
    from unisd.allocator import active
    from unisd.models import cpu_description  # imports torch: not before a stage child's early return

    print(
        f"{args.config} {' '.join(args.overrides)}: {cpu_description()}, allocator {active()}, "
        f"{os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
        f"{args.repeats} repeats, presets alternated; each stage in its own process; negatives {args.negatives}; "
        f"{time.strftime('%Y-%m-%d')}"
    )
    runs: dict[str, list[dict[str, dict]]] = {p: [] for p in args.presets}
    with tempfile.TemporaryDirectory() as caches:
        warm = {p: Path(caches) / f"warm-{p}" for p in args.presets}
        if args.negatives == "warm":
            for preset in args.presets:  # untimed: samples every negative into the preset's cache
                with tempfile.TemporaryDirectory() as tmp:
                    overrides = round_overrides(preset, args.overrides)
                    one_round(args.config, overrides, Path(tmp), warm[preset], ("prepare", "contexts"))
        for repeat in range(args.repeats):
            for preset in args.presets:
                with tempfile.TemporaryDirectory() as tmp:
                    overrides = round_overrides(preset, args.overrides)
                    cache = (
                        warm[preset] if args.negatives == "warm" else Path(caches) / f"cold-{preset}-{repeat}"
                    )
                    runs[preset].append(one_round(args.config, overrides, Path(tmp), cache))
    print("stage seconds (median), round seconds (min / median / max):")
    print("| preset | " + " | ".join(STAGES) + " | round | × sd |")
    print("|---|" + "---|" * (len(STAGES) + 2))
    total = {p: [sum(st["seconds"] for st in r.values()) for r in rs] for p, rs in runs.items()}
    sd = statistics.median(total["sd"]) if "sd" in total else None
    for preset, rs in runs.items():
        cells = [f"{statistics.median(r[s]['seconds'] for r in rs):.1f}" for s in STAGES]
        t = total[preset]
        ratio = f"{statistics.median(t) / sd:.2f}×" if sd else "–"
        print(
            f"| {preset} | "
            + " | ".join(cells)
            + f" | {min(t):.1f} / {statistics.median(t):.1f} / {max(t):.1f} | {ratio} |"
        )
    print("\nstage peak resident memory, GiB (median):")
    print("| preset | " + " | ".join(STAGES) + " |")
    print("|---|" + "---|" * len(STAGES))
    for preset, rs in runs.items():
        cells = [f"{statistics.median(r[s]['peak_gib'] for r in rs):.2f}" for s in STAGES]
        print(f"| {preset} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
