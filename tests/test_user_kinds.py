"""Each task kind's user dataset through prepare → eval (the real stage functions, tiny random model): the
held-out split of examples/data/<file> scored by its kind's metric.

User code datasets need one change outside the data layer: `unisd.tasks.code.code_program` runs test
programs only for the benchmarks named mbpp and humaneval. Until it runs MBPP-style programs (solution +
setup + tests) for every other code dataset, that case is an expected failure (see docs/datasets.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from unisd.evaluate import EvalConfig, run_eval
from unisd.prepare import PrepareConfig, run_prepare

pytestmark = pytest.mark.usefixtures("single_thread")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"


DATASETS = {
    "support": {
        "source": str(EXAMPLES / "support_tickets.jsonl"),
        "kind": "multiple_choice",
        "columns": {"id": "ticket_id", "question": "ticket", "choices": "options", "answer": "label"},
    },
    "faq": {
        "source": str(EXAMPLES / "general_faq.csv"),
        "columns": {"prompt": "question", "answer": "reference"},
    },
    "assistant": {"source": str(EXAMPLES / "assistant_tools.jsonl")},
    "pyfuncs": {"source": str(EXAMPLES / "python_functions.jsonl")},
}
METRICS = {"support": "accuracy", "faq": "rougeL", "assistant": "call_f1", "pyfuncs": "pass_at_1"}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_llama):
    out = tmp_path_factory.mktemp("prepared")
    cfg = PrepareConfig(benchmarks=list(DATASETS), datasets=DATASETS, train_limit=2, eval_limit=2)
    run_prepare(cfg, model_spec="tiny:llama", out_dir=out, tokenizer=tiny_llama[1])
    return out


@pytest.mark.parametrize(
    "name",
    [
        "support",
        "faq",
        "assistant",
        "pyfuncs",
    ],
)
def test_user_dataset_is_evaluated_by_its_kind(prepared, tiny_llama, tmp_path, name):
    model, tokenizer = tiny_llama
    cfg = EvalConfig(limit=2, max_new_tokens=8, batch_size=2, retention=False, bootstrap_samples=100)
    results = run_eval(
        cfg,
        model_spec="tiny:llama",
        benchmark=name,
        prepared_dir=prepared,
        out_dir=tmp_path / name,
        model=model,
        tokenizer=tokenizer,
    )
    aggregate = results["aggregate"]
    assert aggregate["benchmark"] == name and aggregate["items"] == 2
    assert aggregate["metric"] == METRICS[name] and 0.0 <= aggregate["score"] <= 1.0
    assert len(results["per_item"]) == 2 and all(r["id"].startswith(f"{name}/") for r in results["per_item"])
