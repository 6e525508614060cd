"""Validation at the door: every bad input a tester found is refused before anything is loaded or written,
with one line that names the field / path / ids and the fix, exit code 2 (1 only for internal errors).

Each test asserts the exact user-facing message and the outcome: nothing written (no run folder, no stage
folder, no manifest), nothing mixed (artifacts of different runs refused), nothing lost (a file given as
--out is untouched; a full disk leaves no half-written file).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from unisd.cli import main

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


@pytest.fixture(autouse=True)
def _logs(tmp_path, monkeypatch):
    monkeypatch.setenv("UNISD_LOG_DIR", str(tmp_path / "logs"))


def run_cli(capsys, *argv: str) -> tuple[int, list[str], float]:
    started = time.monotonic()
    code = main(list(argv))
    seconds = time.monotonic() - started
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()], seconds


def error_line(lines: list[str]) -> str:
    (line,) = [x for x in lines if ": error: " in x]
    return line


# --------------------------------------------------------------------------------------------------
# config ranges: the silent cases and the tracebacks, refused when the config loads


CONFIG_CASES = [
    # silent before: evaluated n−1 items / trained a full epoch / decoded greedily / reported no pass@5
    ("eval.limit=-1", "eval.limit: Input should be greater than or equal to 1 (got -1)"),
    ("train.max_steps=0", "train.max_steps: Input should be greater than or equal to 1 (got 0)"),
    (
        "rollout.temperature=-0.5",
        "rollout.temperature: Input should be greater than or equal to 0 (got -0.5)",
    ),
    (
        "eval.pass_k=[5]",
        "eval: pass_k [5]: pass@k needs 1 <= k <= num_samples (1); [5] cannot be estimated: "
        "raise eval.num_samples to 5 or drop them",
    ),
    # tracebacks before
    (
        "train.micro_batch_size=0",
        "train.micro_batch_size: Input should be greater than or equal to 1 (got 0)",
    ),
    ("train.grad_accum=0", "train.grad_accum: Input should be greater than or equal to 1 (got 0)"),
    (
        "train.checkpoint_every=0",
        "train.checkpoint_every: Input should be greater than or equal to 1 (got 0)",
    ),
    # unclear before: "range() arg 3 must not be zero" / "no training items left after the length limits"
    ("rollout.batch_size=0", "rollout.batch_size: Input should be greater than or equal to 1 (got 0)"),
    (
        "prepare.benchmarks=[]",
        "prepare.benchmarks: List should have at least 1 item after validation, not 0 (got [])",
    ),
]


@pytest.mark.parametrize(("override", "expected"), CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_values_are_refused_before_anything_runs(override, expected, tmp_path, capsys):
    root = tmp_path / "kfp"
    code, lines, seconds = run_cli(
        capsys, "run", "--config", str(DEMO), f"pipeline.pipeline_root={root}", override
    )
    assert code == 2
    assert (
        error_line(lines)
        == f"unisd run: error: invalid config ({DEMO} with pipeline.pipeline_root={root} {override}): {expected}"
    )
    assert lines[-1].startswith("  log: ") and len(lines) == 2  # one line + where the log is
    assert not root.exists()  # no run folder, no task, nothing loaded
    print(f"{override}: refused in {seconds:.2f}s")


def test_a_stage_command_refuses_the_same_values(tmp_path, capsys):
    out = tmp_path / "prepared"
    code, lines, _ = run_cli(capsys, "prepare", "--model", "tiny:llama", "--out", str(out), "eval.limit=-1")
    assert code == 2 and "eval.limit: Input should be greater than or equal to 1 (got -1)" in error_line(
        lines
    )
    assert not out.exists()


def test_several_bad_values_are_listed_together(tmp_path, capsys):
    code, lines, _ = run_cli(
        capsys, "run", "--config", str(DEMO), "train.grad_accum=0", "rollout.temperature=-1"
    )
    assert code == 2
    assert lines[0].endswith("2 problems:")
    assert lines[1] == "  rollout.temperature: Input should be greater than or equal to 0 (got -1)"
    assert lines[2] == "  train.grad_accum: Input should be greater than or equal to 1 (got 0)"


# --------------------------------------------------------------------------------------------------
# paths: model folders, --out, data files


def test_a_model_folder_that_does_not_exist(tmp_path, capsys):
    missing = tmp_path / "models" / "student"
    code, lines, seconds = run_cli(capsys, "run", "--config", str(DEMO), f"model={missing}")
    assert code == 2 and len(lines) == 2  # not 78 lines of "Repo id must be ..."
    assert error_line(lines) == (
        f"unisd run: error: model folder '{missing}' does not exist (resolved: {missing}): check the path, "
        "or use a built-in name (unisd models) or tiny:<arch>"
    )
    print(f"refused in {seconds:.2f}s")


def test_a_folder_that_is_not_a_model(tmp_path, capsys, tiny_llama):
    model, tokenizer = tiny_llama
    empty = tmp_path / "notes"
    empty.mkdir()
    (empty / "README.md").write_text("not a model")
    code, lines, _ = run_cli(capsys, "prepare", "--model", str(empty), "--out", str(tmp_path / "p1"))
    assert code == 2 and error_line(lines) == (
        f"unisd prepare: error: model '{empty}' is a folder but not a model (no config.json in it): pass a "
        "save_pretrained folder, a built-in name (unisd models) or tiny:<arch>"
    )
    # weights without a tokenizer: was "Couldn't instantiate the backend tokenizer"
    no_tokenizer = tmp_path / "weights-only"
    model.save_pretrained(no_tokenizer)
    code, lines, _ = run_cli(capsys, "prepare", "--model", str(no_tokenizer), "--out", str(tmp_path / "p2"))
    assert code == 2 and error_line(lines) == (
        f"unisd prepare: error: model '{no_tokenizer}' has no tokenizer files (tokenizer.json / "
        "tokenizer_config.json): save the tokenizer next to the weights (tokenizer.save_pretrained(folder))"
    )
    # a train-stage output where a model is expected
    train_out = tmp_path / "train-out"
    model.save_pretrained(train_out / "merged")
    tokenizer.save_pretrained(train_out / "merged")
    code, lines, _ = run_cli(capsys, "prepare", "--model", str(train_out), "--out", str(tmp_path / "p3"))
    assert code == 2 and error_line(lines) == (
        f"unisd prepare: error: model '{train_out}' is a train-stage output, not a model folder: pass "
        f"{train_out / 'merged'} (or --student for the stage commands)"
    )
    assert not any((tmp_path / p).exists() for p in ("p1", "p2", "p3"))


def test_out_that_is_a_file_is_refused_and_left_alone(tmp_path, capsys):
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    code, lines, _ = run_cli(capsys, "prepare", "--model", "tiny:llama", "--out", str(target))
    assert code == 2 and error_line(lines) == (
        f"unisd prepare: error: --out {target} is a file, not a folder: pass a folder path (it is created if "
        "missing)"
    )
    assert target.read_text() == "keep me"
    code, lines, _ = run_cli(capsys, "prepare", "--model", "tiny:llama", "--out", str(target / "sub"))
    assert code == 2 and f"{target} is a file, so no folder can be made under it" in error_line(lines)


def test_a_non_utf8_byte_in_a_data_file_names_file_line_and_column(tmp_path, capsys):
    data = tmp_path / "data"
    from unisd.data import resolve_data_dir

    shutil.copytree(resolve_data_dir() / "mbpp", data / "mbpp")
    path = data / "mbpp" / "mbpp.jsonl"
    raw = bytearray(path.read_bytes())
    line_starts = [0] + [i + 1 for i, b in enumerate(raw) if b == ord("\n")]
    at = line_starts[6] + 10  # line 7, column 11
    raw[at] = 0xFF
    path.write_bytes(bytes(raw))
    out = tmp_path / "prepared"
    code, lines, _ = run_cli(
        capsys, "prepare", "--model", "tiny:llama", "--out", str(out), "prepare.benchmarks=[mbpp]",
        f"prepare.data_dir={data}",
    )  # fmt: skip
    assert code == 2 and error_line(lines) == (
        f"unisd prepare: error: {path}, line 7, column 11: byte 0xff is not UTF-8: re-save the file as UTF-8 "
        "(e.g. iconv -f latin1 -t utf-8) or restore the original"
    )
    assert not out.exists()


def test_mlflow_down_at_start_fails_in_seconds_before_any_stage(tmp_path, capsys):
    from mlflow_server import free_port

    port = free_port()
    root = tmp_path / "kfp"
    code, lines, seconds = run_cli(
        capsys, "run", "--config", str(DEMO), f"pipeline.pipeline_root={root}",
        f"tracking.tracking_uri=http://127.0.0.1:{port}", "tracking.probe_timeout_s=3",
    )  # fmt: skip
    print(f"refused in {seconds:.1f}s: {error_line(lines)}")
    assert code == 2 and len(lines) == 2 and seconds < 30  # was: minutes in, line 1,059 of a kfp traceback
    line = error_line(lines)
    assert line.startswith(
        f"unisd run: error: MLflow tracking server http://127.0.0.1:{port} is not reachable (connection refused; "
    )
    assert line.endswith(
        "start it (mlflow server --backend-store-uri ... --port ...) or set tracking.tracking_uri to a running "
        "server"
    )
    assert not root.exists()


# --------------------------------------------------------------------------------------------------
# a full disk: a clear message, nothing half-written


@pytest.fixture
def tiny_disk(tmp_path):
    """A 48 KiB tmpfs: really full, really ENOSPC (needs root; skipped elsewhere)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_disk_full_is_one_clear_line_and_nothing_is_half_written(tiny_disk, capsys):
    out = tiny_disk / "prepared"
    code, lines, _ = run_cli(
        capsys, "prepare", "--model", "tiny:llama", "--out", str(out), "prepare.benchmarks=[mbpp]",
        "prepare.train_limit=64", "prepare.eval_limit=64",
    )  # fmt: skip
    line = error_line(lines)
    print(line)
    assert code == 2 and len(lines) == 2
    assert line.startswith(f"unisd prepare: error: no space left on device while writing {out} (")
    assert line.endswith(
        "MiB free there): free some space or write somewhere else (--out / pipeline.pipeline_root), then rerun. "
        "Nothing was marked finished: files are written whole or not at all, and a stage without its "
        "manifest.json is redone"
    )
    written = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
    assert not (out / "manifest.json").exists()
    assert not [p for p in written if p.name.startswith(".") or p.suffix == ".tmp"]  # no temp files left
    for path in written:  # what is there is whole
        for row in path.read_text().splitlines():
            json.loads(row)


