"""unisd.reliability: agreement weights against a float64 reference, quantiles, global vs per-rank."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from unisd import reliability
from unisd.reliability import (
    agreement_weights,
    all_gather_uneven,
    global_quantile,
    quantile,
    summarize_weights,
)

# Tiny tensors: single-threaded torch (see conftest.single_thread).
pytestmark = pytest.mark.usefixtures("single_thread")


def ragged_mask(lengths, length):
    mask = torch.zeros(len(lengths), length, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return mask


def ref_token_weights(views, mask, stat, gamma, q, cap):
    """ALGORITHM.md token level, float64, with explicit loops."""
    k, b, t = views.shape
    delta = torch.zeros(b, t, dtype=torch.float64)
    for i in range(b):
        for j in range(t):
            column = [float(views[kk, i, j]) for kk in range(k)]
            if stat == "var":
                mean = sum(column) / k
                delta[i, j] = sum((x - mean) ** 2 for x in column) / (k - 1)
            else:
                delta[i, j] = max(column) - min(column)
    valid = mask.bool()
    s = max(torch.quantile(delta[valid], q).item(), 1e-6)
    w = torch.zeros(b, t, dtype=torch.float64)
    for i in range(b):
        for j in range(t):
            if valid[i, j]:
                w[i, j] = max(0.01, 1.0 / (1.0 + gamma * min(delta[i, j].item() / s, cap)))
    return w


def ref_sequence_weights(views, mask, stat, gamma):
    k, b, t = views.shape
    w = torch.zeros(b, t, dtype=torch.float64)
    for i in range(b):
        n = int(mask[i].sum())
        scores = [sum(float(views[kk, i, j]) for j in range(t) if mask[i, j]) / max(1, n) for kk in range(k)]
        if stat == "var":
            mean = sum(scores) / k
            delta = sum((s - mean) ** 2 for s in scores) / k  # population
        else:
            delta = max(scores) - min(scores)
        w[i, :] = max(1e-6, math.exp(-gamma * delta)) * mask[i].double()
    return w


def make_views(k, lengths, length, seed=0, spread=2.0):
    g = torch.Generator().manual_seed(seed)
    mask = ragged_mask(lengths, length)
    views = -torch.rand(k, len(lengths), length, generator=g) * spread - torch.rand(
        1, len(lengths), length, generator=g
    )
    views = views.masked_fill(~mask.bool().unsqueeze(0), float("-inf"))  # padding may hold anything
    return views, mask


@pytest.mark.parametrize("stat", ["var", "range"])
@pytest.mark.parametrize("k,lengths", [(3, [5, 2, 7, 0]), (4, [9, 9]), (2, [1, 6, 3])])
@pytest.mark.parametrize("gamma", [1.0, 0.01])
def test_token_weights_match_float64_reference(stat, k, lengths, gamma):
    views, mask = make_views(k, lengths, 9, seed=k)
    ours = agreement_weights(views, mask, level="token", stat=stat, gamma=gamma, quantile=0.95, cap=10.0)
    expected = ref_token_weights(views.double(), mask, stat, gamma, 0.95, 10.0)
    assert ours.shape == mask.shape and ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-7)
    # fp64 input is computed in fp64
    torch.testing.assert_close(
        agreement_weights(views.double(), mask, level="token", stat=stat, gamma=gamma),
        expected,
        rtol=1e-12,
        atol=0,
    )


@pytest.mark.parametrize("stat", ["var", "range"])
@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_sequence_weights_match_float64_reference(stat, gamma):
    views, mask = make_views(3, [5, 2, 7, 0, 1], 8, seed=1, spread=4.0)
    ours = agreement_weights(views, mask, level="sequence", stat=stat, gamma=gamma)
    expected = ref_sequence_weights(views.double(), mask, stat, gamma)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-7)
    # broadcast: one value per sequence
    for i in range(mask.shape[0]):
        valid = ours[i][mask[i].bool()]
        assert valid.numel() == 0 or torch.all(valid == valid[0])


def test_floors_and_cap():
    views, mask = make_views(3, [8, 8], 8, seed=2, spread=50.0)
    w = agreement_weights(views, mask, level="token", gamma=1e6)
    assert w[mask.bool()].min().item() == pytest.approx(0.01)  # max(0.01, ·)
    w_seq = agreement_weights(views, mask, level="sequence", gamma=1e6)
    assert w_seq[mask.bool()].min().item() == pytest.approx(1e-6)
    # the cap bounds δ/s at 10, so even huge outliers give w ≥ 1/(1+10γ)
    w_cap = agreement_weights(views, mask, level="token", gamma=0.05, cap=10.0)
    assert w_cap[mask.bool()].min().item() >= 1 / (1 + 0.5) - 1e-6


@pytest.mark.parametrize("stat", ["var", "range"])
def test_gamma_0_001_is_nearly_inert(stat):
    views, mask = make_views(3, [12, 4, 9], 12, seed=3, spread=30.0)
    views[:, 0, 0] = torch.tensor([-0.1, -400.0, -800.0])  # one wildly disagreeing token: δ/s hits the cap
    w = agreement_weights(views, mask, level="token", stat=stat, gamma=0.001)
    valid = w[mask.bool()]
    assert valid.min().item() >= 0.990 and valid.max().item() <= 1.0
    assert valid.min().item() == pytest.approx(1 / 1.01, rel=1e-6)  # some token hits the cap
    stats = summarize_weights(w, mask)
    assert (
        0.990
        <= stats["agreement/weight_min"]
        <= stats["agreement/weight_mean"]
        <= stats["agreement/weight_max"]
        <= 1.0
    )


def test_masked_positions_are_zero_and_bad_input_is_rejected():
    views, mask = make_views(3, [3, 0], 5)
    for level in ("token", "sequence"):
        w = agreement_weights(views, mask, level=level)
        assert torch.all(w[~mask.bool()] == 0) and torch.isfinite(w).all()
    broken = views.clone()
    broken[1, 0, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        agreement_weights(broken, mask)
    with pytest.raises(ValueError, match="at least K=2"):
        agreement_weights(views[:1], mask)
    with pytest.raises(ValueError, match="does not match"):
        agreement_weights(views, mask[:, :3])
    with pytest.raises(ValueError, match="level"):
        agreement_weights(views, mask, level="word")
    assert summarize_weights(torch.zeros(2, 3), torch.zeros(2, 3)) == {
        "agreement/weight_min": 1.0,
        "agreement/weight_mean": 1.0,
        "agreement/weight_max": 1.0,
    }


def test_quantile_matches_torch_including_the_large_input_path(monkeypatch):
    x = torch.randn(1001, dtype=torch.float64)
    for q in (0.0, 0.5, 0.95, 0.99, 1.0):
        expected = torch.quantile(x, q)
        assert quantile(x, q).item() == pytest.approx(expected.item(), rel=1e-12)
        monkeypatch.setattr(reliability, "_TORCH_QUANTILE_MAX", 10)  # force the sort-based path
        assert quantile(x, q).item() == pytest.approx(expected.item(), rel=1e-12)
        monkeypatch.undo()
    assert math.isnan(quantile(torch.zeros(0), 0.5).item())
    # without a process group, global == local
    assert global_quantile(x, 0.9).item() == pytest.approx(torch.quantile(x, 0.9).item())
    assert torch.equal(all_gather_uneven(x), x)


def _agreement_worker(rank: int, world: int, init_file: str, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        # Rank 1 has more sequences and much noisier views; rank 0's tokens have little disagreement.
        views, mask = make_views(
            3, [4, 6] if rank == 0 else [7, 2, 5], 7, seed=10 + rank, spread=1.0 + 20 * rank
        )
        if rank == 0:
            views = views * 0.05
        gathered = all_gather_uneven(torch.arange(rank * 10, rank * 10 + 2 + 3 * rank, dtype=torch.float32))
        results[rank] = {
            "views": views.tolist(),
            "mask": mask.tolist(),
            "global": agreement_weights(views, mask, gamma=1.0).tolist(),
            "faithful": agreement_weights(views, mask, gamma=1.0, faithful=True).tolist(),
            "gathered": gathered.tolist(),
        }
    finally:
        dist.destroy_process_group()


def test_global_batch_quantile_across_ranks_vs_faithful(tmp_path):
    manager = mp.Manager()
    results = manager.dict()
    # fork: the two ranks inherit the imported modules (spawn would re-import torch, seconds per rank)
    mp.start_processes(
        _agreement_worker, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True, start_method="fork"
    )
    # uneven all_gather: rank 0 sends 2 values, rank 1 sends 5
    assert results[0]["gathered"] == [0.0, 1.0, 10.0, 11.0, 12.0, 13.0, 14.0]
    views = [torch.tensor(results[r]["views"], dtype=torch.float64) for r in (0, 1)]
    masks = [torch.tensor(results[r]["mask"]) for r in (0, 1)]
    # Reference for the global version: one quantile over every valid token of both ranks.
    deltas = [v.masked_fill(~m.bool().unsqueeze(0), 0).var(0, unbiased=True) for v, m in zip(views, masks)]
    s = torch.quantile(torch.cat([d[m.bool()] for d, m in zip(deltas, masks)]), 0.95).clamp_min(1e-6)
    for r in (0, 1):
        expected = ((1 / (1 + (deltas[r] / s).clamp(max=10))).clamp_min(0.01)) * masks[r]
        torch.testing.assert_close(
            torch.tensor(results[r]["global"], dtype=torch.float64), expected, rtol=1e-5, atol=1e-7
        )
        torch.testing.assert_close(
            torch.tensor(results[r]["faithful"], dtype=torch.float64),
            ref_token_weights(views[r], masks[r], "var", 1.0, 0.95, 10.0),
            rtol=1e-5,
            atol=1e-7,
        )
    # Per-rank scales make rank 0's calm tokens look as unreliable as rank 1's noisy ones: they differ.
    assert not torch.allclose(torch.tensor(results[0]["global"]), torch.tensor(results[0]["faithful"]))
