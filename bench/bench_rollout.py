"""Rollout decode throughput: HF `model.generate` vs unisd's pruned decode loop (finished rows leave the batch),
the continuous one (waiting prompts take the freed rows; prefill bucketed by prompt length) and the
static-KV-cache path with a compiled decode step (`--paths hf pruned continuous static`), on the same real prompts
(CommonsenseQA + MBPP training items), side by side, alternating, in one run. The static path's first call
compiles; its time is printed apart and left out of the rates.

A path named `<path>@bfloat16` decodes with bf16 weights (`rollout.dtype`); its row also prints the staleness
its log-probs would show in scoring: mean |logp_rollout − logp_fp32 re-score| over its tokens.

The fp32 paths produce the same greedy tokens (tests/test_rollout.py checks it); what differs is how much compute a
batch spends waiting: with HF generate every row of a batch runs until the longest answer is done. Reported:
useful tokens per second (completion tokens, EOS included), min / median / max over repeats, and the share
of decoded positions that were useful under HF generate.

    python bench/bench_rollout.py                         # SmolLM2-135M, CPU, batch 1 and 16
    python bench/bench_rollout.py --items 64 --batch-sizes 1 16 --paths hf pruned continuous pruned@bfloat16
    python bench/bench_rollout.py --device cuda --batch-sizes 16 64 --items 64 --paths hf pruned static
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from unisd.artifacts import read_jsonl  # noqa: E402
from unisd.models import cpu_description, load_model, load_tokenizer  # noqa: E402
from unisd.prepare import PrepareConfig, run_prepare  # noqa: E402
from unisd.rollout import DECODERS, RolloutConfig, prompts_per_call  # noqa: E402

DTYPES = RolloutConfig.model_fields["dtype"].annotation.__args__  # one source: the config's own choices


def prompts_of(model_spec: str, items: int, tokenizer) -> list[list[int]]:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = PrepareConfig(benchmarks=["commonsenseqa", "mbpp"], train_limit=(items + 1) // 2, eval_limit=1)
        run_prepare(cfg, model_spec=model_spec, out_dir=tmp, tokenizer=tokenizer)
        return [r["student_prompt_ids"] for r in read_jsonl(Path(tmp) / "train.jsonl")][:items]


def run(fn, model, tokenizer, prompts, cfg) -> tuple[float, int, int]:
    """(seconds, useful tokens, decoded positions) over all prompts, handed over as the stages hand them
    (`prompts_per_call`: a batch, or for `continuous` a queue of batches with batch_size rows in flight)."""
    useful = positions = 0
    per_call = prompts_per_call(cfg)
    outputs = []
    start = time.perf_counter()
    for b in range(0, len(prompts), per_call):
        out = fn(model, tokenizer, prompts[b : b + per_call], cfg, first_index=b)
        lengths = [len(ids) for ids, _, _ in out]
        useful += sum(lengths)
        positions += max(lengths) * len(lengths)
        outputs += out
    return time.perf_counter() - start, useful, positions, outputs


def staleness(model, prompts, outputs, pad_id: int) -> float:
    """Mean |recorded log-prob − the fp32 model's teacher-forced log-prob| over every generated token."""
    from unisd.scoring import _score_rows_plain

    gaps = []
    for p, (ids, _, logps) in zip(prompts, outputs):
        if ids:
            rescored = _score_rows_plain(model, [p], [ids], pad_id=pad_id, chunk_size=1024)[0][0]
            gaps += [abs(a - b) for a, b in zip(logps, rescored)]
    return statistics.fmean(gaps)


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
    p.add_argument(
        "--paths",
        nargs="+",
        default=["hf", "pruned"],
        help=f"of {sorted(DECODERS)}, each optionally @bfloat16",
    )
    args = p.parse_args()
    for spec in args.paths:
        name, _, dtype = spec.partition("@")
        if name not in DECODERS or (dtype and dtype not in DTYPES):
            p.error(f"--paths {spec}: expected one of {sorted(DECODERS)}, optionally @<{'|'.join(DTYPES)}>")
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, device=args.device)
    models = {"": model}
    for dtype in {spec.partition("@")[2] for spec in args.paths} - {""}:
        models[dtype] = load_model(args.model, device=args.device, dtype=dtype)
    prompts = prompts_of(args.model, args.items, tokenizer)
    cfg = RolloutConfig(temperature=args.temperature, max_new_tokens=args.max_new_tokens)
    paths = ["hf", *[name for name in args.paths if name != "hf"]]  # hf: the reference of every ratio
    print(
        f"{args.model} on {args.device} ({cpu_description()}, {os.cpu_count()} cores, "
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
        stale: dict[str, float] = {}
        for _ in range(args.repeats):
            for name in paths:
                decode, _, dtype = name.partition("@")
                path_cfg = batch_cfg.model_copy(update={"decode": decode})
                seconds, useful, positions, outputs = run(
                    DECODERS[decode], models[dtype], tokenizer, prompts, path_cfg
                )
                rates[name].append(useful / seconds)
                shares[name] = useful / positions
                if dtype:
                    stale[name] = staleness(model, prompts, outputs, tokenizer.pad_token_id)
        left = {"pruned": "100% (finished rows leave)", "continuous": "100% (rows leave, waiting ones join)"}
        for name, r in rates.items():
            shown = left.get(name.partition("@")[0], f"{shares[name]:.0%}")
            if name in stale:
                shown += f"; staleness vs fp32 {stale[name]:.4f}"
            print(f"| {bs} | {name} | {min(r):.1f} / {statistics.median(r):.1f} / {max(r):.1f} | {shown} |")
        for name in paths[1:]:
            ratio = statistics.median(rates[name]) / statistics.median(rates["hf"])
            print(f"| {bs} | **{name} / hf** | **{ratio:.2f}×** (median) | |")


if __name__ == "__main__":
    main()
