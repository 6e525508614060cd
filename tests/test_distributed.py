"""`unisd train` as N ranks (torchrun, gloo on CPU): the same numbers as one rank, on every engine.

One torchrun launch (tests/dist_worker.py, 2 ranks) runs four trainings in a row: LoRA + DDP, full fine-tuning
+ DDP, full fine-tuning + DeepSpeed ZeRO-2, + ZeRO-3 (DS_ACCELERATOR=cpu). The 1-rank references run in this
process on the same global windows. The objective is UniSD* with quantile clipping and a per-step EMA teacher,
so every global-batch statistic is exercised: the window normalisers, the agreement quantile (all-gathered), the
clipping quantile (a no-grad pre-pass over the window, all-gathered) and the EMA (gathered under ZeRO-3).

Then `torchrun -m unisd train` is SIGKILLed in rank 1 mid-run: the job must fail, and the rerun must resume to
the same weights as the uninterrupted 2-rank run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from test_train import TINY_TRAIN

from unisd.train import latest_checkpoint

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed (the dev extra)"
    ),
]

HERE = Path(__file__).resolve().parent
SPEC = "tiny:llama"
LORA = {**TINY_TRAIN["lora"], "dropout": 0.0}
# 4 items per optimizer step: 1 rank = 2 micro-batches of 2 (accumulation); 2 ranks = 1 micro-batch of 2 each.
BASE = {**{k: v for k, v in TINY_TRAIN.items() if k != "lora"}, "save_merged": False}
FULL = {**BASE, "lora": {**LORA, "enabled": False}, "max_steps": 3}
RUNS = {
    "lora": {**BASE, "lora": LORA, "max_steps": 8},
    "full": FULL,
    "zero2": {**FULL, "deepspeed": "zero2"},
    "zero3": {**FULL, "deepspeed": "zero3", "zero3_persistence_threshold": 0},  # partition every parameter
}
OBJECTIVE = {"ema_every": 1, "clip": "quantile"}


def _env() -> dict[str, str]:
    src = str(HERE.parent / "src")
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([src, str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TORCH_EXTENSIONS_DIR": os.environ.get(
            "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions")
        ),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        *args,
    ]


def _failure(out: subprocess.CompletedProcess, log: Path) -> str:
    """A failed launch's message: its error lines first (CI shows the head of a long message), then the tail;
    the whole output is kept in `log`."""
    log.write_text(f"{out.stdout or ''}\n---- stderr ----\n{out.stderr or ''}")
    text = (out.stderr or "").splitlines()
    errors = [line for line in text if any(w in line for w in ("rror", "Traceback", "exited", "unisd:"))]
    return "\n".join(["error lines:", *errors[:40], f"(whole output: {log})", "tail:", *text[-40:]])


def _train_argv(config: Path, art: dict[str, Path], out: Path) -> list[str]:
    paths = ["--prepared", art["prepared"], "--contexts", art["contexts"], "--rollouts", art["rollout"]]
    return [
        "train",
        "--config",
        str(config),
        *map(str, paths),
        "--scores",
        str(art["scores"]),
        "--out",
        str(out),
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{name: (1-rank dir or None, 2-rank dir)} plus the configs and artifacts, after one torchrun launch."""
    from test_train import make_artifacts

    from unisd.cli import main as unisd_main
    from unisd.scoring import ScoringConfig, run_scoring

    root = tmp_path_factory.mktemp("dist")
    prepared, contexts, rollout = make_artifacts(root)
    run_scoring(
        ScoringConfig(batch_size=4, min_shared_prefix=8),
        model_spec=SPEC,
        prepared_dir=prepared,
        contexts_dir=contexts,
        rollout_dirs=[rollout],
        out_dir=root / "scores",
    )
    art = {"prepared": prepared, "contexts": contexts, "rollout": rollout, "scores": root / "scores"}
    configs = {}
    for name, train in RUNS.items():
        configs[name] = root / f"{name}.yaml"
        configs[name].write_text(
            yaml.safe_dump({"model": SPEC, "preset": "unisd_star", "objective": OBJECTIVE, "train": train})
        )
    plan = root / "two.json"
    plan.write_text(json.dumps([_train_argv(configs[n], art, root / "two" / n) for n in RUNS]))
    started = time.perf_counter()
    out = subprocess.run(
        torchrun(2, str(HERE / "dist_worker.py"), str(plan)),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert out.returncode == 0, _failure(out, root / "two.log")
    print(f"2-rank launch (4 trainings): {time.perf_counter() - started:.1f} s")
    for name in ("lora", "full"):  # the 1-rank references, in this process
        assert unisd_main(_train_argv(configs[name], art, root / "one" / name)) == 0
    return {"root": root, "configs": configs, "art": art}


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    adapter = path / "adapter" / "adapter_model.safetensors"
    return load_file(str(adapter if adapter.exists() else path / "merged" / "model.safetensors"))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _assert_same_run(a: Path, b: Path, *, tol: float) -> None:
    ma, mb = _metrics(a), _metrics(b)
    assert [r["step"] for r in ma] == [r["step"] for r in mb]
    for ra, rb in zip(ma, mb):
        assert abs(ra["loss"] - rb["loss"]) <= tol, (ra["step"], ra["loss"], rb["loss"])
        assert ra["num_tokens"] == rb["num_tokens"] and ra["num_sequences"] == rb["num_sequences"]
        assert ra["train/lr"] == pytest.approx(rb["train/lr"], rel=1e-9)
        assert ra["kd/clip_threshold"] == pytest.approx(rb["kd/clip_threshold"], rel=1e-4, abs=tol)
    assert _max_diff(_weights(a), _weights(b)) <= tol


def test_two_ranks_equal_one_rank_lora_ddp(runs):
    root = runs["root"]
    manifest = json.loads((root / "two" / "lora" / "manifest.json").read_text())
    assert manifest["counts"]["ranks"] == 2 and manifest["counts"]["engine"] == "ddp"
    _assert_same_run(root / "one" / "lora", root / "two" / "lora", tol=1e-5)
    trained = _weights(root / "two" / "lora")
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in trained.items())


