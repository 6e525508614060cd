"""Reliability of the teacher signal: multi-view agreement weights and global-batch quantiles.

The K auxiliary views a_1..a_K score the student's own completion y: ℓ^k_t = log π_φ(y_t | a_k, x, y<t)
(temperature 1, sampled token only). Where the views disagree, the c*-teacher is less trustworthy and
the token (or the whole sequence) is down-weighted in the distillation loss (ALGORITHM.md,
"Multi-teacher agreement").

Quantiles (the agreement scale s, and the divergence-clipping threshold in `unisd.objective.losses`) are taken
over every valid token of the *global* batch: when torch.distributed is initialised the values are
all-gathered from every rank (uneven sizes handled). `faithful=True` reproduces the reference code,
which takes them per micro-batch on each rank, so the weights depend on how the batch was split.

Everything here is a pure tensor function. Shapes: K views, B sequences, T completion positions.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

AgreementLevel = Literal["token", "sequence"]
AgreementStat = Literal["var", "range"]

# torch.quantile refuses inputs with more than 2**24 elements; above that we sort ourselves.
_TORCH_QUANTILE_MAX = 2**24
TOKEN_WEIGHT_FLOOR = 0.01  # ALGORITHM.md: w_t = max(0.01, ...)
SEQUENCE_WEIGHT_FLOOR = 1e-6  # ALGORITHM.md: w = max(1e-6, exp(-γ δ))
SCALE_FLOOR = 1e-6  # ALGORITHM.md: s clamped ≥ 1e-6


def distributed_world_size(group: dist.ProcessGroup | None = None) -> int:
    """World size when torch.distributed is initialised, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group)
    return 1


