"""What does self-distillation teach? The teacher's distribution on the student's own tokens, measured.

For N training items of one benchmark the student samples a completion (T, max tokens as in training); the
same model then reads (x, y) as the student and (c*, x, y) as the teacher. Per completion position we
compare the two full distributions: entropy, the probability of stopping (EOS), and KL(p^T ‖ p^S) — the
sd loss — split by where in the answer the position lies:

    answer    positions up to and including the answer line ("Answer: X")
    after     positions after the answer line (what the student writes once it has answered)
    eos       the position where the student stopped (the EOS token itself)
    cut       completions that hit the token limit before any EOS

It also greedy-decodes the teacher prompt itself (how the teacher would answer) and reports its length and
format. Run on CPU in a few minutes:

    python bench/probe_sd_signal.py --benchmark commonsenseqa --items 32 --max-new-tokens 96
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from unisd.artifacts import read_jsonl  # noqa: E402
from unisd.data.records import Record  # noqa: E402
from unisd.extract import extract_choice_letter  # noqa: E402
from unisd.models import load_model, load_tokenizer  # noqa: E402
from unisd.prepare import PrepareConfig, run_prepare  # noqa: E402
from unisd.rollout import RolloutConfig, eos_token_ids, generate_hf  # noqa: E402

ANSWER_LINE = re.compile(r"answer\s*[:\-]?\s*\(?[A-Ea-e]\)?", re.IGNORECASE)


@torch.no_grad()
def full_logprobs(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """[T, V] log p(· | prompt, y<t) at the T completion positions (fp32)."""
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits, dim=-1)


def answer_end(tokenizer, completion: list[int]) -> int | None:
    """Index of the first completion token after the answer line, or None when there is no answer line."""
    for t in range(1, len(completion) + 1):
        text = tokenizer.decode(completion[:t], skip_special_tokens=True)
        if ANSWER_LINE.search(text):
            return t
    return None


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--benchmark", default="commonsenseqa")
    p.add_argument("--items", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    tok = load_tokenizer(args.model)
    model = load_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        run_prepare(
            PrepareConfig(benchmarks=[args.benchmark], train_limit=args.items, eval_limit=1, seed=args.seed),
            model_spec=args.model,
            out_dir=tmp,
            tokenizer=tok,
        )
        rows = read_jsonl(Path(tmp) / "train.jsonl")
    eos = eos_token_ids(tok, model)
    eos_id = sorted(eos)[0]
    cfg = RolloutConfig(temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=args.seed)
    greedy = cfg.model_copy(update={"temperature": 0.0})
    by_region: dict[str, dict[str, list[float]]] = {}
    lengths = {"student": [], "teacher_greedy": []}
    formats = {"student_parsed": 0, "teacher_parsed": 0, "teacher_correct": 0, "finished": 0}

    def add(region: str, key: str, values: torch.Tensor) -> None:
        by_region.setdefault(region, {}).setdefault(key, []).extend(values.tolist())

    for b in range(0, len(rows), 8):
        chunk = rows[b : b + 8]
        sampled = generate_hf(model, tok, [r["student_prompt_ids"] for r in chunk], cfg, first_index=b)
        teacher_says = generate_hf(
            model, tok, [r["teacher_prompt_ids"] for r in chunk], greedy, first_index=b
        )
        for row, (y, finished, _), (ty, _, _) in zip(chunk, sampled, teacher_says):
            rec = Record.from_dict(row["record"])
            n = len(rec.choices or [])
            text = tok.decode(y, skip_special_tokens=True)
            ttext = tok.decode(ty, skip_special_tokens=True)
            lengths["student"].append(len(text))
            lengths["teacher_greedy"].append(len(ttext))
            formats["finished"] += finished
            formats["student_parsed"] += extract_choice_letter(text, n) is not None
            t_letter = extract_choice_letter(ttext, n)
            formats["teacher_parsed"] += t_letter is not None
            formats["teacher_correct"] += t_letter == rec.answer
            if not y:
                continue
            ls = full_logprobs(model, row["student_prompt_ids"], y)
            lt = full_logprobs(model, row["teacher_prompt_ids"], y)
            kl = (lt.exp() * (lt - ls)).sum(-1)
            ent_s = -(ls.exp() * ls).sum(-1)
            ent_t = -(lt.exp() * lt).sum(-1)
            eos_s, eos_t = ls[:, eos_id].exp(), lt[:, eos_id].exp()
            end = answer_end(tok, y)
            regions = torch.zeros(len(y), dtype=torch.long)  # 0 answer, 1 after, 2 eos, 3 cut
            if end is not None:
                regions[end:] = 1
            elif not finished:
                regions[:] = 3
            if finished:
                regions[-1] = 2
            for code, name in enumerate(("answer", "after", "eos", "cut, no answer line")):
                sel = regions == code
                if sel.any():
                    for key, v in (
                        ("kl", kl),
                        ("H_student", ent_s),
                        ("H_teacher", ent_t),
                        ("p_eos_student", eos_s),
                        ("p_eos_teacher", eos_t),
                    ):
                        add(name, key, v[sel])
        print(f"  {min(b + 8, len(rows))}/{len(rows)} items", file=sys.stderr)

    n = len(rows)
    print(
        f"\n{args.model}, {args.benchmark}, {n} training items, rollout T={args.temperature} "
        f"≤{args.max_new_tokens} tokens"
    )
    print(
        f"student rollouts: finished (EOS) {formats['finished']}/{n}, answer letter parsed "
        f"{formats['student_parsed']}/{n}, mean length {statistics.mean(lengths['student']):.0f} chars"
    )
    print(
        f"teacher (greedy on the teacher prompt): parsed {formats['teacher_parsed']}/{n}, correct "
        f"{formats['teacher_correct']}/{n}, mean length {statistics.mean(lengths['teacher_greedy']):.0f} chars"
    )
    print("\n| positions | tokens | KL(p^T‖p^S) | H student | H teacher | p(EOS) student | p(EOS) teacher |")
    print("|---|---|---|---|---|---|---|")
    for name, stats in by_region.items():
        m = {k: statistics.mean(v) for k, v in stats.items()}
        print(
            f"| {name} | {len(stats['kl'])} | {m['kl']:.3f} | {m['H_student']:.3f} | {m['H_teacher']:.3f} "
            f"| {m['p_eos_student']:.4f} | {m['p_eos_teacher']:.4f} |"
        )


if __name__ == "__main__":
    main()
