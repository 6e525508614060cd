"""A real `mlflow server` on 127.0.0.1 for tests: sqlite backend + local artifact store in a temp dir.

    with MlflowServer(tmp_path) as server:      # starts, waits for GET /health == 200
        cfg = TrackingConfig(tracking_uri=server.uri, ...)

`MlflowServer(tmp, port=p).start(wait=False)` launches it without waiting (for tests of clients that
must survive a server that comes up late); `stop()` kills the server's process group (uvicorn workers
included). Settings from STACK.md: job execution off (2 processes, ≈270 MB instead of ≈2 GB) and no
telemetry.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A port nothing listens on right now (the OS picks it; a later bind can still race, rarely)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    def __init__(self, root: str | Path, port: int | None = None, host: str = "127.0.0.1") -> None:
        self.root = Path(root)
        self.host = host
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None
        self.startup_s: float | None = None  # seconds from launch to a healthy /health
        self.log_path = self.root / "server.log"

    @property
    def uri(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, *, wait: bool = True, timeout_s: float = 90.0) -> MlflowServer:
        self.root.mkdir(parents=True, exist_ok=True)
        env = os.environ | {
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_DISABLE_TELEMETRY": "true",
        }
        command = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{(self.root / 'mlflow.db').resolve()}",
            "--artifacts-destination", str((self.root / "artifacts").resolve()),
            "--host", self.host, "--port", str(self.port), "--workers", "1",
        ]  # fmt: skip
        self._launched = time.monotonic()
        with open(self.log_path, "ab") as log_file:
            # own session: stop() can signal the server and its uvicorn worker together
            self.process = subprocess.Popen(
                command, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        if wait:
            self.wait_healthy(timeout_s)
        return self

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def wait_healthy(self, timeout_s: float = 90.0) -> float:
        """Block until /health answers 200; returns the start-up time in seconds."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited with {self.process.returncode}:\n{self._log_tail()}"
                )
            if self.healthy():
                self.startup_s = time.monotonic() - self._launched
                return self.startup_s
            time.sleep(0.25)
        raise TimeoutError(f"mlflow server at {self.uri} not healthy after {timeout_s}s:\n{self._log_tail()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=5)

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def __enter__(self) -> MlflowServer:
        return self if self.process is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