def all_gather_uneven(values: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Concatenate a 1-D tensor from every rank, in rank order; ranks may hold different lengths.

    values: [n_r] on this rank → [sum_r n_r]. Without an initialised process group it returns `values`.
    Every rank must call it (it is a collective), including ranks with n_r = 0.
    """
    if values.dim() != 1:
        raise ValueError(f"all_gather_uneven expects a 1-D tensor, got shape {tuple(values.shape)}")
    world = distributed_world_size(group)
    if world == 1:
        return values
    size = torch.tensor([values.numel()], device=values.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    counts = [int(s.item()) for s in sizes]
    longest = max(counts)
    padded = values.new_zeros(longest)
    padded[: values.numel()] = values
    gathered = [values.new_zeros(longest) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    return torch.cat([g[:c] for g, c in zip(gathered, counts)])


def quantile(values: Tensor, q: float) -> Tensor:
    """Linear-interpolation quantile of a 1-D tensor (same definition as torch.quantile), any size.

    Returns a 0-d tensor; NaN when `values` is empty.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile q must be in [0, 1], got {q}")
    values = values.reshape(-1)
    if values.numel() == 0:
        return values.new_full((), float("nan"))
    if values.numel() <= _TORCH_QUANTILE_MAX:
        return torch.quantile(values, q)
    ordered = values.sort().values
    pos = q * (ordered.numel() - 1)
    lo = int(pos)
    hi = min(lo + 1, ordered.numel() - 1)
    return ordered[lo] + (pos - lo) * (ordered[hi] - ordered[lo])


def global_quantile(
    values: Tensor, q: float, *, faithful: bool = False, group: dist.ProcessGroup | None = None
) -> Tensor:
    """q-quantile of `values` [n] over the global batch (all ranks), or this rank only when `faithful`.

    The result is detached (thresholds and scales never carry gradient). NaN when no rank has values.
    """
    values = values.detach().reshape(-1)
    if not faithful:
        values = all_gather_uneven(values, group)
    return quantile(values, q)


def _check_views(view_logps: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    if view_logps.dim() != 3:
        raise ValueError(f"view_logps must be [K, B, T], got shape {tuple(view_logps.shape)}")
    if mask.shape != view_logps.shape[1:]:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match view_logps [K, B, T] = {tuple(view_logps.shape)}"
        )
    if view_logps.shape[0] < 2:
        raise ValueError(f"agreement needs at least K=2 views, got K={view_logps.shape[0]}")
    valid = mask.bool()
    compute_dtype = torch.promote_types(view_logps.dtype, torch.float32)
    logps = view_logps.detach().to(compute_dtype)
    bad = (~torch.isfinite(logps) & valid.unsqueeze(0)).sum()
    if bad.item() > 0:
        raise ValueError(f"view_logps has {int(bad.item())} non-finite value(s) at valid (mask=1) positions")
    # Padding may hold anything (-inf, NaN): zero it so it cannot leak through reductions.
    logps = torch.where(valid.unsqueeze(0), logps, torch.zeros((), dtype=compute_dtype, device=logps.device))
    return logps, valid


def agreement_weights(
    view_logps: Tensor,
    mask: Tensor,
    *,
    level: AgreementLevel = "token",
    stat: AgreementStat = "var",
    gamma: float = 1.0,
    quantile: float = 0.95,
    cap: float = 10.0,
    faithful: bool = False,
    group: dist.ProcessGroup | None = None,
) -> Tensor:
    """Per-token agreement weights from K views' sampled-token log-probs.

    view_logps: [K, B, T] ℓ^k_t (temperature 1), K ≥ 2.  mask: [B, T] 1 on valid completion tokens.
    Returns [B, T] in the compute dtype (fp32, or fp64 for fp64 input); 0 at masked positions.

    token level:    δ_t = Var_k ℓ^k_t (unbiased, ÷(K-1)) or max_k - min_k;
                    s = quantile_q(δ over valid tokens of the global batch), clamped ≥ 1e-6;
                    w_t = max(0.01, 1 / (1 + γ · min(δ_t / s, cap))).
    sequence level: s^k = mean_t ℓ^k_t over valid tokens; δ = Var_k s^k (population, ÷K) or range;
                    w = max(1e-6, exp(-γ δ)) broadcast to every valid token. (No quantile involved.)

    With γ = 0.001 (UniSD*) the token weights lie in [1/1.01, 1] ≈ [0.990, 1.0]: nearly inert.
    """
    if level not in ("token", "sequence"):
        raise ValueError(f"agreement level must be 'token' or 'sequence', got {level!r}")
    if stat not in ("var", "range"):
        raise ValueError(f"agreement stat must be 'var' or 'range', got {stat!r}")
    if gamma < 0:
        raise ValueError(f"agreement gamma must be ≥ 0, got {gamma}")
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"agreement quantile must be in (0, 1], got {quantile}")
    if cap <= 0:
        raise ValueError(f"agreement cap must be > 0, got {cap}")
    logps, valid = _check_views(view_logps, mask)
    mask_f = valid.to(logps.dtype)

    if level == "token":
        if stat == "var":
            delta = logps.var(dim=0, unbiased=True)
        else:
            delta = logps.amax(dim=0) - logps.amin(dim=0)
        scale = global_quantile(delta[valid], quantile, faithful=faithful, group=group)
        # No valid token anywhere: NaN scale; the weights are masked out anyway.
        scale = torch.nan_to_num(scale, nan=1.0).clamp_min(SCALE_FLOOR)
        normalised = (delta / scale).clamp(max=cap)
        weights = (1.0 / (1.0 + gamma * normalised)).clamp_min(TOKEN_WEIGHT_FLOOR)
        return weights * mask_f

    counts = mask_f.sum(dim=-1).clamp_min(1.0)  # [B]
    seq_scores = (logps * mask_f.unsqueeze(0)).sum(dim=-1) / counts  # [K, B]
    if stat == "var":
        delta_seq = seq_scores.var(dim=0, unbiased=False)
    else:
        delta_seq = seq_scores.amax(dim=0) - seq_scores.amin(dim=0)
    weights_seq = torch.exp(-gamma * delta_seq).clamp_min(SEQUENCE_WEIGHT_FLOOR)  # [B]
    return weights_seq.unsqueeze(-1) * mask_f


def summarize_weights(weights: Tensor, mask: Tensor, prefix: str = "agreement/weight_") -> dict[str, float]:
    """{prefix}min / mean / max of `weights` [B, T] (or [N]) over valid positions; 1.0 each when none.

    Report these: at γ = 0.001 they show the weights are ≈1 everywhere.
    """
    if weights.shape != mask.shape:
        raise ValueError(f"weights shape {tuple(weights.shape)} != mask shape {tuple(mask.shape)}")
    values = weights.detach()[mask.bool()].float()
    if values.numel() == 0:
        return {f"{prefix}min": 1.0, f"{prefix}mean": 1.0, f"{prefix}max": 1.0}
    low, mean, high = torch.stack([values.min(), values.mean(), values.max()]).tolist()
    return {f"{prefix}min": low, f"{prefix}mean": mean, f"{prefix}max": high}
