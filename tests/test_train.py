from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from unisd.artifacts import write_json, write_jsonl
from unisd.objective import preset
from unisd.scoring import ScoringConfig, run_scoring
from unisd.train import LoraSettings, TrainConfig, latest_checkpoint, run_train

SPEC = "tiny:llama"


def make_artifacts(root, n_items=8, k=3, seed=0, empty_ids=()):
    """prepared/ contexts/ rollout/ directories with random token ids (tiny model, real tokenizer ids)."""
    rng = random.Random(seed)

    def toks(lo, hi):
        return [rng.randrange(3, 2000) for _ in range(rng.randint(lo, hi))]

    shared = toks(20, 20)  # an "induced" context shared by every item → exercises the prefix cache
    prepared, contexts, rollouts = [], [], []
    for i in range(n_items):
        q = toks(3, 8)
        item_id = f"t/{i}"
        prepared.append({"id": item_id, "student_prompt_ids": q, "teacher_prompt_ids": toks(4, 6) + q})
        contexts.append(
            {
                "id": item_id,
                "views": [
                    {
                        "kind": "induced",
                        "context_id": "induced:0" if v == 0 else None,
                        "text": "",
                        "prompt_ids": (shared if v == 0 else toks(5, 9)) + q,
                    }
                    for v in range(k)
                ],
                "negative": {
                    "text": "",
                    "prompt_ids": toks(4, 6) + q,
                    "answer": "",
                    "validated": True,
                    "source": "model",
                },
            }
        )
        comp = [] if i in empty_ids else toks(2, 6)
        rollouts.append(
            {"id": item_id, "completion_ids": comp, "text": "", "finished": True, "logps": [0.0] * len(comp)}
        )
    write_jsonl(root / "prepared" / "train.jsonl", prepared)
    write_jsonl(root / "contexts" / "contexts.jsonl", contexts)
    write_jsonl(root / "rollout" / "completions.jsonl", rollouts)
    for stage, folder in (("prepare", "prepared"), ("negatives", "contexts"), ("rollout", "rollout")):
        write_json(
            root / folder / "manifest.json", {"stage": stage}
        )  # what `unisd train` checks (contexts.jsonl: the negatives stage)
    return root / "prepared", root / "contexts", root / "rollout"


# The train settings of every tiny-model training test (test_distributed, test_pvc_resume import it): LoRA on
# q/v, 4 items per optimizer step (2 micro-batches of 2), a checkpoint every step, a fixed seed.
TINY_TRAIN = {
    "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]},
    "lr": 1e-3,
    "micro_batch_size": 2,
    "grad_accum": 2,
    "checkpoint_every": 1,
    "seed": 3,
}


def _cfg(**kw):
    base = {**TINY_TRAIN, "lora": LoraSettings(**TINY_TRAIN["lora"]), "max_steps": 4}
    return TrainConfig(**{**base, **kw})


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


def _run(tmp, artifacts, objective, **kw):
    prepared, contexts, rollout, scores = artifacts
    return run_train(
        _cfg(**kw.pop("cfg", {})),
        objective,
        model_spec=SPEC,
        prepared_dir=prepared,
        contexts_dir=contexts,
        rollout_dirs=[rollout],
        score_dirs=[scores],
        out_dir=tmp,
        **kw,
    )


def test_unisd_star_trains_and_logs_every_term(tmp_path, artifacts):
    logged = []
    manifest = _run(
        tmp_path / "run",
        artifacts,
        preset("unisd_star"),
        log_metrics=lambda m, step: logged.append((step, m)),
    )
    assert manifest["counts"]["steps"] == 4
    assert [s for s, _ in logged] == [1, 2, 3, 4]
    keys = set(logged[-1][1])
    assert {"loss", "kd_loss", "cl_loss", "fm_loss", "train/grad_norm", "train/lr"} <= keys
    assert all(torch.isfinite(torch.tensor(m["loss"])) for _, m in logged)
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").exists()
    assert (tmp_path / "run" / "merged" / "config.json").exists()


def _final_weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "adapter" / "adapter_model.safetensors"))


def test_kill_and_resume_gives_identical_weights(tmp_path, artifacts):
    objective = preset("unisd_star").model_copy(update={"ema_every": 1})
    full = _run(tmp_path / "full", artifacts, objective)
    stop = random.Random().randint(1, 3)  # a random step
    partial = _run(tmp_path / "resumed", artifacts, objective, stop_after_steps=stop)
    assert partial == {"stopped_at": stop}
    assert latest_checkpoint(tmp_path / "resumed" / "checkpoints") is not None
    resumed = _run(tmp_path / "resumed", artifacts, objective)
    a, b = _final_weights(tmp_path / "full"), _final_weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    assert any(k.endswith("lora_B.weight") and a[k].abs().max() > 0 for k in a)  # training moved the adapter
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    assert abs(full["counts"]["final"]["loss"] - resumed["counts"]["final"]["loss"]) <= 1e-6


