"""`unisd experiment` + `unisd experiment-report` on a tiny model and real CommonsenseQA items: shared stages
computed once, one result file per variant, a rerun that skips, a changed setting that reruns, and the report
with paired CIs and plots."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from unisd.cli import main
from unisd.experiment import load_experiment

REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _config(tmp_path, lr=1e-3):
    cfg = {
        "experiment": {
            "name": "tiny",
            "plans": [
                {
                    "model": "tiny:llama",
                    "seeds": [0, 1],
                    "variants": ["base", "sft", "agreement_seq_random", "sd"],
                }
            ],
            "eval_overrides": {"commonsenseqa": {"limit": 4}},
        },
        "run": {
            "prepare": {"benchmarks": ["commonsenseqa"], "train_limit": 4, "eval_limit": 6},
            "rollout": {"max_new_tokens": 6, "batch_size": 4},
            "scoring": {"batch_size": 4},
            "train": {
                "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                "lr": lr,
                "micro_batch_size": 2,
                "grad_accum": 2,
                "max_steps": 1,
            },
            "eval": {
                "max_new_tokens": 6,
                "batch_size": 4,
                "bootstrap_samples": 200,
                "retention_reverse": False,
            },
        },
    }
    path = tmp_path / f"exp-{lr}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_experiment_runs_resumes_and_reports(tmp_path):
    config = _config(tmp_path)
    work, results = tmp_path / "work", tmp_path / "results"
    args = ["experiment", "--config", str(config), "--work", str(work), "--results", str(results)]
    assert main(args) == 0
    files = sorted(p.relative_to(results).as_posix() for p in results.rglob("*.json"))
    assert files == [
        f"tiny_llama/seed-{s}/{v}.json" for s in (0, 1) for v in ("agreement_seq_random", "base", "sd", "sft")
    ]
    sd = json.loads((results / "tiny_llama/seed-0/sd.json").read_text())
    assert sd["train"]["steps"] == 1 and sd["objective"]["method"] == "distill"
    assert len(sd["eval"]["commonsenseqa"]["per_item"]) == 4  # the per-benchmark override
    assert "retention_ppl" in sd["eval"]["commonsenseqa"]["aggregate"]
    sft = json.loads((results / "tiny_llama/seed-0/sft.json").read_text())
    assert sft["objective"]["method"] == "sft" and "sft_loss" in sft["train"]["final"]
    # Shared once per seed: one rollout, one scoring folder for the one context kind used.
    seed0 = work / "tiny_llama" / "seed-0"
    assert sorted(p.name for p in seed0.iterdir()) == [
        "contexts-random",
        "prepared",
        "rollout",
        "scores-random",
        "variants",
    ]
    assert not (seed0 / "variants" / "sd" / "train" / "merged").exists()  # weights dropped after eval
    # Each variant waits only for the stages it reads: the base and SFT results (no rollout) are written
    # before the rollout stage runs.
    first_rollout_write = min(p.stat().st_mtime for p in (seed0 / "rollout").rglob("*") if p.is_file())
    assert (results / "tiny_llama/seed-0/sft.json").stat().st_mtime < first_rollout_write
    # and a result names only the shared stages its variant read
    read = {
        v: set(json.loads((results / f"tiny_llama/seed-0/{v}.json").read_text())["seconds"]["shared"])
        for v in ("sft", "sd", "agreement_seq_random")
    }
    assert read["sft"] == {"prepare"} and read["sd"] == {"prepare", "rollout"}
    assert read["agreement_seq_random"] == {"prepare", "rollout", "contexts-random", "scores-random"}
    # The held-out items are the same for both seeds (eval_seed), the training sample is not.
    ids = [
        [
            r["id"]
            for r in json.loads((results / f"tiny_llama/seed-{s}/base.json").read_text())["eval"][
                "commonsenseqa"
            ]["per_item"]
        ]
        for s in (0, 1)
    ]
    assert ids[0] == ids[1]

    stamp = {p: p.stat().st_mtime_ns for p in results.rglob("*.json")}
    started = time.perf_counter()
    assert main(args) == 0  # everything finished: nothing reruns
    assert {p: p.stat().st_mtime_ns for p in results.rglob("*.json")} == stamp
    assert time.perf_counter() - started < 30

    changed = _config(tmp_path, lr=5e-4)  # a changed training setting reruns the trained variants only
    assert main(["experiment", "--config", str(changed), "--work", str(work), "--results", str(results)]) == 0
    after = {p: p.stat().st_mtime_ns for p in results.rglob("*.json")}
    rerun = sorted(p.name for p in after if after[p] != stamp[p])
    assert rerun == sorted(["sd.json", "sft.json", "agreement_seq_random.json"] * 2)

    out = tmp_path / "docs" / "RESULTS.md"
    assert main(["experiment-report", "--results", str(results), "--out", str(out)]) == 0
    text = out.read_text()
    assert "## tiny:llama" in text and "| `sd` | 0,1 |" in text and "Δ vs base" in text
    assert "## Verdict" in text and "no UniSD* result yet" in text
    assert (tmp_path / "docs" / "results" / "tiny-tiny_llama-delta.png").stat().st_size > 1000


def test_a_setting_added_since_keeps_a_result_and_a_changed_one_reruns_it(tmp_path, caplog):
    """Result files are committed and outlive the unisd that wrote them: a setting unisd gained since, at its
    default, leaves them finished; any changed value (or a new setting away from its default) reruns them."""
    import copy
    import logging

    from unisd.artifacts import write_json
    from unisd.experiment import Cell, cell_settings, finished, load_experiment

    cfg = load_experiment(_config(tmp_path))
    cell = Cell(tmp_path / "work", tmp_path / "results", "tiny:llama", 0)
    older = copy.deepcopy(cell_settings(cfg, "tiny:llama", 0, "sd"))
    del older["run"]["train"]["skip_memory_check"], older["run"]["retrain"]  # not settings back then
    write_json(cell.result_file("sd"), {"settings_hash": "from-an-older-unisd", "settings": older})
    assert finished(cell, cfg, "sd")

    caplog.set_level(logging.INFO, logger="unisd.experiment")
    older["run"]["train"]["lr"] = 5e-4
    write_json(cell.result_file("sd"), {"settings_hash": "from-an-older-unisd", "settings": older})
    assert not finished(cell, cfg, "sd")
    assert "run.train.lr: 0.0005 -> 0.001" in caplog.text

    older["run"]["train"]["lr"] = 1e-3
    raw = yaml.safe_load(_config(tmp_path).read_text())
    raw["run"]["train"]["skip_memory_check"] = True
    (tmp_path / "new-setting.yaml").write_text(yaml.safe_dump(raw))
    with_new = load_experiment(tmp_path / "new-setting.yaml")
    write_json(cell.result_file("sd"), {"settings_hash": "from-an-older-unisd", "settings": older})
    assert finished(cell, cfg, "sd") and not finished(cell, with_new, "sd")
    assert "run.train.skip_memory_check: (not a setting then) -> True" in caplog.text

    write_json(cell.result_file("sd"), {"settings_hash": "from-an-older-unisd"})  # no record of its settings
    assert not finished(cell, cfg, "sd")


COMMITTED_CONFIGS = sorted(
    p.relative_to(REPO_ROOT).as_posix()
    for p in [*REPO_ROOT.glob("configs/experiment-*.yaml"), *REPO_ROOT.glob("configs/experiments/*.yaml")]
)


@pytest.mark.parametrize("path", COMMITTED_CONFIGS)
def test_every_committed_experiment_config_validates(path):
    # the GPU config has never run (no device lent): this is what keeps it from rotting as settings change
    cfg = load_experiment(REPO_ROOT / path)
    assert cfg.experiment.plans and all(plan.variants for plan in cfg.experiment.plans)


def test_the_committed_configs_include_the_gpu_one():
    assert "configs/experiment-gpu.yaml" in COMMITTED_CONFIGS and len(COMMITTED_CONFIGS) >= 7


def test_committed_results_stay_current_for_their_configs():
    """Every committed result file is one its experiment's config would not rerun: a changed RunConfig default
    (or a setting that changes what a variant computes) would silently cost hours of reruns, so it must be
    a new value set in a config, never a new default."""
    from unisd.artifacts import read_json
    from unisd.experiment import Cell, finished

    configs = {load_experiment(REPO_ROOT / p).experiment.name: REPO_ROOT / p for p in COMMITTED_CONFIGS}
    files = sorted(REPO_ROOT.glob("docs/results/*/*/seed-*/*.json"))
    assert len(files) >= 40
    for path in files:
        result = read_json(path)
        cfg = load_experiment(configs[result["experiment"]])
        cell = Cell(REPO_ROOT / "runs", path.parents[2], result["model"], int(result["seed"]))
        assert cell.result_file(result["variant"]) == path
        assert finished(cell, cfg, result["variant"]), f"{path.relative_to(REPO_ROOT)} would be rerun"