def test_two_ranks_equal_one_rank_full_finetuning_ddp(runs):
    _assert_same_run(runs["root"] / "one" / "full", runs["root"] / "two" / "full", tol=1e-5)


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_zero_matches_ddp(runs, stage):
    root = runs["root"]
    manifest = json.loads((root / "two" / stage / "manifest.json").read_text())
    assert manifest["counts"]["engine"] == stage
    _assert_same_run(root / "two" / "full", root / "two" / stage, tol=1e-5)
    for a, b in zip(_metrics(root / "two" / "full"), _metrics(root / "two" / stage)):
        assert a["train/grad_norm"] == pytest.approx(b["train/grad_norm"], rel=1e-4)


def test_ema_teacher_under_zero3_equals_the_single_process_ema(runs):
    from safetensors.torch import load_file

    root = runs["root"]
    one = load_file(str(root / "one" / "full" / "ema_teacher.safetensors"))
    zero3 = load_file(str(root / "two" / "zero3" / "ema_teacher.safetensors"))
    assert "model.embed_tokens.weight" in one and "model.layers.1.mlp.down_proj.weight" in one
    assert _max_diff(one, zero3) <= 1e-6
    rows = _metrics(root / "two" / "zero3")
    assert [r["ema/updates"] for r in rows] == [1.0, 2.0, 3.0]
    assert all(r["ema/teacher_student_gap"] > 0 for r in rows)  # over every rank's shards, not 0/0
    single = _metrics(root / "one" / "full")
    for a, b in zip(single, rows):
        assert a["ema/teacher_student_gap"] == pytest.approx(b["ema/teacher_student_gap"], rel=1e-4)


def _rank_pid(launcher: subprocess.Popen, local_rank: int) -> int | None:
    import psutil

    try:
        children = psutil.Process(launcher.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return None
    for child in children:
        try:
            if child.environ().get("LOCAL_RANK") == str(local_rank):
                return child.pid
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def test_sigkill_of_rank_1_fails_the_job_and_the_rerun_resumes_to_the_same_weights(runs):
    """`torchrun -m unisd train` (2 ranks, DDP): rank 1 SIGKILLed at a random moment after a random step →
    torchrun fails the job (no manifest); the same command again resumes from rank 0's last checkpoint and ends
    on the weights and loss of the uninterrupted 2-rank run."""
    root, art = runs["root"], runs["art"]
    total = RUNS["lora"]["max_steps"]
    killed = root / "killed"
    cmd = torchrun(2, "-m", "unisd", *_train_argv(runs["configs"]["lora"], art, killed))
    rng = random.Random()
    kill_after = rng.randint(1, total // 2)
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while True:
        assert proc.poll() is None, "train exited before it could be killed"
        assert time.monotonic() < deadline
        ckpt = latest_checkpoint(killed / "checkpoints") if (killed / "checkpoints").exists() else None
        if ckpt is not None and int(ckpt.name.removeprefix("step-")) >= kill_after:
            break
        time.sleep(0.002)
    time.sleep(rng.uniform(0.0, 0.05))  # somewhere inside the next step or checkpoint write
    victim = _rank_pid(proc, 1)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0, "the job must fail when a rank dies"
    assert not (killed / "manifest.json").exists()
    assert "SIGKILL" in stderr or "Signal 9" in stderr or "exitcode" in stderr.lower(), stderr[-2000:]

    again = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, _failure(again, root / "again.log")
    assert "resumed from" in again.stderr
    full = root / "two" / "lora"
    assert _max_diff(_weights(full), _weights(killed)) <= 1e-6
    final_full = json.loads((full / "manifest.json").read_text())["counts"]["final"]["loss"]
    final_killed = json.loads((killed / "manifest.json").read_text())["counts"]["final"]["loss"]
    assert abs(final_full - final_killed) <= 1e-6
