"""The whole DAG through real kfp.local (SubprocessRunner, this env) on a tiny random model.

Slowest test in the suite (every component is a fresh Python process that imports torch): it is the one
that proves the pipeline the user runs with `make demo` works end to end — MLflow version registered,
alias set, report written.
"""

from __future__ import annotations

import json

import pytest
import yaml

from unisd.cli import main


@pytest.mark.slow
def test_whole_pipeline_runs_locally_and_registers_a_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = yaml.safe_load(open(__file__.replace("tests/test_local_pipeline.py", "configs/demo.yaml")))
    config["model"] = "tiny:llama"
    config["prepare"].update(train_limit=4, eval_limit=3)
    config["contexts"].update(negative_max_tokens=12, induced_max_tokens=12)
    config["rollout"]["max_new_tokens"] = 12
    config["eval"].update(limit=3, max_new_tokens=16, bootstrap_samples=200)
    config["train"].update(max_steps=1, micro_batch_size=2, grad_accum=2)
    config["tracking"]["tracking_uri"] = "sqlite:///mlflow.db"
    config["pipeline"].update(shards=2, pipeline_root=str(tmp_path / "kfp"))
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))

    assert main(["run", "--config", str(path)]) == 0
    (summary_file,) = (tmp_path / "kfp").glob("*/summary.json")
    summary = json.loads(summary_file.read_text())
    report_html = open(summary["report_html"]).read()
    assert "<img" in report_html
    assert "gamma" in report_html and "0.001" in report_html  # the run's γ (UniSD*) is in the run table
    roles = {(e["benchmark"], e["role"]) for e in summary["eval"]}
    assert roles == {(b, r) for b in ("mbpp", "commonsenseqa") for r in ("base", "adapted")}
    decision = summary["decision"]
    assert decision["version"] == "1" and isinstance(decision["promote"], bool)

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    version = client.get_model_version_by_alias(config["tracking"]["registered_model"], "challenger")
    assert str(version.version) == "1"
    assert {"pipeline_run_id", "git_sha", "data_hash", "base_model"} <= set(version.tags)
    run = client.get_run(version.run_id)
    assert any(k.startswith("eval/mbpp/") for k in run.data.metrics)
    assert "kd_loss" in run.data.metrics and "loss" in run.data.metrics
