"""Rollout decode throughput: HF `model.generate` vs unisd's pruned decode loop (finished rows leave the batch)
and the static-KV-cache path with a compiled decode step (`--paths hf pruned static`), on the same real prompts
(CommonsenseQA + MBPP training items), side by side, alternating, in one run. The static path's first call
compiles; its time is printed apart and left out of the rates.

Both produce the same greedy tokens (tests/test_rollout.py checks it); what differs is how much compute a
batch spends waiting: with HF generate every row of a batch runs until the longest answer is done. Reported:
useful tokens per second (completion tokens, EOS included), min / median / max over repeats, and the share
of decoded positions that were useful under HF generate.

    python bench/bench_rollout.py                         # SmolLM2-135M, CPU, batch 1 and 16
    python bench/bench_rollout.py --device cuda --batch-sizes 16 64 --items 64 --paths hf pruned static
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from unisd.artifacts import read_jsonl  # noqa: E402
from unisd.models import load_model, load_tokenizer  # noqa: E402
from unisd.prepare import PrepareConfig, run_prepare  # noqa: E402
from unisd.rollout import DECODERS, RolloutConfig  # noqa: E402


def prompts_of(model_spec: str, items: int, tokenizer) -> list[list[int]]:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = PrepareConfig(benchmarks=["commonsenseqa", "mbpp"], train_limit=(items + 1) // 2, eval_limit=1)
        run_prepare(cfg, model_spec=model_spec, out_dir=tmp, tokenizer=tokenizer)
        return [r["student_prompt_ids"] for r in read_jsonl(Path(tmp) / "train.jsonl")][:items]


def run(fn, model, tokenizer, prompts, cfg, batch_size: int) -> tuple[float, int, int]:
    """(seconds, useful tokens, decoded positions) over all prompts in batches."""
    useful = positions = 0
    start = time.perf_counter()
    for b in range(0, len(prompts), batch_size):
        out = fn(model, tokenizer, prompts[b : b + batch_size], cfg, first_index=b)
        lengths = [len(ids) for ids, _, _ in out]
        useful += sum(lengths)
        positions += max(lengths) * len(lengths)
    return time.perf_counter() - start, useful, positions


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--device", default="cpu")
    p.add_argument("--items", type=int, default=32)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (equal outputs on both paths)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--paths", nargs="+", default=["hf", "pruned"], choices=sorted(DECODERS))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, device=args.device)
    prompts = prompts_of(args.model, args.items, tokenizer)
    cfg = RolloutConfig(temperature=args.temperature, max_new_tokens=args.max_new_tokens)
    paths = ["hf", *[name for name in args.paths if name != "hf"]]  # hf: the reference of every ratio
    print(
        f"{args.model} on {args.device} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads), {len(prompts)} prompts, ≤{args.max_new_tokens} new tokens, "
        f"T={args.temperature}, {args.repeats} repeats, paths alternated"
    )
    print("| batch | path | useful tok/s min / median / max | useful share of decoded positions |")
    print("|---|---|---|---|")
    for bs in args.batch_sizes:
        batch_cfg = cfg.model_copy(update={"batch_size": bs})
        if "static" in paths:  # compile (once per batch shape and width bucket), outside the timed repeats
            started = time.perf_counter()
            DECODERS["static"](model, tokenizer, prompts[:bs], batch_cfg)
            print(f"| {bs} | static: first call (compiles) | {time.perf_counter() - started:.1f} s | |")
        rates: dict[str, list[float]] = {name: [] for name in paths}
        shares: dict[str, float] = {}
        for _ in range(args.repeats):
            for name in paths:
                seconds, useful, positions = run(DECODERS[name], model, tokenizer, prompts, batch_cfg, bs)
                rates[name].append(useful / seconds)
                shares[name] = useful / positions
        for name, r in rates.items():
            shown = "100% (finished rows leave)" if name == "pruned" else f"{shares[name]:.0%}"
            print(f"| {bs} | {name} | {min(r):.1f} / {statistics.median(r):.1f} / {max(r):.1f} | {shown} |")
        for name in paths[1:]:
            ratio = statistics.median(rates[name]) / statistics.median(rates["hf"])
            print(f"| {bs} | **{name} / hf** | **{ratio:.2f}×** (median) | |")


if __name__ == "__main__":
    main()
