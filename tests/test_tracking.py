"""unisd.tracking against a REAL `mlflow server` (tests/mlflow_server.py) and a real sqlite file.

One server per session; every test uses its own experiment and registered-model name. The retry
tests start a second server late on a chosen port, and point a client at a port nothing serves.
"""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow_server import MlflowServer, free_port

from unisd import tracking
from unisd.tracking import TrackingConfig, TrackingUnavailableError


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    with MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start() as srv:
        print(f"mlflow server healthy after {srv.startup_s:.1f}s")
        yield srv


@pytest.fixture
def cfg(server, request) -> TrackingConfig:
    name = request.node.name.replace("[", "-").replace("]", "")
    return TrackingConfig(
        tracking_uri=server.uri,
        experiment=f"exp-{name}",
        registered_model=f"model-{name}",
        retries=2,
        backoff_s=0.2,
    )


def client(cfg: TrackingConfig) -> MlflowClient:
    return MlflowClient(tracking_uri=cfg.tracking_uri, registry_uri=cfg.tracking_uri)


def metrics_rows(steps: int) -> list[dict]:
    """Rows shaped like the train stage's metrics.jsonl."""
    return [
        {
            "step": s,
            "loss": 2.0 / s,
            "kd_loss": 1.5 / s,
            "cl_loss": 0.3,
            "fm_loss": 0.01 * s,
            "agreement/weight_min": 0.99,
            "agreement/weight_mean": 0.995,
            "agreement/weight_max": 1.0,
            "kd/clip_fraction": 0.0,
            "train/grad_norm": 1.0 + s,
            "train/lr": 1e-4,
            "train/bad_items": 0,
            "pass@1": 0.5,  # '@' is not allowed in MLflow names
            "missing": None,
        }
        for s in range(1, steps + 1)
    ]


