"""Write an eval stage's output by hand for `make images-check` (c): an answer per MBPP item of the prepared
split -- the gold program, a wrong one, a hostile one that tries to leave the sandbox (writes outside its
workdir, opens a socket, exits before the tests can fail), then gold programs -- so the grade component can
run in the sandbox image on them.

    python scripts/grade_check_samples.py PREPARED_DIR OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

from unisd import tasks
from unisd.artifacts import write_json, write_jsonl
from unisd.evaluate import MEASURES_FILE, SAMPLES_FILE, eval_source, load_eval_records

HOSTILE = """```python
import os, socket
for target in ("/out/PWNED", "/tmp/PWNED", os.path.expanduser("~/PWNED")):
    try:
        open(target, "w").write("escaped")
    except OSError:
        pass
try:
    socket.create_connection(("1.1.1.1", 80), timeout=1)
    open("/out/PWNED-net", "w").write("network")
except OSError:
    pass
os._exit(0)  # leave before the tests run: must count as a failure, not a pass
```"""


def main(prepared: str, out: str) -> None:
    records = load_eval_records(
        eval_source(prepared, "mbpp"), None
    )  # the whole split: grade scores all of it
    wrong = "```python\ndef nothing():\n    return None\n```"
    answers = [tasks.of(r).gold_completion(r) for r in records]
    answers[1:3] = [wrong, HOSTILE]  # gold, wrong, hostile, then gold for the rest
    rows = [{"id": r.id, "samples": [a], "finished": True} for r, a in zip(records, answers)]
    write_jsonl(Path(out) / SAMPLES_FILE, rows)
    write_json(
        Path(out) / MEASURES_FILE, {"benchmark": "mbpp", "model": "hand-written answers", "role": "adapted"}
    )
    print(
        f"wrote {len(rows)} answers (gold, wrong, hostile, then gold) for {[r.id for r in records]} to {out}"
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
