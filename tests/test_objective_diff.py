"""`unisd objective-diff`: every component changes the computation it claims to change (on a tiny model's real
forward passes), and the reference reduction really makes sequence-level agreement plain SD."""

from __future__ import annotations

import pytest

from unisd.objective_diff import objective_diff

pytestmark = pytest.mark.usefixtures("single_thread")


def test_each_component_moves_the_loss_gradient_or_trajectory_away_from_sd():
    presets = [
        "sd",
        "agreement_seq_retrieval",
        "agreement_tok_random",
        "ema",
        "contrastive",
        "match_joint",
        "clip",
    ]
    rows = {r.preset: r for r in objective_diff("tiny:llama", presets, steps=2, items=4)}
    assert rows["sd"].inert
    for name in ("agreement_seq_retrieval", "agreement_tok_random", "contrastive", "match_joint"):
        assert rows[name].loss_rel > 1e-7 and rows[name].grad_rel > 1e-7, name
    # The EMA teacher equals θ0 at step 1 (same loss and gradient), then follows the student.
    assert rows["ema"].loss_rel == 0 and rows["ema"].grad_rel == 0 and rows["ema"].traj_rel > 1e-4
    # Static clipping at c=10 changes nothing unless a token's divergence exceeds 10: reported, not hidden.
    assert rows["clip"].inert


def test_faithful_sequence_agreement_is_exactly_plain_sd():
    rows = {
        r.preset: r
        for r in objective_diff(
            "tiny:llama", ["sd", "agreement_seq_retrieval"], steps=2, items=4, overrides={"faithful": True}
        )
    }
    assert rows["agreement_seq_retrieval"].loss_rel < 1e-6
    assert rows["agreement_seq_retrieval"].traj_rel < 1e-5
