"""The UniSD* teacher side, side by side: the c*/c⁻ pair as one shared-prefix call
(`sequences.paired_completion_hidden`) vs two plain passes, no grad, on bench_step's window of real-vocabulary
prompts (x, then the demonstration).

    python bench/bench_teacher_pass.py                  # SmolLM2-135M, CPU, 1 thread, 2 and 4 items
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_step import window  # noqa: E402

from unisd.models import load_model, load_tokenizer  # noqa: E402
from unisd.sequences import build_teacher_forcing_batch, completion_hidden, paired_completion_hidden  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--items", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer, model = load_tokenizer(args.model), load_model(args.model)
    pad = tokenizer.pad_token_id
    print("| items | paired s | two plain s | plain / paired |\n|---|---|---|---|")
    for n in args.items:
        items = window(tokenizer, n, 256, 448, 128, 3)
        pos, neg = [i["teacher_prompt_ids"] for i in items], [i["negative_prompt_ids"] for i in items]
        comp = [i["completion_ids"] for i in items]
        for _ in range(args.repeats):
            with torch.no_grad():
                start = time.perf_counter()
                paired_completion_hidden(model, pos, neg, comp, pad_id=pad)
                paired = time.perf_counter() - start
                start = time.perf_counter()
                for prompts in (pos, neg):
                    completion_hidden(model, build_teacher_forcing_batch(prompts, comp, pad_id=pad))
                plain = time.perf_counter() - start
            print(f"| {n} | {paired:.1f} | {plain:.1f} | {plain / paired:.2f}× |")


if __name__ == "__main__":
    main()
