"""Which uncertainty signal should pick the items that get the K-view re-scoring (`scoring.budget` < 1)?

The views are worth their forwards where they disagree: there the agreement weights move. This bench scores
every item's views once (budget 1) and runs the c*-teacher over every completion, takes each item's mean view disagreement (Var_k ℓ^k_t over its tokens,
what token agreement reads) as the truth, and asks of each `scoring.uncertainty` signal how much of the best
possible half's disagreement its top half captures, beside a random half. It prints the forward seconds each
signal needs, since `student_surprisal` reads the rollout's own log-probs and needs none.

    OMP_NUM_THREADS=2 python bench/bench_budget_signal.py                         # the demo's 16 items
    OMP_NUM_THREADS=2 python bench/bench_budget_signal.py prepare.train_limit=32  # 64 items
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def item_signals(root: Path, cfg) -> tuple[dict[str, list[float]], float]:
    """Per scored item: view disagreement and the three uncertainty signals (from one budget-1 scoring, the
    rollout's log-probs and a c*-teacher pass run here, as teacher_entropy/divergence would), and the seconds
    of that teacher pass."""
    import torch
    from safetensors.torch import load_file

    from unisd.artifacts import read_jsonl
    from unisd.models import load_model, load_tokenizer
    from unisd.rollout import load_completions
    from unisd.scoring import score_completions

    tensors = load_file(str(root / "score" / "scores.safetensors"))
    ids = json.loads((root / "score" / "ids.json").read_text())
    completions = load_completions([root / "rollout"])
    prepared = {r["id"]: r for r in read_jsonl(root / "prepare" / "train.jsonl")}
    ys = [completions[i]["completion_ids"] for i in ids]
    model, tokenizer = load_model(cfg.model), load_tokenizer(cfg.model)
    start = time.perf_counter()
    teacher = score_completions(
        model,
        [prepared[i]["teacher_prompt_ids"] for i in ids],
        ys,
        cfg.scoring,
        pad_id=tokenizer.pad_token_id,
        want_entropy=True,
    )
    teacher_seconds = time.perf_counter() - start
    off = tensors["offsets"].tolist()
    out: dict[str, list[float]] = {
        k: [] for k in ("disagreement", "teacher_entropy", "divergence", "student_surprisal")
    }
    for n, item in enumerate(ids):
        views = tensors["view_logps"][:, off[n] : off[n + 1]].double()
        rollout = torch.tensor(completions[item]["logps"], dtype=torch.float64)
        t_logps, t_entropy = (torch.tensor(v, dtype=torch.float64) for v in teacher[n])
        out["disagreement"].append(float(views.var(0, unbiased=True).mean()))
        out["teacher_entropy"].append(float(t_entropy.mean()))
        out["divergence"].append(float((rollout - t_logps).mean()))
        out["student_surprisal"].append(float(-rollout.mean()))
    return out, teacher_seconds


def captured(signal: list[float], truth: list[float], k: int) -> float:
    """Share of the best k items' total disagreement that the signal's top k hold."""

    def top(s: list[float]) -> list[int]:
        return sorted(range(len(s)), key=lambda j: -s[j])[:k]

    return sum(truth[j] for j in top(signal)) / sum(truth[j] for j in top(truth))


def main() -> None:
    from scipy.stats import spearmanr

    from unisd import pipeline_steps as steps
    from unisd.models import cpu_description
    from unisd.runconfig import load_run_config

    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    ap.add_argument("--root", help="keep the stages' folders here (default: a temporary folder)")
    ap.add_argument("overrides", nargs="*", help="run config overrides, key.sub=value")
    args = ap.parse_args()
    fixed = [
        "preset=unisd_star",
        "contexts.negatives=false",
        "scoring.budget=1.0",
        "scoring.staleness_items=0",
    ]
    cfg = load_run_config(args.config, [*args.overrides, *fixed])
    print(
        f"{args.config} {' '.join(args.overrides)}: {cpu_description()}, {os.cpu_count()} cores, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; {time.strftime('%Y-%m-%d')}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root or tmp)
        p, d, c, r, s = (str(root / n) for n in ("prepare", "contexts", "negatives", "rollout", "score"))
        steps.prepare(cfg, p)
        steps.contexts(cfg, p, d)
        steps.negatives(cfg, p, d, c)
        steps.rollout(cfg, p, r)
        steps.score(cfg, p, c, r, s)
        signals, teacher_seconds = item_signals(root, cfg)
    truth = signals.pop("disagreement")
    n, k = len(truth), len(truth) // 2
    rng = random.Random(0)
    chance = sum(captured([rng.random() for _ in truth], truth, k) for _ in range(1000)) / 1000
    forwards = {"teacher_entropy": "teacher", "divergence": "teacher + student", "student_surprisal": "none"}
    print(
        f"{n} items, budget 0.5 ({k} items get views); views' disagreement = mean_t Var_k ℓ^k_t; "
        f"the teacher pass over all {n} items took {teacher_seconds:.1f} s"
    )
    print(
        "| signal | Spearman vs disagreement | disagreement captured by its top half | forward passes it needs |"
    )
    print("|---|---|---|---|")
    for name, signal in signals.items():
        rho = spearmanr(signal, truth).statistic
        print(f"| {name} | {rho:+.2f} | {captured(signal, truth, k):.2f} | {forwards[name]} |")
    print(f"| random half (1000 draws) | – | {chance:.2f} | none |")


if __name__ == "__main__":
    main()
