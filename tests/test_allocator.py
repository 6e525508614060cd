"""unisd.allocator: the `unisd` command restarts itself on tcmalloc/jemalloc where installed, never loops on a
library that does not load, keeps the numbers, and sandboxed code never inherits the preload."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from unisd.allocator import ENV, SYSTEM, AllocatorError, chosen, find, resolve

INSTALLED = find("tcmalloc") or find("jemalloc")
needs_allocator = pytest.mark.skipif(
    INSTALLED is None, reason="no tcmalloc or jemalloc installed (apt: libtcmalloc-minimal4 / libjemalloc2)"
)
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _python(code: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", ENV)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**base, "PYTHONPATH": SRC, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_choice_is_validated():
    assert chosen({}) == "auto"
    assert chosen({ENV: " TCMalloc "}) == "tcmalloc"
    with pytest.raises(
        AllocatorError, match=f"{ENV}='mimalloc' is not one of auto, tcmalloc, jemalloc, system"
    ):
        chosen({ENV: "mimalloc"})


def test_resolve_prefers_tcmalloc_and_names_the_package_when_missing(tmp_path):
    assert resolve(SYSTEM, [str(tmp_path)]) is None
    assert resolve("auto", [str(tmp_path)]) is None  # nothing installed: the C library's allocator
    with pytest.raises(AllocatorError, match="install libtcmalloc-minimal4"):
        resolve("tcmalloc", [str(tmp_path)])
    (tmp_path / "libjemalloc.so.2").write_bytes(b"")
    assert resolve("auto", [str(tmp_path)]) == ("jemalloc", tmp_path / "libjemalloc.so.2")
    (tmp_path / "libtcmalloc_minimal.so.4").write_bytes(b"")
    assert resolve("auto", [str(tmp_path)]) == ("tcmalloc", tmp_path / "libtcmalloc_minimal.so.4")
    assert resolve("jemalloc", [str(tmp_path)])[0] == "jemalloc"


def test_a_library_that_does_not_load_is_tried_once(tmp_path):
    """Not an ELF file: ld.so ignores it, and the restarted process must not restart again."""
    (tmp_path / "libtcmalloc_minimal.so.4").write_text("not a library")
    runs = tmp_path / "runs"
    out = _python(
        f"""
        from pathlib import Path
        from unisd.allocator import active, reexec_with_allocator
        with open({str(runs)!r}, "a") as f:
            f.write("run\\n")
        reexec_with_allocator(dirs=[{str(tmp_path)!r}])
        print(active())
        """,
        {},
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert runs.read_text().count("run") == 2  # the command, then itself once with LD_PRELOAD set
    assert out.stdout.strip() == SYSTEM
    assert "cannot be preloaded" in out.stderr  # ld.so said why


def test_the_unisd_command_rejects_an_unknown_allocator():
    out = _python("import sys; from unisd.cli import main; sys.exit(main())", {ENV: "mimalloc"})
    assert out.returncode == 2
    assert (
        out.stderr.strip() == f"unisd: error: {ENV}='mimalloc' is not one of auto, tcmalloc, jemalloc, system"
    )


def test_in_process_main_never_restarts(monkeypatch):
    """main(argv) is how tests and other programs call unisd: a restart there would replace their process."""
    from unisd.cli import main

    monkeypatch.setenv(ENV, "mimalloc")  # a restart attempt would fail on this choice first
    assert main(["models"]) == 0


@needs_allocator
@pytest.mark.parametrize("choice", ["auto", SYSTEM])
def test_the_unisd_command_restarts_on_the_installed_allocator(choice):
    expected = ("tcmalloc" if find("tcmalloc") else "jemalloc") if choice == "auto" else SYSTEM
    code = """
        import os, sys
        from unisd.allocator import active
        if "--report" in sys.argv:  # the restarted command, with its arguments unchanged
            print(active(), os.environ.get("LD_PRELOAD", ""), sys.argv[1:])
            sys.exit(0)
        from unisd.cli import main
        sys.argv.append("--report")
        sys.orig_argv.append("--report")
        sys.exit(main())
        """
    out = _python(code, {ENV: choice})
    if choice == SYSTEM:  # no restart: main() itself ran, and its parser rejected the arguments
        assert out.returncode == 2, out.stderr
        assert out.stdout == "" and "usage: unisd" in out.stderr
        return
    assert out.returncode == 0, out.stderr
    name, preload, argv = out.stdout.split(" ", 2)
    assert name == expected
    assert preload.split(":")[0] == str(resolve(choice)[1])
    assert argv.strip() == "['--report']"


@needs_allocator
def test_the_allocator_changes_no_number():
    """A tiny model's loss and gradient, bit for bit, on the C library's allocator and on the preloaded one."""
    code = """
        import json, torch
        from unisd.allocator import active
        from unisd.models import tiny_model
        model = tiny_model("llama", seed=0)
        ids = torch.randint(0, model.config.vocab_size, (4, 48), generator=torch.Generator().manual_seed(0))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        print(json.dumps([active(), loss.item(), grad.double().square().sum().item(), grad[:64].tolist()]))
        """
    name, library = resolve("auto")
    plain = _python(code, {"OMP_NUM_THREADS": "1"})
    preloaded = _python(code, {"OMP_NUM_THREADS": "1", "LD_PRELOAD": str(library)})
    assert plain.returncode == 0 and preloaded.returncode == 0, plain.stderr + preloaded.stderr
    a, b = json.loads(plain.stdout), json.loads(preloaded.stdout)
    assert (a[0], b[0]) == (SYSTEM, name)
    assert a[1:] == b[1:]


@needs_allocator
def test_sandboxed_code_never_inherits_the_preload(monkeypatch):
    from unisd.sandbox import run_sandboxed

    monkeypatch.setenv("LD_PRELOAD", str(INSTALLED))
    result = run_sandboxed(
        "import os; from pathlib import Path\n"
        "maps = Path('/proc/self/maps').read_text()\n"
        "print(os.environ.get('LD_PRELOAD'), 'tcmalloc' in maps or 'jemalloc' in maps)",
        timeout_s=30,
        memory_mb=512,
    )
    assert result.status == "passed", result.reason
    assert result.stdout.strip() == "None False"
