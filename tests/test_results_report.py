"""docs/RESULTS.md's verdict: every UniSD* variant (by preset, whatever its name) is judged against the base
and the strongest SFT/SD variant, and two experiments' folders give two sections that never pool."""

import pytest

from unisd.artifacts import write_json
from unisd.results_report import build_results_report

ITEMS = [f"q{i}" for i in range(40)]
MACHINE = {"node": "n", "cpu": "x86_64", "cores": 2, "torch_threads": 1, "cuda": None, "python": "3.11"}


def _write(results, experiment, variant, preset, seed, correct, benchmark="commonsenseqa"):
    """A result file whose variant answers the first `correct` held-out items right."""
    per_item = [{"id": i, "score": float(n < correct), "predicted": "A"} for n, i in enumerate(ITEMS)]
    write_json(
        results / "m" / f"seed-{seed}" / f"{variant}.json",
        {
            "version": 1,
            "experiment": experiment,
            "model": "m",
            "seed": seed,
            "variant": variant,
            "settings": {"run": {"preset": preset}},
            "train": None,
            "eval": {benchmark: {"aggregate": {"score": correct / len(ITEMS)}, "per_item": per_item}},
            "seconds": {"train": 1.0, "eval": 1.0, "variant_total": 2.0, "shared": {"rollout": 10.0}},
            "machine": MACHINE,
            "finished_at": f"2026-12-0{seed + 1}T00:00:00Z",
        },
    )


def test_verdict_names_every_unisd_star_variant_and_the_strongest_baseline(tmp_path):
    csqa, sqa = tmp_path / "csqa", tmp_path / "sqa"
    for seed in (0, 1):
        _write(csqa, "e1", "base", None, seed, 4)
        _write(csqa, "e1", "sd", "sd", seed, 5)
        _write(csqa, "e1", "sft-3ep", "sft", seed, 30)  # the strongest baseline, under a variant's name
        _write(csqa, "e1", "unisd_star", "unisd_star", seed, 6)
        _write(csqa, "e1", "unisd_star-strong", "unisd_star", seed, 20)
    _write(sqa, "e2", "base", None, 0, 10, benchmark="scienceqa")
    _write(sqa, "e2", "unisd_star-strong", "unisd_star", 0, 10, benchmark="scienceqa")
    out = build_results_report([csqa, sqa], tmp_path / "docs" / "RESULTS.md")
    text = out.read_text()

    assert "## m · commonsenseqa" in text and "## m · scienceqa" in text
    assert "Experiment `e1`" in text and "Experiment `e2`" in text
    verdict = text.split("## Verdict", 1)[1]
    first, second = verdict.split("- **m · scienceqa**")
    assert "best macro score `sft-3ep` (0.750)" in first
    # both UniSD* rows, each against the base (better: +16 of 40 per seed) and sft-3ep (worse)
    assert "`unisd_star-strong` (seeds 0,1: 0.500): better than the base model with 95% confidence" in first
    assert "worse than the strongest baseline, `sft-3ep`" in first
    assert "`unisd_star` (seeds 0,1: 0.150)" in first
    assert "80 paired items" in first
    # the second experiment: the same model name, its own section, no baseline, equal to its base
    assert "not distinguishable from the base model" in second and "strongest baseline" not in second
    # shared stages count once per experiment × seed: 3 seeds × 10 s, not once per variant file
    assert "12 result files" in text and "0.01 h of shared stages" in text
    assert (tmp_path / "docs" / "results" / "e1-m-delta.png").stat().st_size > 1000


def test_one_experiment_and_model_in_two_folders_is_refused(tmp_path):
    for folder in ("a", "b"):
        _write(tmp_path / folder, "e1", "base", None, 0, 4)
    with pytest.raises(ValueError, match="two folders"):
        build_results_report([tmp_path / "a", tmp_path / "b"], tmp_path / "RESULTS.md")
