"""A whole round per preset, side by side: the wall time of every stage (prepare → contexts → rollout → score →
train) through `unisd.pipeline_steps` — exactly what the pipeline runs — for each preset, in fresh folders,
presets alternated within each repeat.

    python bench/bench_round.py                                  # demo settings, sd vs unisd_star, 3 repeats
    python bench/bench_round.py --presets sd sft unisd_star --repeats 1 rollout.decode=pruned
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from unisd import pipeline_steps as steps  # noqa: E402
from unisd.runconfig import load_run_config  # noqa: E402

STAGES = ("prepare", "contexts", "rollout", "score", "train")


def one_round(cfg, root: Path) -> dict[str, float]:
    times = {}

    def timed(name, fn, *args):
        start = time.perf_counter()
        fn(*args)
        times[name] = time.perf_counter() - start

    p, c, r, s, t = (str(root / n) for n in STAGES)
    timed("prepare", steps.prepare, cfg, p)
    timed("contexts", steps.contexts, cfg, p, c)
    timed("rollout", steps.rollout, cfg, p, r)
    timed("score", steps.score, cfg, p, c, r, s)
    timed("train", steps.train, cfg, p, c, r, s, t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--presets", nargs="+", default=["sd", "unisd_star"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("overrides", nargs="*", help="run config overrides, key.sub=value")
    args = ap.parse_args()
    print(
        f"{args.config} {' '.join(args.overrides)}: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
        f"{args.repeats} repeats, presets alternated; {time.strftime('%Y-%m-%d')}"
    )
    runs: dict[str, list[dict[str, float]]] = {p: [] for p in args.presets}
    for _ in range(args.repeats):
        for preset in args.presets:
            cfg = load_run_config(args.config, [*args.overrides, f"preset={preset}", "pipeline.shards=1"])
            with tempfile.TemporaryDirectory() as tmp:
                runs[preset].append(one_round(cfg, Path(tmp)))
    print("| preset | " + " | ".join(STAGES) + " | round (min / median / max) | × sd |")
    print("|---|" + "---|" * (len(STAGES) + 2))
    total = {p: [sum(r.values()) for r in rs] for p, rs in runs.items()}
    sd = statistics.median(total["sd"]) if "sd" in total else None
    for preset, rs in runs.items():
        cells = [f"{statistics.median(r[s] for r in rs):.1f}" for s in STAGES]
        t = total[preset]
        ratio = f"{statistics.median(t) / sd:.2f}×" if sd else "–"
        print(
            f"| {preset} | "
            + " | ".join(cells)
            + f" | {min(t):.1f} / {statistics.median(t):.1f} / {max(t):.1f} s | {ratio} |"
        )


if __name__ == "__main__":
    main()
