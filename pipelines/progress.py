"""What a local run shows on the terminal: one line per stage as it starts and ends (name, seconds, the key
count), an overall progress bar, and a compact summary at the end. Everything kfp.local prints — its per-task
warnings, the components' own output, executor JSON — goes to a log file in the run folder instead.

kfp.local reports tasks through its logger ("Executing task 'x'", "Task 'x' finished with status S") on
stdout; `StageConsole` is that stdout: it writes every line to the log and turns those two into stage lines.
A task finished by an earlier attempt of the run (`unisd run --resume`: kfp.local's cache hit, "Task x cache
hit") shows as `↺ <stage>  done before`.
"""

from __future__ import annotations

import contextlib
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from unisd.artifacts import read_json

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_START = re.compile(r"Executing task '([^']+)'")
_END = re.compile(r"Task '([^']+)' finished with status (\w+)")
_CACHED = re.compile(r"Task (\S+) cache hit")
TITLES = {
    "resolve-config-op": "resolve config",
    "start-tracking-op": "MLflow run",
    "end-tracking-op": "end MLflow run",
    "prepare-op": "prepare",
    "data-check-op": "data check",
    "starting-model-op": "starting model",
    "contexts-op": "contexts",
    "negatives-op": "negatives",
    "shard-indices-op": "shards",
    "rollout-op": "rollout",
    "merge-shards-op": "gather",
    "score-op": "score",
    "train-op": "train",
    "eval-op": "eval",
    "grade-op": "grade",
    "register-op": "register + gate",
    "promote-op": "promote",
    "report-op": "report",
}


def expected_tasks(*, rounds: int, shards: int, benchmarks: int) -> int:
    """Tasks of one local run (the exit step counted)."""
    return 8 + rounds * (2 * shards + 3) + 4 * benchmarks + 4  # eval + grade, base and distilled


def _key_counts(task_dir: Path) -> str:
    """The one or two numbers worth seeing for a finished task, read from its output folder."""
    found = sorted(task_dir.glob("*/manifest.json"), key=lambda p: p.stat().st_mtime)
    results = sorted(task_dir.glob("*/results.json"))
    if start := sorted(task_dir.glob("*/start.json")):
        return read_json(start[-1])["reason"]
    if results:
        agg = read_json(results[-1])["aggregate"]
        return f"{agg['benchmark']} {agg.get('role', '')}: {agg['metric']} {agg['score']:.3f} ({agg['items']} items)"
    if not found:
        return ""
    manifest = read_json(found[-1])
    if manifest.get("skipped"):
        return f"skipped ({manifest['skipped']})"
    c: dict[str, Any] = manifest.get("counts", {})
    stage = manifest.get("stage")
    if stage == "prepare":
        return f"{c.get('train')} training items, eval {c.get('eval')}"
    if stage == "contexts":
        return f"{c.get('kept')} items × {c.get('num_views')} {c.get('kind')} views, {c.get('negative_candidates')} negative candidates"
    if stage == "negatives":
        return f"{c.get('negatives_model')} model-written negatives, {c.get('negatives_fallback')} fallbacks"
    if stage == "eval":
        cfg = manifest.get("config", {})
        return f"{cfg.get('benchmark')} {'adapted' if cfg.get('base') else 'base'}: {c.get('items')} answers"
    if stage == "rollout":
        return f"{c.get('items')} completions, {c.get('completion_tokens')} tokens ({c.get('tokens_per_s')} tok/s)"
    if stage == "score":
        return f"{c.get('scored_views')} of {c.get('items')} items re-scored by the views, weight mean {c.get('weight_mean') or 1:.4f}"
    if stage == "train":
        return f"{c.get('steps')} steps, final loss {c.get('final', {}).get('loss', float('nan')):.4f}"
    return ""


def _op_name(task: str) -> str:
    """The component a task runs: its name without the "-2", "-3" kfp appends to later uses of one op."""
    return re.sub(r"-\d+$", "", task)


_ITERATION = re.compile(r"^(for-loop-\d+)-iteration-(\d+)$")
SHARDED = ("rollout-op", "score-op")  # the tasks a ParallelFor runs once per shard


def _shard_label(task_dir: Path) -> str:
    """A sharded task folder's label, e.g. " 2/4" for the second of four shards; "" for other tasks."""
    m = _ITERATION.match(task_dir.parent.name)
    if not m or _op_name(task_dir.name) not in SHARDED:
        return ""
    shards = len(list(task_dir.parent.parent.glob(f"{m.group(1)}-iteration-*")))
    return f" {int(m.group(2)) + 1}/{shards}"


