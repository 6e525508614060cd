from __future__ import annotations

import random

import pytest
import torch

from unisd.models import tiny_model
from unisd.scoring import ScoringConfig, _score_rows_plain, score_views, select_for_budget


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", vocab_size=300, seed=1)


def _reference_logps(model, prompt, completion):
    """Naive: one full HF forward of prompt+completion, log_softmax over all positions."""
    ids = torch.tensor([list(prompt) + list(completion)])
    logits = model(input_ids=ids).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    n = len(prompt)
    return [logp[n - 1 + t, tok].item() for t, tok in enumerate(completion)]


def test_plain_rows_match_naive_forward(model):
    rng = random.Random(0)
    prompts = [[rng.randrange(1, 300) for _ in range(rng.randint(1, 9))] for _ in range(5)]
    comps = [[rng.randrange(1, 300) for _ in range(rng.randint(0, 6))] for _ in range(5)]
    scored = _score_rows_plain(model, prompts, comps, pad_id=0, chunk_size=3, want_entropy=True)
    for p, c, (lp, ent) in zip(prompts, comps, scored):
        assert len(lp) == len(c) == len(ent)
        assert lp == pytest.approx(_reference_logps(model, p, c), abs=1e-4)
        assert all(e >= 0 for e in ent)


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_shared_prefix_rows_match_naive_forward(model, prefix_cache):
    rng = random.Random(1)
    shared = [rng.randrange(1, 300) for _ in range(20)]  # a context prefix shared by 5 rows
    rows = []
    for i in range(7):
        suffix = [rng.randrange(1, 300) for _ in range(rng.randint(1, 6))]
        comp = [rng.randrange(1, 300) for _ in range(rng.randint(1, 5))]
        key = "ctx-a" if i < 5 else None
        rows.append(((shared + suffix) if key else suffix, comp, key))
    out = score_views(
        model,
        rows,
        pad_id=0,
        batch_size=3,
        chunk_size=4,
        prefix_cache=prefix_cache,
        min_shared_prefix=8,
        progress=False,
    )
    for (p, c, _), lp in zip(rows, out):
        assert lp == pytest.approx(_reference_logps(model, p, c), abs=1e-4)


def test_select_for_budget():
    assert select_for_budget([0.1, 0.9, 0.5, 0.7], 0.5) == {1, 3}
    assert select_for_budget([0.1, 0.9], 1.0) == {0, 1}
    assert select_for_budget([0.3, 0.3, 0.3], 0.34) == {0, 1}  # ceil(1.02) = 2, ties by index
    with pytest.raises(ValueError):
        select_for_budget([1.0], 0.0)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_paired_forward_with_a_shared_prefix_equals_two_plain_forwards(arch):
    """The c*- and c⁻-teacher passes in one call (each item's shared prefix computed once) give the hidden
    states two separate passes give."""
    import torch

    from unisd.models import tiny_model
    from unisd.sequences import build_teacher_forcing_batch, completion_hidden, paired_completion_hidden

    model = tiny_model(arch, vocab_size=64, seed=4)
    xs = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
    pos = [x + [20, 21, 22] for x in xs]
    neg = [x + [30, 31] for x in xs]
    comps = [[40, 41, 42], [43], [44, 45]]
    with torch.no_grad():
        a, b = paired_completion_hidden(model, pos, neg, comps, pad_id=0)
        ref_a = completion_hidden(model, build_teacher_forcing_batch(pos, comps, pad_id=0))
        ref_b = completion_hidden(model, build_teacher_forcing_batch(neg, comps, pad_id=0))
    mask = build_teacher_forcing_batch(pos, comps, pad_id=0).completion_mask
    torch.testing.assert_close(a[mask], ref_a[mask], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b[mask], ref_b[mask], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# the stage: which passes the budget's signal runs, and which items it sends to the views


def _stage(tmp_path, cfg: ScoringConfig, logps=None):
    """run_scoring on tiny-model artifacts (test_train.make_artifacts), the rollout's log-probs replaced by
    `logps` (per item) when given. Returns (manifest, scores.safetensors tensors, scored ids)."""
    import json

    from safetensors.torch import load_file
    from test_train import SPEC, make_artifacts

    from unisd.artifacts import read_jsonl, write_jsonl
    from unisd.scoring import run_scoring

    prepared, contexts, rollout = make_artifacts(tmp_path / "art", n_items=8)
    if logps is not None:
        rows = read_jsonl(rollout / "completions.jsonl")
        for row, lp in zip(rows, logps):
            row["logps"] = lp(len(row["completion_ids"])) if callable(lp) else lp
        write_jsonl(rollout / "completions.jsonl", rows)
    out = tmp_path / "scores"
    manifest = run_scoring(
        cfg,
        model_spec=SPEC,
        prepared_dir=prepared,
        contexts_dir=contexts,
        rollout_dirs=[rollout],
        out_dir=out,
    )
    return manifest, load_file(str(out / "scores.safetensors")), json.loads((out / "ids.json").read_text())


def test_budget_one_runs_no_teacher_pass_and_scores_every_item(tmp_path):
    manifest, tensors, _ = _stage(tmp_path, ScoringConfig(batch_size=4, budget=1.0, staleness_items=2))
    assert "teacher" not in manifest["timings_s"]  # nothing to choose: the signal would be wasted work
    assert "teacher_logps" not in tensors and "uncertainty" not in tensors
    assert bool(tensors["has_views"].all()) and manifest["counts"]["scored_views"] == 8
    assert manifest["counts"]["staleness_mean_abs_logp"] is not None  # the sampler check still runs


def test_student_surprisal_picks_the_items_the_student_was_least_sure_of_without_a_forward(tmp_path):
    # Items 1, 4, 6 and 7 sampled their tokens at log-prob −3, the rest at −0.1: those four are the top half.
    surprised = {1, 4, 6, 7}
    logps = [(lambda n, v=(-3.0 if i in surprised else -0.1): [v] * n) for i in range(8)]
    cfg = ScoringConfig(batch_size=4, budget=0.5, uncertainty="student_surprisal", staleness_items=0)
    manifest, tensors, ids = _stage(tmp_path, cfg, logps)
    assert "teacher" not in manifest["timings_s"] and "student" not in manifest["timings_s"]
    assert [i for i, has in zip(ids, tensors["has_views"].tolist()) if has] == [
        f"t/{i}" for i in sorted(surprised)
    ]
    assert tensors["uncertainty"].tolist() == pytest.approx(
        [3.0 if i in surprised else 0.1 for i in range(8)]
    )


def test_teacher_entropy_budget_still_runs_the_teacher_pass(tmp_path):
    cfg = ScoringConfig(batch_size=4, budget=0.5, uncertainty="teacher_entropy", staleness_items=0)
    manifest, tensors, _ = _stage(tmp_path, cfg)
    assert "teacher" in manifest["timings_s"] and "teacher_logps" in tensors
    assert manifest["counts"]["scored_views"] == 4


def test_student_surprisal_refuses_a_rollout_without_log_probs(tmp_path):
    cfg = ScoringConfig(batch_size=4, budget=0.5, uncertainty="student_surprisal")
    with pytest.raises(ValueError, match=r"item t/0 has no log-prob per completion token \(field 'logps'\)"):
        _stage(tmp_path, cfg, [[] for _ in range(8)])
