"""Peak memory and time of the chunked divergence vs the naive [N, V] form, forward + backward.

    python bench/bench_chunked_loss.py                              # CPU, vocab 49,152 and 151,936
    python bench/bench_chunked_loss.py --device cuda --tokens 8192 --hidden 3584 --dtype bfloat16

Every variant runs in a fresh subprocess so that peaks do not mix:
- CPU: the parent reads each child's own peak RSS from os.wait4 (per-child rusage; the cumulative
  RUSAGE_CHILDREN maximum would hide a smaller child behind a larger earlier one) and subtracts the
  peak of a baseline child that only allocates the inputs.
- CUDA: each child reports torch.cuda.max_memory_allocated minus what is allocated after its inputs.
Variants: naive (logits = h Wᵀ in fp32, unisd.losses.token_divergence, autograd), chunked
(unisd.losses.chunked_token_divergence), and TRL's generalized_jsd_loss if `trl` imports (not installed
in the dev env; never installed by this script). The values (loss, ∂/∂h, a projection of ∂/∂W) of each
variant are checked against the naive one. The student head requires grad unless --frozen-head (LoRA).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ("baseline", "naive", "chunked", "trl")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vocab", type=int, nargs="+", default=[49152, 151936])
    parser.add_argument("--tokens", type=int, default=1024, help="N = B·T completion tokens")
    parser.add_argument("--hidden", type=int, default=576, help="H (576 = SmolLM2-135M)")
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument(
        "--kind", default="forward_kl", choices=["forward_kl", "reverse_kl", "jsd", "skew_kl"]
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="input dtype")
    parser.add_argument("--frozen-head", action="store_true", help="head weight without grad (LoRA case)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs (the minimum is reported)")
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed runs (default: 0 on CPU, 1 on CUDA)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--worker-vocab", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------ worker side


def _inputs(args, vocab, torch):
    g = torch.Generator(device="cpu").manual_seed(0)
    dtype = getattr(torch, args.dtype)
    h = args.hidden
    student = torch.randn(args.tokens, h, generator=g).to(args.device, dtype)
    teacher = (student.float().cpu() + 0.5 * torch.randn(args.tokens, h, generator=g)).to(args.device, dtype)
    weight = (torch.randn(vocab, h, generator=g) * (3.0 / h**0.5)).to(args.device, dtype)
    return student.requires_grad_(), weight.requires_grad_(not args.frozen_head), teacher


def _run_variant(variant, args, student, weight, teacher, torch):
    from unisd.losses import chunked_token_divergence, token_divergence

    student.grad = None
    weight.grad = None
    if variant == "naive":
        logits_s = student.float() @ weight.float().t()
        with torch.no_grad():
            logits_t = teacher.float() @ weight.float().t()
        loss = token_divergence(logits_s, logits_t, args.kind).sum()
    elif variant == "chunked":
        loss = chunked_token_divergence(
            student, weight, teacher, None, args.kind, chunk_size=args.chunk_size
        ).sum()
    elif variant == "trl":
        logits_s = (student.float() @ weight.float().t()).unsqueeze(0)
        with torch.no_grad():
            logits_t = (teacher.float() @ weight.float().t()).unsqueeze(0)
        # TRL: beta=0 → KL(teacher‖student) (forward), beta=1 → reverse, else generalized JSD.
        beta = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": 0.5}[args.kind]
        loss = trl_gkd_trainer().generalized_jsd_loss(logits_s, logits_t, beta=beta, reduction="sum")
    else:
        raise ValueError(variant)
    loss.backward()
    return loss


def worker(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    vocab = args.worker_vocab
    cuda = args.device == "cuda"
    student, weight, teacher = _inputs(args, vocab, torch)
    if cuda:
        torch.cuda.synchronize()
        base_alloc = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    result = {"variant": args.worker, "vocab": vocab}
    if args.worker != "baseline":
        warmup = args.warmup if args.warmup is not None else (1 if cuda else 0)
        for _ in range(warmup):
            _run_variant(args.worker, args, student, weight, teacher, torch)
        times = []
        for _ in range(max(1, args.repeats)):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            loss = _run_variant(args.worker, args, student, weight, teacher, torch)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        result["time_s"] = min(times)
        result["loss"] = float(loss)
        # Values to compare across variants: ∂/∂h whole, ∂/∂W through a fixed projection.
        proj = torch.randn(args.hidden, generator=torch.Generator().manual_seed(1)).to(args.device)
        payload = {"grad_h": student.grad.float().cpu()}
        if weight.grad is not None:
            payload["grad_w_proj"] = (weight.grad.float() @ proj).cpu()
        torch.save(payload, args.out + ".pt")
    if cuda:
        result["peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base_alloc) / 2**20
    Path(args.out).write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------ parent side


def trl_gkd_trainer():
    """TRL's GKDTrainer (home of the static generalized_jsd_loss), wherever this TRL version keeps it."""
    try:
        from trl import GKDTrainer
    except ImportError:
        from trl.experimental.gkd import GKDTrainer
    return GKDTrainer