# --------------------------------------------------------------------------------------------------
# artifacts of different runs are refused, not silently mixed


@pytest.fixture(scope="module")
def two_prepares(tmp_path_factory):
    """Two prepares of CommonsenseQA with different seeds (8 items each, few shared), contexts of the first
    (skipped: the sd preset uses none), a rollout of the first and one of its two shards."""
    root = tmp_path_factory.mktemp("lineage")
    overrides = ["preset=sd", "prepare.benchmarks=[commonsenseqa]", "prepare.train_limit=8"]
    overrides += ["prepare.eval_limit=2", "rollout.max_new_tokens=4", "rollout.batch_size=8"]

    def stage(name, *options):
        assert main([name, "--model", "tiny:llama", *options, *overrides]) == 0

    stage("prepare", "--out", str(root / "prep-a"))
    assert (
        main(
            ["prepare", "--model", "tiny:llama", "--out", str(root / "prep-b"), *overrides, "prepare.seed=1"]
        )
        == 0
    )
    stage("contexts", "--prepared", str(root / "prep-a"), "--out", str(root / "ctx-a"))
    stage("rollout", "--prepared", str(root / "prep-a"), "--out", str(root / "roll-a"))
    stage("rollout", "--prepared", str(root / "prep-a"), "--out", str(root / "roll-a0"), "--num-shards", "2")
    return root, overrides


