"""The decode step's LM head on CPU: `F.linear(x, W)` (W [V, d], the layout HF keeps) against `x @ Wᵀ` with Wᵀ
stored contiguous ([d, V]), side by side, alternating, in one run.

On the AVX2 EPYC of 2026-12-04, MKL's sgemm for the skinny product a decode step makes (rows × 576 by 576 × 49152)
was several times slower in the linear layout. This bench measures (1) the product alone, at the decode batch
sizes, and (2) a whole greedy decode (unisd's `pruned` path) with the head swapped for the transposed copy,
and checks the greedy tokens stay equal. Rerun with this bench on the same CPU, the gap did not reproduce at
decode batch sizes (docs/PERFORMANCE.md), so the rollout keeps HF's head.

    OMP_NUM_THREADS=2 python bench/bench_lm_head_layout.py
    OMP_NUM_THREADS=2 python bench/bench_lm_head_layout.py --rows 8 16 --items 8 --max-new-tokens 48
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_rollout import prompts_of  # noqa: E402

from unisd.models import cpu_description, load_model, load_tokenizer  # noqa: E402
from unisd.rollout import DECODERS, RolloutConfig  # noqa: E402


class TransposedHead(torch.nn.Module):
    """An LM head computing h @ Wᵀ from a contiguous [d, V] copy of W (bias-free, as tied heads are).

    h: [..., d] → logits [..., V]. A copy, so only valid while W does not change (a rollout, not a step)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight_t = weight.detach().t().contiguous()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.weight_t


@contextlib.contextmanager
def transposed_head(model):
    """Swap `model.lm_head` for a TransposedHead for the duration of the block."""
    original = model.lm_head
    if original.bias is not None:
        raise ValueError("transposed_head: the LM head has a bias; this bench assumes a bias-free head")
    model.lm_head = TransposedHead(original.weight)
    try:
        yield model
    finally:
        model.lm_head = original


def time_ms(fn, repeats: int) -> list[float]:
    fn()  # warm up (MKL picks its kernels on the first call)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16])
    p.add_argument("--gemm-repeats", type=int, default=20)
    p.add_argument("--items", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    for flag in ("gemm_repeats", "items", "max_new_tokens", "repeats"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be ≥ 1, got {getattr(args, flag)}")
    if min(args.rows) < 1:
        p.error(f"--rows must be ≥ 1, got {args.rows}")
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, device="cpu", dtype="float32")
    weight = model.lm_head.weight.detach()
    vocab, dim = weight.shape
    print(
        f"{args.model} LM head [{vocab}, {dim}] fp32 on {cpu_description()} ({os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads), torch {torch.__version__}"
    )
    print(
        "\n| rows | F.linear(x, W) ms median | x @ Wᵀ (contiguous) ms median | linear / transposed | max |Δ| |"
    )
    print("|---|---|---|---|---|")
    weight_t = weight.t().contiguous()
    for rows in args.rows:
        x = torch.randn(rows, dim, generator=torch.Generator().manual_seed(rows))
        with torch.no_grad():
            linear = statistics.median(time_ms(lambda x=x: F.linear(x, weight), args.gemm_repeats))
            transposed = statistics.median(time_ms(lambda x=x: x @ weight_t, args.gemm_repeats))
            gap = (F.linear(x, weight) - x @ weight_t).abs().max().item()
        print(f"| {rows} | {linear:.1f} | {transposed:.1f} | **{linear / transposed:.2f}×** | {gap:.1e} |")

    prompts = prompts_of(args.model, args.items, tokenizer)
    cfg = RolloutConfig(
        temperature=0.0, max_new_tokens=args.max_new_tokens, batch_size=len(prompts), decode="pruned"
    )
    decode = DECODERS["pruned"]
    seconds: dict[str, list[float]] = {"linear": [], "transposed": []}
    tokens: dict[str, list[list[int]]] = {}
    for _ in range(args.repeats):
        for layout in seconds:
            head = transposed_head(model) if layout == "transposed" else contextlib.nullcontext()
            with head:
                start = time.perf_counter()
                out = decode(model, tokenizer, prompts, cfg)
                seconds[layout].append(time.perf_counter() - start)
            tokens[layout] = [ids for ids, _, _ in out]
    same = tokens["linear"] == tokens["transposed"]
    lin, tr = (statistics.median(seconds[k]) for k in ("linear", "transposed"))
    print(
        f"\ngreedy pruned decode, {len(prompts)} prompts in one batch, ≤{args.max_new_tokens} new tokens, "
        f"{args.repeats} repeats alternated:"
    )
    print(f"- linear head: {' / '.join(f'{s:.1f}' for s in seconds['linear'])} s")
    print(f"- transposed head: {' / '.join(f'{s:.1f}' for s in seconds['transposed'])} s")
    print(f"- **linear / transposed: {lin / tr:.2f}×** (median); greedy tokens equal: {same}")


if __name__ == "__main__":
    main()