def trl_available() -> bool:
    try:
        trl_gkd_trainer()
    except Exception:  # not installed (the dev env), or an incompatible version
        return False
    return True


def run_child(args, variant: str, vocab: int, workdir: str) -> dict:
    out = os.path.join(workdir, f"{variant}_{vocab}.json")
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        variant,
        "--worker-vocab",
        str(vocab),
        "--out",
        out,
        "--tokens",
        str(args.tokens),
        "--hidden",
        str(args.hidden),
        "--chunk-size",
        str(args.chunk_size),
        "--kind",
        args.kind,
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--repeats",
        str(args.repeats),
    ]
    if args.frozen_head:
        cmd.append("--frozen-head")
    if args.warmup is not None:
        cmd += ["--warmup", str(args.warmup)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} (vocab {vocab}) failed with exit code {proc.returncode}:\n{output}")
    result = json.loads(Path(out).read_text())
    result["maxrss_mib"] = usage.ru_maxrss / 1024  # Linux: KiB
    return result


def compare(workdir: str, variant: str, vocab: int) -> dict:
    import torch

    ref = torch.load(os.path.join(workdir, f"naive_{vocab}.json.pt"))
    got = torch.load(os.path.join(workdir, f"{variant}_{vocab}.json.pt"))
    errors = {}
    for key in ref:
        a, b = got[key].double(), ref[key].double()
        errors[key] = ((a - b).norm() / b.norm().clamp_min(1e-30)).item()
    return errors


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("--device cuda: CUDA is not available", file=sys.stderr)
            return 2
    variants = ["naive", "chunked"]
    if args.skip_trl or args.kind == "skew_kl":
        pass
    elif trl_available():
        variants.append("trl")
    else:
        print("trl does not import: TRL's generalized_jsd_loss is not measured")
    print(
        f"device={args.device} dtype={args.dtype} N={args.tokens} H={args.hidden} chunk={args.chunk_size} "
        f"kind={args.kind} head_grad={not args.frozen_head} repeats={args.repeats}"
    )
    header = f"{'vocab':>7} {'variant':>8} {'time_s':>8} {'extra_peak_MiB':>15} {'loss':>14} {'rel_err_loss':>12} {'rel_err_grad_h':>14} {'rel_err_grad_W':>14}"
    print(header)
    summary = []
    with tempfile.TemporaryDirectory() as workdir:
        for vocab in args.vocab:
            base = run_child(args, "baseline", vocab, workdir) if args.device == "cpu" else None
            rows = {}
            for variant in variants:
                r = run_child(args, variant, vocab, workdir)
                if args.device == "cpu":
                    r["peak_extra_mib"] = r["maxrss_mib"] - base["maxrss_mib"]
                rows[variant] = r
            for variant, r in rows.items():
                err = compare(workdir, variant, vocab)
                rel_loss = abs(r["loss"] - rows["naive"]["loss"]) / abs(rows["naive"]["loss"])
                r.update(rel_err_loss=rel_loss, **{f"rel_err_{k}": v for k, v in err.items()})
                print(
                    f"{vocab:>7} {variant:>8} {r['time_s']:>8.2f} {r['peak_extra_mib']:>15.1f} {r['loss']:>14.6g} "
                    f"{rel_loss:>12.2e} {err['grad_h']:>14.2e} {err.get('grad_w_proj', float('nan')):>14.2e}"
                )
            naive, chunked = rows["naive"], rows["chunked"]
            mem_ratio = chunked["peak_extra_mib"] / naive["peak_extra_mib"]
            time_ratio = chunked["time_s"] / naive["time_s"]
            summary.append(
                (vocab, mem_ratio, time_ratio, max(chunked["rel_err_loss"], chunked["rel_err_grad_h"]))
            )
            if base is not None:
                print(f"{vocab:>7} baseline (inputs only) peak RSS {base['maxrss_mib']:.1f} MiB")
    # Both variants return gradients in the input dtype: bf16 rounding alone differs by ~1e-4.
    tolerance = 1e-4 if args.dtype == "float32" else 1e-3
    print(f"\nchunked / naive (values must agree to {tolerance:g} relative):")
    ok = True
    for vocab, mem_ratio, time_ratio, err in summary:
        goal = mem_ratio <= 0.5
        ok &= goal and err < tolerance
        print(
            f"  vocab {vocab:>7}: peak memory x{mem_ratio:.3f} (goal <= 0.5: {'met' if goal else 'NOT met'}), "
            f"time x{time_ratio:.2f}, max rel. error {err:.1e}"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