def test_score_refuses_rollouts_of_another_prepare(two_prepares, capsys):
    root, overrides = two_prepares
    ids_a = {json.loads(x)["id"] for x in (root / "prep-a" / "train.jsonl").read_text().splitlines()}
    ids_b = {json.loads(x)["id"] for x in (root / "prep-b" / "train.jsonl").read_text().splitlines()}
    foreign = ids_a - ids_b
    print(f"prepares share {len(ids_a & ids_b)} of 8 items")
    assert foreign
    out = root / "score-mixed"
    code, lines, _ = run_cli(
        capsys, "score", "--model", "tiny:llama", "--prepared", str(root / "prep-b"), "--contexts",
        str(root / "ctx-a"), "--rollouts", str(root / "roll-a"), "--out", str(out), *overrides,
    )  # fmt: skip
    line = error_line(lines)
    print(line)
    data_hash = json.loads((root / "prep-b" / "manifest.json").read_text())["counts"]["data_hash"][:12]
    assert code == 2 and not out.exists()  # was: silently scored the shared items only
    assert line.startswith(
        f"unisd score: error: --rollouts {root / 'roll-a'} was made from another prepare: {len(foreign)} of 8 "
        f"completion ids are not in --prepared {root / 'prep-b'} (data_hash {data_hash}, 8 items) (e.g. "
    )
    assert sorted(foreign)[0] in line


