"""Durable resume on a cluster: with $UNISD_PROGRESS_DIR (set by the cluster placement to a run-scoped folder
on the cache PVC), train checkpoints and the metrics so far live there, so a retried pod — which gets a NEW,
empty KFP output folder — resumes instead of starting over, and the output holds only the finished result.

    test_progress_dir_*                        the one helper (unisd.artifacts.progress_dir) rollout, train
                                               and eval use: default, key, $(VAR) expansion, unresolved refs
    test_train_sigkilled_then_retried_…        `unisd train` (pipeline_steps.train, what train_op calls)
                                               SIGKILLed after a checkpoint, rerun into a fresh output folder
                                               with the same progress dir: resumed (not restarted), the same
                                               adapter weights and loss as an uninterrupted run, and no
                                               checkpoints in either output folder
    test_rollout_retried_in_a_fresh_output_…   a rollout pod's finished batches on the PVC are kept by the
                                               retry, whose output folder holds only completions + manifest
    test_eval_retried_in_a_fresh_output_…      an eval pod killed after generating: the retry (new output
                                               folder) takes every batch from the PVC, generates none
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import time

import pytest
import torch
import yaml
from test_train import SPEC, TINY_TRAIN, _final_weights, _train_cli, make_artifacts

from unisd.artifacts import PROGRESS_DIR_ENV, progress_dir
from unisd.scoring import ScoringConfig, run_scoring
from unisd.train import latest_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")


def test_progress_dir_defaults_to_the_output_folder(tmp_path, monkeypatch):
    monkeypatch.delenv(PROGRESS_DIR_ENV, raising=False)
    assert progress_dir(tmp_path / "out", "shard-0") == tmp_path / "out"
    monkeypatch.setenv(PROGRESS_DIR_ENV, str(tmp_path / "pvc" / "progress" / "run-7" / "rollout-op"))
    assert progress_dir(tmp_path / "out", "shard-1") == tmp_path / "pvc/progress/run-7/rollout-op/shard-1"
    assert progress_dir(tmp_path / "out") == tmp_path / "pvc/progress/run-7/rollout-op"


def test_progress_dir_expands_kubernetes_references_and_refuses_unresolved_ones(
    tmp_path, monkeypatch, caplog
):
    monkeypatch.setenv("UNISD_KFP_RUN", "unisd-self-distillation-x7k2p")
    monkeypatch.setenv(PROGRESS_DIR_ENV, f"{tmp_path}/progress/$(UNISD_KFP_RUN)/train-op")
    assert progress_dir(tmp_path / "out") == tmp_path / "progress/unisd-self-distillation-x7k2p/train-op"
    # a reference nothing defines, or a KFP placeholder KFP left in an env value: every run would share one
    # folder, so the output folder is used instead, with a warning
    for value in (
        f"{tmp_path}/progress/$(NOT_SET)/train-op",
        f"{tmp_path}/progress/{{{{$.pipeline_job_uuid}}}}",
    ):
        monkeypatch.setenv(PROGRESS_DIR_ENV, value)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="unisd.artifacts"):
            assert progress_dir(tmp_path / "out", "mbpp") == tmp_path / "out"
        assert "unresolved reference" in caplog.text


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("art")
    prepared, contexts, rollout = make_artifacts(root)
    run_scoring(
        ScoringConfig(batch_size=4, min_shared_prefix=8),
        model_spec=SPEC,
        prepared_dir=prepared,
        contexts_dir=contexts,
        rollout_dirs=[rollout],
        out_dir=root / "scores",
    )
    return prepared, contexts, rollout, root / "scores"


TOTAL_STEPS = 8


def write_config(path):
    train = {**TINY_TRAIN, "max_steps": TOTAL_STEPS, "save_merged": False}
    config = {"model": SPEC, "preset": "unisd_star", "objective": {"ema_every": 1}, "train": train}
    path.write_text(yaml.safe_dump(config))
    return path


def finished_only(out):
    """The output folder holds the finished result: adapter, metrics, manifest; no checkpoints/optimizer."""
    names = {p.name for p in out.iterdir()}
    assert "checkpoints" not in names and not list(out.rglob("state.pt")), names
    assert {"adapter", "manifest.json", "metrics.jsonl"} <= names, names


@pytest.mark.slow
def test_train_sigkilled_then_retried_in_a_fresh_output_folder_resumes_from_the_pvc(tmp_path, artifacts):
    config = write_config(tmp_path / "run.yaml")
    pvc = tmp_path / "cache-pvc"
    base = {**os.environ, "OMP_NUM_THREADS": "1"}

    def env(run):  # what the placement gives the train pod: the run's name and the progress folder
        return base | {"UNISD_KFP_RUN": run, PROGRESS_DIR_ENV: f"{pvc}/progress/$(UNISD_KFP_RUN)/train-op"}

    full = tmp_path / "full"
    subprocess.run(_train_cli(config, artifacts, full), env=env("run-a"), check=True, capture_output=True)
    finished_only(full)
    (ckpts,) = (pvc / "progress/run-a/train-op").glob("train-*/checkpoints")  # keyed by the inputs' hash
    assert latest_checkpoint(ckpts) is not None

    progress = pvc / "progress" / "run-b" / "train-op"
    kill_after = random.Random().randint(1, TOTAL_STEPS // 2)
    first = tmp_path / "attempt-1"
    proc = subprocess.Popen(
        _train_cli(config, artifacts, first),
        env=env("run-b"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 600
    while True:
        assert proc.poll() is None, "train exited before it could be killed"
        assert time.monotonic() < deadline
        found = list(progress.glob("train-*/checkpoints"))
        ckpt = latest_checkpoint(found[0]) if found else None
        if ckpt is not None and int(ckpt.name.removeprefix("step-")) >= kill_after:
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not (first / "manifest.json").exists() and not (first / "checkpoints").exists()
    reached = int(latest_checkpoint(found[0]).name.removeprefix("step-"))
    assert found[0].parent.name == ckpts.parent.name  # the same settings and inputs: the same key

    # the retried pod: a NEW output folder, the same run and task, so the same progress folder
    retried = tmp_path / "attempt-2"
    done = subprocess.run(
        _train_cli(config, artifacts, retried), env=env("run-b"), check=True, capture_output=True, text=True
    )
    assert f"(step {reached})" in done.stderr and "resumed from" in done.stderr, done.stderr[-2000:]
    finished_only(retried)
    a, b = _final_weights(full), _final_weights(retried)
    assert a.keys() == b.keys()
    assert any(k.endswith("lora_B.weight") and a[k].abs().max() > 0 for k in a)  # training moved the adapter
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    manifests = [json.loads((d / "manifest.json").read_text())["counts"] for d in (full, retried)]
    assert abs(manifests[0]["final"]["loss"] - manifests[1]["final"]["loss"]) <= 1e-6
    assert manifests[0]["tokens"] == manifests[1]["tokens"]  # the steps before the kill are counted too
    steps = [json.loads(line)["step"] for line in (retried / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, TOTAL_STEPS + 1))


def test_rollout_retried_in_a_fresh_output_folder_keeps_the_batches_on_the_pvc(tmp_path, monkeypatch):
    from test_rollout import _Tok

    from unisd.artifacts import read_jsonl, write_jsonl
    from unisd.models import tiny_model
    from unisd.rollout import PARTIAL_KEY, RolloutConfig, rollout_stage, run_rollout

    model = tiny_model("llama", vocab_size=64, seed=2)
    model.generation_config.eos_token_id = 2
    prepared = tmp_path / "prepared"
    rows = [
        {"id": f"x/{i}", "student_prompt_ids": [5 + i, 6, 7], "teacher_prompt_ids": [1]} for i in range(4)
    ]
    write_jsonl(prepared / "train.jsonl", rows)
    cfg = RolloutConfig(backend="hf", temperature=0.0, max_new_tokens=4, batch_size=2)
    monkeypatch.setenv(PROGRESS_DIR_ENV, str(tmp_path / "pvc/progress/run-c/rollout-op"))
    # the first attempt's pod finished item x/1 (a marker text) and was killed; its output folder is gone
    key = rollout_stage(cfg, "tiny:llama", prepared / "train.jsonl", tmp_path / "attempt-1").inputs_hash
    pvc = tmp_path / "pvc/progress/run-c/rollout-op" / f"rollout-{key[:16]}"
    kept = {"id": "x/1", "completion_ids": [9], "text": "KEPT", "finished": False, "logps": [-1.0]}
    write_jsonl(pvc / "partial.jsonl", [kept])
    (pvc / PARTIAL_KEY).write_text(key + "\n")

    out = tmp_path / "attempt-2"
    run_rollout(
        cfg, model_spec="tiny:llama", prepared_dir=prepared, out_dir=out, model=model, tokenizer=_Tok()
    )
    done = read_jsonl(out / "completions.jsonl")
    assert [r["id"] for r in done] == ["x/0", "x/1", "x/2", "x/3"] and done[1]["text"] == "KEPT"
    assert sorted(p.name for p in out.iterdir()) == ["completions.jsonl", "manifest.json"]
    assert not (pvc / "partial.jsonl").exists()  # finished: the progress is in completions.jsonl now


def test_eval_retried_in_a_fresh_output_folder_reuses_the_generations_on_the_pvc(
    tmp_path, monkeypatch, tiny_llama
):
    from unisd import evaluate, rollout
    from unisd.artifacts import read_jsonl
    from unisd.evaluate import EvalConfig, generate_samples
    from unisd.prepare import PrepareConfig, run_prepare

    model, tokenizer = tiny_llama
    prepared = tmp_path / "prepared"
    run_prepare(
        PrepareConfig(benchmarks=["commonsenseqa"], train_limit=1, eval_limit=4),
        model_spec="tiny:llama",
        out_dir=prepared,
    )
    cfg = EvalConfig(limit=4, max_new_tokens=6, batch_size=2, retention=False, reference_fit=True)
    pvc = tmp_path / "pvc/progress/run-d/eval-op"
    monkeypatch.setenv(PROGRESS_DIR_ENV, str(pvc))
    kw = dict(model_spec="tiny:llama", benchmark="commonsenseqa", prepared_dir=prepared, model=model)

    def killed(*args, **kwargs):  # the pod dies after generating, before its measures are written
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(evaluate, "reference_fit", killed)
        with pytest.raises(KeyboardInterrupt):
            generate_samples(cfg, out_dir=tmp_path / "attempt-1", tokenizer=tokenizer, **kw)
    assert not (tmp_path / "attempt-1" / "progress").exists()
    assert not (tmp_path / "attempt-1" / "manifest.json").exists()
    (greedy,) = pvc.glob("eval-*/progress/greedy.jsonl")  # the progress lives on the PVC
    assert len(greedy.read_text().splitlines()) == 4

    calls = []
    real = rollout.generate
    monkeypatch.setattr(rollout, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    measures = generate_samples(cfg, out_dir=tmp_path / "attempt-2", tokenizer=tokenizer, **kw)
    assert calls == []  # every batch came from the PVC, none was generated again
    assert len(read_jsonl(tmp_path / "attempt-2" / "samples.jsonl")) == 4 and "reference_nll" in measures
    assert not (tmp_path / "attempt-2" / "progress").exists() and not greedy.exists()
