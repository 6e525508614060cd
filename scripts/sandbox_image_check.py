"""Run inside the sandbox image by scripts/check_images.sh: a hostile program under unisd.sandbox (what
the grade step does), then a grading trick through run_checked. Prints one JSON line per check."""

import json
import os
import socket  # noqa: F401 -- the hostile program imports it too; a broken image fails here first

from unisd import sandbox

HOSTILE = r"""
import json, os, socket, time
out = {"uid": os.getuid()}
for path in ("/opt/unisd/pwned", "/tmp/pwned-outside", "/etc/pwned", "/cache/pwned", "../pwned"):
    try:
        with open(path, "w") as fh:
            fh.write("pwned")
        out[path] = "WROTE"
    except OSError as e:
        out[path] = type(e).__name__
for target in (("1.1.1.1", 53), ("10.0.2.2", 80)):
    try:
        socket.create_connection(target, timeout=2).close()
        out["connect %s:%d" % target] = "CONNECTED"
    except OSError as e:
        out["connect %s:%d" % target] = str(e)
n = 0
try:
    for _ in range(10000):
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        n += 1
    out["fork"] = "forked %d children, no limit hit" % n
except OSError as e:
    out["fork"] = "stopped after %d children: %s" % (n, e)
print(json.dumps(out))
"""

TRICK = (
    "import builtins\nbuiltins.abs = lambda x: 0\nclass Yes:\n    def __eq__(self, other):\n        return True\n"
    "def area(r):\n    return Yes()\n"
    "assert abs(area(1) - 3.14159) < 1e-3\nassert area(2) == 12.566\n"
)

try:
    backend = sandbox.detect_backend()
    refusal = None
except sandbox.SandboxUnavailable as exc:
    backend, refusal = None, str(exc)
print(
    json.dumps(
        {
            "check": "backend",
            "detected": backend,
            "refusal": refusal,
            "bwrap_nested_layout": sandbox._BWRAP_NESTED[0],
            "env": os.environ.get(sandbox.BACKEND_ENV),
        }
    )
)
if backend is not None:
    result = sandbox.run_sandboxed(HOSTILE, timeout_s=20, memory_mb=256, max_procs=32)
    try:
        seen = json.loads(result.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        seen = result.stdout[-500:]
    after = {p: os.path.exists(p) for p in ("/tmp/pwned-outside", "/opt/unisd/pwned", "/etc/pwned")}
    print(
        json.dumps(
            {
                "check": "hostile",
                "backend": result.backend,
                "status": result.status,
                "reason": result.reason,
                "warning": result.warning,
                "inside": seen,
                "files_left_in_container": after,
            }
        )
    )
    graded = sandbox.run_checked(TRICK, timeout_s=20, memory_mb=512)
    print(
        json.dumps(
            {
                "check": "grading_trick",
                "status": graded.status,
                "why": (graded.stderr.strip().splitlines() or [""])[-1][:200],
            }
        )
    )
