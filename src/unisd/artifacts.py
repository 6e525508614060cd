"""Stage artifact directories: atomic writes, a small manifest, and skip-if-done by inputs' hash.

Every stage writes `<dir>/manifest.json` (stage, config, inputs' hash, counts, timings, versions) LAST, via an
atomic rename, so a directory with a manifest is complete and a directory without one is not. A stage that
finds a manifest with the same inputs' hash skips its work: this is how sharded stages resume.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import re
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from unisd import __version__

MANIFEST = "manifest.json"
log = logging.getLogger(__name__)
# A run-scoped folder for in-progress state (set per task by the cluster placement, on the cache PVC).
PROGRESS_DIR_ENV = "UNISD_PROGRESS_DIR"
_ENV_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def progress_dir(out_dir: str | Path, *key: str) -> Path:
    """Where a stage keeps its in-progress state (rollout partial.jsonl, train checkpoints/, eval progress/):
    `out_dir` by default (local runs); `$UNISD_PROGRESS_DIR/<key…>` when that is set — a folder on the cache
    PVC that a retried pod finds again while its KFP output folder is new, so the output holds only the
    finished result. `key` tells apart the calls one task makes: the stages pass `<stage>-<inputs hash>`, the
    same for a retry and different for each shard, benchmark or experiment variant.

    Kubernetes references `$(VAR)` in the value are expanded here from this process's env: Kubernetes only
    expands variables defined earlier in the container's list, and KFP appends the downward-API ones (the
    run's name) after the container env. A reference left unresolved (or a KFP `{{$…}}` placeholder, which
    KFP does not resolve in env values) would make every run share one folder: then the output folder is
    used, with a warning."""
    raw = os.environ.get(PROGRESS_DIR_ENV, "").strip()
    if not raw:
        return Path(out_dir)
    value = _ENV_REF.sub(lambda m: os.environ.get(m.group(1), m.group(0)), raw)
    if "$(" in value or "{{" in value:
        log.warning(
            "%s=%r has an unresolved reference: keeping progress in %s (a retried task starts over)",
            PROGRESS_DIR_ENV,
            value,
            out_dir,
        )
        return Path(out_dir)
    return Path(value).joinpath(*key)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path next to `path`; rename it over `path` only if the block finishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON (line {err.lineno}): {err.msg}") from err


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    count = 0
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL file; a bad line raises naming the file and line number."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    with open(path) as f:
        return _parse_jsonl_lines(path, f)


def _parse_jsonl_lines(path: Path, lines: Iterable[str]) -> list[dict[str, Any]]:
    rows = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {lineno}: not valid JSON: {err.msg}") from err
        if not isinstance(row, dict):
            raise ValueError(f"{path}, line {lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def read_partial_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of an append-only progress file (`partial.jsonl`); [] when it does not exist.

    A process killed mid-append leaves a torn last line: that row is dropped (its batch is simply redone)
    and cut from the file too, so the next append starts on a fresh line. A bad line anywhere else is
    corruption and raises like `read_jsonl`.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    complete = data.rfind(b"\n") + 1  # bytes up to the last newline
    if complete < len(data):
        log.warning("%s: dropping a torn last line (an interrupted write)", path)
        with open(path, "r+b") as f:
            f.truncate(complete)
    return _parse_jsonl_lines(path, data[:complete].decode().splitlines())


def hash_files(paths: Iterable[str | Path], extra: Any = None) -> str:
    """sha256 over file contents (sorted by path within each directory) plus a JSON-able `extra`."""
    digest = hashlib.sha256()
    for p in paths:
        p = Path(p)
        files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
        for f in files:
            if f.name == MANIFEST or f.name.startswith("."):
                continue
            digest.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    digest.update(chunk)
    if extra is not None:
        digest.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"unisd": __version__, "python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "kfp", "mlflow"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[name] = md.version(name)
    return out


def write_manifest(
    out_dir: str | Path,
    *,
    stage: str,
    config: Any,
    inputs_hash: str,
    counts: dict[str, Any],
    timings: dict[str, float],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    manifest = {
        "stage": stage,
        "inputs_hash": inputs_hash,
        "config": config,
        "counts": counts,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "versions": library_versions(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
    }
    write_json(Path(out_dir) / MANIFEST, manifest)
    return manifest


def completed_manifest(out_dir: str | Path, inputs_hash: str) -> dict[str, Any] | None:
    """The manifest of a finished stage with the same inputs, or None (then the stage must run)."""
    path = Path(out_dir) / MANIFEST
    if not path.exists():
        return None
    manifest = read_json(path)
    return manifest if manifest.get("inputs_hash") == inputs_hash else None


class Timer:
    """Collects named wall-clock timings: `with timer("load"): ...`."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start


# ----------------------------------------------------------------------------------------------------------
# The stage skeleton


def model_fingerprint(model_spec: str | None) -> str | None:
    """What identifies a model in an inputs hash: a directory's file contents (a trained student), else the
    spec itself (a built-in name, tiny:/random: spec or hub id)."""
    if model_spec is None:
        return None
    path = Path(model_spec)
    return hash_files([path]) if path.is_dir() else model_spec


class Stage:
    """One stage run's bookkeeping: timings, the inputs hash, skip-if-done, the manifest written last.

        stage = begin_stage("train", out_dir, config=cfg_dict, inputs=[prepared / "train.jsonl"], model=spec)
        if stage.done:
            return stage.done               # same config, input files and model: nothing to do
        with stage.timer("load"): ...
        return stage.finish(counts={...})   # atomic manifest: the directory is complete

    The hash covers the config (a JSON-able dict), the contents of every input file or directory, and the
    model (`model_fingerprint`), so an unchanged rerun skips and a changed one reruns.
    """

    def __init__(
        self, name: str, out_dir: Path, config: Any, inputs_hash: str, model_fingerprint: str | None
    ):
        self.name, self.out_dir, self.config, self.inputs_hash = name, out_dir, config, inputs_hash
        self.model_fingerprint = model_fingerprint  # hashed once: a model folder is hundreds of MB
        self.timer = Timer()
        self.done = completed_manifest(out_dir, inputs_hash)
        # Finished with other inputs: the folder is about to be rewritten, so it is no longer complete, and
        # whatever progress it holds (checkpoints, partial files) belongs to that other run.
        self.stale = self.done is None and (out_dir / MANIFEST).exists()
        if self.stale:
            log.info("%s: %s was made from other inputs; running again", name, out_dir)
            (out_dir / MANIFEST).unlink()

    def finish(self, *, counts: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
        return write_manifest(
            self.out_dir,
            stage=self.name,
            config=self.config,
            inputs_hash=self.inputs_hash,
            counts=counts,
            timings=self.timer.timings,
            extra=extra,
        )


def begin_stage(
    name: str,
    out_dir: str | Path,
    *,
    config: Any,
    inputs: Iterable[str | Path] = (),
    model: str | None = None,
) -> Stage:
    """Start stage `name` in `out_dir` (see `Stage`); `inputs` that do not exist are refused by name."""
    paths = [Path(p) for p in inputs]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{name}: input(s) not found: {', '.join(missing)}")
    fingerprint = model_fingerprint(model)
    digest = hash_files(paths, extra={"stage": name, "config": config, "model": fingerprint})
    return Stage(name, Path(out_dir), config, digest, fingerprint)
