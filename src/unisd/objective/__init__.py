"""The UniSD objective: its typed config, the presets, and the function the trainer calls each micro-batch.

    L = L_KD + λ_c L_CL + λ_f L_FM          (match_repr: L = L_FM alone, as the reference; sft: L = NLL)

The package, in reading order:
    losses       the terms as pure tensor functions (divergences chunked over the vocabulary, clipping,
                 reductions, L_CL, L_FM)
    reliability  agreement weights from the K views' log-probs (global-batch quantiles)
    teacher      the frozen θ₀ or EMA teacher (full fine-tuning or LoRA)
    diff         `unisd objective-diff`: how far each preset computes from plain SD
    (here)       ObjectiveConfig, the presets (configs/presets/*.yaml), window normalisers, compute_objective

`compute_objective` takes the student's and the c*-teacher's final hidden states at the completion
positions ([B, T, H], row t predicts tokens[:, t]) plus the LM head weights, gathers the valid tokens
of `mask`, and assembles every term from `unisd.objective.losses` without materialising [B, T, V]. It
returns the loss and a flat dict of float stats (every term, the divergence, clipping, agreement weights).

Gradient accumulation: pass `normalizers` from `window_normalizers` (counts over the whole window) so
that the sum of the per-micro-batch losses is the window's loss — divide nothing afterwards.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from pydantic import Field, model_validator
from torch import Tensor

from unisd.config import StrictModel, read_yaml, validate
from unisd.objective.losses import (
    DEFAULT_CHUNK_SIZE,
    chunked_distribution_contrastive,
    chunked_divergence_and_logprobs,
    chunked_token_divergence,
    contrastive_token_loss,
    distillation_loss,
    feature_matching_loss,
    flatten_valid,
    reduce_per_token,
    sampled_token_logprobs,
)
from unisd.objective.reliability import agreement_weights, distributed_world_size, summarize_weights


class ObjectiveConfig(StrictModel):
    """Every knob of the UniSD loss. Defaults follow ALGORITHM.md (the `sd` preset)."""

    divergence: Literal["forward_kl", "reverse_kl", "jsd", "skew_kl"] = "forward_kl"
    jsd_beta: float = Field(
        0.5, ge=0.0, le=1.0, description="JSD mixture weight; 0 → forward KL, 1 → reverse KL"
    )
    skew_alpha: float = Field(0.1, ge=0.0, lt=1.0, description="skew KL: KL(p^T ‖ α p^T + (1−α) p^S)")
    loss_temperature: float = Field(
        1.0, gt=0.0, description="τ for p^S, p^T and ℓ^S, ℓ^± (reference: T_r=0.7)"
    )

    clip: Literal["none", "static", "quantile"] = "none"
    clip_value: float = Field(10.0, gt=0.0)
    clip_quantile: float = Field(0.99, gt=0.0, le=1.0)
    clip_style: Literal["hard", "soft"] = "hard"

    agreement: Literal["none", "token", "sequence"] = "none"
    agreement_stat: Literal["var", "range"] = "var"
    agreement_gamma: float = Field(1.0, ge=0.0)
    agreement_quantile: float = Field(0.95, gt=0.0, le=1.0)
    agreement_cap: float = Field(10.0, gt=0.0)
    context_kind: Literal["random", "retrieval", "induced"] = "random"
    num_views: int = Field(3, ge=2, description="K auxiliary contexts")

    contrastive_lambda: float = Field(0.0, ge=0.0)
    contrastive_margin: float = Field(0.5, ge=0.0)
    contrastive_variant: Literal["token", "distribution"] = "token"
    contrastive_alpha: float = Field(0.1, gt=0.0, lt=1.0, description="skew for the distribution variant")

    feature_lambda: float = Field(0.0, ge=0.0)
    match_repr: bool = Field(False, description="train on L_FM alone (unscaled, as the reference)")

    method: Literal["distill", "sft"] = Field(
        "distill",
        description="distill: the UniSD objective on the student's own completions; sft: cross-entropy on "
        "the gold completions (the SFT baseline: same adapter, data, steps and schedule)",
    )

    teacher: Literal["frozen", "ema"] = "frozen"
    ema_beta: float = Field(0.9, ge=0.0, le=1.0)
    ema_every: int = Field(10, ge=1, description="optimizer steps between EMA updates (the half-life unit)")
    ema_schedule: Literal["per_step", "every"] = Field(
        "per_step",
        description="per_step: φ ← β^(1/N) φ + (1 − β^(1/N)) θ after every optimizer step (same half-life, "
        "moves from the first step, so short runs have an EMA teacher at all); every: β every N steps "
        "(the reference; `faithful` implies it)",
    )

    reduction: Literal["sequence_mean", "token_mean"] = "sequence_mean"
    faithful: bool = Field(False, description="reproduce the reference code's behaviour where we fix it")
    chunk_size: int = Field(DEFAULT_CHUNK_SIZE, ge=1, description="tokens per logits chunk")

    @model_validator(mode="after")
    def _consistent(self) -> ObjectiveConfig:
        if self.match_repr and self.contrastive_lambda > 0:
            raise ValueError("match_repr trains on L_FM alone: contrastive_lambda must be 0")
        if self.match_repr and self.feature_lambda > 0:
            raise ValueError(
                "match_repr trains on L_FM alone, unscaled (as the reference): leave feature_lambda at 0 "
                "(it weights L_FM only when added to L_KD)"
            )
        return self

    @property
    def is_sft(self) -> bool:
        return self.method == "sft"

    @property
    def uses_views(self) -> bool:
        return not self.is_sft and self.agreement != "none"

    @property
    def uses_negative(self) -> bool:
        return not self.is_sft and self.contrastive_lambda > 0

    @property
    def uses_rollouts(self) -> bool:
        """SFT trains on the gold completions: no rollout, no scoring."""
        return not self.is_sft

    @property
    def effective_ema_schedule(self) -> str:
        return "every" if self.faithful else self.ema_schedule

    def agreement_kwargs(self) -> dict:
        """The keyword arguments of `unisd.objective.reliability.agreement_weights` this config sets."""
        return dict(
            level=self.agreement,
            stat=self.agreement_stat,
            gamma=self.agreement_gamma,
            quantile=self.agreement_quantile,
            cap=self.agreement_cap,
            faithful=self.faithful,
        )

    @property
    def uses_features(self) -> bool:
        return self.match_repr or self.feature_lambda > 0


def load_objective(path: str | Path) -> ObjectiveConfig:
    """ObjectiveConfig from the `objective:` section of a YAML file; errors name the file and field."""
    data = read_yaml(path)
    section = data.get("objective")
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise ValueError(f"{path}: 'objective' must be a mapping, got {type(section).__name__}")
    return validate(ObjectiveConfig, section, source=f"{path} [objective]")


# The modes of ALGORITHM.md's table, one YAML file each (configs/presets/<name>.yaml, `objective:` holds only
# what differs from the ObjectiveConfig defaults): the one list of presets.
# UNISD_PROJECT_ROOT: where an image (or a wheel install) keeps the project's configs/.
PRESET_DIR = (
    Path(os.environ.get("UNISD_PROJECT_ROOT") or Path(__file__).resolve().parents[3]) / "configs" / "presets"
)


def _load_presets() -> dict[str, ObjectiveConfig]:
    files = sorted(PRESET_DIR.glob("*.yaml"))
    if not files:
        raise FileNotFoundError(f"no objective presets in {PRESET_DIR} (configs/presets/*.yaml)")
    return {path.stem: load_objective(path) for path in files}


def preset(name: str) -> ObjectiveConfig:
    """The ObjectiveConfig of a mode of ALGORITHM.md (sd, agreement_tok_random, ..., unisd_star, sft)."""
    if name not in PRESETS:
        raise ValueError(f"unknown objective preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name].model_copy(deep=True)


def preset_fields(name: str) -> dict:
    """The fields a preset sets (what configs/presets/<name>.yaml holds under `objective:`)."""
    preset(name)
    return dict(read_yaml(PRESET_DIR / f"{name}.yaml").get("objective") or {})


PRESETS: dict[str, ObjectiveConfig] = _load_presets()

# Every loss term the trainer logs (stats keys), in display order: the trainer, components and report read
# this list.
LOSS_TERMS: tuple[str, ...] = ("loss", "kd_loss", "cl_loss", "fm_loss", "sft_loss")


# ---------------------------------------------------------------------------------------------------
# Normalisers for gradient accumulation
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Normalizers:
    """Denominators for one gradient-accumulation window (None = this micro-batch alone).

    num_sequences: sequences in the window (sequence_mean); num_tokens: valid completion tokens
    (token_mean of L_CL, L_FM); num_weighted_tokens: Σ m·w (token_mean of L_KD with agreement weights).
    """

    num_sequences: float | None = None
    num_tokens: float | None = None
    num_weighted_tokens: float | None = None


def window_normalizers(
    masks: Sequence[Tensor],
    weights: Sequence[Tensor | None] | None = None,
    *,
    group: dist.ProcessGroup | None = None,
    faithful: bool = False,
) -> Normalizers:
    """Normalizers for the micro-batches `masks` ([B, T] each) of one accumulation window.

    num_sequences counts the sequences with at least one valid token (an empty completion has no
    mean to contribute); `faithful` counts every row, as the reference's batch mean does.

    Under torch.distributed the counts are summed over ranks and divided by the world size: DDP
    averages gradients over ranks, so each rank must divide by (global count / world size) for the
    result to be the global-window mean. Weighted counts need the agreement weights of every
    micro-batch in advance (score the K views for the whole window first; they are no-grad).
    """
    if not masks:
        raise ValueError("window_normalizers needs at least one micro-batch mask")
    if weights is not None and len(weights) != len(masks):
        raise ValueError(f"got {len(weights)} weight tensors for {len(masks)} masks")
    device = masks[0].device
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    for index, mask in enumerate(masks):
        valid = mask.bool()
        totals[0] += mask.shape[0] if faithful else valid.any(dim=1).sum()
        totals[1] += valid.sum()
        w = weights[index] if weights is not None else None
        totals[2] += (w.double() * valid).sum() if w is not None else valid.sum()
    world = distributed_world_size(group)
    if world > 1:
        dist.all_reduce(totals, group=group)
        totals /= world
    num_sequences, num_tokens, num_weighted = totals.tolist()
    return Normalizers(num_sequences, max(num_tokens, 1e-12), max(num_weighted, 1e-12))


# ---------------------------------------------------------------------------------------------------
# The combined objective
# ---------------------------------------------------------------------------------------------------


def _flat(x: Tensor, flat_index: Tensor) -> Tensor:
    """[B, T, ...] → [N, ...] at the valid positions (keeps autograd)."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])[flat_index]


