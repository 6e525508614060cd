"""Data prep: benchmarks and user datasets → training records (student + teacher prompt ids), held-out eval
records, and a snapshot of exactly the rows used.

    prepare.benchmarks: [mbpp, support, s3://team/faq.jsonl]   built-in names, names from prepare.datasets,
                                                                or dataset sources (docs/datasets.md)
    prepare.datasets: {support: {source: ..., kind: ..., columns: {...}}}

Everything is read and validated before anything is written, so a bad row, an empty split or an
unreachable source leaves no half-written folder. The output:

    train.jsonl              {"id", "record", "student_prompt_ids", "teacher_prompt_ids"}
    eval/<name>.jsonl        the held-out records of each benchmark / dataset
    snapshot/<name>.jsonl    the rows used (training items kept + held-out items), as records without
                             their source path; later stages and reruns read these files, never the source
    snapshot/sources.json    per dataset: the source, its kind, fingerprint, rows and the rows' sha256
    dropped.jsonl, report.md, manifest.json (counts.data_hash = sha256 of snapshot/*.jsonl: the MLflow
                             lineage tag `data_hash`; a changed source is a new data hash)

Skip-if-done (`begin_stage`) covers the config, the contents of every local input file and, for object
storage and the Hub, the sources' fingerprints (size + ETag / md5 / generation, the Hub commit): an
unchanged rerun skips without downloading anything, a changed source reruns.

Items whose student or teacher prompt exceeds its length limit are counted and dropped with a report —
never silently truncated (a truncated teacher prompt would distil from a teacher that never saw the demo).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field, model_validator

from unisd.artifacts import begin_stage, hash_files, write_json, write_jsonl, write_text
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
from unisd.data.sources import NAME, DatasetSpec, dataset_name, is_source, mask_credentials

log = logging.getLogger(__name__)


class PrepareConfig(StrictModel):
    # built-in benchmark names, names of `datasets`, or dataset sources (a path or URI; docs/datasets.md)
    benchmarks: list[str] = Field(["mbpp"], min_length=1)  # what is trained on: at least one
    eval_only: list[str] = []  # held-out benchmarks never trained on (transfer), e.g. [gpqa, humaneval]
    datasets: dict[str, DatasetSpec] = {}  # user datasets by name
    max_bad_rows: int = Field(0, ge=0)  # user datasets: rows breaking the schema to skip (0: refuse any)
    train_split: str = Field("train", min_length=1)
    eval_split: str = Field("auto", min_length=1)  # "test" where it has labels, else "validation" (CQA)
    train_limit: int | None = Field(None, ge=1)  # per benchmark; a seeded sample when set; None = all
    eval_limit: int | None = Field(None, ge=1)  # None = all
    max_prompt_tokens: int = Field(3072, ge=1)
    max_teacher_prompt_tokens: int = Field(4096, ge=1)
    data_dir: str | None = None  # the built-ins' data directory (a path or an s3:// gs:// az:// URI)
    seed: int = Field(0, ge=0)  # the training sample (train_limit)
    # the held-out sample (eval_limit); None = seed. Fix it to compare seeds.
    eval_seed: int | None = Field(None, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _no_uri_credentials(cls, data):
        if isinstance(data, dict):
            for key in ("benchmarks", "eval_only"):
                if isinstance(data.get(key), list) and (masked := mask_credentials(data[key])):
                    raise ValueError(
                        f"{masked}: the URI holds credentials (user:secret@...); put them in the environment "
                        "instead (in a cluster: a Kubernetes Secret mounted as env)"
                    )
        return data

    @model_validator(mode="after")
    def _known_entries(self) -> PrepareConfig:
        resolve_entries(self)
        return self


@dataclass(frozen=True)
class Entry:
    """One benchmark of a prepare run: a built-in (spec None) or a user dataset."""

    name: str
    spec: DatasetSpec | None
    train: bool  # listed in `benchmarks` (else eval only)

    @property
    def builtin(self) -> bool:
        return self.spec is None


def resolve_entries(cfg: PrepareConfig) -> list[Entry]:
    """The benchmarks and user datasets of a prepare config, named, in order (benchmarks, then eval_only)."""
    for name in cfg.datasets:
        if name in BENCHMARK_SPECS:
            raise ValueError(f"prepare.datasets: {name!r} is a built-in benchmark's name; choose another")
        if not NAME.match(name):
            raise ValueError(
                f"prepare.datasets: {name!r} is not a dataset name (use 1-64 of a-z 0-9 _ -, starting with a "
                "letter or digit)"
            )
    entries: dict[str, Entry] = {}
    for listed, train in ((cfg.benchmarks, True), (cfg.eval_only, False)):
        for item in listed:
            if is_source(item):
                name, spec = dataset_name(item), DatasetSpec(source=item)
                if name in BENCHMARK_SPECS or name in cfg.datasets:
                    raise ValueError(
                        f"{item}: its name {name!r} is already a built-in or a prepare.datasets entry; give it "
                        "another name in prepare.datasets"
                    )
            elif item in BENCHMARK_SPECS:
                name, spec = item, None
            elif item in cfg.datasets:
                name, spec = item, cfg.datasets[item]
            else:
                known = [*BENCHMARK_SPECS, *cfg.datasets]
                raise ValueError(
                    f"unknown benchmark {item!r}: expected a built-in ({', '.join(BENCHMARK_SPECS)}), a name "
                    f"from prepare.datasets ({', '.join(cfg.datasets) or 'none defined'}), or a dataset "
                    f"source (a path, s3://, gs://, az://, hf://); known: {known}"
                )
            previous = entries.get(name)
            if previous is not None and (previous.spec != spec or train):
                raise ValueError(f"{item}: the name {name!r} is used twice in prepare.benchmarks / eval_only")
            if previous is None:
                entries[name] = Entry(name, spec, train)
    return list(entries.values())


def eval_split_for(name: str, requested: str) -> str:
    """The held-out split: a built-in's eval split (or `requested`); user datasets evaluate on test."""
    if requested != "auto":
        return requested
    return BENCHMARK_SPECS[name].eval_split if name in BENCHMARK_SPECS else "test"


