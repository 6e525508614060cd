"""unisd.report: the HTML/Markdown run report from synthetic inputs, and a real render in headless
Chromium (skipped when the `chromium` binary is absent; `make` installs it for CI)."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from unisd import report
from unisd.artifacts import write_json
from unisd.tracking import promotion_decision


def train_rows(steps: int = 20) -> list[dict]:
    return [
        {
            "step": s,
            "loss": 2.0 * 0.9**s + 0.05,
            "kd_loss": 1.8 * 0.9**s + 0.04,
            "cl_loss": 0.3 + 0.01 * np.sin(s),
            "fm_loss": 0.02 * 0.95**s,
            "agreement/weight_min": 0.990,
            "agreement/weight_mean": 0.996,
            "agreement/weight_max": 1.0,
            "train/grad_norm": 1.0 + 0.1 * s,
            "train/lr": 1e-4 * (1 - s / steps),
            "train/tokens_per_s": 120.0,
        }
        for s in range(1, steps + 1)
    ]


def aggregates() -> list[dict]:
    out = []
    for benchmark, base, adapted in (
        ("mbpp", 0.30, 0.42),
        ("commonsenseqa", 0.55, 0.61),
        ("gpqa", 0.25, 0.24),
    ):
        out.append({"benchmark": benchmark, "role": "base", "model": "smollm2", "items": 50, "metric": "score",
                    "score": base, "score_ci95": [base - 0.1, base + 0.1], "reference_nll": 1.2})  # fmt: skip
        out.append({"benchmark": benchmark, "role": "adapted", "model": "smollm2+lora", "items": 50,
                    "metric": "score", "score": adapted, "score_ci95": {"low": adapted - 0.1, "high": adapted + 0.1},
                    "reference_nll": 1.1, "retention_ppl": 1.8, "retention_jsd": 0.04})  # fmt: skip
    return out


def decision() -> dict:
    base = {f"mbpp/{i}": float(i < 15) for i in range(50)}
    adapted = {f"mbpp/{i}": float(i < 21) for i in range(50)}
    return promotion_decision(base, adapted, margin=0.0) | {"baseline": "base", "champion_version": None}


RUN_INFO = {
    "model": "smollm2-135m-instruct",
    "preset": "unisd_star",
    "gamma": 0.001,
    "lineage": {"git_sha": "abc1234", "data_hash": "d41d8cd9", "pipeline_run_id": "kfp-42"},
}


def embedded_pngs(page: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def full_report(out: Path) -> dict[str, str]:
    inert = torch.linspace(0.990, 1.0, 5000)  # UniSD*'s γ=0.001 keeps weights in [0.990, 1.0]
    return report.build_report(
        out, train_metrics=train_rows(), weights=inert, eval_aggregates=aggregates(), promotion=decision(),
        run_info=RUN_INFO,
    )  # fmt: skip


def test_full_report_has_every_section_plot_and_table(tmp_path):
    paths = full_report(tmp_path)
    page = Path(paths["html"]).read_text()
    for anchor in ("run", "training", "weights", "eval", "retention", "promotion"):
        assert f'<section id="{anchor}">' in page
    pngs = embedded_pngs(page)
    assert len(pngs) == 5  # losses, diagnostics, weights, eval, retention
    assert all(p.startswith(b"\x89PNG\r\n\x1a\n") and len(p) > 5000 for p in pngs)
    # self-contained: no scripts, nothing fetched from elsewhere
    assert "<script" not in page and not re.search(r'(src|href)="(https?:)?//', page)
    assert "Nearly inert" in page and "this run has γ = 0.001" in page
    assert "PROMOTED to champion" in page and "abc1234" in page

    md = Path(paths["markdown"]).read_text()
    assert (
        "| benchmark | metric | items | base | base 95% CI | adapted | adapted 95% CI | Δ adapted − base |"
        in md
    )
    assert "| mbpp | score | 50 | 0.3000 | [0.2000, 0.4000] | 0.4200 | [0.3200, 0.5200] | 0.1200 |" in md
    assert "| gpqa | adapted | 1.8000 | 0.0400 | 1.1000 |" in md  # retention row
    assert "| lineage.git_sha | abc1234 |" in md
    assert re.search(r"\| kd_loss \| 20 \| 1\.6600 \| 0\.2588 \|", md)
    assert "| delta | 0.1200 |" in md and "Nearly inert" in md


def test_missing_pieces_are_reported_not_fatal(tmp_path):
    paths = report.build_report(tmp_path)
    page = Path(paths["html"]).read_text()
    md = Path(paths["markdown"]).read_text()
    assert embedded_pngs(page) == []
    for text in ("No training metrics yet", "No agreement weights", "No evaluation results yet",
                 "No retention measurements yet", "No promotion decision", "No run info"):  # fmt: skip
        assert text in page and text in md
    # eval ran, but only the base model (no retention) and no gate yet; no agreement weights
    only_base = [a for a in aggregates() if a["role"] == "base"]
    paths = report.build_report(tmp_path / "b", train_metrics=train_rows(3), eval_aggregates=only_base)
    page = Path(paths["html"]).read_text()
    assert len(embedded_pngs(page)) == 3  # losses, diagnostics, eval
    assert "without a base model" in page and "Δ adapted" not in page


def test_spread_weights_are_not_called_inert_and_bad_input_is_named(tmp_path):
    weights = np.concatenate([np.full(100, 0.01), np.linspace(0.2, 1.0, 900), [np.nan]])
    stats = report.weight_stats(weights)
    assert stats["inert"] is False and stats["min"] == 0.01 and stats["non_finite"] == 1
    page = Path(report.build_report(tmp_path, weights=weights)["html"]).read_text()
    assert "Nearly inert" not in page and len(embedded_pngs(page)) == 1
    assert report.weight_stats(np.linspace(0.99, 1.0, 10))["inert"] is True
    with pytest.raises(ValueError, match=r"eval_aggregates\[0\] \(mbpp\): needs 'role'"):
        report.build_report(tmp_path, eval_aggregates=[{"benchmark": "mbpp", "score": 0.5}])
    with pytest.raises(ValueError, match=r"a second 'base' result for 'mbpp'"):
        report.build_report(tmp_path, eval_aggregates=[aggregates()[0], aggregates()[0]])
    with pytest.raises(ValueError, match=r"train_metrics\[1\]: 'step' must be an integer"):
        report.build_report(tmp_path, train_metrics=[{"step": 1, "loss": 1.0}, {"loss": 0.5}])


def test_weights_sample_reads_scoring_shards(tmp_path):
    """The layout `unisd.scoring.load_scores` reads: flat tensors + offsets per item, ids.json."""
    for shard, values in (("s0", [0.5, 0.9, 1.0]), ("s1", [0.2, 0.7])):
        d = tmp_path / shard
        d.mkdir()
        n = len(values)
        save_file(
            {
                "weights": torch.tensor(values),
                "teacher_logps": torch.zeros(n),
                "view_logps": torch.zeros(2, n),
                "offsets": torch.tensor([0, n]),
                "has_views": torch.tensor([True]),
            },
            str(d / "scores.safetensors"),
        )
        write_json(d / "ids.json", [f"item-{shard}"])
    dirs = [tmp_path / "s0", tmp_path / "s1"]
    assert sorted(report.weights_sample(dirs).round(4).tolist()) == [0.2, 0.5, 0.7, 0.9, 1.0]
    sample = report.weights_sample(dirs, max_n=3)
    assert len(sample) == 3 and sample.min() == pytest.approx(0.2) and sample.max() == 1.0


def chromium_screenshot(html_path: Path, png_path: Path, profile: Path) -> subprocess.CompletedProcess:
    command = [
        "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", f"--screenshot={png_path}", "--window-size=1280,2000",
        f"file://{html_path}",
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="chromium not installed (apt-get install chromium)"
)
def test_report_renders_in_headless_chromium(tmp_path):
    from matplotlib.image import imread

    paths = full_report(tmp_path / "report")
    shot = tmp_path / "report.png"
    result = chromium_screenshot(Path(paths["html"]).resolve(), shot, tmp_path / "profile")
    assert result.returncode == 0, result.stderr[-2000:]
    assert shot.is_file() and shot.stat().st_size > 10_000
    pixels = imread(shot)[..., :3]  # [H, W, 3] floats in [0, 1]
    assert pixels.shape[:2] == (2000, 1280)
    # not blank: real variation, and a good share of the page is not white background
    assert pixels.std() > 0.1
    assert (pixels.mean(axis=2) < 0.9).mean() > 0.02
