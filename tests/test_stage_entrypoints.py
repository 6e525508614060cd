"""One function per stage: `unisd <stage>` and the KFP component body call the same `unisd.pipeline_steps`
function, so a round run by hand computes exactly what the pipeline computes (byte-identical payloads); and
every stage skips an unchanged rerun and reruns a changed one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from kfp import dsl

from components import stages

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _config(tmp_path: Path) -> Path:
    cfg = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    cfg["model"] = "tiny:llama"
    cfg["preset"] = "unisd_star"
    cfg["prepare"].update(benchmarks=["commonsenseqa"], train_limit=6, eval_limit=3)
    cfg["contexts"].update(negative_max_tokens=8, induced_max_tokens=8)
    cfg["rollout"]["max_new_tokens"] = 6
    cfg["eval"].update(limit=3, max_new_tokens=6, bootstrap_samples=200)
    cfg["train"].update(max_steps=1, micro_batch_size=2, grad_accum=2, save_merged=True)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cli(*args: str, cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-m", "unisd", *args], cwd=cwd, env=env, check=True, capture_output=True, timeout=900
    )


def _by_cli(config: Path, out: Path) -> None:
    c = ["--config", str(config)]
    _cli("prepare", *c, "--out", str(out / "prepared"), cwd=out.parent)
    _cli("contexts", *c, "--prepared", str(out / "prepared"), "--out", str(out / "contexts"), cwd=out.parent)
    _cli("rollout", *c, "--prepared", str(out / "prepared"), "--out", str(out / "rollout"), cwd=out.parent)
    common = [
        "--prepared",
        str(out / "prepared"),
        "--contexts",
        str(out / "contexts"),
        "--rollouts",
        str(out / "rollout"),
    ]
    _cli("score", *c, *common, "--out", str(out / "scores"), cwd=out.parent)
    _cli("train", *c, *common, "--scores", str(out / "scores"), "--out", str(out / "train"), cwd=out.parent)
    _cli(
        "eval",
        *c,
        "--prepared",
        str(out / "prepared"),
        "--benchmark",
        "commonsenseqa",
        "--student",
        str(out / "train"),
        "--out",
        str(out / "eval"),
        cwd=out.parent,
    )


def _by_components(config: Path, out: Path, resolved: Path) -> None:
    """The component bodies (their python_func), with KFP artifacts pointing at local folders."""

    def art(kind, name):
        return kind(uri=str(out / name))

    cfg = dsl.Artifact(uri=str(resolved))
    stages.prepare_op.python_func(config=cfg, prepared=art(dsl.Dataset, "prepared"))
    stages.contexts_op.python_func(
        config=cfg, prepared=art(dsl.Dataset, "prepared"), draft=art(dsl.Dataset, "contexts/draft")
    )
    stages.negatives_op.python_func(
        config=cfg,
        prepared=art(dsl.Dataset, "prepared"),
        draft=art(dsl.Dataset, "contexts/draft"),
        contexts=art(dsl.Dataset, "contexts"),
    )
    stages.rollout_op.python_func(
        config=cfg,
        prepared=art(dsl.Dataset, "prepared"),
        shard=0,
        num_shards=1,
        rollout=art(dsl.Dataset, "rollout"),
    )
    stages.score_op.python_func(
        config=cfg,
        prepared=art(dsl.Dataset, "prepared"),
        contexts=art(dsl.Dataset, "contexts"),
        rollouts=art(dsl.Dataset, "rollout"),
        shard=0,
        num_shards=1,
        scores=art(dsl.Dataset, "scores"),
    )
    stages.train_op.python_func(
        config=cfg,
        prepared=art(dsl.Dataset, "prepared"),
        contexts=art(dsl.Dataset, "contexts"),
        rollouts=art(dsl.Dataset, "rollout"),
        scores=art(dsl.Dataset, "scores"),
        run_id="",
        round_index=0,
        model=art(dsl.Model, "train"),
        metrics=dsl.Metrics(uri=str(out / "train-metrics")),
    )
    stages.eval_op.python_func(
        config=cfg,
        prepared=art(dsl.Dataset, "prepared"),
        benchmark="commonsenseqa",
        samples=art(dsl.Dataset, "eval/samples"),
        model=art(dsl.Model, "train"),
    )
    stages.grade_op.python_func(
        config=cfg,
        prepared=art(dsl.Dataset, "prepared"),
        benchmark="commonsenseqa",
        samples=art(dsl.Dataset, "eval/samples"),
        results=art(dsl.Dataset, "eval"),
        metrics=dsl.Metrics(uri=str(out / "eval-metrics")),
    )


PAYLOADS = [
    "prepared/train.jsonl",
    "prepared/eval/commonsenseqa.jsonl",
    "contexts/draft/views.jsonl",
    "contexts/draft/candidates.jsonl",
    "contexts/contexts.jsonl",
    "contexts/negative_candidates.jsonl",
    "rollout/completions.jsonl",
    "scores/scores.safetensors",
    "scores/ids.json",
    "train/adapter/adapter_model.safetensors",
    "train/ema_teacher.safetensors",
    "train/merged/model.safetensors",
    "eval/samples/samples.jsonl",
    "eval/completions.jsonl",
]


def test_cli_and_component_compute_byte_identical_stage_outputs(tmp_path, monkeypatch):
    config = _config(tmp_path)
    cli_out, comp_out = tmp_path / "cli", tmp_path / "component"
    cli_out.mkdir()
    comp_out.mkdir()
    _by_cli(config, cli_out)
    from unisd.pipeline_steps import resolve_config, ui_values
    from unisd.runconfig import load_run_config

    cfg = load_run_config(config)
    resolved = tmp_path / "resolved.yaml"  # what resolve_config_op writes for this config
    resolved.write_text(resolve_config(config.read_text(), ui_values(cfg), ui_values(cfg)))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _by_components(config, comp_out, resolved)
    finally:
        torch.set_num_threads(threads)
    for name in PAYLOADS:
        assert (cli_out / name).read_bytes() == (comp_out / name).read_bytes(), name
    results = [json.loads((d / "eval" / "results.json").read_text()) for d in (cli_out, comp_out)]
    assert results[0]["per_item"] == results[1]["per_item"] and results[0]["aggregate"]["role"] == "adapted"


def test_every_stage_skips_an_unchanged_rerun_and_reruns_a_changed_one(tmp_path):
    config = _config(tmp_path)
    out = tmp_path / "run"
    out.mkdir()
    _by_cli(config, out)
    stage_dirs = [
        "prepared",
        "contexts/draft",
        "contexts",
        "rollout",
        "scores",
        "train",
        "eval/samples",
        "eval",
    ]
    manifests = {d: (out / d / "manifest.json").read_text() for d in stage_dirs}
    _by_cli(config, out)  # unchanged: every stage returns its finished manifest, untouched
    assert {d: (out / d / "manifest.json").read_text() for d in stage_dirs} == manifests
    changed = tmp_path / "changed.yaml"
    cfg = yaml.safe_load(config.read_text())
    cfg["train"]["lr"] = 5e-4  # train, eval and grade depend on it; prepare/contexts/rollout/scores do not
    changed.write_text(yaml.safe_dump(cfg))
    _by_cli(changed, out)
    after = {d: (out / d / "manifest.json").read_text() for d in stage_dirs}
    assert [d for d in stage_dirs if after[d] != manifests[d]] == ["train", "eval/samples", "eval"]