def _sample(records: list[Record], limit: int | None, seed: int) -> list[Record]:
    if limit is None or limit >= len(records):
        return records
    return sorted(random.Random(seed).sample(records, limit), key=lambda r: r.id)


@dataclass
class _Loaded:
    entry: Entry
    train: list[Record]
    held_out: list[Record]
    kind: str
    source: str
    fingerprint: dict | None = None
    rows_read: int | None = None
    bad_rows: int = 0


def _load(entry: Entry, cfg: PrepareConfig, data_dir, fingerprint: dict | None) -> _Loaded:
    from unisd.data.sources import load_dataset_records

    eval_seed = cfg.seed if cfg.eval_seed is None else cfg.eval_seed
    split = eval_split_for(entry.name, cfg.eval_split)
    if entry.builtin:
        train = load_benchmark(entry.name, cfg.train_split, data_dir=data_dir) if entry.train else []
        held_out = load_benchmark(entry.name, split, data_dir=data_dir)
        loaded = _Loaded(
            entry, train, held_out, BENCHMARK_SPECS[entry.name].task_kind, f"built-in ({data_dir})"
        )
    else:
        ds = load_dataset_records(entry.name, entry.spec, max_bad_rows=cfg.max_bad_rows)
        train = ds.rows(cfg.train_split) if entry.train else []
        loaded = _Loaded(
            entry,
            train,
            ds.rows(split),
            ds.kind,
            entry.spec.source,
            fingerprint,
            ds.rows_read,
            len(ds.bad_rows),
        )
    loaded.train = _sample(loaded.train, cfg.train_limit, cfg.seed)
    loaded.held_out = _sample(loaded.held_out, cfg.eval_limit, eval_seed)
    overlap = {r.id for r in loaded.train} & {r.id for r in loaded.held_out}
    if overlap:
        raise ValueError(f"{entry.name}: {len(overlap)} items are in both the training and the eval split")
    return loaded


def run_prepare(cfg: PrepareConfig, *, model_spec: str, out_dir: str | Path, tokenizer=None) -> dict:
    """Write train.jsonl, eval/<name>.jsonl, snapshot/, dropped.jsonl, report.md and manifest.json to
    `out_dir` (see the module docstring)."""
    out_dir = Path(out_dir)
    entries = resolve_entries(cfg)
    unused = sorted(set(cfg.datasets) - {e.name for e in entries})
    if unused:
        log.warning("prepare: datasets %s are defined but not in benchmarks / eval_only: not used", unused)
    data_dir = _builtin_data_dir(cfg, entries)
    inputs, fingerprints = _stage_inputs(entries, data_dir)
    stage = begin_stage(
        "prepare",
        out_dir,
        config={**cfg.model_dump(mode="json"), "model": model_spec, "sources": fingerprints},
        inputs=inputs,
        model=model_spec,
    )
    if stage.done:
        return stage.done
    timer = stage.timer
    with timer("load"):  # everything read and validated before anything is written
        loaded = [_load(e, cfg, data_dir, fingerprints.get(e.name)) for e in entries]
    tokenizer = tokenizer or _tokenizer(model_spec)
    with timer("prepare"):
        train_rows, dropped, eval_counts, used = _encode_training_items(loaded, cfg, tokenizer)
    if not train_rows:
        raise ValueError(
            f"no training items left after the length limits ({len(dropped)} dropped); see report"
        )
    for item in loaded:
        write_jsonl(out_dir / "eval" / f"{item.entry.name}.jsonl", [r.to_dict() for r in item.held_out])
    snapshot = out_dir / "snapshot"
    _write_snapshot(snapshot, loaded, used)
    write_jsonl(out_dir / "train.jsonl", train_rows)
    data_hash = hash_files(sorted(snapshot.glob("*.jsonl")))
    write_jsonl(out_dir / "dropped.jsonl", dropped)
    write_text(out_dir / "report.md", _report(model_spec, data_dir, loaded, train_rows, eval_counts, dropped))
    counts = {
        "train": len(train_rows),
        "dropped": len(dropped),
        "eval": eval_counts,
        "data_hash": data_hash,
        "snapshot_rows": sum(len(rows) for rows in used.values()),
        "bad_rows_skipped": sum(item.bad_rows for item in loaded),
    }
    log.info("prepare: %s", counts)
    return stage.finish(counts=counts)


