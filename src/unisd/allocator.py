"""Run unisd's processes on tcmalloc (or jemalloc) where the machine has one.

PyTorch's CPU allocator is plain malloc. glibc's mmap threshold rises to the size of the largest freed block,
so a train step's activations land on the heap, and freed heap stays resident: the demo's train step
(SmolLM2-135M, micro-batch 4 × accumulation 2) peaks at 8.1 GiB on glibc and at 4.7 GiB on tcmalloc, which is
also faster (docs/PERFORMANCE.md; `python bench/bench_step.py --variants sd sd+tcmalloc`). The numbers do not
change: an allocator only decides where tensors live.

A process's allocator is fixed when it starts, so the `unisd` command re-executes itself once with LD_PRELOAD
set, and every process it starts (kfp.local's component subprocesses, torchrun's ranks) inherits it. Code run
in the sandbox never does: the sandbox builds its environment from scratch.

UNISD_ALLOCATOR: `auto` (the default: tcmalloc, else jemalloc, else the C library's), `tcmalloc`, `jemalloc`
(an error where it is not installed) or `system` (never preload).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

ENV = "UNISD_ALLOCATOR"
SYSTEM = "system"
LIBRARIES = {"tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"), "jemalloc": ("libjemalloc.so.2",)}
PACKAGES = {"tcmalloc": "libtcmalloc-minimal4", "jemalloc": "libjemalloc2"}  # Debian/Ubuntu (apt)
CHOICES = ("auto", *LIBRARIES, SYSTEM)
# System library folders only: a preloaded library runs inside every process unisd starts.
LIBRARY_DIRS = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
)
# tcmalloc prints a line for every allocation over 1 GiB by default (a 152k-vocabulary logits row block is one)
_TCMALLOC_QUIET = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(2**40)}


class AllocatorError(ValueError):
    """UNISD_ALLOCATOR names an allocator that is unknown or not installed."""


def chosen(environ: Mapping[str, str] = os.environ) -> str:
    value = environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise AllocatorError(f"{ENV}={value!r} is not one of {', '.join(CHOICES)}")
    return value


def find(name: str, dirs: Sequence[str] = LIBRARY_DIRS) -> Path | None:
    """Where the allocator's shared library is installed, or None."""
    for folder in dirs:
        for file in LIBRARIES[name]:
            path = Path(folder) / file
            if path.is_file():
                return path
    return None


def resolve(choice: str, dirs: Sequence[str] = LIBRARY_DIRS) -> tuple[str, Path] | None:
    """(name, library) to preload for a choice; None for `system`, or where `auto` finds none."""
    if choice == SYSTEM:
        return None
    for name in LIBRARIES if choice == "auto" else (choice,):
        path = find(name, dirs)
        if path is not None:
            return name, path
    if choice == "auto":
        return None
    raise AllocatorError(
        f"{ENV}={choice}, but none of {', '.join(LIBRARIES[choice])} is in {', '.join(dirs)}: install {PACKAGES[choice]} "
        f"(apt), or set {ENV}=auto or {SYSTEM}"
    )


def active() -> str:
    """The allocator this process runs on: a LIBRARIES name if one is loaded, else `system`."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:  # not Linux: nothing was preloaded by us
        return SYSTEM
    loaded = {Path(line.split()[-1]).name for line in maps.splitlines() if "/" in line}
    # maps names the file a symlink points at: libtcmalloc_minimal.so.4 -> libtcmalloc_minimal.so.4.5.10
    for name, files in LIBRARIES.items():
        if any(n == f or n.startswith(f + ".") for n in loaded for f in files):
            return name
    return SYSTEM


def preload_environment(name: str, library: Path, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """environ with the allocator put first on LD_PRELOAD (and tcmalloc's large-allocation report off)."""
    env = dict(environ)
    env["LD_PRELOAD"] = ":".join(p for p in (str(library), environ.get("LD_PRELOAD", "")) if p)
    if name == "tcmalloc":
        env = {**_TCMALLOC_QUIET, **env}
    return env


def reexec_with_allocator(argv: Sequence[str] | None = None, dirs: Sequence[str] = LIBRARY_DIRS) -> None:
    """Replace this process by the same command on the chosen allocator; returns where there is nothing to do:
    the allocator is already loaded, `auto` found none, `system`, not Linux, or the library is already on
    LD_PRELOAD (it was tried and did not load: never loop). Call it before anything else has happened."""
    if not sys.platform.startswith("linux"):
        return
    target = resolve(chosen(), dirs)
    if target is None or active() == target[0]:
        return
    name, library = target
    if str(library) in os.environ.get("LD_PRELOAD", "").split(":"):
        return
    argv = list(argv if argv is not None else sys.orig_argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv[1:]], preload_environment(name, library))
