"""Where one training micro-batch's memory goes (docs/PERFORMANCE.md, "Where the train stage's memory goes").

Peak resident set after the teacher pass, the student forward and the backward (VmHWM reset between phases via
/proc/self/clear_refs, Linux), and, with --saved, the tensors autograd keeps for backward grouped by shape.
Run it under another allocator to compare, e.g. LD_PRELOAD=libjemalloc.so.2 or MALLOC_MMAP_THRESHOLD_=131072.

    python bench/probe_train_memory.py sd 4                  # variant, items per micro-batch
    python bench/probe_train_memory.py sd 4 --checkpointing --saved
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_step import window  # noqa: E402

from unisd.objective import preset  # noqa: E402
from unisd.train import (  # noqa: E402
    LoraSettings,
    TrainConfig,
    build_models,
    micro_batch_loss,
    teacher_pass,
    window_normalizer_counts,
    window_weights,
)


def status_gib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    raise KeyError(field)


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("variant")
    ap.add_argument("items", type=int)
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--saved", action="store_true", help="group the tensors autograd saves by shape")
    args = ap.parse_args()
    torch.set_num_threads(1)
    objective = preset(args.variant)
    cfg = TrainConfig(
        lora=LoraSettings(r=8, alpha=16),
        micro_batch_size=args.items,
        gradient_checkpointing=args.checkpointing,
    )
    tokenizer, model, teacher = build_models(cfg, objective, "smollm2-135m-instruct")
    items = window(tokenizer, args.items, 256, 448, 128, objective.num_views)
    pad = tokenizer.pad_token_id
    weights = window_weights(objective, items, args.items)
    normalizers = window_normalizer_counts(items, weights, args.items)
    print(f"after load: rss {status_gib('VmRSS'):.2f} GiB")

    def phase(name, fn):
        reset_peak()
        start = time.perf_counter()
        out = fn()
        print(
            f"{name}: rss {status_gib('VmRSS'):.2f} peak {status_gib('VmHWM'):.2f} GiB, {time.perf_counter() - start:.1f} s"
        )
        return out

    t = phase("teacher pass", lambda: teacher_pass(model, teacher, objective, items, pad_id=pad))
    saved: dict[int, tuple] = {}

    def pack(x):
        key = x.untyped_storage().data_ptr()
        saved.setdefault(key, (tuple(x.shape), str(x.dtype), x.untyped_storage().nbytes()))
        return x

    def forward():
        with (
            torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x)
            if args.saved
            else contextlib.nullcontext()
        ):
            return micro_batch_loss(
                model, teacher, objective, items, pad_id=pad, weights_by_item=weights,
                normalizers=normalizers, teacher_outputs=t,
            )[0]  # fmt: skip

    loss = phase("student forward", forward)
    phase("backward", loss.backward)
    if args.saved:
        total = collections.Counter()
        for shape, dtype, nbytes in saved.values():
            total[(shape, dtype)] += nbytes
        print(f"saved for backward: {sum(total.values()) / 2**30:.2f} GiB; largest groups (MiB):")
        for (shape, dtype), nbytes in total.most_common(8):
            print(f"  {nbytes / 2**20:8.1f}  {shape} {dtype}")


if __name__ == "__main__":
    main()