def test_score_refuses_rollouts_that_cover_only_some_items(two_prepares, capsys):
    root, overrides = two_prepares
    code, lines, _ = run_cli(
        capsys, "score", "--model", "tiny:llama", "--prepared", str(root / "prep-a"), "--contexts",
        str(root / "ctx-a"), "--rollouts", str(root / "roll-a0"), "--out", str(root / "score-part"), *overrides,
    )  # fmt: skip
    assert code == 2 and error_line(lines).startswith(
        f"unisd score: error: --rollouts cover 4 of the 8 items of --prepared {root / 'prep-a'} (data_hash "
    )
    assert "pass every rollout shard (or the gathered folder)" in error_line(lines)
    assert not (root / "score-part").exists()


def test_the_contexts_draft_is_refused_where_the_final_contexts_belong(two_prepares, capsys, tmp_path):
    """`unisd contexts --out C` writes the contexts stage's draft into C/draft and the final contexts (the
    negatives stage's) into C: score and train take C; the draft is refused, saying which folder to pass."""
    root, overrides = two_prepares
    assert json.loads((root / "ctx-a" / "manifest.json").read_text())["stage"] == "negatives"
    assert json.loads((root / "ctx-a" / "draft" / "manifest.json").read_text())["stage"] == "contexts"
    code, lines, _ = run_cli(
        capsys, "score", "--model", "tiny:llama", "--prepared", str(root / "prep-a"), "--contexts",
        str(root / "ctx-a" / "draft"), "--rollouts", str(root / "roll-a"), "--out", str(tmp_path / "s"), *overrides,
    )  # fmt: skip
    assert code == 2 and error_line(lines) == (
        f"unisd score: error: --contexts {root / 'ctx-a' / 'draft'} is a contexts output, not a negatives output: "
        "pass the folder `unisd contexts --out` wrote, not its draft/ folder"
    )
    code, lines, _ = run_cli(
        capsys, "negatives", "--model", "tiny:llama", "--prepared", str(root / "prep-a"), "--draft",
        str(root / "ctx-a"), "--out", str(tmp_path / "n"), *overrides,
    )  # fmt: skip
    assert code == 2 and error_line(lines) == (
        f"unisd negatives: error: --draft {root / 'ctx-a'} is a negatives output, not a contexts output"
    )


def test_input_folders_of_the_wrong_kind_or_unfinished(two_prepares, capsys, tmp_path):
    root, overrides = two_prepares

    def rollout(prepared):
        return run_cli(
            capsys, "rollout", "--model", "tiny:llama", "--prepared", str(prepared), "--out", str(tmp_path / "r"),
            *overrides,
        )  # fmt: skip

    code, lines, _ = rollout(root / "roll-a")
    assert code == 2 and error_line(lines) == (
        f"unisd rollout: error: --prepared {root / 'roll-a'} is a rollout output, not a prepare output"
    )
    unfinished = tmp_path / "half"
    unfinished.mkdir()
    (unfinished / "train.jsonl").write_text("")
    code, lines, _ = rollout(unfinished)
    assert code == 2 and error_line(lines) == (
        f"unisd rollout: error: --prepared {unfinished} has no manifest.json: its prepare stage did not finish "
        "(rerun it) or this is not a prepare output"
    )
    code, lines, _ = rollout(tmp_path / "nope")
    assert code == 2 and error_line(lines) == (
        f"unisd rollout: error: --prepared {tmp_path / 'nope'} does not exist: pass the folder `unisd prepare "
        "--out` wrote"
    )
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------------------------------
# anything else: one line, the log path, exit 1 for an internal error; -v prints the traceback


