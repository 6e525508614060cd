from __future__ import annotations

import random

import pytest
import torch

from unisd.models import tiny_model
from unisd.scoring import _score_rows_plain, score_views, select_for_budget


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
