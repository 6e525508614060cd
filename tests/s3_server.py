"""A real S3-compatible server on 127.0.0.1 for tests: moto in server mode (`python -m moto.server`).

    with S3Server() as s3:                    # starts, waits until it answers HTTP
        s3.env                                 # AWS_* variables that point s3fs / botocore at it
        s3.fs()                                # an s3fs.S3FileSystem on it
        s3.put("bucket/key.jsonl", b"...")     # creates the bucket when needed

`use(monkeypatch)` sets the environment (test credentials, the endpoint, no instance-metadata lookups,
no shared credential files) and clears fsspec's cached filesystems so the new settings apply.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

from mlflow_server import free_port


class S3Server:
    def __init__(self, port: int | None = None, host: str = "127.0.0.1") -> None:
        self.host, self.port = host, port or free_port()
        self.process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_CONFIG_FILE": os.devnull,
        }

    def start(self, timeout_s: float = 60.0) -> S3Server:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.process.returncode}")
            try:
                with urllib.request.urlopen(f"{self.endpoint}/", timeout=2):
                    return self
            except urllib.error.HTTPError:
                return self  # it answers: up
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.1)
        raise TimeoutError(f"moto server at {self.endpoint} not up after {timeout_s}s")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=5)

    def use(self, monkeypatch) -> S3Server:
        for key, value in self.env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        monkeypatch.delenv("AWS_PROFILE", raising=False)
        clear_fsspec_cache()
        return self

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(
            key="test", secret="test", client_kwargs={"endpoint_url": self.endpoint}, skip_instance_cache=True
        )

    def put(self, path: str, data: bytes | str) -> str:
        fs = self.fs()
        bucket = path.split("/", 1)[0]
        if not fs.exists(bucket):
            fs.mkdir(bucket)
        with fs.open(path, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        return f"s3://{path}"

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def clear_fsspec_cache() -> None:
    """Forget cached filesystem instances (they keep the credentials and endpoint they were made with)."""
    import fsspec

    fsspec.AbstractFileSystem.clear_instance_cache()
    try:
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
    except ImportError:
        pass
