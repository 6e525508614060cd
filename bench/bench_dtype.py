"""Forward time in float32 against bfloat16 on this machine's CPU, the question behind every `*.dtype` setting.

On a CPU with native bf16 (AVX512-BF16 / AMX) bf16 weights decode faster; without it torch emulates bf16 and
it is several times slower. The header says which CPU this is; the machine can change between sessions.

    OMP_NUM_THREADS=2 python bench/bench_dtype.py                       # SmolLM2, (16, 1) (8, 32) (8, 128)
    python bench/bench_dtype.py --shapes 8x512 --repeats 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from unisd.models import cpu_description, load_model  # noqa: E402


def shape(text: str) -> tuple[int, int]:
    """ "8x128" → (8, 128): batch rows × tokens per row."""
    rows, _, tokens = text.partition("x")
    if not (rows.isdigit() and tokens.isdigit() and int(rows) > 0 and int(tokens) > 0):
        raise argparse.ArgumentTypeError(f"a shape is ROWSxTOKENS with both ≥ 1, e.g. 8x128; got {text!r}")
    return int(rows), int(tokens)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--shapes", nargs="+", type=shape, default=[(16, 1), (8, 32), (8, 128)])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.repeats < 1 or args.threads < 1:
        sys.exit(f"--repeats and --threads must be at least 1, got {args.repeats} and {args.threads}")
    torch.set_num_threads(args.threads)
    print(
        f"{args.model} forward on cpu ({cpu_description()}, {os.cpu_count()} cores, {args.threads} threads); "
        f"one warm-up, then min / median of {args.repeats}; {time.strftime('%Y-%m-%d')}"
    )
    models = {dtype: load_model(args.model, dtype=dtype, device="cpu") for dtype in ("float32", "bfloat16")}
    print("| rows × tokens | float32 s | bfloat16 s | bf16 / fp32 |")
    print("|---|---|---|---|")
    for rows, tokens in args.shapes:
        ids = torch.randint(0, 1000, (rows, tokens))
        seconds = {}
        for dtype, model in models.items():
            times = []
            with torch.inference_mode():
                model(ids)  # warm-up: first-call allocations and kernel selection
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    model(ids)
                    times.append(time.perf_counter() - start)
            seconds[dtype] = (min(times), statistics.median(times))
        fp32, bf16 = seconds["float32"], seconds["bfloat16"]
        print(
            f"| {rows} × {tokens} | {fp32[0]:.3f} / {fp32[1]:.3f} | {bf16[0]:.3f} / {bf16[1]:.3f} | "
            f"{bf16[1] / fp32[1]:.2f}× |"
        )


if __name__ == "__main__":
    main()