def test_an_internal_error_is_one_line_exit_1_and_the_log_has_the_traceback(monkeypatch, tmp_path, capsys):
    from unisd import cli

    def broken(args):
        raise KeyError("views")

    help_text, add_args, _ = cli.COMMANDS["models"]
    monkeypatch.setitem(cli.COMMANDS, "models", (help_text, add_args, broken))
    code, lines, _ = run_cli(capsys, "models")
    assert (
        code == 1
        and lines[0] == "unisd models: error: internal error (KeyError: 'views'); this is a bug in unisd"
    )
    log = Path(lines[1].split("log: ", 1)[1].split(" (-v")[0])
    assert "Traceback (most recent call last)" in log.read_text() and "KeyError: 'views'" in log.read_text()
    code, lines, _ = run_cli(capsys, "-v", "models")
    assert code == 1 and lines[0] == "Traceback (most recent call last):"


def test_config_files_report_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"train": {"micro_batch_size": 0}}))
    code, lines, _ = run_cli(capsys, "run", "--config", str(bad))
    assert code == 2 and error_line(lines) == (
        f"unisd run: error: invalid config ({bad}): train.micro_batch_size: Input should be greater than or "
        "equal to 1 (got 0)"
    )


def test_tracking_sync_with_the_server_still_down_keeps_everything(tmp_path, capsys):
    from mlflow_server import free_port

    uri = f"http://127.0.0.1:{free_port()}"
    outbox = tmp_path / "mlflow-outbox.jsonl"
    record = {"op": "set_terminated", "run_id": "a" * 32, "status": "FINISHED", "uri": uri, "what": "end run"}
    outbox.write_text(json.dumps(record) + "\n")
    code, lines, seconds = run_cli(capsys, "tracking", "sync", str(tmp_path))
    assert code == 2 and len(lines) == 2 and seconds < 30
    assert error_line(lines).startswith(
        f"unisd tracking: error: MLflow tracking server {uri} is not reachable ("
    )
    assert error_line(lines).endswith(f"; 1 call(s) keep waiting in {tmp_path}")
    assert json.loads(outbox.read_text()) == record  # nothing lost


def test_resume_refuses_what_it_cannot_resume(tmp_path, capsys):
    run_dir = tmp_path / "run-1"
    run_dir.mkdir()
    code, lines, _ = run_cli(capsys, "run", "--resume", str(run_dir))
    assert code == 2 and error_line(lines) == (
        f"unisd run: error: --resume {run_dir}: no run.json there (not a run folder of `unisd run`)"
    )
    (run_dir / "run.json").write_text(
        json.dumps({"attempts": [{"status": "succeeded"}], "tracking_uri": "x"})
    )
    code, lines, _ = run_cli(capsys, "run", "--resume", str(run_dir))
    assert code == 2 and error_line(lines) == (
        f"unisd run: error: --resume {run_dir}: the run already finished (summary: {run_dir / 'summary.json'})"
    )
    code, lines, _ = run_cli(capsys, "run", "--resume", str(run_dir), "train.max_steps=3")
    assert code == 2 and error_line(lines) == (
        "unisd run: error: --resume continues a run with its own config: drop --config / --rounds / overrides "
        "(start a new run to change them)"
    )


def test_logs_pruned_by_another_process_meanwhile_are_skipped(tmp_path):
    """Every torchrun rank prunes the shared log folder as it starts: a log another rank deleted between the
    listing and the look at its age must not fail the command (it did, in CI)."""
    from unisd.cli import prune_logs

    for i in range(5):
        (tmp_path / f"unisd-train-{i}.log").write_text("x")
        os.utime(tmp_path / f"unisd-train-{i}.log", (1000 + i, 1000 + i))
    (tmp_path / "unisd-train-gone.log").symlink_to(tmp_path / "deleted-meanwhile")  # listed, then no file
    prune_logs(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.glob("unisd-*.log") if p.exists()) == [
        "unisd-train-3.log",
        "unisd-train-4.log",
    ]
