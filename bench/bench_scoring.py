"""Multi-view scoring throughput: unisd's batched scorer vs a naive loop (one HF forward per view per item).

Both compute ℓ^k_t = log p(y_t | a_k, x, y<t) for K views of N completions; the values are checked equal.
The workload mimics induced contexts: K views whose context prefix comes from a small pool (so many rows
share a prefix), a per-item question, and a per-item completion. Timings are measured side by side in one
run (this machine is noisy), and the ratios are what to read.

    python bench/bench_scoring.py                                   # SmolLM2-135M on CPU
    python bench/bench_scoring.py --model random:qwen2.5-0.5b --device cuda --items 256
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from unisd.models import load_model  # noqa: E402
from unisd.scoring import score_views  # noqa: E402


def workload(
    n_items: int,
    k: int,
    pool: int,
    ctx_len: int,
    q_len: tuple[int, int],
    y_len: tuple[int, int],
    vocab: int,
    seed: int = 0,
):
    rng = random.Random(seed)
    contexts = [[rng.randrange(100, vocab) for _ in range(ctx_len)] for _ in range(pool)]
    rows = []
    for _ in range(n_items):
        question = [rng.randrange(100, vocab) for _ in range(rng.randint(*q_len))]
        completion = [rng.randrange(100, vocab) for _ in range(rng.randint(*y_len))]
        for c in rng.sample(range(pool), k):
            rows.append((contexts[c] + question, completion, f"induced:{c}"))
    return rows


@torch.no_grad()
def naive(model, rows):
    """One full HF forward per row (= per view per item): logits at every position, then gather."""
    device = next(model.parameters()).device
    out = []
    for prompt, completion, _ in rows:
        ids = torch.tensor([prompt + completion], device=device)
        logits = model(input_ids=ids).logits[0].float()
        logp = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
        out.append(logp.gather(1, torch.tensor(completion, device=device)[:, None]).squeeze(1).tolist())
    return out


def timed(fn, device):
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bf16 on cuda, fp32 on cpu")
    ap.add_argument("--items", type=int, default=24)
    ap.add_argument("--views", type=int, default=3)
    ap.add_argument("--pool", type=int, default=4, help="distinct induced contexts")
    ap.add_argument("--context-len", type=int, default=160)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()

    model = load_model(args.model, device=args.device, dtype=args.dtype).eval()
    vocab = model.get_output_embeddings().weight.shape[0]
    rows = workload(args.items, args.views, args.pool, args.context_len, (40, 90), (48, 96), vocab)
    tokens = sum(len(p) + len(c) for p, c, _ in rows)
    print(
        f"model={args.model} device={args.device} dtype={next(model.parameters()).dtype} items={args.items} "
        f"K={args.views} rows={len(rows)} tokens={tokens} context_pool={args.pool}"
    )
    # Warm-up (allocator, kernels) on a few rows, not timed.
    naive(model, rows[:2])
    score_views(model, rows[:4], pad_id=0, batch_size=4, chunk_size=1024, progress=False)

    ref, t_naive = timed(lambda: naive(model, rows), args.device)
    plain, t_plain = timed(
        lambda: score_views(
            model,
            rows,
            pad_id=0,
            batch_size=args.batch_size,
            chunk_size=1024,
            prefix_cache=False,
            progress=False,
        ),
        args.device,
    )
    ours, t_ours = timed(
        lambda: score_views(
            model,
            rows,
            pad_id=0,
            batch_size=args.batch_size,
            chunk_size=1024,
            prefix_cache=True,
            min_shared_prefix=16,
            progress=False,
        ),
        args.device,
    )
    diff = max(abs(a - b) for r, o in zip(ref, ours) for a, b in zip(r, o))
    diff_plain = max(abs(a - b) for r, o in zip(ref, plain) for a, b in zip(r, o))
    print(f"{'variant':<38}{'seconds':>10}{'rows/s':>10}{'speed-up':>10}")
    for name, t in (
        ("naive: HF forward per view per item", t_naive),
        ("unisd batched, no prefix cache", t_plain),
        ("unisd batched + shared-prefix KV cache", t_ours),
    ):
        print(f"{name:<38}{t:>10.2f}{len(rows) / t:>10.1f}{t_naive / t:>9.2f}x")
    print(f"max |Δ logp| vs naive: batched {diff_plain:.2e}, prefix-cached {diff:.2e}")


if __name__ == "__main__":
    main()