class StageConsole:
    """A stdout for kfp.local: lines go to `log`; task start/end lines become stage lines on `terminal`."""

    def __init__(self, log: TextIO, terminal: TextIO, run_root: Path, total: int):
        from tqdm.auto import tqdm

        self.log, self.terminal, self.run_root = log, terminal, run_root
        self.started: dict[str, float] = {}
        self.bar = tqdm(total=total, desc="pipeline", unit="task", file=terminal, leave=False)
        self._buffer = ""
        self.failed: list[str] = []

    def write(self, text: str) -> int:
        self.log.write(text)
        self._buffer += text
        while "\n" in self._buffer:
            line, self._buffer = self._buffer.split("\n", 1)
            self._line(_ANSI.sub("", line))
        return len(text)

    def flush(self) -> None:
        self.log.flush()

    def isatty(self) -> bool:
        return False

    def _say(self, text: str) -> None:
        self.bar.write(text, file=self.terminal)

    def _line(self, line: str) -> None:
        if m := _START.search(line):
            self.started[m.group(1)] = time.perf_counter()
            self._say(f"  ▶ {self._title(m.group(1))}")
        elif m := _CACHED.search(line):
            self._say(f"  ↺ {self._title(m.group(1)):<18}            done before")
            self.bar.update(1)
        elif m := _END.search(line):
            name, status = m.groups()
            seconds = time.perf_counter() - self.started.get(name, time.perf_counter())
            mark = "✓" if status == "SUCCESS" else "✗"
            if status != "SUCCESS":
                self.failed.append(name)
            task_dir = self._task_dir(name)
            detail = _key_counts(task_dir) if status == "SUCCESS" else "FAILED"
            self._say(f"  {mark} {self._title(name) + _shard_label(task_dir):<18} {seconds:7.1f} s  {detail}")
            self.bar.update(1)

    def _title(self, task: str) -> str:
        base = _op_name(task)
        return TITLES.get(base, base) + (f" [{task.rsplit('-', 1)[1]}]" if base != task else "")

    def _task_dir(self, task: str) -> Path:
        """The task's folder; a task inside a ParallelFor (rollout / score shards) lives in a
        `for-loop-*-iteration-*` folder, and the one that just finished is the newest."""
        direct = self.run_root / task
        if direct.exists():
            return direct
        finished = {
            m.parent.parent: m.stat().st_mtime
            for m in self.run_root.glob(f"for-loop-*/{task}/*/manifest.json")
        }
        return max(finished, key=finished.get) if finished else direct

    def close(self) -> None:
        self.bar.close()


@contextlib.contextmanager
def quiet_kfp(log_path: Path, run_root: Path, total: int, *, verbose: bool) -> Iterator[StageConsole | None]:
    """Route kfp.local's output to `log_path` and show stage lines instead (`verbose`: show everything).
    `run_root`: the run's task folders. Log records of this process (kfp.local's cache hits, unisd's own
    warnings) go the same way, not to the terminal's log handler."""
    if verbose:
        yield None
        return
    import logging
    import warnings

    log_path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    with open(log_path, "a") as log:
        console = StageConsole(log, sys.stderr, run_root, total)
        handler = logging.StreamHandler(console)
        handler.setFormatter(logging.Formatter("%(asctime)s - %(levelname)s - %(message)s"))
        saved, saved_level = root.handlers[:], root.level
        root.handlers = [h for h in saved if isinstance(h, logging.FileHandler)] + [handler]
        root.setLevel(min(saved_level or logging.WARNING, logging.INFO))
        try:
            with (
                contextlib.redirect_stdout(console),
                contextlib.redirect_stderr(log),
                warnings.catch_warnings(),
            ):
                warnings.simplefilter("default")
                yield console
        finally:
            root.handlers = saved
            root.setLevel(saved_level)
            console.close()


def log_tail(log_path: Path, lines: int = 40) -> str:
    """The last `lines` lines of the run log (where a failed component's traceback is)."""
    if not log_path.exists():
        return ""
    return "\n".join(_ANSI.sub("", log_path.read_text(errors="replace")).splitlines()[-lines:])


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The end-of-run table: base vs adapted per benchmark with CIs, the promotion decision and why."""
    by: dict[str, dict[str, dict]] = {}
    for row in summary.get("eval", []):
        by.setdefault(row["benchmark"], {})[row["role"]] = row

    def cell(row: dict | None) -> str:
        if not row or row.get("score") is None:
            return "–"
        low, high = row.get("score_ci95") or (float("nan"), float("nan"))
        return f"{row['score']:.3f} [{low:.2f}, {high:.2f}]"

    lines = ["", f"{'benchmark':<16}{'base':<22}{'adapted':<22}", "-" * 60]
    for bench, roles in sorted(by.items()):
        lines.append(f"{bench:<16}{cell(roles.get('base')):<22}{cell(roles.get('adapted')):<22}")
    check = summary.get("retrain_check") or {}
    if check and not check.get("train"):
        return ["", f"skipped: {check['reason']}"]
    decision = summary.get("decision") or {}
    if decision:
        verdict = "PROMOTED to champion" if decision.get("promote") else "not promoted"
        lines += ["", f"model version {decision.get('version')}: {verdict} — {decision.get('reason', '')}"]
    return lines