def compute_objective(
    cfg: ObjectiveConfig,
    *,
    student_hidden: Tensor,
    student_head_weight: Tensor,
    teacher_hidden: Tensor,
    tokens: Tensor,
    mask: Tensor,
    teacher_head_weight: Tensor | None = None,
    token_weights: Tensor | None = None,
    view_logps: Tensor | None = None,
    negative_logps: Tensor | None = None,
    negative_hidden: Tensor | None = None,
    normalizers: Normalizers | None = None,
    logit_softcap: float | None = None,
    group: dist.ProcessGroup | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The UniSD loss of one micro-batch and its stats.

    student_hidden [B, T, H]  final hidden state (after the final norm) of the student on x, row t
                              predicting tokens[:, t]; requires grad.
    student_head_weight [V, H] student LM head (grad if it requires grad).
    teacher_hidden [B, T, H]  the c*-teacher's at the same completion positions (detached here).
    tokens [B, T], mask [B, T] completion tokens y and their validity (1 up to and incl. first EOS).
    teacher_head_weight       [V, H] or None (= the student head; LoRA / frozen teachers).
    token_weights [B, T]      precomputed agreement weights, or
    view_logps [K, B, T]      the K views' ℓ^k (temperature 1) to compute them here (cfg.agreement).
    negative_logps [B, T]     ℓ^− (c⁻-teacher, at the loss temperature) for the token contrastive term.
    negative_hidden [B, T, H] c⁻-teacher hidden states for the distribution contrastive variant.
    normalizers               window counts (see window_normalizers); None = this micro-batch alone.
    Returns (loss, stats of floats): loss, kd_loss, cl_loss, fm_loss (those that are on), kd/*,
    cl/*, agreement/weight_{min,mean,max}, num_tokens, num_sequences.
    """
    batch = _check_batch(mask, tokens, student_hidden=student_hidden, teacher_hidden=teacher_hidden)
    flat_index, seq_ids = flatten_valid(mask)
    terms = _Terms(cfg, flat_index, seq_ids, batch, normalizers or Normalizers(), logit_softcap, group)
    h_student = _flat(student_hidden, flat_index)
    h_teacher = _flat(teacher_hidden, flat_index).detach()
    stats: dict[str, float] = {"num_tokens": float(flat_index.numel()), "num_sequences": float(batch)}
    weights = _flat_agreement_weights(cfg, mask, token_weights, view_logps, group, flat_index, stats)
    total: Tensor | None = None
    if not cfg.match_repr:
        total = _distillation_loss(
            cfg,
            terms,
            h_student,
            student_head_weight,
            h_teacher,
            teacher_head_weight,
            tokens=tokens,
            mask=mask,
            weights=weights,
            teacher_hidden=teacher_hidden,
            negative_logps=negative_logps,
            negative_hidden=negative_hidden,
            stats=stats,
        )
    total = _with_feature_matching(cfg, terms, total, h_student, h_teacher, stats)
    stats["loss"] = float(total.detach())
    return total, stats


def _flat_agreement_weights(
    cfg: ObjectiveConfig,
    mask: Tensor,
    token_weights: Tensor | None,
    view_logps: Tensor | None,
    group: dist.ProcessGroup | None,
    flat_index: Tensor,
    stats: dict[str, float],
) -> Tensor | None:
    """Returns the agreement weights at the valid positions ([N], detached; None when agreement is off)."""
    if cfg.agreement == "none":
        return None
    token_weights = _agreement_weights(cfg, mask, token_weights, view_logps, group)
    stats.update(summarize_weights(token_weights, mask))
    return _flat(token_weights.detach(), flat_index)


def _distillation_loss(
    cfg: ObjectiveConfig,
    terms: _Terms,
    h_student: Tensor,
    student_head_weight: Tensor,
    h_teacher: Tensor,
    teacher_head_weight: Tensor | None,
    *,
    tokens: Tensor,
    mask: Tensor,
    weights: Tensor | None,
    teacher_hidden: Tensor,
    negative_logps: Tensor | None,
    negative_hidden: Tensor | None,
    stats: dict[str, float],
) -> Tensor:
    """Returns L_KD + λ_CL · L_CL (the contrastive term only when contrastive_lambda > 0); logs into stats."""
    kd, student_logps, positive_logps = terms.distillation(
        h_student, student_head_weight, h_teacher, teacher_head_weight, tokens, weights, stats
    )
    total = kd
    if cfg.contrastive_lambda > 0:
        if cfg.contrastive_variant == "token":
            cl = terms.token_contrastive(student_logps, positive_logps, negative_logps, mask, stats)
        else:
            cl = terms.distribution_contrastive(
                h_student,
                student_head_weight,
                h_teacher,
                teacher_head_weight,
                negative_hidden,
                teacher_hidden,
            )
        stats["cl_loss"] = float(cl.detach())
        total = total + cfg.contrastive_lambda * cl
    return total


def _with_feature_matching(
    cfg: ObjectiveConfig,
    terms: _Terms,
    total: Tensor | None,
    h_student: Tensor,
    h_teacher: Tensor,
    stats: dict[str, float],
) -> Tensor | None:
    """Returns `total` + λ_FM · L_FM (L_FM alone under match_repr; `total` as is without features)."""
    if cfg.uses_features:
        fm = terms.feature_matching(h_student, h_teacher)
        stats["fm_loss"] = float(fm.detach())
        total = fm if cfg.match_repr else total + cfg.feature_lambda * fm
    return total


def _check_batch(mask: Tensor, tokens: Tensor, **hidden: Tensor) -> int:
    """The micro-batch size B, after checking mask/tokens [B, T] and every hidden [B, T, H]."""
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, T], got shape {tuple(mask.shape)}")
    batch, length = mask.shape
    for name, x in hidden.items():
        if x.dim() != 3 or tuple(x.shape[:2]) != (batch, length):
            raise ValueError(f"{name} must be [B, T, H] = [{batch}, {length}, H], got {tuple(x.shape)}")
    if tokens.shape != mask.shape:
        raise ValueError(f"tokens shape {tuple(tokens.shape)} != mask shape {tuple(mask.shape)}")
    return batch


def _agreement_weights(cfg: ObjectiveConfig, mask: Tensor, token_weights, view_logps, group) -> Tensor:
    """[B, T] agreement weights: precomputed ones, or computed here from the K views' log-probs."""
    if (token_weights is None) == (view_logps is None):
        raise ValueError(
            f"agreement={cfg.agreement!r} needs exactly one of token_weights [B, T] or view_logps [K, B, T]"
        )
    if view_logps is not None:
        if view_logps.shape[0] != cfg.num_views:
            raise ValueError(
                f"view_logps has K={view_logps.shape[0]} views, config num_views={cfg.num_views}"
            )
        token_weights = agreement_weights(view_logps, mask, **cfg.agreement_kwargs(), group=group)
    if token_weights.shape != mask.shape:
        raise ValueError(
            f"token_weights shape {tuple(token_weights.shape)} != mask shape {tuple(mask.shape)}"
        )
    return token_weights


@dataclass
class _Terms:
    """The loss terms of one micro-batch over its N valid tokens (flat_index / seq_ids of the mask)."""

    cfg: ObjectiveConfig
    flat_index: Tensor
    seq_ids: Tensor
    batch: int
    norms: Normalizers
    softcap: float | None
    group: dist.ProcessGroup | None

    @property
    def kd_norm(self):
        if self.cfg.reduction == "sequence_mean":
            return self.norms.num_sequences
        return self.norms.num_weighted_tokens if self.cfg.agreement != "none" else self.norms.num_tokens

    @property
    def norm(self):  # unweighted terms (L_CL, L_FM)
        return self.norms.num_sequences if self.cfg.reduction == "sequence_mean" else self.norms.num_tokens

    def _head(self) -> dict:
        c = self.cfg
        return dict(
            kind=c.divergence,
            beta=c.jsd_beta,
            alpha=c.skew_alpha,
            temperature=c.loss_temperature,
            chunk_size=c.chunk_size,
            logit_softcap=self.softcap,
        )

    def distillation(self, h_student, w_student, h_teacher, w_teacher, tokens, weights, stats):
        """L_KD (clip → weight → reduce) and, when the token contrastive term needs them, ℓ^S and ℓ^+ from the
        same pass over the vocabulary."""
        c = self.cfg
        student_logps = positive_logps = None
        if c.contrastive_lambda > 0 and c.contrastive_variant == "token":
            div, student_logps, positive_logps = chunked_divergence_and_logprobs(
                h_student, w_student, h_teacher, _flat(tokens, self.flat_index), w_teacher, **self._head()
            )
        else:
            div = chunked_token_divergence(h_student, w_student, h_teacher, w_teacher, **self._head())
        kd, kd_stats = distillation_loss(
            div,
            self.seq_ids,
            self.batch,
            weights=weights,
            clip=c.clip,
            clip_value=c.clip_value,
            clip_quantile=c.clip_quantile,
            clip_style=c.clip_style,
            reduction=c.reduction,
            normalizer=self.kd_norm,
            faithful=c.faithful,
            group=self.group,
        )
        stats.update(kd_stats)
        stats["kd_loss"] = float(kd.detach())
        return kd, student_logps, positive_logps

    def token_contrastive(self, student_logps, positive_logps, negative_logps, mask, stats):
        if negative_logps is None:
            raise ValueError("contrastive_lambda > 0 (token variant) needs negative_logps [B, T]")
        if negative_logps.shape != mask.shape:
            raise ValueError(
                f"negative_logps shape {tuple(negative_logps.shape)} != mask shape {tuple(mask.shape)}"
            )
        cl, cl_stats = contrastive_token_loss(
            student_logps,
            positive_logps,
            _flat(negative_logps, self.flat_index),
            self.seq_ids,
            self.batch,
            margin=self.cfg.contrastive_margin,
            reduction=self.cfg.reduction,
            normalizer=self.norm,
            faithful=self.cfg.faithful,
        )
        stats.update(cl_stats)
        return cl

    def distribution_contrastive(
        self, h_student, w_student, h_teacher, w_teacher, negative_hidden, teacher_hidden
    ):
        if negative_hidden is None:
            raise ValueError("contrastive_variant='distribution' needs negative_hidden [B, T, H]")
        if tuple(negative_hidden.shape) != tuple(teacher_hidden.shape):
            raise ValueError(f"negative_hidden shape {tuple(negative_hidden.shape)} != teacher_hidden shape")
        per_token = chunked_distribution_contrastive(
            h_student,
            w_student,
            h_teacher,
            _flat(negative_hidden, self.flat_index).detach(),
            w_teacher,
            alpha=self.cfg.contrastive_alpha,
            temperature=self.cfg.loss_temperature,
            chunk_size=self.cfg.chunk_size,
            logit_softcap=self.softcap,
        )
        return reduce_per_token(
            per_token,
            self.seq_ids,
            self.batch,
            reduction=self.cfg.reduction,
            normalizer=self.norm,
            faithful=self.cfg.faithful,
        )

    def feature_matching(self, h_student, h_teacher):
        return feature_matching_loss(
            h_student,
            h_teacher,
            self.seq_ids,
            self.batch,
            reduction=self.cfg.reduction,
            normalizer=self.norm,
            faithful=self.cfg.faithful,
        )


def compute_sft_objective(
    cfg: ObjectiveConfig,
    *,
    student_hidden: Tensor,
    student_head_weight: Tensor,
    tokens: Tensor,
    mask: Tensor,
    normalizers: Normalizers | None = None,
    logit_softcap: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The SFT baseline's loss of one micro-batch: mean NLL of the gold completion tokens.

    student_hidden [B, T, H] (grad) at the positions predicting tokens [B, T] (the gold completion,
    EOS included), mask [B, T]. Reduced like L_KD (cfg.reduction, window normalizers), at temperature
    1 (cross-entropy on the data, not a distillation temperature). Returns (loss, stats: loss,
    sft_loss, num_tokens, num_sequences).
    """
    if mask.dim() != 2 or tokens.shape != mask.shape:
        raise ValueError(f"tokens {tuple(tokens.shape)} and mask {tuple(mask.shape)} must both be [B, T]")
    norms = normalizers or Normalizers()
    flat_index, seq_ids = flatten_valid(mask)
    logps = sampled_token_logprobs(
        _flat(student_hidden, flat_index),
        student_head_weight,
        _flat(tokens, flat_index),
        chunk_size=cfg.chunk_size,
        logit_softcap=logit_softcap,
    )
    norm = norms.num_sequences if cfg.reduction == "sequence_mean" else norms.num_tokens
    loss = reduce_per_token(
        -logps, seq_ids, mask.shape[0], reduction=cfg.reduction, normalizer=norm, faithful=cfg.faithful
    )
    value = float(loss.detach())
    stats = {
        "loss": value,
        "sft_loss": value,
        "num_tokens": float(flat_index.numel()),
        "num_sequences": float(mask.shape[0]),
    }
    return loss, stats