def make_model_dir(root: Path, *, merged: bool = False) -> Path:
    """A train-stage output: adapter/ (HF PEFT files) and optionally merged/, plus checkpoints/ that
    must NOT be registered."""
    (root / "adapter").mkdir(parents=True)
    (root / "adapter" / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA"}))
    (root / "adapter" / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    if merged:
        (root / "merged").mkdir()
        (root / "merged" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (root / "checkpoints" / "step_1").mkdir(parents=True)
    (root / "checkpoints" / "step_1" / "state.pt").write_bytes(b"x")
    return root


LINEAGE = {
    "pipeline_run_id": "kfp-123",
    "git_sha": "abc1234",
    "data_hash": "d41d8cd9",
    "base_model": "smollm2-135m-instruct",
    "preset": "unisd_star",
}


def scores(values: list[float], benchmark: str = "mbpp") -> dict[str, float]:
    return {f"{benchmark}/{i}": v for i, v in enumerate(values)}


# --------------------------------------------------------------------------------------------------
# config


def test_sqlite_uri_resolves_against_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert TrackingConfig().tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert (
        TrackingConfig(tracking_uri="sqlite:///runs/m.db").tracking_uri == f"sqlite:///{tmp_path}/runs/m.db"
    )
    assert TrackingConfig(tracking_uri="sqlite:////abs/m.db").tracking_uri == "sqlite:////abs/m.db"
    assert TrackingConfig(tracking_uri="http://mlflow:5000").tracking_uri == "http://mlflow:5000"
    with pytest.raises(ValueError, match="promotion_margin"):
        TrackingConfig(promotion_margin=float("nan"))
    with pytest.raises(ValueError, match="extra"):
        TrackingConfig(tracking_url="x")


def test_sanitize_metric_name():
    assert tracking.sanitize_metric_name("pass@1") == "pass_at_1"
    assert tracking.sanitize_metric_name("eval/mbpp/base/score") == "eval/mbpp/base/score"
    assert tracking.sanitize_metric_name("kd/ratio(clip)%") == "kd/ratio_clip__"
    assert tracking.sanitize_metric_name("/a//../b/") == "a/b"


# --------------------------------------------------------------------------------------------------
# runs and metrics


def test_run_params_and_step_metrics_round_trip(cfg):
    run_id = tracking.start_run(
        cfg,
        run_name="train",
        tags={"stage": "train"},
        params={"train": {"lr": 1e-4, "steps": 3}, "preset": "sd"},
    )
    rows = metrics_rows(3)
    logged = tracking.log_step_metrics(cfg, run_id, rows)
    assert logged == 3 * 12  # every numeric key but "step"; None skipped
    mlflow = client(cfg)
    for key in (
        "loss",
        "kd_loss",
        "cl_loss",
        "fm_loss",
        "agreement/weight_mean",
        "train/grad_norm",
        "pass_at_1",
    ):
        history = sorted((m.step, m.value) for m in mlflow.get_metric_history(run_id, key))
        assert [step for step, _ in history] == [1, 2, 3], key
        expected = [float(r[key.replace("pass_at_1", "pass@1")]) for r in rows]
        assert [value for _, value in history] == pytest.approx(expected), key
    run = mlflow.get_run(run_id)
    assert run.data.params["train.lr"] == "0.0001" and run.data.params["preset"] == "sd"
    assert run.data.tags["stage"] == "train"
    assert "missing" not in run.data.metrics
    with pytest.raises(ValueError, match="row 1: 'step' must be an integer"):
        tracking.log_step_metrics(cfg, run_id, [{"step": 1, "loss": 1.0}, {"loss": 2.0}])
    with pytest.raises(ValueError, match=r"row 0 \(step 4\): field 'loss' is not a number"):
        tracking.log_step_metrics(cfg, run_id, [{"step": 4, "loss": "high"}])
    tracking.end_run(cfg, run_id)
    assert mlflow.get_run(run_id).info.status == "FINISHED"


def test_log_eval_metrics_table_and_config(cfg, tmp_path):
    run_id = tracking.start_run(cfg, run_name="eval")
    results = {
        "aggregate": {
            "benchmark": "mbpp",
            "model": "smollm2-135m-instruct",
            "items": 3,
            "metric": "pass_at_1",
            "score": 2 / 3,
            "score_ci95": [0.2, 1.0],
            "retention_ppl": 1.7,
            "retention_jsd": 0.05,
        },
        "per_item": [
            {"id": "mbpp-11", "score": 1.0, "passed": [True]},
            {"id": "mbpp-12", "score": 0.0, "passed": [False]},
            {"id": "mbpp-13", "score": 1.0, "passed": [True], "error": "timeout"},
        ],
    }
    metrics = tracking.log_eval(cfg, run_id, results, model_role="adapted")
    mlflow = client(cfg)
    logged = mlflow.get_run(run_id).data.metrics
    assert logged["eval/mbpp/adapted/score"] == pytest.approx(2 / 3)
    assert (
        logged["eval/mbpp/adapted/score_ci95_low"] == 0.2
        and logged["eval/mbpp/adapted/score_ci95_high"] == 1.0
    )
    assert logged["eval/mbpp/adapted/retention_jsd"] == 0.05 and logged["eval/mbpp/adapted/items"] == 3
    assert set(metrics) <= set(logged)
    table_file = mlflow.download_artifacts(run_id, "eval/mbpp/adapted/per_item.json", str(tmp_path))
    table = json.loads(Path(table_file).read_text())
    assert table["columns"] == ["id", "score", "passed", "error"]
    assert table["data"][2] == ["mbpp-13", 1.0, "[true]", "timeout"]
    tags = mlflow.get_run(run_id).data.tags
    assert {"path": "eval/mbpp/adapted/per_item.json", "type": "table"} in json.loads(
        tags["mlflow.loggedArtifacts"]
    )
    # logging again (a retried step) overwrites, it does not append rows
    tracking.log_eval(cfg, run_id, results, model_role="adapted")
    again = json.loads(
        Path(
            mlflow.download_artifacts(run_id, "eval/mbpp/adapted/per_item.json", str(tmp_path / "b"))
        ).read_text()
    )
    assert len(again["data"]) == 3
    with pytest.raises(ValueError, match="model_role"):
        tracking.log_eval(cfg, run_id, results)
    base = json.loads(json.dumps(results))
    base["aggregate"]["role"] = "base"  # the role may come from the aggregate itself
    tracking.log_eval(cfg, run_id, base)
    assert "eval/mbpp/base/score" in mlflow.get_run(run_id).data.metrics

    n_params = tracking.log_config(cfg, run_id, "model: tiny\ntrain:\n  lr: 0.0001\n  lora: {r: 8}\n")
    assert n_params == 3
    params = mlflow.get_run(run_id).data.params
    assert params["config.train.lora.r"] == "8" and params["config.model"] == "tiny"
    text = Path(mlflow.download_artifacts(run_id, "config/run_config.yaml", str(tmp_path / "c"))).read_text()
    assert "lora: {r: 8}" in text
    with pytest.raises(ValueError, match="not valid YAML"):
        tracking.log_config(cfg, run_id, "a: [")

    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "notes.txt").write_text("hello")
    tracking.log_artifacts(cfg, run_id, tmp_path / "extra", "notes")
    assert [f.path for f in mlflow.list_artifacts(run_id, "notes")] == ["notes/notes.txt"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tracking.log_artifacts(cfg, run_id, tmp_path / "nope")


# --------------------------------------------------------------------------------------------------
# registry, gate, promotion, rollback


def test_register_gate_promote_and_rollback(cfg, tmp_path):
    mlflow = client(cfg)
    base = scores([0.0] * 20 + [1.0] * 10)  # 30 items, base solves 10
    assert tracking.current_champion(cfg) is None  # no registered model yet
    assert tracking.champion_item_scores(cfg) is None

    # version 1: clearly better than the base; no champion yet → compared with the base
    run1 = tracking.start_run(cfg, run_name="round-1")
    better = scores([1.0] * 12 + [0.0] * 8 + [1.0] * 10)  # 22 of 30
    v1 = tracking.register_model_version(
        cfg, run1, make_model_dir(tmp_path / "m1", merged=True), lineage=LINEAGE, item_scores=better
    )
    assert v1 == "1" and tracking.alias_version(cfg, "challenger") == "1"
    mv = mlflow.get_model_version(cfg.registered_model, v1)
    assert {k: mv.tags[k] for k in LINEAGE} == LINEAGE
    assert mv.tags["model_format"] == "adapter+merged" and mv.run_id == run1
    assert mv.source.endswith(f"{run1}/artifacts/model")
    listed = {f.path for f in mlflow.list_artifacts(run1, "model")}
    assert listed == {"model/adapter", "model/merged"}  # checkpoints/ are not registered
    assert tracking.version_item_scores(cfg, v1) == better

    decision = tracking.decide_promotion(cfg, better, base_items=base, challenger_version=v1)
    assert decision["baseline"] == "base" and decision["promote"] is True, decision["reason"]
    assert (
        decision["delta"] == pytest.approx(12 / 30) and decision["ci_low"] > 0 and decision["n_items"] == 30
    )
    tracking.log_promotion(cfg, run1, decision, version=v1)
    assert tracking.promote(cfg, v1) is None
    assert tracking.current_champion(cfg) == "1"
    assert tracking.champion_item_scores(cfg) == better
    assert mlflow.get_model_version(cfg.registered_model, v1).tags["gate_promote"] == "True"
    assert mlflow.get_run(run1).data.metrics["promotion/delta"] == pytest.approx(12 / 30)

    # version 2: worse than the champion (but better than the base) → compared with the champion, refused
    run2 = tracking.start_run(cfg, run_name="round-2")
    worse = scores([1.0] * 5 + [0.0] * 15 + [1.0] * 10)  # 15 of 30
    v2 = tracking.register_model_version(
        cfg, run2, make_model_dir(tmp_path / "m2"), lineage=LINEAGE, item_scores=worse
    )
    assert tracking.alias_version(cfg, "challenger") == v2 == "2"
    decision = tracking.decide_promotion(cfg, worse, base_items=base, challenger_version=v2)
    assert decision["baseline"] == "champion" and decision["champion_version"] == "1"
    assert decision["promote"] is False and decision["delta"] < 0
    # equal to the champion → refused (the CI's lower bound is not above the margin)
    assert tracking.decide_promotion(cfg, better, base_items=base)["promote"] is False
    # a NaN score → refused
    with_nan = dict(better) | {"mbpp/3": float("nan")}
    refused = tracking.decide_promotion(cfg, with_nan, base_items=base)
    assert refused["promote"] is False and "NaN" in refused["reason"]
    # challenger eval failed / missing → refused
    assert tracking.decide_promotion(cfg, None, base_items=base)["promote"] is False
    assert tracking.current_champion(cfg) == "1"

    # version 3: better than the champion → promoted; then rolled back to 1
    run3 = tracking.start_run(cfg, run_name="round-3")
    best = scores([1.0] * 30)
    v3 = tracking.register_model_version(
        cfg, run3, make_model_dir(tmp_path / "m3"), lineage=LINEAGE, item_scores=best
    )
    cfg3 = cfg.model_copy(update={"promotion_margin": 0.05})
    decision = tracking.decide_promotion(cfg3, best, base_items=base, challenger_version=v3)
    assert decision["promote"] is True and decision["ci_low"] > 0.05, decision["reason"]
    assert tracking.promote(cfg, v3, reason=decision["reason"]) == "1"
    assert tracking.current_champion(cfg) == "3"
    out = tracking.rollback(cfg, "1", reason="regression seen in production")
    assert out == {"previous": "3", "champion": "1"}
    assert tracking.current_champion(cfg) == "1"
    assert (
        "regression seen in production"
        in mlflow.get_model_version(cfg.registered_model, "3").tags["rolled_back"]
    )
    assert (
        mlflow.get_model_version(cfg.registered_model, "1").tags["restored_reason"]
        == "regression seen in production"
    )
    with pytest.raises(ValueError, match="already the champion"):
        tracking.rollback(cfg, "1")

    # a permanent error is raised at once, not retried (retries=5 × 1 s backoff would take ≥ 31 s)
    slow_cfg = cfg.model_copy(update={"retries": 5, "backoff_s": 1.0})
    started = time.monotonic()
    with pytest.raises(MlflowException, match="not found"):
        tracking.rollback(slow_cfg, "99", reason="no such version")
    assert time.monotonic() - started < 5
    assert tracking.current_champion(cfg) == "1"

    with pytest.raises(ValueError, match="lineage lacks"):
        tracking.register_model_version(cfg, run3, tmp_path / "m3", lineage={"git_sha": "x"})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no model"):
        tracking.register_model_version(cfg, run3, tmp_path / "empty", lineage=LINEAGE)


def test_champion_without_stored_scores_blocks_the_gate(cfg, tmp_path):
    run = tracking.start_run(cfg, run_name="no-scores")
    version = tracking.register_model_version(cfg, run, make_model_dir(tmp_path / "m"), lineage=LINEAGE)
    tracking.promote(cfg, version)
    decision = tracking.decide_promotion(cfg, scores([1.0] * 10), base_items=scores([0.0] * 10))
    assert decision["promote"] is False and "no stored per-item scores" in decision["reason"]


# --------------------------------------------------------------------------------------------------
# the gate itself (pure)


def test_promotion_decision_rules():
    champion = scores([0.0] * 10 + [1.0] * 10)
    clearly_better = scores([1.0] * 20)
    decision = tracking.promotion_decision(champion, clearly_better, margin=0.0)
    assert decision["promote"] is True and decision["delta"] == 0.5 and decision["n_items"] == 20
    assert decision["per_benchmark"] == {"mbpp": {"delta": 0.5, "n": 20}}
    # a margin the CI's lower bound does not clear
    assert tracking.promotion_decision(champion, clearly_better, margin=0.6)["promote"] is False
    # better on average (+0.1) but not with confidence: 2 of 20 items flip → the CI reaches 0
    slightly = tracking.promotion_decision(champion, scores([1.0] * 2 + [0.0] * 8 + [1.0] * 10), margin=0.0)
    assert (
        slightly["delta"] == pytest.approx(0.1) and slightly["ci_low"] <= 0 and slightly["promote"] is False
    )
    assert tracking.promotion_decision(champion, champion, margin=0.0)["promote"] is False  # equal
    assert tracking.promotion_decision(clearly_better, champion, margin=0.0)["promote"] is False  # worse
    # only the shared ids count; the rest are reported
    extra = clearly_better | {"mbpp/99": 0.0, "csqa/1": 0.0}
    decision = tracking.promotion_decision(champion, extra, margin=0.0)
    assert decision["n_items"] == 20 and decision["n_only_challenger"] == 2 and decision["promote"] is True
    for bad in (None, {}):
        refused = tracking.promotion_decision(bad, clearly_better, margin=0.0)
        assert refused["promote"] is False and "missing" in refused["reason"] and math.isnan(refused["delta"])
        assert tracking.promotion_decision(champion, bad, margin=0.0)["promote"] is False
    disjoint = tracking.promotion_decision(champion, scores([1.0] * 20, "gpqa"), margin=0.0)
    assert disjoint["promote"] is False and "share no item ids" in disjoint["reason"]
    nan = tracking.promotion_decision(champion, clearly_better | {"mbpp/0": float("nan")}, margin=0.0)
    assert nan["promote"] is False and "NaN" in nan["reason"]
    few = tracking.promotion_decision(scores([0.0] * 3), scores([1.0] * 3), margin=0.0, min_items=5)
    assert few["promote"] is False and "too few" in few["reason"]
    with pytest.raises(ValueError, match="finite"):
        tracking.promotion_decision(champion, clearly_better, margin=float("nan"))


def test_pooled_item_scores_keys_by_benchmark():
    results = [
        {
            "aggregate": {"benchmark": "mbpp"},
            "per_item": [{"id": "1", "score": 1.0}, {"id": "2", "score": 0}],
        },
        {"aggregate": {"benchmark": "gpqa"}, "per_item": [{"id": "1", "score": 0.5}]},
    ]
    assert tracking.pooled_item_scores(results) == {"mbpp/1": 1.0, "mbpp/2": 0.0, "gpqa/1": 0.5}
    with pytest.raises(ValueError, match=r"gpqa: per_item\[0\] lacks 'id' or 'pass'"):
        tracking.pooled_item_scores(results[1:], metric="pass")
    with pytest.raises(ValueError, match="appears twice"):
        tracking.pooled_item_scores([results[0], results[0]])


# --------------------------------------------------------------------------------------------------
# retries against a server that is not there yet / never comes


def test_retry_succeeds_when_the_server_comes_back_late(server, tmp_path, caplog):
    """Stop the session's server, start a call, bring the server back on the same port a moment later:
    the call must get through by retrying, and what was logged before the restart is still there. The
    budget is a time (retry_for_s), not a count: a loaded machine restarts the server in 10-50 s."""
    cfg = TrackingConfig(
        tracking_uri=server.uri, experiment="late", registered_model="late-model", retry_for_s=180,
        backoff_s=0.5, max_backoff_s=3,
    )  # fmt: skip
    before = tracking.start_run(cfg, run_name="before-restart")
    server.stop()
    assert not server.healthy()
    outcome: dict = {}

    def call() -> None:
        started = time.monotonic()
        try:
            outcome["run_id"] = tracking.start_run(cfg, run_name="during-restart", params={"a": 1})
        except Exception as err:  # surfaced by the assertions below
            outcome["error"] = err
        outcome["seconds"] = time.monotonic() - started

    caplog.set_level("WARNING", logger="unisd.tracking")
    worker = threading.Thread(target=call)
    worker.start()
    time.sleep(1.0)  # the call is already failing and backing off when the server starts
    server.start(wait=False)
    worker.join(timeout=120)
    assert not worker.is_alive()
    assert "error" not in outcome, outcome.get("error")
    print(
        f"restarted server healthy after {server.wait_healthy():.1f}s; the call took {outcome['seconds']:.1f}s"
    )
    mlflow = client(cfg)
    assert mlflow.get_run(outcome["run_id"]).data.params["a"] == "1"
    assert mlflow.get_run(before).info.run_name == "before-restart"
    assert outcome["seconds"] > 1.0
    assert any("retrying in" in r.getMessage() for r in caplog.records)


def test_clear_error_when_the_server_never_comes():
    cfg = TrackingConfig(tracking_uri=f"http://127.0.0.1:{free_port()}", retries=2, backoff_s=0.1)
    started = time.monotonic()
    with pytest.raises(TrackingUnavailableError) as err:
        tracking.start_run(cfg, run_name="nobody-home")
    message = str(err.value)
    assert cfg.tracking_uri in message and "failed 3 time(s)" in message and "unreachable" in message
    assert 0.3 <= time.monotonic() - started < 10  # slept 0.1 s, then 0.2 s, between the 3 attempts


# --------------------------------------------------------------------------------------------------
# the local demo's store: a sqlite file


def test_sqlite_file_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = TrackingConfig(
        tracking_uri="sqlite:///runs/mlflow.db", experiment="demo", registered_model="demo-model"
    )
    run_id = tracking.start_run(cfg, run_name="demo", params={"preset": "sd"})
    tracking.log_step_metrics(cfg, run_id, metrics_rows(2))
    version = tracking.register_model_version(
        cfg, run_id, make_model_dir(tmp_path / "out"), lineage=LINEAGE, item_scores=scores([1.0] * 6)
    )
    tracking.promote(cfg, version)
    assert (tmp_path / "runs" / "mlflow.db").is_file()
    adapter = tmp_path / "runs" / "mlartifacts"
    assert list(adapter.rglob("model/adapter/adapter_config.json")), "artifacts must sit next to the db"
    assert tracking.current_champion(cfg) == version
    assert tracking.champion_item_scores(cfg) == scores([1.0] * 6)
    assert [v for _, v in tracking.get_metric_history(cfg, run_id, "kd_loss")] == [1.5, 0.75]


# --------------------------------------------------------------------------------------------------
# a server that blinks: probe, outbox, replay, finish


@pytest.fixture(scope="module")
def blinking(tmp_path_factory):
    """A server of its own (the tests stop and restart it; the session server stays up)."""
    with MlflowServer(tmp_path_factory.mktemp("mlflow-blinking")).start() as srv:
        yield srv


def _outbox_cfg(server: MlflowServer, tmp_path: Path, name: str) -> TrackingConfig:
    return TrackingConfig(
        tracking_uri=server.uri,
        experiment=f"blink-{name}",
        registered_model=f"blink-{name}",
        retry_for_s=3,
        backoff_s=0.5,
        probe_timeout_s=2,
        outbox=str(tmp_path / "mlflow-outbox.jsonl"),
    )


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_probe_fails_in_seconds_with_one_line():
    cfg = TrackingConfig(tracking_uri=f"http://127.0.0.1:{free_port()}", probe_timeout_s=3)
    started = time.monotonic()
    with pytest.raises(TrackingUnavailableError) as err:
        tracking.probe(cfg)
    seconds = time.monotonic() - started
    message = str(err.value)
    print(f"probe gave up after {seconds:.1f}s: {message}")
    assert "\n" not in message and cfg.tracking_uri in message and "connection refused" in message
    assert "start it" in message and seconds < 10
    assert not tracking.reachable(cfg)


def test_probe_passes_for_a_running_server_and_a_writable_sqlite_folder(server, tmp_path):
    tracking.probe(TrackingConfig(tracking_uri=server.uri))
    tracking.probe(TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/new/dir/mlflow.db"))
    assert (tmp_path / "new" / "dir").is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(TrackingUnavailableError, match="cannot create"):
        tracking.probe(TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/file/mlflow.db"))


def test_outbox_keeps_what_a_dead_server_missed_and_sync_replays_it(blinking, tmp_path):
    """Real server killed mid-run: every logging call lands in the outbox (the first after its retries,
    the rest after a short probe), nothing raises; restarted, one sync replays all of it in order and the
    run ends FINISHED at the time the run really ended."""
    cfg = _outbox_cfg(blinking, tmp_path, "sync")
    outbox = Path(cfg.outbox)
    run_id = tracking.start_run(cfg, run_name="blink", params={"preset": "sd"})
    rows = metrics_rows(4)
    tracking.log_step_metrics(cfg, run_id, rows[:2])  # live
    blinking.stop()
    started = time.monotonic()
    assert tracking.log_step_metrics(cfg, run_id, rows[2:]) == 2 * 12  # buffered, not raised
    first = time.monotonic() - started
    results = {
        "aggregate": {"benchmark": "mbpp", "role": "adapted", "items": 2, "score": 0.5},
        "per_item": [{"id": "a", "score": 1.0}, {"id": "b", "score": 0.0}],
    }
    started = time.monotonic()
    tracking.log_eval(cfg, run_id, results)
    tracking.set_tags(cfg, run_id, {"stage": "eval"})
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "report.md").write_text("# report")
    tracking.log_artifacts(cfg, run_id, tmp_path / "report", "report")
    ended = tracking.finish_run(cfg, run_id, "FINISHED")
    later = time.monotonic() - started
    print(f"first buffered call {first:.1f}s (its retries), 6 later calls {later:.1f}s together")
    assert ended["ended"] is False and ended["pending"] == len(_records(outbox))
    ops = [r["op"] for r in _records(outbox)]
    assert ops[0] == "log_batch" and ops[-1] == "set_terminated" and "log_artifacts" in ops
    assert first >= 2 and later < 6 * cfg.probe_timeout_s + 5

    blinking.start()
    summary = tracking.sync_outbox(outbox)
    print("sync:", summary)
    assert summary["replayed"] == len(ops) and summary["remaining"] == 0 and summary["failed"] == 0
    assert _records(outbox) == [] and len(_records(outbox.with_name("mlflow-outbox.done.jsonl"))) == len(ops)
    mlflow = client(cfg)
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert (
        run.info.end_time
        == next(
            r for r in _records(outbox.with_name("mlflow-outbox.done.jsonl")) if r["op"] == "set_terminated"
        )["end_time"]
    )
    assert [s for s, _ in tracking.get_metric_history(cfg, run_id, "loss")] == [1, 2, 3, 4]
    assert run.data.metrics["eval/mbpp/adapted/score"] == 0.5 and run.data.tags["stage"] == "eval"
    assert [f.path for f in mlflow.list_artifacts(run_id, "report")] == ["report/report.md"]
    assert tracking.sync_outbox(outbox)["replayed"] == 0  # nothing left: a second sync is harmless


def test_finish_run_replays_first_when_the_server_is_back(blinking, tmp_path):
    cfg = _outbox_cfg(blinking, tmp_path, "finish")
    run_id = tracking.start_run(cfg, run_name="blink-finish")
    blinking.stop()
    tracking.log_step_metrics(cfg, run_id, metrics_rows(3))
    assert tracking.outbox_pending(cfg.outbox) == 1
    blinking.start()
    ended = tracking.finish_run(cfg, run_id, "FINISHED")
    assert ended == {"status": "FINISHED", "ended": True, "pending": 0, "outbox": cfg.outbox}
    assert client(cfg).get_run(run_id).info.status == "FINISHED"
    assert [s for s, _ in tracking.get_metric_history(cfg, run_id, "kd_loss")] == [1, 2, 3]
    # a resumed pipeline reopens its run; its exit step ends it again
    assert tracking.reopen_run(cfg, run_id) == "FINISHED" and tracking.run_status(cfg, run_id) == "RUNNING"
    tracking.finish_run(cfg, run_id, "KILLED")
    assert tracking.run_status(cfg, run_id) == "KILLED"


def test_without_an_outbox_an_unreachable_server_still_raises(tmp_path, monkeypatch):
    monkeypatch.delenv("UNISD_RUN_DIR", raising=False)
    cfg = TrackingConfig(tracking_uri=f"http://127.0.0.1:{free_port()}", retries=1, backoff_s=0.1)
    with pytest.raises(TrackingUnavailableError):
        tracking.log_step_metrics(cfg, "0" * 32, metrics_rows(1))
    monkeypatch.setenv("UNISD_RUN_DIR", str(tmp_path))  # what `unisd run` sets for its components
    assert tracking.outbox_path(cfg) == tmp_path / "mlflow-outbox.jsonl"
    tracking.log_step_metrics(cfg, "0" * 32, metrics_rows(1))
    assert tracking.outbox_pending(tmp_path / "mlflow-outbox.jsonl") == 1


def test_outbox_ignores_a_torn_last_line_and_keeps_refused_calls_apart(server, tmp_path):
    cfg = TrackingConfig(tracking_uri=server.uri, experiment="torn", retries=0)
    run_id = tracking.start_run(cfg, run_name="torn")
    outbox = tmp_path / "mlflow-outbox.jsonl"
    good = {
        "op": "log_batch",
        "run_id": run_id,
        "metrics": [["loss", 1.0, 1, 1]],
        "uri": server.uri,
        "what": "m",
    }
    refused = {
        "op": "log_batch",
        "run_id": "f" * 32,
        "metrics": [["loss", 1.0, 1, 1]],
        "uri": server.uri,
        "what": "x",
    }
    outbox.write_text(json.dumps(good) + "\n" + json.dumps(refused) + "\n" + '{"op": "log_ba')
    assert tracking.outbox_pending(outbox) == 2
    summary = tracking.sync_outbox(outbox)
    assert summary["replayed"] == 1 and summary["failed"] == 1 and "x:" in summary["errors"][0]
    assert json.loads((tmp_path / "mlflow-outbox.failed.jsonl").read_text())["replay_error"]
    assert tracking.get_metric_history(cfg, run_id, "loss") == [(1, 1.0)]
