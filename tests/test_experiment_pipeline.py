"""The experiment as a KFP pipeline, run for real through kfp.local (tiny model): groups' shared stages in one
ParallelFor, variant cells in another, RESULTS.md from the collected results."""

from __future__ import annotations

import os

import pytest
import yaml

pytestmark = pytest.mark.slow


def test_experiment_pipeline_runs_locally(tmp_path, monkeypatch):
    from kfp import local

    from pipelines.experiment_pipeline import build_experiment_pipeline

    cfg = {
        "experiment": {
            "name": "tiny-kfp",
            "plans": [{"model": "tiny:llama", "seeds": [0], "variants": ["base", "sd", "sft"]}],
            "eval_overrides": {"commonsenseqa": {"limit": 3}},
        },
        "run": {
            "prepare": {"benchmarks": ["commonsenseqa"], "train_limit": 4, "eval_limit": 4},
            "rollout": {"max_new_tokens": 4, "batch_size": 4},
            "train": {"lora": {"r": 4, "alpha": 8}, "micro_batch_size": 2, "grad_accum": 2, "max_steps": 1},
            "eval": {
                "max_new_tokens": 4,
                "batch_size": 4,
                "bootstrap_samples": 200,
                "retention_reverse": False,
            },
        },
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(tmp_path / "kfp"),
        raise_on_error=True,
    )
    pipeline = build_experiment_pipeline(path, cluster=False, work_dir=str(tmp_path / "work"))
    pipeline()
    results = sorted((tmp_path / "work" / "results").rglob("*.json"))
    assert [p.name for p in results] == ["base.json", "sd.json", "sft.json"]
    (report,) = [p for p in (tmp_path / "kfp").rglob("experiment-report-op/report") if p.is_file()]
    text = report.read_text()
    assert "## tiny:llama" in text and "| `sft` |" in text and "Δ vs base" in text
    assert os.path.isdir(tmp_path / "work" / "tiny_llama" / "seed-0" / "rollout")  # shared once for the group
