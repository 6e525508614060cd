"""Scheduled retraining that means something (`retrain.*`, the gate's retention guards): three consecutive
local pipeline runs (real kfp.local, tiny model) on one user dataset, tracked by a real MLflow server.

1. first run: no champion yet, trains from the base model, is promoted (margin −1) → champion v1;
2. same source, unchanged: the run skips before any expensive stage, the reason is tagged on its MLflow
   run, which ends FINISHED; no training task ran;
3. rows added to the source: a new data hash, so it trains — from the champion's weights
   (`retrain.continue_from_champion`) — and a challenger that breaks the retention bound is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from mlflow_server import MlflowServer

from unisd.cli import main

REPO = Path(__file__).resolve().parents[1]
MODEL_NAME = "retrain-student"


def _write_rows(path: Path, n: int) -> None:
    rows = [
        json.loads(line) for line in (REPO / "examples/data/support_tickets.jsonl").read_text().splitlines()
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:n]))


def _config(tmp_path: Path, data: Path, uri: str, **tracking) -> Path:
    config = yaml.safe_load((REPO / "configs/demo.yaml").read_text())
    config["model"] = "tiny:llama"
    config["prepare"].update(
        benchmarks=["support"],
        datasets={
            "support": {
                "source": str(data),
                "kind": "multiple_choice",
                "columns": {"id": "ticket_id", "question": "ticket", "choices": "options", "answer": "label"},
            }
        },
        train_limit=None,
        eval_limit=None,
    )
    config["contexts"].update(negative_max_tokens=8, induced_max_tokens=8)
    config["rollout"]["max_new_tokens"] = 8
    config["eval"].update(limit=None, max_new_tokens=8, bootstrap_samples=200)
    config["train"].update(max_steps=1, micro_batch_size=2, grad_accum=1)
    config["tracking"].update(
        tracking_uri=uri, registered_model=MODEL_NAME, promotion_margin=-1.0, **tracking
    )
    config["retrain"] = {"skip_unchanged_data": True, "continue_from_champion": True}
    config["pipeline"].update(shards=1, pipeline_root=str(tmp_path / "kfp"))
    path = tmp_path / "retrain.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _run(config: Path, tmp_path: Path, n: int) -> dict:
    assert main(["run", "--config", str(config)]) == 0
    summaries = sorted((tmp_path / "kfp").glob("*/summary.json"), key=lambda p: p.stat().st_mtime)
    assert len(summaries) == n
    return json.loads(summaries[-1].read_text())


@pytest.mark.slow
def test_scheduled_runs_skip_unchanged_data_continue_from_the_champion_and_guard_retention(
    tmp_path, monkeypatch
):
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    data = tmp_path / "support.jsonl"
    _write_rows(data, 12)
    with MlflowServer(tmp_path / "mlflow") as server:
        client = MlflowClient(tracking_uri=server.uri)

        first = _run(_config(tmp_path, data, server.uri), tmp_path, 1)
        assert first["retrain_check"]["train"] and first["retrain_check"]["champion"] == ""
        assert first["decision"]["promote"], first["decision"]
        champion = client.get_model_version_by_alias(MODEL_NAME, "champion")
        assert champion.version == "1"

        second = _run(_config(tmp_path, data, server.uri), tmp_path, 2)
        check = second["retrain_check"]
        assert not check["train"] and check["data_hash"] == champion.tags["data_hash"]
        assert second["decision"] is None and second["eval"] == []
        run_dir = Path(second["run_dir"])
        assert not list(run_dir.glob("**/train-op*")), "a skipped run must not train"
        (skipped,) = client.search_runs(
            [client.get_experiment_by_name("unisd-demo").experiment_id], "tags.skipped = 'true'"
        )
        assert "data unchanged since champion version 1" in skipped.data.tags["skipped_reason"]
        assert skipped.info.status == "FINISHED"

        _write_rows(data, 20)  # new rows arrive in the source
        guarded = _config(tmp_path, data, server.uri, promotion_max_retention_ppl=1.0)  # PPL_ret ≥ 1 always
        third = _run(guarded, tmp_path, 3)
        check = third["retrain_check"]
        assert (
            check["train"] and check["champion"] == "1" and check["data_hash"] != champion.tags["data_hash"]
        )
        assert "continuing from champion version 1" in check["reason"]
        (train_manifest,) = Path(third["run_dir"]).glob("**/train-op*/**/manifest.json")
        init = json.loads(train_manifest.read_text())["config"]["train"]["init_adapter"]
        assert init and "starting-model-op" in init  # the champion's adapter, downloaded from the registry
        decision = third["decision"]
        assert not decision["promote"] and "retention guard" in decision["reason"]
        assert "retention_ppl" in decision["retention_guard"]
        assert client.get_model_version_by_alias(MODEL_NAME, "champion").version == "1"
        version = client.get_model_version(MODEL_NAME, decision["version"])
        assert version.tags["data_hash"] == check["data_hash"]  # lineage: which data each version saw
