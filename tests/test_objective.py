"""unisd.objective: presets and their YAML files, config validation, and compute_objective end to end
against a float64 reference (values and gradients), including gradient accumulation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from unisd.config import ConfigError
from unisd.objective import (
    PRESETS,
    Normalizers,
    ObjectiveConfig,
    compute_objective,
    load_objective,
    preset,
    window_normalizers,
)

# Tiny tensors: single-threaded torch (see conftest.single_thread).
pytestmark = pytest.mark.usefixtures("single_thread")


PRESET_DIR = Path(__file__).resolve().parents[1] / "configs" / "presets"
EXPECTED_PRESETS = {
    "sd",
    "sft",
    "agreement_tok_random",
    "agreement_tok_retrieval",
    "agreement_tok_induced",
    "agreement_seq_random",
    "agreement_seq_retrieval",
    "agreement_seq_induced",
    "ema",
    "contrastive",
    "match_joint",
    "match_repr",
    "clip",
    "unisd_star",
}


# ------------------------------------------------------------------ presets and config


def test_every_mode_has_a_preset_and_a_yaml_equal_to_it():
    assert set(PRESETS) == EXPECTED_PRESETS
    assert {p.stem for p in PRESET_DIR.glob("*.yaml")} == EXPECTED_PRESETS
    for name in EXPECTED_PRESETS:
        assert load_objective(PRESET_DIR / f"{name}.yaml") == preset(name), name


def test_preset_values_follow_the_algorithm_table():
    sd = preset("sd")
    assert (sd.divergence, sd.teacher, sd.agreement, sd.clip, sd.contrastive_lambda, sd.feature_lambda) == (
        "forward_kl",
        "frozen",
        "none",
        "none",
        0.0,
        0.0,
    )
    assert sd.loss_temperature == 1.0 and sd.reduction == "sequence_mean" and not sd.faithful
    tok = preset("agreement_tok_retrieval")
    assert (tok.agreement, tok.context_kind, tok.agreement_gamma, tok.num_views) == (
        "token",
        "retrieval",
        0.01,
        3,
    )
    seq = preset("agreement_seq_induced")
    assert (seq.agreement, seq.context_kind, seq.agreement_gamma) == ("sequence", "induced", 0.01)
    assert (preset("ema").teacher, preset("ema").ema_beta, preset("ema").ema_every) == ("ema", 0.9, 10)
    assert (preset("contrastive").contrastive_lambda, preset("contrastive").contrastive_margin) == (0.1, 0.5)
    assert preset("match_joint").feature_lambda == 0.1 and preset("match_repr").match_repr
    assert (preset("clip").clip, preset("clip").clip_value, preset("clip").clip_style) == (
        "static",
        10.0,
        "hard",
    )
    star = preset("unisd_star")
    assert (star.divergence, star.agreement, star.context_kind, star.num_views, star.agreement_gamma) == (
        "forward_kl",
        "token",
        "retrieval",
        3,
        0.001,
    )
    assert (star.contrastive_lambda, star.contrastive_margin, star.feature_lambda) == (0.01, 0.1, 0.01)
    assert (star.teacher, star.ema_beta, star.ema_every, star.clip) == ("ema", 0.98, 10, "none")
    preset("sd").clip = "static"  # a copy: the registry is not mutated
    assert preset("sd").clip == "none"


def test_config_errors_name_the_file_and_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("objective:\n  divergence: kl\n")
    with pytest.raises(ConfigError, match=r"(?s)bad.yaml.*divergence"):
        load_objective(bad)
    bad.write_text("objective:\n  agreement_gama: 0.1\n")
    with pytest.raises(ConfigError, match="agreement_gama"):
        load_objective(bad)
    with pytest.raises(ValueError, match="jsd_beta"):
        ObjectiveConfig(jsd_beta=1.5)
    with pytest.raises(ValueError, match="num_views"):
        ObjectiveConfig(num_views=1)
    with pytest.raises(ValueError, match="match_repr trains on L_FM alone"):
        ObjectiveConfig(match_repr=True, feature_lambda=0.1)
    with pytest.raises(ValueError, match="unknown objective preset"):
        preset("sdft")


# ------------------------------------------------------------------ float64 reference of the whole objective


def ragged_mask(lengths, length):
    mask = torch.zeros(len(lengths), length, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return mask


def ref_objective(cfg: ObjectiveConfig, hs, ws, ht, wt, tokens, mask, weights, neg_logps, neg_hidden):
    """L = L_KD + λc L_CL + λf L_FM, float64, on full [B, T, V] logits, following ALGORITHM.md literally."""
    tau = cfg.loss_temperature
    zs, zt = hs @ ws.t(), (ht @ wt.t()).detach()
    q, p = torch.softmax(zs / tau, -1), torch.softmax(zt / tau, -1)

    def kl(a, b):
        return (a * torch.log(a / b)).sum(-1)

    if cfg.divergence == "forward_kl":
        d = kl(p, q)
    elif cfg.divergence == "reverse_kl":
        d = kl(q, p)
    elif cfg.divergence == "jsd":
        b = cfg.jsd_beta
        m = (1 - b) * q + b * p
        d = b * kl(p, m) + (1 - b) * kl(q, m)
    else:
        a = cfg.skew_alpha
        d = kl(p, a * p + (1 - a) * q)
    valid = mask.bool()
    if cfg.clip != "none":
        c = (
            cfg.clip_value
            if cfg.clip == "static"
            else max(torch.quantile(d[valid].detach(), cfg.clip_quantile).item(), 1e-6)
        )
        if cfg.clip_style == "hard":
            d = torch.where(d > c, torch.full_like(d, c), d)
        else:
            d = d * torch.where(d > c, c / d, torch.ones_like(d)).detach()
    w = weights if weights is not None else torch.ones_like(d)
    m = mask.double()

    def seq_mean(values, wts):
        if cfg.faithful:  # the reference: ÷ summed weight, every row in the batch mean
            return ((m * wts * values).sum(-1) / (m * wts).sum(-1).clamp_min(1)).mean()
        rows = m.sum(-1) > 0  # ours: ÷ token count, empty rows leave the mean
        return ((m * wts * values).sum(-1) / m.sum(-1).clamp_min(1))[rows].mean()

    def tok_mean(values, wts):
        return (m * wts * values).sum() / (m * wts).sum()

    reduce = seq_mean if cfg.reduction == "sequence_mean" else tok_mean
    ones = torch.ones_like(d)
    total = 0.0
    if not cfg.match_repr:
        total = reduce(d, w)
        if cfg.contrastive_lambda > 0:
            if cfg.contrastive_variant == "token":
                ls = torch.log_softmax(zs / tau, -1).gather(-1, tokens[..., None])[..., 0]
                lp = torch.log_softmax(zt / tau, -1).gather(-1, tokens[..., None])[..., 0]
                hinge = torch.relu(cfg.contrastive_margin + (ls - lp).abs() - (ls - neg_logps).abs())
                total = total + cfg.contrastive_lambda * reduce(hinge, ones)
            else:
                a = cfg.contrastive_alpha
                r = torch.softmax((neg_hidden @ wt.t()) / tau, -1)
                pull = kl(p, a * p + (1 - a) * q)
                push = (q * torch.log(q / (a * q.detach() + (1 - a) * r))).sum(-1)
                total = total + cfg.contrastive_lambda * reduce(
                    pull - torch.log(torch.tensor(a)) - push, ones
                )
    if cfg.match_repr or cfg.feature_lambda > 0:
        fm = reduce(((hs - ht.detach()) ** 2).mean(-1), ones)
        total = fm if cfg.match_repr else total + cfg.feature_lambda * fm
    return total


def ref_token_agreement(views, mask, gamma, q=0.95, cap=10.0):
    valid = mask.bool()
    delta = views.var(0, unbiased=True)
    s = torch.quantile(delta[valid], q).clamp_min(1e-6)
    return (1 / (1 + gamma * (delta / s).clamp(max=cap))).clamp_min(0.01) * mask


def ref_sequence_agreement(views, mask, gamma):
    m = mask.double()
    seq_means = (views * m).sum(-1) / m.sum(-1).clamp_min(1)  # [K, B]
    delta = seq_means.var(0, unbiased=False)
    return torch.exp(-gamma * delta).clamp_min(1e-6)[:, None] * m


def make_batch(b=3, t=6, h=8, v=40, lengths=(6, 2, 4), seed=0, k=3):
    g = torch.Generator().manual_seed(seed)
    return {
        "student_hidden": torch.randn(b, t, h, generator=g),
        "teacher_hidden": torch.randn(b, t, h, generator=g),
        "student_head_weight": torch.randn(v, h, generator=g) * 0.7,
        "tokens": torch.randint(0, v, (b, t), generator=g),
        "mask": ragged_mask(lengths, t),
        "views": -torch.rand(k, b, t, generator=g) * 3,
        "negative_logps": -torch.rand(b, t, generator=g) * 5,
        "negative_hidden": torch.randn(b, t, h, generator=g),
    }


CASES = {
    "sd": preset("sd"),
    "unisd_star": preset("unisd_star"),
    "contrastive_jsd_softclip_tokenmean": ObjectiveConfig(
        divergence="jsd",
        jsd_beta=0.3,
        loss_temperature=0.7,
        clip="quantile",
        clip_quantile=0.8,
        clip_style="soft",
        contrastive_lambda=0.1,
        reduction="token_mean",
    ),
    "reverse_hardclip_match_joint": ObjectiveConfig(
        divergence="reverse_kl",
        clip="static",
        clip_value=0.5,
        feature_lambda=0.1,
        agreement="token",
        agreement_gamma=1.0,
    ),
    "skew_distribution_contrastive": ObjectiveConfig(
        divergence="skew_kl",
        skew_alpha=0.2,
        contrastive_lambda=0.3,
        contrastive_variant="distribution",
        chunk_size=2,
    ),
    "match_repr": preset("match_repr"),
    "agreement_seq_ours": ObjectiveConfig(agreement="sequence", agreement_gamma=1.0),
    "agreement_seq_faithful": ObjectiveConfig(agreement="sequence", agreement_gamma=1.0, faithful=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_compute_objective_matches_float64_reference(case):
    cfg = CASES[case].model_copy(update={"chunk_size": min(CASES[case].chunk_size, 4)})  # several chunks
    batch = make_batch(seed=len(case))
    hs = batch["student_hidden"].clone().requires_grad_()
    views = batch["views"] if cfg.agreement != "none" else None
    loss, stats = compute_objective(
        cfg,
        student_hidden=hs,
        student_head_weight=batch["student_head_weight"],
        teacher_hidden=batch["teacher_hidden"],
        tokens=batch["tokens"],
        mask=batch["mask"],
        view_logps=views,
        negative_logps=batch["negative_logps"] if cfg.contrastive_lambda > 0 else None,
        negative_hidden=batch["negative_hidden"] if cfg.contrastive_variant == "distribution" else None,
    )
    (grad,) = torch.autograd.grad(loss, hs)

    hs64 = batch["student_hidden"].double().requires_grad_()
    w64 = batch["student_head_weight"].double()
    ref_agreement = ref_sequence_agreement if cfg.agreement == "sequence" else ref_token_agreement
    weights = ref_agreement(views.double(), batch["mask"], cfg.agreement_gamma) if views is not None else None
    expected = ref_objective(
        cfg,
        hs64,
        w64,
        batch["teacher_hidden"].double(),
        w64,
        batch["tokens"],
        batch["mask"],
        weights,
        batch["negative_logps"].double(),
        batch["negative_hidden"].double(),
    )
    (expected_grad,) = torch.autograd.grad(expected, hs64)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-7)
    assert stats["loss"] == pytest.approx(loss.item())
    assert all(isinstance(v, float) for v in stats.values())
    assert ("kd_loss" in stats) == (not cfg.match_repr)
    assert ("cl_loss" in stats) == (cfg.contrastive_lambda > 0)
    assert ("fm_loss" in stats) == (cfg.match_repr or cfg.feature_lambda > 0)


def test_unisd_star_logs_nearly_inert_weights():
    batch = make_batch(seed=4)
    batch["views"][:, 0, 0] = torch.tensor([-0.1, -40.0, -90.0])  # a wild outlier token
    _, stats = compute_objective(
        preset("unisd_star"),
        student_hidden=batch["student_hidden"].requires_grad_(),
        student_head_weight=batch["student_head_weight"],
        teacher_hidden=batch["teacher_hidden"],
        tokens=batch["tokens"],
        mask=batch["mask"],
        view_logps=batch["views"],
        negative_logps=batch["negative_logps"],
    )
    assert 0.990 <= stats["agreement/weight_min"] < stats["agreement/weight_max"] <= 1.0
    assert stats["num_tokens"] == 12.0 and stats["num_sequences"] == 3.0


@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean"])
def test_accumulation_over_micro_batches_equals_one_big_batch(reduction):
    cfg = ObjectiveConfig(
        agreement="token",
        agreement_gamma=1.0,
        clip="static",
        clip_value=1.0,
        contrastive_lambda=0.1,
        feature_lambda=0.1,
        reduction=reduction,
        chunk_size=3,
    )
    batch = make_batch(b=6, t=5, lengths=(5, 1, 3, 4, 2, 5), seed=7)
    weights = torch.rand(6, 5, generator=torch.Generator().manual_seed(1)) * batch["mask"]
    head = batch["student_head_weight"].clone().requires_grad_()

    def run(rows, normalizers):
        hs = batch["student_hidden"].clone().requires_grad_()
        loss, _ = compute_objective(
            cfg,
            student_hidden=hs[rows],
            student_head_weight=head,
            teacher_hidden=batch["teacher_hidden"][rows],
            tokens=batch["tokens"][rows],
            mask=batch["mask"][rows],
            token_weights=weights[rows],
            negative_logps=batch["negative_logps"][rows],
            normalizers=normalizers,
        )
        grad_h, grad_w = torch.autograd.grad(loss, (hs, head))
        return loss, grad_h, grad_w

    big_loss, big_gh, big_gw = run(slice(0, 6), None)
    parts = [slice(0, 1), slice(1, 4), slice(4, 6)]  # uneven micro-batches
    norms = window_normalizers([batch["mask"][r] for r in parts], [weights[r] for r in parts])
    assert norms == Normalizers(6.0, 20.0, pytest.approx(float((weights * batch["mask"]).sum())))
    total, gh, gw = 0.0, 0.0, 0.0
    for rows in parts:
        loss, grad_h, grad_w = run(rows, norms)
        total, gh, gw = total + loss, gh + grad_h, gw + grad_w
    assert total.item() == pytest.approx(big_loss.item(), rel=1e-6)
    torch.testing.assert_close(gh, big_gh, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gw, big_gw, rtol=1e-5, atol=1e-7)


def _normalizer_worker(rank: int, world: int, init_file: str, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        masks = [ragged_mask([3, 1], 4)] if rank == 0 else [ragged_mask([4, 4, 2], 4), ragged_mask([1], 4)]
        norms = window_normalizers(masks)
        results[rank] = (norms.num_sequences, norms.num_tokens, norms.num_weighted_tokens)
    finally:
        dist.destroy_process_group()


def test_window_normalizers_are_global_counts_over_world_size(tmp_path):
    manager = mp.Manager()
    results = manager.dict()
    # fork: the two ranks inherit the imported modules (spawn would re-import torch, seconds per rank)
    mp.start_processes(
        _normalizer_worker,
        args=(2, str(tmp_path / "init"), results),
        nprocs=2,
        join=True,
        start_method="fork",
    )
    # 6 sequences and 15 tokens in the global window; DDP averages over 2 ranks → divide by 2.
    assert results[0] == results[1] == (3.0, 7.5, 7.5)


def test_compute_objective_input_errors_and_empty_batch():
    batch = make_batch()
    common = dict(
        student_hidden=batch["student_hidden"].requires_grad_(),
        student_head_weight=batch["student_head_weight"],
        teacher_hidden=batch["teacher_hidden"],
        tokens=batch["tokens"],
        mask=batch["mask"],
    )
    with pytest.raises(ValueError, match="exactly one of token_weights"):
        compute_objective(preset("agreement_tok_random"), **common)
    with pytest.raises(ValueError, match="needs negative_logps"):
        compute_objective(preset("contrastive"), **common)
    with pytest.raises(ValueError, match="num_views"):
        compute_objective(preset("agreement_tok_random"), **common, view_logps=batch["views"][:2])
    with pytest.raises(ValueError, match=r"teacher_hidden must be \[B, T, H\]"):
        compute_objective(preset("sd"), **{**common, "teacher_hidden": batch["teacher_hidden"][:2]})
    empty = {**common, "mask": torch.zeros_like(batch["mask"])}
    loss, stats = compute_objective(
        preset("unisd_star"), **empty, view_logps=batch["views"], negative_logps=batch["negative_logps"]
    )
    loss.backward()
    assert loss.item() == 0.0 and stats["num_tokens"] == 0.0
