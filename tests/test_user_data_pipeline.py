"""The whole pipeline (`unisd run`, real kfp.local) on two USER datasets read from a real S3-compatible
server on 127.0.0.1 (moto's server mode): a multiple-choice table with its own column names and a free-form
CSV, both from examples/data. Tiny random model, as tests/test_local_pipeline.py.

It checks what a user relies on: the prepare artifact holds the snapshot of the rows used (and their
hash), the registered model version's `data_hash` tag is that hash, and each dataset has base and adapted
eval results (in the run summary, the report and MLflow).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from s3_server import S3Server

from unisd.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_pipeline_trains_and_evaluates_user_datasets_from_s3(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with S3Server() as s3:
        s3.use(monkeypatch)  # the components (subprocesses of kfp.local) inherit these AWS_* variables
        s3.put("team/support.jsonl", (REPO / "examples/data/support_tickets.jsonl").read_bytes())
        s3.put("team/faq/general_faq.csv", (REPO / "examples/data/general_faq.csv").read_bytes())

        config = yaml.safe_load((REPO / "configs/demo.yaml").read_text())
        config["model"] = "tiny:llama"
        config["prepare"].update(
            benchmarks=["support", "faq"],
            datasets={
                "support": {
                    "source": "s3://team/support.jsonl",
                    "kind": "multiple_choice",
                    "columns": {
                        "id": "ticket_id",
                        "question": "ticket",
                        "choices": "options",
                        "answer": "label",
                    },
                },
                "faq": {
                    "source": "s3://team/faq/",
                    "columns": {"prompt": "question", "answer": "reference", "explanation": "rationale"},
                },
            },
            train_limit=4,
            eval_limit=3,
        )
        config["contexts"].update(negative_max_tokens=12, induced_max_tokens=12)
        config["rollout"]["max_new_tokens"] = 12
        config["eval"].update(limit=3, max_new_tokens=16, bootstrap_samples=200)
        config["train"].update(max_steps=1, micro_batch_size=2, grad_accum=2)
        config["tracking"].update(tracking_uri="sqlite:///mlflow.db", registered_model="user-data-student")
        config["pipeline"].update(shards=1, pipeline_root=str(tmp_path / "kfp"))
        path = tmp_path / "user-data.yaml"
        path.write_text(yaml.safe_dump(config))

        assert main(["run", "--config", str(path)]) == 0

    (summary_file,) = (tmp_path / "kfp").glob("*/summary.json")
    summary = json.loads(summary_file.read_text())
    run_dir = Path(summary["run_dir"])

    # the snapshot: exactly the rows used, and their hash, inside the prepare artifact
    (manifest_file,) = [
        p for p in run_dir.glob("**/manifest.json") if json.loads(p.read_text())["stage"] == "prepare"
    ]
    prepared = manifest_file.parent
    counts = json.loads(manifest_file.read_text())["counts"]
    sources = json.loads((prepared / "snapshot" / "sources.json").read_text())
    assert (
        sources["support"]["source"] == "s3://team/support.jsonl"
        and sources["support"]["kind"] == "multiple_choice"
    )
    assert sources["faq"]["kind"] == "free_form"  # inferred from the mapped columns
    assert sources["support"]["fingerprint"]["files"][0][2]  # the object's ETag
    for name in ("support", "faq"):
        rows = (prepared / "snapshot" / f"{name}.jsonl").read_text().splitlines()
        assert len(rows) == sources[name]["rows_used"] == 4 + 3  # train_limit + eval_limit
        assert {json.loads(r)["benchmark"] for r in rows} == {name}
    assert counts["eval"] == {"support": 3, "faq": 3} and len(counts["data_hash"]) == 64

    # per-dataset eval results, base and adapted
    roles = {(e["benchmark"], e["role"]) for e in summary["eval"]}
    assert roles == {(b, r) for b in ("support", "faq") for r in ("base", "adapted")}
    metrics = {e["benchmark"]: e for e in summary["eval"]}
    assert all(0.0 <= e["score"] <= 1.0 for e in summary["eval"]) and metrics["faq"]["score"] is not None
    report = Path(summary["report_html"]).read_text()
    assert "support" in report and "faq" in report
    assert summary["decision"]["version"] == "1"

    # MLflow: the registered version carries the snapshot's data hash, the run the per-dataset metrics
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    version = client.get_model_version_by_alias("user-data-student", "challenger")
    assert version.tags["data_hash"] == counts["data_hash"]
    run = client.get_run(version.run_id)
    assert any(k.startswith("eval/support/") for k in run.data.metrics)
    assert any(k.startswith("eval/faq/") for k in run.data.metrics)
