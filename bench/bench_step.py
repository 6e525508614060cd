"""One training step per preset, side by side: wall time and peak memory of the trainer's own step
(`accumulate_window` + `apply_update`: student forward + chunked loss head + backward, c*-teacher forward,
c⁻-teacher forward when the contrastive term is on, EMA update) on the same window of real prompts.

Each measurement runs in a fresh child process (so peak memory is that variant's alone), variants alternate
within every repeat, and the table gives min / median / max over repeats plus the ratio to `sd`.

    python bench/bench_step.py                                    # SmolLM2-135M, CPU, 2 items per micro-batch
    python bench/bench_step.py --micro-batch 4 --grad-accum 2     # the demo's settings
    python bench/bench_step.py --variants sd sd+released-heap  # glibc keeps freed heap, or returns it
    python bench/bench_step.py --variants sd+system sd+tcmalloc sd+jemalloc  # the allocator (unisd.allocator)
    python bench/bench_step.py --device cuda --model random:qwen2.5-0.5b --micro-batch 8 \
        --prompt-tokens 512 --teacher-tokens 1024 --completion-tokens 512
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

# `<preset>+released-heap` runs the preset with train.release_host_memory=true (freed heap back to the OS);
# `<preset>+tcmalloc` / `+jemalloc` / `+system` runs it on that allocator (unisd.allocator); suffixes combine.
RELEASED_HEAP = "released-heap"
VARIANTS = ["sd", "sft", "agreement_tok_retrieval", "ema", "contrastive", "match_joint", "clip", "unisd_star"]


def window(tokenizer, n: int, prompt: int, teacher: int, completion: int, views: int, seed: int = 0):
    """n training items of the given token lengths (ids drawn from the real vocabulary), K view log-probs.

    Laid out as the real prompts are (data/prompts.py): the teacher prompt is x followed by the demonstration
    block, so the c*- and c⁻-teacher rows share the prefix x and differ only in the demonstration."""
    import torch

    rng = random.Random(seed)
    vocab = len(tokenizer)

    def toks(k):
        return [rng.randrange(100, vocab - 1) for _ in range(k)]

    items = []
    for i in range(n):
        x = toks(prompt)
        items.append(
            {
                "id": f"bench/{i}",
                "student_prompt_ids": x,
                "teacher_prompt_ids": x + toks(teacher - prompt),
                "negative_prompt_ids": x + toks(teacher - prompt),
                "completion_ids": toks(completion),
                "view_logps": -torch.rand(views, completion) * 4,
            }
        )
    return items


def child(args) -> None:
    import torch

    from unisd.objective import preset
    from unisd.train import (
        LoraSettings,
        TrainConfig,
        accumulate_window,
        apply_update,
        build_models,
        cosine_with_warmup,
    )

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    from unisd.allocator import active

    name, *suffixes = args.variant.split("+")
    objective = preset(name)
    cfg = TrainConfig(
        lora=LoraSettings(r=args.lora_r, alpha=2 * args.lora_r),
        micro_batch_size=args.micro_batch,
        gradient_checkpointing=args.checkpointing,
        release_host_memory=RELEASED_HEAP in suffixes,
    )
    tokenizer, model, teacher = build_models(cfg, objective, args.model)
    if args.device != "cpu":
        model.to(args.device)
    items = window(
        tokenizer,
        args.micro_batch * args.grad_accum,
        args.prompt_tokens,
        args.teacher_tokens,
        args.completion_tokens,
        objective.num_views,
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(100, 0))
    times = []
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for step in range(args.steps + 1):  # the first step warms up (allocator, kernels)
        start = time.perf_counter()
        accumulate_window(
            model, teacher, objective, items, micro_batch_size=args.micro_batch, pad_id=tokenizer.pad_token_id
        )
        apply_update(params, optimizer, scheduler, teacher, 1.0)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - start)
    peak = (
        torch.cuda.max_memory_allocated() / 2**30
        if args.device.startswith("cuda")
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB → GiB
    )
    print(
        json.dumps(
            {
                "variant": args.variant,
                "allocator": active(),
                "step_s": statistics.median(times),
                "peak_gib": peak,
                "rss_before_steps_gib": base_rss / 2**20,
            }
        )
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--device", default="cpu")
    p.add_argument("--variants", nargs="+", default=VARIANTS)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--teacher-tokens", type=int, default=448)
    p.add_argument("--completion-tokens", type=int, default=128)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--steps", type=int, default=2, help="timed steps per measurement (after one warm-up)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--checkpointing", action="store_true", help="train.gradient_checkpointing=true")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        return child(args)
    from unisd.models import cpu_description  # imports torch, as the children do

    print(
        f"{args.model} on {args.device} ({cpu_description()}, {os.cpu_count()} cores, "
        f"{args.threads} torch thread(s)); micro-batch {args.micro_batch} × accumulation {args.grad_accum}; "
        f"prompt {args.prompt_tokens} / teacher {args.teacher_tokens} / completion {args.completion_tokens} "
        f"tokens; LoRA r={args.lora_r}; gradient checkpointing {'on' if args.checkpointing else 'off'}; {args.repeats} repeats × {args.steps} steps, variants alternated; "
        f"{time.strftime('%Y-%m-%d')}"
    )
    runs: dict[str, list[dict]] = {v: [] for v in args.variants}
    for _ in range(args.repeats):
        for variant in args.variants:
            cmd = [sys.executable, __file__, *_strip_variants(sys.argv[1:]), "--variant", variant]
            env = {**allocator_environment(variant), "OMP_NUM_THREADS": str(args.threads)}
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
            runs[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
    # the reference: plain sd, else the first sd variant (`sd+system` beside `sd+tcmalloc`)
    ref = next((v for v in ("sd", *runs) if v in runs and v.split("+")[0] == "sd"), None)
    sd = statistics.median(r["step_s"] for r in runs[ref]) if ref else None
    print(
        f"| variant | allocator | step s min / median / max | × {ref or 'sd'} (median) | peak memory GiB (median) |"
    )
    print("|---|---|---|---|---|")
    for variant, rs in runs.items():
        t = [r["step_s"] for r in rs]
        ratio = f"{statistics.median(t) / sd:.2f}×" if sd else "–"
        print(
            f"| {variant} | {rs[0]['allocator']} | {min(t):.2f} / {statistics.median(t):.2f} / {max(t):.2f} | {ratio} | "
            f"{statistics.median(r['peak_gib'] for r in rs):.2f} |"
        )


def allocator_environment(variant: str) -> dict[str, str]:
    """The child's environment: the parent's, or the one its `+<allocator>` suffix asks for."""
    from unisd.allocator import CHOICES, LIBRARIES, SYSTEM, AllocatorError, find, preload_environment, resolve

    _, *suffixes = variant.split("+")
    unknown = [s for s in suffixes if s != RELEASED_HEAP and s not in CHOICES]
    if unknown:
        raise SystemExit(f"bench_step: variant {variant!r}: unknown suffix {unknown[0]!r}")
    allocator = next((s for s in suffixes if s in CHOICES), None)
    if allocator is None:
        return dict(os.environ)
    # the parent may itself run on an allocator: the child starts from LD_PRELOAD without it
    libraries = {str(path) for path in map(find, LIBRARIES) if path}
    kept = [p for p in os.environ.get("LD_PRELOAD", "").split(":") if p and p not in libraries]
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if kept:
        env["LD_PRELOAD"] = ":".join(kept)
    if allocator == SYSTEM:
        return env
    try:
        target = resolve(allocator)
    except AllocatorError as err:
        raise SystemExit(f"bench_step: variant {variant!r}: {err}") from None
    return preload_environment(*target, env) if target else env


def _strip_variants(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if a == "--variants":
            skip = True
            continue
        if skip and a.startswith("--"):
            skip = False
        if not skip:
            out.append(a)
    return out


if __name__ == "__main__":
    main()
