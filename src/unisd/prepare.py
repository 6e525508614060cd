"""Data prep: benchmarks → training records (student + teacher prompt ids) and held-out eval records.

Items whose student or teacher prompt exceeds its length limit are counted and dropped with a report —
never silently truncated (a truncated teacher prompt would distil from a teacher that never saw the demo).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

from pydantic import Field

from unisd.artifacts import begin_stage, hash_files, write_jsonl, write_text
from unisd.config import StrictModel
from unisd.data import (
    encode_prompt,
    load_benchmark,
    resolve_data_dir,
    student_messages,
    teacher_messages,
)
from unisd.data.benchmarks import BENCHMARK_SPECS, benchmark_files
from unisd.data.records import Record

log = logging.getLogger(__name__)


class PrepareConfig(StrictModel):
    benchmarks: list[str] = Field(["mbpp"], min_length=1)  # what is trained on: at least one
    eval_only: list[str] = []  # held-out benchmarks never trained on (transfer), e.g. [gpqa, humaneval]
    train_split: str = Field("train", min_length=1)
    eval_split: str = Field("auto", min_length=1)  # "test" where it has labels, else "validation" (CQA)
    train_limit: int | None = Field(None, ge=1)  # per benchmark; a seeded sample when set; None = all
    eval_limit: int | None = Field(None, ge=1)  # None = all
    max_prompt_tokens: int = Field(3072, ge=1)
    max_teacher_prompt_tokens: int = Field(4096, ge=1)
    data_dir: str | None = None
    seed: int = Field(0, ge=0)  # the training sample (train_limit)
    eval_seed: int | None = Field(
        None, ge=0
    )  # the held-out sample (eval_limit); None = seed. Fix it to compare seeds.

    def model_post_init(self, _context) -> None:
        unknown = [b for b in [*self.benchmarks, *self.eval_only] if b not in BENCHMARK_SPECS]
        if unknown:
            raise ValueError(f"unknown benchmark(s) {unknown}; expected some of {list(BENCHMARK_SPECS)}")


def eval_split_for(name: str, requested: str) -> str:
    return BENCHMARK_SPECS[name].eval_split if requested == "auto" else requested


def _sample(records: list[Record], limit: int | None, seed: int) -> list[Record]:
    if limit is None or limit >= len(records):
        return records
    return sorted(random.Random(seed).sample(records, limit), key=lambda r: r.id)


def run_prepare(cfg: PrepareConfig, *, model_spec: str, out_dir: str | Path, tokenizer=None) -> dict:
    """Write train.jsonl, eval/<benchmark>.jsonl, dropped.jsonl, report.md and manifest.json to `out_dir`."""
    from unisd.models import load_tokenizer

    out_dir = Path(out_dir)
    data_dir = resolve_data_dir(cfg.data_dir)
    names = [*cfg.benchmarks, *[b for b in cfg.eval_only if b not in cfg.benchmarks]]
    stage = begin_stage(
        "prepare",
        out_dir,
        config={**cfg.model_dump(), "model": model_spec},
        inputs=[f for name in names for f in benchmark_files(name, data_dir)],
        model=model_spec,
    )
    if stage.done:
        return stage.done
    timer = stage.timer
    tokenizer = tokenizer or load_tokenizer(model_spec)
    train_rows, dropped, eval_counts = [], [], {}
    with timer("prepare"):
        eval_seed = cfg.seed if cfg.eval_seed is None else cfg.eval_seed
        for name in names:
            train = (
                _sample(load_benchmark(name, cfg.train_split, data_dir=data_dir), cfg.train_limit, cfg.seed)
                if name in cfg.benchmarks
                else []
            )
            held_out = _sample(
                load_benchmark(name, eval_split_for(name, cfg.eval_split), data_dir=data_dir),
                cfg.eval_limit,
                eval_seed,
            )
            overlap = {r.id for r in train} & {r.id for r in held_out}
            if overlap:
                raise ValueError(f"{name}: {len(overlap)} items are in both the training and the eval split")
            for rec in train:
                student = encode_prompt(tokenizer, student_messages(rec))
                teacher = encode_prompt(tokenizer, teacher_messages(rec))
                reasons = []
                if len(student) > cfg.max_prompt_tokens:
                    reasons.append(
                        f"student prompt {len(student)} > max_prompt_tokens {cfg.max_prompt_tokens}"
                    )
                if len(teacher) > cfg.max_teacher_prompt_tokens:
                    reasons.append(
                        f"teacher prompt {len(teacher)} > max_teacher_prompt_tokens {cfg.max_teacher_prompt_tokens}"
                    )
                if reasons:
                    dropped.append({"id": rec.id, "stage": "prepare", "reasons": reasons})
                    continue
                train_rows.append(
                    {
                        "id": rec.id,
                        "record": rec.to_dict(),
                        "student_prompt_ids": student,
                        "teacher_prompt_ids": teacher,
                    }
                )
            write_jsonl(out_dir / "eval" / f"{name}.jsonl", [r.to_dict() for r in held_out])
            eval_counts[name] = len(held_out)
    if not train_rows:
        raise ValueError(
            f"no training items left after the length limits ({len(dropped)} dropped); see report"
        )
    write_jsonl(out_dir / "train.jsonl", train_rows)
    data_hash = hash_files(sorted([out_dir / "train.jsonl", *(out_dir / "eval").glob("*.jsonl")]))
    write_jsonl(out_dir / "dropped.jsonl", dropped)
    report = [
        "# Data prep",
        "",
        f"model: `{model_spec}`, data: `{data_dir}`",
        "",
        "| benchmark | train items | eval items |",
        "|---|---|---|",
        *[
            f"| {b} | {sum(1 for r in train_rows if r['record']['benchmark'] == b)} | {eval_counts[b]} |"
            for b in eval_counts
        ],
        "",
        f"Dropped for length (never truncated): {len(dropped)}",
        *[f"- {d['id']}: {'; '.join(d['reasons'])}" for d in dropped[:50]],
    ]
    write_text(out_dir / "report.md", "\n".join(report) + "\n")
    counts = {"train": len(train_rows), "dropped": len(dropped), "eval": eval_counts, "data_hash": data_hash}
    log.info("prepare: %s", counts)
    return stage.finish(counts=counts)