def _builtin_data_dir(cfg: PrepareConfig, entries: list[Entry]):
    """The built-ins' data directory, resolved only when a built-in reads files; else None."""
    needs_files = any(e.builtin and BENCHMARK_SPECS[e.name].files for e in entries)
    return resolve_data_dir(cfg.data_dir) if needs_files else None


def _stage_inputs(entries: list[Entry], data_dir) -> tuple[list, dict]:
    """The local files skip-if-done hashes and, per user dataset, its source's fingerprint."""
    from unisd.data.sources import source_fingerprint

    inputs, fingerprints = [], {}
    for e in entries:
        if e.builtin:
            inputs += benchmark_files(e.name, data_dir)
        else:
            files, fingerprints[e.name] = source_fingerprint(e.spec)
            inputs += files
    return inputs, fingerprints


def _encode_training_items(
    loaded: list[_Loaded], cfg: PrepareConfig, tokenizer
) -> tuple[list[dict], list[dict], dict[str, int], dict[str, list[Record]]]:
    """train.jsonl's rows, the dropped items, each benchmark's held-out count and the records each uses
    (training items kept + held-out items)."""
    train_rows, dropped, eval_counts, used = [], [], {}, {}
    for item in loaded:
        kept = []
        for rec in item.train:
            row, reasons = _encode_train_item(rec, cfg, tokenizer)
            if reasons:
                dropped.append({"id": rec.id, "stage": "prepare", "reasons": reasons})
                continue
            kept.append(rec)
            train_rows.append(row)
        used[item.entry.name] = kept + item.held_out
        eval_counts[item.entry.name] = len(item.held_out)
    return train_rows, dropped, eval_counts, used


def _encode_train_item(rec: Record, cfg: PrepareConfig, tokenizer) -> tuple[dict | None, list[str]]:
    """One record's train.jsonl row (its student and teacher prompt ids) and no reasons, or None and the
    reasons it is dropped."""
    if not rec.reference.strip():
        return None, ["no reference solution: usable for evaluation only"]
    student = encode_prompt(tokenizer, student_messages(rec))
    teacher = encode_prompt(tokenizer, teacher_messages(rec))
    reasons = []
    if len(student) > cfg.max_prompt_tokens:
        reasons.append(f"student prompt {len(student)} > max_prompt_tokens {cfg.max_prompt_tokens}")
    if len(teacher) > cfg.max_teacher_prompt_tokens:
        reasons.append(
            f"teacher prompt {len(teacher)} > max_teacher_prompt_tokens {cfg.max_teacher_prompt_tokens}"
        )
    if reasons:  # never truncated: a truncated teacher prompt would distil from a teacher without the demo
        return None, reasons
    row = {
        "id": rec.id,
        "record": rec.to_dict(),
        "student_prompt_ids": student,
        "teacher_prompt_ids": teacher,
    }
    return row, []


def _write_snapshot(snapshot: Path, loaded: list[_Loaded], used: dict[str, list[Record]]) -> None:
    """Write snapshot/<name>.jsonl (the rows each benchmark uses) and snapshot/sources.json."""
    from unisd.data.sources import records_hash, snapshot_row

    sources = {}
    for item in loaded:
        rows = used[item.entry.name]
        write_jsonl(snapshot / f"{item.entry.name}.jsonl", [snapshot_row(r) for r in rows])
        sources[item.entry.name] = {
            "source": item.source,
            "kind": item.kind,
            "builtin": item.entry.builtin,
            "fingerprint": item.fingerprint,
            "rows_read": item.rows_read,
            "bad_rows_skipped": item.bad_rows,
            "rows_used": len(rows),
            "sha256": records_hash(rows),
        }
    write_json(snapshot / "sources.json", sources)


def _tokenizer(model_spec: str):
    from unisd.models import load_tokenizer

    return load_tokenizer(model_spec)


def _report(model_spec, data_dir, loaded, train_rows, eval_counts, dropped) -> str:
    lines = [
        "# Data prep",
        "",
        f"model: `{model_spec}`" + (f", built-in data: `{data_dir}`" if data_dir is not None else ""),
        "",
        "| benchmark | kind | source | train items | eval items | bad rows skipped |",
        "|---|---|---|---|---|---|",
    ]
    for item in loaded:
        name = item.entry.name
        n_train = sum(1 for r in train_rows if r["record"]["benchmark"] == name)
        source = "built-in" if item.entry.builtin else f"`{item.source}`"
        lines.append(
            f"| {name} | {item.kind} | {source} | {n_train} | {eval_counts[name]} | {item.bad_rows} |"
        )
    lines += [
        "",
        f"Dropped (never truncated): {len(dropped)}",
        *[f"- {d['id']}: {'; '.join(d['reasons'])}" for d in dropped[:50]],
        "",
        "The rows used are in snapshot/ (sources.json: where each dataset came from and its fingerprint).",
    ]
    return "\n".join(lines) + "\n"