class _Planted:
    def __reduce__(self):  # what a pickle-based loader would run
        return (os.system, (f"touch {self.marker}",))


def test_a_planted_checkpoint_is_refused_and_runs_nothing(tmp_path, artifacts):
    objective = preset("sd")
    _run(tmp_path / "run", artifacts, objective, stop_after_steps=1)
    ckpt = latest_checkpoint(tmp_path / "run" / "checkpoints")
    planted = _Planted()
    planted.marker = tmp_path / "ran"
    torch.save({"format": 0, "payload": planted}, ckpt / "state.pt")
    with pytest.raises(ValueError, match="objects other than tensors"):
        _run(tmp_path / "run", artifacts, objective)
    assert not planted.marker.exists()


def _train_cli(config, artifacts, out):
    prepared, contexts, rollout, scores = artifacts
    paths = ["--prepared", prepared, "--contexts", contexts, "--rollouts", rollout, "--scores", scores]
    return [sys.executable, "-m", "unisd", "train", "--config", config, *paths, "--out", out]


def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(tmp_path, artifacts):
    """`unisd train` as a real process, SIGKILLed at a random moment after a random step (inside a step
    or a checkpoint write), then restarted: same final weights and loss as a run never killed."""
    total_steps = 12
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": SPEC,
                "preset": "unisd_star",
                "objective": {"ema_every": 1},
                "train": {**TINY_TRAIN, "max_steps": total_steps, "save_merged": False},
            }
        )
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_train_cli(config, artifacts, full), env=env, check=True, capture_output=True, timeout=600)

    rng = random.Random()
    kill_after_step = rng.randint(1, total_steps // 2)
    proc = subprocess.Popen(
        _train_cli(config, artifacts, killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 600
    while True:
        assert proc.poll() is None, "train exited before it could be killed"
        assert time.monotonic() < deadline
        ckpt = latest_checkpoint(killed / "checkpoints") if (killed / "checkpoints").exists() else None
        if ckpt is not None and int(ckpt.name.removeprefix("step-")) >= kill_after_step:
            break
        time.sleep(0.002)
    time.sleep(rng.uniform(0.0, 0.05))  # somewhere inside the next step or checkpoint write
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not (killed / "manifest.json").exists()  # it really died before finishing

    subprocess.run(
        _train_cli(config, artifacts, killed), env=env, check=True, capture_output=True, timeout=600
    )
    a, b = _final_weights(full), _final_weights(killed)
    assert a.keys() == b.keys()
    assert any(k.endswith("lora_B.weight") and a[k].abs().max() > 0 for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    loss_full = json.loads((full / "manifest.json").read_text())["counts"]["final"]["loss"]
    loss_killed = json.loads((killed / "manifest.json").read_text())["counts"]["final"]["loss"]
    assert abs(loss_full - loss_killed) <= 1e-6


def test_too_many_empty_completions_is_a_hard_stop(tmp_path):
    prepared, contexts, rollout = make_artifacts(tmp_path, empty_ids={0, 1, 2})
    from unisd.train import BadInputError

    with pytest.raises(BadInputError, match="unusable"):
        run_train(
            _cfg(),
            preset("sd"),
            model_spec=SPEC,
            prepared_dir=prepared,
            rollout_dirs=[rollout],
            out_dir=tmp_path / "out",
        )


def test_online_mode_generates_and_scores_inside_the_loop(tmp_path, artifacts):
    """The colocated protocol: each step's completions come from the current student, not the rollout files."""
    prepared, contexts, _, _ = artifacts
    objective = preset("agreement_tok_induced")
    logged = []
    manifest = run_train(
        _cfg(mode="online", max_steps=2, online_max_new_tokens=6),
        objective,
        model_spec=SPEC,
        prepared_dir=prepared,
        contexts_dir=contexts,
        out_dir=tmp_path / "online",
        log_metrics=lambda m, step: logged.append(m),
    )
    assert manifest["counts"]["steps"] == 2
    # Agreement weights were computed from views scored online (not all exactly 1).
    assert all("agreement/weight_mean" in m for m in logged)
    assert any(m["agreement/weight_min"] < 1.0 for m in logged)


def test_logged_loss_is_the_optimised_window_loss(tmp_path, artifacts):
    """One window of 4 items as 1 micro-batch of 4 or 2 micro-batches of 2: the same logged loss (each
    micro-batch loss is a share of the window's, so the trainer sums them — it never divides again)."""
    objective = preset("sd")
    lora = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    one = _run(
        tmp_path / "one",
        artifacts,
        objective,
        cfg={"lora": lora, "micro_batch_size": 4, "grad_accum": 1, "max_steps": 1},
    )
    two = _run(
        tmp_path / "two",
        artifacts,
        objective,
        cfg={"lora": lora, "micro_batch_size": 2, "grad_accum": 2, "max_steps": 1},
    )
    loss_one, loss_two = one["counts"]["final"]["loss"], two["counts"]["final"]["loss"]
    assert loss_one > 0
    assert loss_two == pytest.approx(loss_one, rel=1e-4)
    assert two["counts"]["final"]["num_sequences"] == 4 == one["counts"]["final"]["num_sequences"]


def test_ema_teacher_moves_in_a_two_step_run(tmp_path, artifacts):
    """UniSD*'s EMA (β=0.98 per 10 steps) in the demo's 2-step run: the per-step cadence moves the teacher
    adapter from the first step (the reference cadence would never move it in a run this short)."""
    manifest = _run(tmp_path / "ema", artifacts, preset("unisd_star"), cfg={"max_steps": 2})
    rows = [json.loads(line) for line in (tmp_path / "ema" / "metrics.jsonl").read_text().splitlines()]
    assert [r["ema/updates"] for r in rows] == [1.0, 2.0]
    assert 0 < rows[0]["ema/teacher_moved"] < rows[1]["ema/teacher_moved"]
    assert (tmp_path / "ema" / "ema_teacher.safetensors").exists()
    assert manifest["export"]["ema_teacher"].endswith("ema_teacher.safetensors")
    reference = preset("unisd_star").model_copy(update={"ema_schedule": "every"})
    _run(tmp_path / "every", artifacts, reference, cfg={"max_steps": 2})
    rows = [json.loads(line) for line in (tmp_path / "every" / "metrics.jsonl").read_text().splitlines()]
    assert [r["ema/teacher_moved"] for r in rows] == [0.0, 0.0]  # why the per-step cadence exists


def _record_rows(n):
    """Prepared rows with real CommonsenseQA-style records (the SFT target is the record's reference)."""
    from unisd.data.records import Record

    rows = []
    for i in range(n):
        rec = Record(
            id=f"csqa/{i}",
            benchmark="commonsenseqa",
            split="train",
            question=f"Question {i}?",
            reference=f"Reasoning: because {i}.\nAnswer: {'ABCDE'[i % 5]}",
            answer="ABCDE"[i % 5],
            choices=["a", "b", "c", "d", "e"],
        )
        rows.append(
            {
                "id": rec.id,
                "record": rec.to_dict(),
                "student_prompt_ids": [5, 6, 7 + i],
                "teacher_prompt_ids": [9, 5, 6, 7 + i],
            }
        )
    return rows


def test_sft_trains_on_the_gold_completions_without_rollouts(tmp_path):
    from unisd.models import load_tokenizer
    from unisd.train import gold_completion_ids

    rows = _record_rows(4)
    write_jsonl(tmp_path / "prepared" / "train.jsonl", rows)
    tokenizer = load_tokenizer(SPEC)
    target = gold_completion_ids(rows[1], tokenizer)
    assert tokenizer.decode(target) == "Reasoning: because 1.\nAnswer: B" + tokenizer.eos_token
    manifest = run_train(
        _cfg(max_steps=6, lr=5e-3, micro_batch_size=4, grad_accum=1),
        preset("sft"),
        model_spec=SPEC,
        prepared_dir=tmp_path / "prepared",
        out_dir=tmp_path / "sft",
    )
    losses = [
        json.loads(line)["sft_loss"] for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()
    ]
    assert manifest["counts"]["steps"] == 6 and manifest["counts"]["items"] == 4
    assert losses[-1] < losses[0]  # the gold tokens became likelier
    final = manifest["counts"]["final"]
    assert final["loss"] == final["sft_loss"] and "kd_loss" not in final


def test_gradient_checkpointing_computes_the_same_step(tmp_path, artifacts):
    """Checkpointing only trades memory for recompute: the same losses and the same trained adapter."""
    objective = preset("sd")
    lora = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    plain = _run(tmp_path / "plain", artifacts, objective, cfg={"lora": lora, "max_steps": 2})
    ckpt = _run(
        tmp_path / "ckpt",
        artifacts,
        objective,
        cfg={"lora": lora, "max_steps": 2, "gradient_checkpointing": True},
    )
    assert ckpt["counts"]["final"]["loss"] == pytest.approx(plain["counts"]["final"]["loss"], rel=1e-5)
    a, b = _final_weights(tmp_path / "plain"), _final_weights(tmp_path / "ckpt")
    assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
