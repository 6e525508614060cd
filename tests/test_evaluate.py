"""The eval stage's generation: resumable per batch, and pass@k samples that are independent draws."""

from __future__ import annotations

import json

import pytest

from unisd.evaluate import EvalConfig, generate_completions, run_eval

pytestmark = pytest.mark.usefixtures("single_thread")


def test_eval_generation_resumes_from_its_progress_file(tmp_path, tiny_llama):
    model, tokenizer = tiny_llama
    prompts = [[11 + i, 50, 60, 70 + i] for i in range(5)]
    cfg = EvalConfig(max_new_tokens=6, batch_size=2)
    progress = tmp_path / "greedy.jsonl"
    first = generate_completions(model, tokenizer, prompts, cfg, progress_file=progress, progress_key="m")
    rows = [json.loads(line) for line in progress.read_text().splitlines()]
    assert sorted(r["index"] for r in rows) == list(range(5))

    # As if killed while appending batch 1: batch 0 complete (row 0 marked), a torn half-line for row 2.
    marked = dict(rows[0], ids=[7, 7, 7])
    progress.write_text(json.dumps(marked) + "\n" + json.dumps(rows[1]) + "\n" + json.dumps(rows[2])[:25])
    resumed = generate_completions(model, tokenizer, prompts, cfg, progress_file=progress, progress_key="m")
    assert resumed[0][0] == [7, 7, 7]  # batch 0 was taken from the file, not regenerated
    assert resumed[1:] == first[1:]  # the rest regenerated (greedy: identical)

    # Rows made under another model/settings key are never reused.
    other = generate_completions(model, tokenizer, prompts, cfg, progress_file=progress, progress_key="x")
    assert other == first
    longer = cfg.model_copy(update={"max_new_tokens": 7})
    assert generate_completions(model, tokenizer, prompts, longer, progress_file=progress, progress_key="m")[
        0
    ][0] != [7, 7, 7]


def test_pass_at_k_samples_are_independent_draws(tmp_path):
    from unisd.prepare import PrepareConfig, run_prepare

    prepared = tmp_path / "prepared"
    run_prepare(
        PrepareConfig(benchmarks=["mbpp"], train_limit=1, eval_limit=3),
        model_spec="tiny:llama",
        out_dir=prepared,
    )
    cfg = EvalConfig(
        limit=3,
        num_samples=3,
        pass_k=[1, 3],
        max_new_tokens=8,
        batch_size=3,
        retention=False,
        reference_fit=False,
    )
    results = run_eval(
        cfg, model_spec="tiny:llama", benchmark="mbpp", prepared_dir=prepared, out_dir=tmp_path / "ev"
    )
    rows = [json.loads(line) for line in (tmp_path / "ev" / "completions.jsonl").read_text().splitlines()]
    assert all(len(r["samples"]) == 3 for r in rows)
    # The two sampled rounds use different seeds: identical draws would make pass@3 a copy of pass@1.
    assert any(r["samples"][1] != r["samples"][2] for r in rows)
    assert results["aggregate"]["items"] == 3
    assert not (tmp_path / "ev" / "samples" / "progress").exists()  # folded into samples.jsonl


def test_cli_evaluates_several_benchmarks_into_one_table(tmp_path):
    from unisd.cli import main
    from unisd.prepare import PrepareConfig, run_prepare

    prepared = tmp_path / "prepared"
    run_prepare(
        PrepareConfig(benchmarks=["gpqa", "toolalpaca"], train_limit=1, eval_limit=2),
        model_spec="tiny:llama",
        out_dir=prepared,
    )
    out = tmp_path / "eval"
    argv = [
        "eval",
        "--model",
        "tiny:llama",
        "--prepared",
        str(prepared),
        "--benchmark",
        "all",
        "--out",
        str(out),
    ]
    assert main([*argv, "eval.limit=2", "eval.max_new_tokens=6", "eval.bootstrap_samples=100"]) == 0
    for benchmark in ("gpqa", "toolalpaca"):
        assert json.loads((out / benchmark / "results.json").read_text())["aggregate"]["items"] == 2
    rows = [line for line in (out / "table.md").read_text().splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows[1:]] == ["gpqa", "toolalpaca"]


def test_grade_stage_scores_answers_without_a_model_and_refuses_samples_of_other_items(
    tmp_path, capsys, monkeypatch
):
    """`unisd grade`: the eval stage's samples in, task scores out (MBPP: run in the sandbox), no model
    loaded — so a cluster runs it in the sandbox pod. The gold program passes, a wrong one fails."""
    from unisd import tasks
    from unisd.artifacts import read_jsonl, write_json, write_jsonl
    from unisd.cli import main
    from unisd.evaluate import load_eval_records
    from unisd.prepare import PrepareConfig, run_prepare

    prepared = tmp_path / "prepared"
    run_prepare(
        PrepareConfig(benchmarks=["mbpp"], train_limit=1, eval_limit=2),
        model_spec="tiny:llama",
        out_dir=prepared,
    )
    records = load_eval_records(prepared / "eval" / "mbpp.jsonl", None)
    samples = tmp_path / "samples"
    gold, wrong = tasks.of(records[0]).gold_completion(records[0]), "```python\ndef nothing():\n    pass\n```"
    write_jsonl(
        samples / "samples.jsonl",
        [{"id": records[0].id, "samples": [gold]}, {"id": records[1].id, "samples": [wrong]}],
    )
    write_json(
        samples / "measures.json", {"benchmark": "mbpp", "model": "someone's model", "role": "adapted"}
    )
    write_json(samples / "manifest.json", {"stage": "eval"})  # what `unisd grade` checks at the door

    def no_model(*args, **kwargs):
        raise AssertionError("the grade stage loaded a model")

    monkeypatch.setattr("unisd.models.load_model", no_model)
    monkeypatch.setattr("unisd.models.load_tokenizer", no_model)
    argv = [
        "grade",
        "--model",
        "tiny:llama",
        "--prepared",
        str(prepared),
        "--benchmark",
        "mbpp",
        "--samples",
        str(samples),
    ]
    assert main([*argv, "--out", str(tmp_path / "graded"), "eval.bootstrap_samples=100"]) == 0
    results = json.loads((tmp_path / "graded" / "results.json").read_text())
    assert [row["score"] for row in results["per_item"]] == [1.0, 0.0]
    assert results["aggregate"]["role"] == "adapted" and results["aggregate"]["model"] == "someone's model"
    assert len(read_jsonl(tmp_path / "graded" / "completions.jsonl")) == 2

    write_jsonl(samples / "samples.jsonl", [{"id": records[0].id, "samples": [gold]}])
    assert main([*argv, "--out", str(tmp_path / "graded-2")]) != 0
    assert f"no samples for item(s) ['{records[1].id}']" in capsys.readouterr().err
