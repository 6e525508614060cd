"""UniSD loss terms as pure tensor functions (ALGORITHM.md: divergence, clipping, L_KD, L_CL, L_FM).

Two forms of every vocabulary-sized computation:

- naive (`token_divergence`, `distribution_contrastive_divergence`): take logits [..., V]; the readable
  reference, used by tests and for small inputs.
- chunked (`chunked_token_divergence`, `chunked_divergence_and_logprobs`, `sampled_token_logprobs`,
  `chunked_distribution_contrastive`): take final hidden states [N, H] and LM-head weights [V, H],
  walk N in chunks of `chunk_size` rows and keep only per-token results ([N]) in forward; backward
  recomputes each chunk's logits. Peak extra memory is O(chunk_size · V), never O(N · V).

All divergences are computed in fp32 (fp64 when given fp64, which gradcheck uses), whatever the input
dtype, and are checked to be ≥ -1e-6 (then clamped at 0): bf16 round-off can make a naive JSD negative.

Conventions
- p^T = softmax(z^T / τ) (teacher, never differentiated), p^S = softmax(z^S / τ) (student).
- `forward_kl`  KL(p^T ‖ p^S) = Σ_v p^T (log p^T − log p^S) — the default (= F.kl_div(input=log p^S,
                target=log p^T, log_target=True)).
- `reverse_kl`  KL(p^S ‖ p^T).
- `jsd`         generalized JSD(β): M = (1−β) p^S + β p^T (built in log space with logaddexp),
                D = β KL(p^T ‖ M) + (1−β) KL(p^S ‖ M). D → 0 at both ends, but its first-order term
                is D ≈ β KL(p^T ‖ p^S) as β → 0 and D ≈ (1−β) KL(p^S ‖ p^T) as β → 1, so the ends
                dispatch explicitly: β = 0 → forward KL, β = 1 → reverse KL (the same map as the
                reference code and TRL's generalized_jsd_loss).
- `skew_kl`     DistiLLM's skew KL: KL(p^T ‖ α p^T + (1−α) p^S), α ∈ [0, 1); α = 0 is forward KL.
                The mixture keeps the divergence bounded (≤ −log α) where the student puts ~0 mass.
- Flattened tokens: the loss functions take the N valid completion tokens of a micro-batch flattened,
  with `seq_ids` [N] (0..B−1, which sequence each token belongs to); `flatten_valid(mask)` builds them
  from a [B, T] mask. Row i of a hidden-state tensor is the state whose logits predict tokens[i].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from unisd.objective.reliability import global_quantile

DivergenceKind = Literal["forward_kl", "reverse_kl", "jsd", "skew_kl"]
DIVERGENCE_KINDS: tuple[str, ...] = ("forward_kl", "reverse_kl", "jsd", "skew_kl")
ClipMode = Literal["none", "static", "quantile"]
ClipStyle = Literal["hard", "soft"]
Reduction = Literal["sequence_mean", "token_mean"]

NEGATIVE_TOLERANCE = 1e-6  # ALGORITHM.md: assert D ≥ −1e-6
QUANTILE_THRESHOLD_FLOOR = 1e-6  # reference: the quantile clip threshold is clamped ≥ 1e-6
DEFAULT_CHUNK_SIZE = 1024


# ---------------------------------------------------------------------------------------------------
# Divergence kernels on log-probabilities (shared by the naive and the chunked forms)
# ---------------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp16/bf16/fp32 inputs, fp64 for fp64 inputs (gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def resolve_divergence(kind: str, beta: float, alpha: float) -> str:
    """Validate (kind, beta, alpha) and map the degenerate ends to the KL they equal.

    jsd β=0 → forward_kl, jsd β=1 → reverse_kl (first-order limit of D/β resp. D/(1−β); see module
    docstring), skew_kl α=0 → forward_kl (M = p^S exactly).
    """
    if kind not in DIVERGENCE_KINDS:
        raise ValueError(f"unknown divergence kind {kind!r}; expected one of {DIVERGENCE_KINDS}")
    if kind == "jsd":
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
        if beta == 0.0:
            return "forward_kl"
        if beta == 1.0:
            return "reverse_kl"
    if kind == "skew_kl":
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"skew_kl alpha must be in [0, 1), got {alpha}")
        if alpha == 0.0:
            return "forward_kl"
    return kind


def _kl_from_logprobs(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a ‖ b) = Σ_v a (log a − log b) over the last dim; 0·log 0 = 0 (a vocabulary entry at -inf)."""
    a = log_a.exp()
    terms = a * (log_a - log_b)
    return torch.where(a > 0, terms, torch.zeros((), dtype=terms.dtype, device=terms.device)).sum(-1)


def _jsd_mixture(log_q: Tensor, log_p: Tensor, beta: float) -> Tensor:
    """log M, M = (1−β) q + β p, in log space."""
    return torch.logaddexp(log_q + math.log1p(-beta), log_p + math.log(beta))


def _skew_mixture(log_q: Tensor, log_p: Tensor, alpha: float) -> Tensor:
    """log M, M = α p + (1−α) q, in log space."""
    return torch.logaddexp(log_p + math.log(alpha), log_q + math.log1p(-alpha))


def divergence_from_logprobs(
    log_q: Tensor, log_p: Tensor, kind: str = "forward_kl", *, beta: float = 0.5, alpha: float = 0.1
) -> Tensor:
    """Per-position divergence from normalised log-probs (finite values).

    log_q: [..., V] student log p^S.  log_p: [..., V] teacher log p^T.  Returns [...] (no clamping).

    Computed from r = log p − log q, shifted so that p' = q·e^r sums to 1 in floating point (q is
    re-normalised the same way). Each divergence is then a true divergence between q and p', and every
    term is small when p ≈ q, so D ≥ 0 up to ~1e-7 (worst −2.4e-7 measured). The direct
    Σ p (log p − log q) inherits fp32 rounding of |log p| (ulp ≈ 2e-6 at |x| ≈ 16) and measured down
    to −3.7e-6 at V = 151,936 for near-equal distributions, below the −1e-6 tolerance. The mixtures
    use M/q = (1−w) + w·e^r through logaddexp. Logits must be finite (no −inf entries).
    """
    kind = resolve_divergence(kind, beta, alpha)
    # Re-normalise q too: fp32 normalisation of logits ~40 leaves a shift of ~ulp(40) ≈ 4e-6 in
    # log q (Σ q − 1 ≈ −2e-6 measured); a second logsumexp over values near 0 is accurate to ~1e-7.
    log_q = log_q - torch.logsumexp(log_q, dim=-1, keepdim=True)
    r = log_p - log_q
    r = r - torch.logsumexp(log_q + r, dim=-1, keepdim=True)
    q = log_q.exp()
    if kind == "reverse_kl":
        return -(q * r).sum(-1)  # KL(q ‖ p') = Σ q (log q − log p')
    p = torch.exp(log_q + r)
    if kind == "forward_kl":
        return (p * r).sum(-1)
    weight = beta if kind == "jsd" else alpha
    log_m_over_q = torch.logaddexp(r + math.log(weight), r.new_tensor(math.log1p(-weight)))
    if kind == "jsd":
        # β KL(p'‖M) + (1−β) KL(q‖M), log(p'/M) = r − log(M/q), log(q/M) = −log(M/q)
        return beta * (p * (r - log_m_over_q)).sum(-1) - (1.0 - beta) * (q * log_m_over_q).sum(-1)
    return (p * (r - log_m_over_q)).sum(-1)  # skew: KL(p' ‖ α p' + (1−α) q)


def _divergence_grad_wrt_scaled_logits(
    log_q: Tensor, log_p: Tensor, div: Tensor, kind: str, beta: float, alpha: float
) -> Tensor:
    """∂D/∂s for s = z^S/τ, q = softmax(s). [c, V].

    For D a function of q: ∂D/∂s = q ⊙ (g − ⟨q, g⟩), g = ∂D/∂q. Closed forms per kind:
      forward_kl: q − p
      reverse_kl: q ⊙ (log q − log p − D)
      jsd:        g = (1−β) log(q/M)               (the p/M and q/M terms cancel)
      skew_kl:    q ⊙ g = −r, r = (1−α) p q / M   → −r + q Σ r
    """
    q = log_q.exp()
    if kind == "forward_kl":
        return q - log_p.exp()
    if kind == "reverse_kl":
        return q * (log_q - log_p - div.unsqueeze(-1))
    if kind == "jsd":
        g = (1.0 - beta) * (log_q - _jsd_mixture(log_q, log_p, beta))
        return q * (g - (q * g).sum(-1, keepdim=True))
    r = (1.0 - alpha) * torch.exp(log_p + log_q - _skew_mixture(log_q, log_p, alpha))
    return q * r.sum(-1, keepdim=True) - r


def _check_nonnegative(div: Tensor, what: str) -> Tensor:
    """Raise if any value is below −1e-6 (a real bug, not round-off); clamp round-off negatives to 0.

    The clamp is on the value only: the gradient passes through unchanged (straight-through), as in the chunked
    path, whose backward never sees the clamp. `clamp_min` would zero the gradient of every token whose fp32
    divergence rounds below 0 — tokens where student and teacher nearly agree, but still differ."""
    if div.numel() and bool((div < -NEGATIVE_TOLERANCE).any()):
        worst = float(div.min())
        raise FloatingPointError(f"{what}: divergence {worst:.3e} < -{NEGATIVE_TOLERANCE:g} (must be ≥ 0)")
    return div + (div.detach().clamp_min(0.0) - div.detach())


def _log_softmax(logits: Tensor) -> Tensor:
    """x − logsumexp(x) over the last dim. More accurate than F.log_softmax in fp32 at LLM vocab sizes:
    on CPU at V = 151,936 we measured 3.4e-5 vs 2.1e-6 max abs error against fp64."""
    return logits - torch.logsumexp(logits, dim=-1, keepdim=True)


def _scale(logits: Tensor, temperature: float) -> Tensor:
    return logits if temperature == 1.0 else logits / temperature


def _validate_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"loss temperature must be > 0, got {temperature}")


# ---------------------------------------------------------------------------------------------------
# Naive form: logits in, [B, T] out
# ---------------------------------------------------------------------------------------------------


def token_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    kind: str = "forward_kl",
    *,
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
) -> Tensor:
    """Per-token divergence from full logits (reference form; materialises [..., V] in fp32).

    student_logits, teacher_logits: [..., V] (e.g. [B, T, V]), any float dtype. The teacher side is
    detached. Both are divided by `temperature`. Returns [...] in fp32 (fp64 for fp64 input).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ"
        )
    _validate_temperature(temperature)
    dtype = _compute_dtype(student_logits.dtype)
    log_q = _log_softmax(_scale(student_logits.to(dtype), temperature))
    log_p = _log_softmax(_scale(teacher_logits.detach().to(dtype), temperature))
    div = divergence_from_logprobs(log_q, log_p, kind, beta=beta, alpha=alpha)
    return _check_nonnegative(div, f"token_divergence({kind})")


def distribution_contrastive_divergence(
    student_logits: Tensor,
    positive_logits: Tensor,
    negative_logits: Tensor,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
) -> Tensor:
    """DistiLLM-2-style distribution-level contrastive term per token (naive form). [..., V] → [...].

    pull = KL(p^+ ‖ α p^+ + (1−α) p^S)             skew KL toward the c*-teacher p^+
    push = KL(p^S ‖ α sg(p^S) + (1−α) p^−)         skew reverse KL from the c⁻-teacher p^−, the
                                                   student side of the mixture detached
    term = pull + (−log α − push)

    Minimising the term pulls p^S toward p^+ and pushes it away from p^−. The mixture bounds the
    push: q / (α q + (1−α) r) ≤ 1/α, so push ≤ −log α and the term is ≥ 0 (the −log α offset is a
    constant that only makes it so; gradients are unchanged). This is our reading of ALGORITHM.md's
    one-line description; the reference code implements only the token-level hinge.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"distribution contrastive alpha must be in (0, 1), got {alpha}")
    _validate_temperature(temperature)
    dtype = _compute_dtype(student_logits.dtype)
    log_q = _log_softmax(_scale(student_logits.to(dtype), temperature))
    log_pos = _log_softmax(_scale(positive_logits.detach().to(dtype), temperature))
    log_neg = _log_softmax(_scale(negative_logits.detach().to(dtype), temperature))
    return _check_nonnegative(
        _distribution_contrastive_from_logprobs(log_q, [log_pos, log_neg], alpha), "distribution contrastive"
    )


def _distribution_contrastive_from_logprobs(
    log_q: Tensor, teacher_logps: list[Tensor], alpha: float
) -> Tensor:
    log_pos, log_neg = teacher_logps
    pull = _kl_from_logprobs(log_pos, _skew_mixture(log_q, log_pos, alpha))
    # push: mixture α·sg(q) + (1−α)·p^−; note _skew_mixture(a, b, α) = log(α e^b + (1−α) e^a).
    push = _kl_from_logprobs(log_q, _skew_mixture(log_neg, log_q.detach(), alpha))
    return pull + (-math.log(alpha) - push)


# ---------------------------------------------------------------------------------------------------
# Chunked form: hidden states + LM head in, per-token results out, logits recomputed in backward
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _HeadSpec:
    kind: str | None  # resolved divergence kind, None = no teacher
    beta: float
    alpha: float
    temperature: float
    softcap: float | None
    chunk_size: int


def _scaled_logits(hidden: Tensor, weight: Tensor, spec: _HeadSpec) -> tuple[Tensor, Tensor | None]:
    """s = softcap(h Wᵀ) / τ in the compute dtype, and tanh(z/cap) when soft-capped (for backward)."""
    logits = hidden @ weight.t()
    tanh = None
    if spec.softcap is not None:
        tanh = torch.tanh(logits / spec.softcap)
        logits = tanh * spec.softcap
    if spec.temperature != 1.0:
        logits = logits / spec.temperature
    return logits, tanh


def _teacher_weight(t_weight: Tensor, s_weight: Tensor, ws: Tensor, dtype: torch.dtype) -> Tensor:
    """The teacher head in the compute dtype; reuses the student's converted copy when both are the same
    tensor (frozen / LoRA teachers), which saves a [V, H] fp32 copy (2.2 GB at 7B)."""
    same = (
        t_weight.data_ptr() == s_weight.data_ptr()
        and t_weight.shape == s_weight.shape
        and t_weight.stride() == s_weight.stride()
        and t_weight.dtype == s_weight.dtype
    )
    return ws if same else t_weight.detach().to(dtype)


class _ChunkedHeadFunction(torch.autograd.Function):
    """Per-token divergence and sampled-token log-probs from hidden states, chunk by chunk.

    Inputs: s_hidden [N, H], s_weight [V, H], t_hidden [N, H] | None, t_weight [V, H] | None,
    tokens [N] | None, spec. Outputs (empty [0] when not requested): divergence [N], student
    log p^S(tokens) [N], teacher log p^T(tokens) [N] (not differentiable).
    Forward keeps only per-token results plus the two log-normalisers; backward recomputes each
    chunk's logits and forms ∂/∂s in closed form (see _divergence_grad_wrt_scaled_logits).
    """

    @staticmethod
    def forward(ctx, s_hidden, s_weight, t_hidden, t_weight, tokens, spec: _HeadSpec):
        ctx.set_materialize_grads(False)
        dtype = _compute_dtype(s_hidden.dtype)
        n = s_hidden.shape[0]
        with torch.autocast(device_type=s_hidden.device.type, enabled=False):
            ws = s_weight.detach().to(dtype)
            wt = _teacher_weight(t_weight, s_weight, ws, dtype) if t_hidden is not None else None
            s_lse = s_hidden.new_zeros(n, dtype=dtype)
            t_lse = s_hidden.new_zeros(n if t_hidden is not None else 0, dtype=dtype)
            div = s_hidden.new_zeros(n if t_hidden is not None else 0, dtype=dtype)
            s_logp = s_hidden.new_zeros(n if tokens is not None else 0, dtype=dtype)
            t_logp = s_hidden.new_zeros(
                n if (tokens is not None and t_hidden is not None) else 0, dtype=dtype
            )
            for start in range(0, n, spec.chunk_size):
                rows = slice(start, min(start + spec.chunk_size, n))
                log_q, _ = _scaled_logits(s_hidden[rows].detach().to(dtype), ws, spec)
                lse = torch.logsumexp(log_q, dim=-1)
                s_lse[rows] = lse
                log_q = log_q.sub_(lse.unsqueeze(-1))
                if tokens is not None:
                    s_logp[rows] = log_q.gather(-1, tokens[rows].unsqueeze(-1)).squeeze(-1)
                if t_hidden is None:
                    continue
                log_p, _ = _scaled_logits(t_hidden[rows].detach().to(dtype), wt, spec)
                lse_t = torch.logsumexp(log_p, dim=-1)
                t_lse[rows] = lse_t
                log_p = log_p.sub_(lse_t.unsqueeze(-1))
                if tokens is not None:
                    t_logp[rows] = log_p.gather(-1, tokens[rows].unsqueeze(-1)).squeeze(-1)
                div[rows] = divergence_from_logprobs(
                    log_q, log_p, spec.kind, beta=spec.beta, alpha=spec.alpha
                )
        if t_hidden is not None:
            div = _check_nonnegative(div, f"chunked divergence ({spec.kind})")
        ctx.spec = spec
        ctx.has_teacher = t_hidden is not None
        ctx.has_tokens = tokens is not None
        ctx.save_for_backward(s_hidden, s_weight, t_hidden, t_weight, tokens, s_lse, t_lse, div)
        ctx.mark_non_differentiable(t_logp)
        return div, s_logp, t_logp

    @staticmethod
    def backward(ctx, g_div, g_slogp, _g_tlogp):
        s_hidden, s_weight, t_hidden, t_weight, tokens, s_lse, t_lse, div = ctx.saved_tensors
        spec: _HeadSpec = ctx.spec
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        use_div = ctx.has_teacher and g_div is not None
        use_logp = ctx.has_tokens and g_slogp is not None
        if not (need_h or need_w) or not (use_div or use_logp):
            return None, None, None, None, None, None
        dtype = s_lse.dtype
        n = s_hidden.shape[0]
        with torch.autocast(device_type=s_hidden.device.type, enabled=False):
            ws = s_weight.detach().to(dtype)
            wt = _teacher_weight(t_weight, s_weight, ws, dtype) if use_div else None
            grad_h = torch.zeros(s_hidden.shape, dtype=dtype, device=s_hidden.device) if need_h else None
            grad_w = torch.zeros(s_weight.shape, dtype=dtype, device=s_weight.device) if need_w else None
            for start in range(0, n, spec.chunk_size):
                rows = slice(start, min(start + spec.chunk_size, n))
                h = s_hidden[rows].detach().to(dtype)
                log_q, tanh = _scaled_logits(h, ws, spec)
                log_q = log_q.sub_(s_lse[rows].unsqueeze(-1))
                grad_s = torch.zeros_like(log_q)
                if use_div:
                    log_p, _ = _scaled_logits(t_hidden[rows].detach().to(dtype), wt, spec)
                    log_p = log_p.sub_(t_lse[rows].unsqueeze(-1))
                    d_div = _divergence_grad_wrt_scaled_logits(
                        log_q, log_p, div[rows], spec.kind, spec.beta, spec.alpha
                    )
                    grad_s.addcmul_(d_div, g_div[rows].to(dtype).unsqueeze(-1))
                    del log_p, d_div
                if use_logp:
                    # ∂ log q_y / ∂s = onehot(y) − q
                    g = g_slogp[rows].to(dtype).unsqueeze(-1)
                    grad_s.addcmul_(log_q.exp(), g, value=-1.0)
                    grad_s.scatter_add_(-1, tokens[rows].unsqueeze(-1), g)
                del log_q
                if spec.temperature != 1.0:
                    grad_s.div_(spec.temperature)
                if tanh is not None:
                    grad_s.mul_(1.0 - tanh * tanh)  # d(cap·tanh(z/cap))/dz
                if need_h:
                    grad_h[rows] = grad_s @ ws
                if need_w:
                    grad_w.addmm_(grad_s.t(), h)
        grad_h = grad_h.to(s_hidden.dtype) if need_h else None
        grad_w = grad_w.to(s_weight.dtype) if need_w else None
        return grad_h, grad_w, None, None, None, None


def _check_head_inputs(
    hidden: Tensor, weight: Tensor, what: str, *, rows: int | None = None, hidden_size: int | None = None
) -> None:
    if hidden.dim() != 2:
        raise ValueError(f"{what} hidden states must be [N, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"{what} head weight must be [V, H] with H = {hidden.shape[1]}, got shape {tuple(weight.shape)}"
        )
    if rows is not None and hidden.shape[0] != rows:
        raise ValueError(f"{what} hidden states have {hidden.shape[0]} rows, expected N = {rows}")
    if hidden_size is not None and hidden.shape[1] != hidden_size:
        raise ValueError(f"{what} hidden size {hidden.shape[1]} != student hidden size {hidden_size}")


def _make_spec(
    kind: str | None, beta: float, alpha: float, temperature: float, chunk_size: int, softcap: float | None
) -> _HeadSpec:
    _validate_temperature(temperature)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"logit_softcap must be > 0 or None, got {softcap}")
    resolved = resolve_divergence(kind, beta, alpha) if kind is not None else None
    return _HeadSpec(resolved, float(beta), float(alpha), float(temperature), softcap, int(chunk_size))


def _check_tokens(tokens: Tensor, n: int, vocab: int) -> Tensor:
    tokens = tokens.reshape(-1)
    if tokens.numel() != n:
        raise ValueError(f"tokens hold {tokens.numel()} entries, expected N = {n}")
    if tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"tokens must be an integer tensor, got {tokens.dtype}")
    if n and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab):
        raise ValueError(
            f"token ids must lie in [0, {vocab}), got [{int(tokens.min())}, {int(tokens.max())}]"
        )
    return tokens.long()


def _checked_teacher_head(
    student_hidden: Tensor,
    student_head_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_head_weight: Tensor | None,
) -> Tensor:
    """Validate student/teacher hidden states and heads; the (detached) head the teacher reads."""
    _check_head_inputs(student_hidden, student_head_weight, "student")
    n, hidden_size = student_hidden.shape
    t_weight = teacher_head_weight if teacher_head_weight is not None else student_head_weight
    _check_head_inputs(teacher_hidden, t_weight, "teacher", rows=n, hidden_size=hidden_size)
    if t_weight.shape[0] != student_head_weight.shape[0]:
        raise ValueError(
            f"teacher head has {t_weight.shape[0]} rows, student head {student_head_weight.shape[0]}"
        )
    return t_weight.detach()


class DivergenceAndLogprobs(NamedTuple):
    divergence: Tensor  # [N] D_t, differentiable w.r.t. student hidden / head
    student_logps: Tensor  # [N] log p^S(y_t) at the loss temperature, differentiable
    teacher_logps: Tensor  # [N] log p^T(y_t) at the loss temperature, no grad


def chunked_divergence_and_logprobs(
    student_hidden: Tensor,
    student_head_weight: Tensor,
    teacher_hidden: Tensor,
    tokens: Tensor,
    teacher_head_weight: Tensor | None = None,
    kind: str = "forward_kl",
    *,
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    logit_softcap: float | None = None,
) -> DivergenceAndLogprobs:
    """D_t plus the sampled token's student and teacher log-probs from ONE pass over the logits.

    student_hidden [N, H] (grad), student_head_weight [V, H] (grad if it requires grad),
    teacher_hidden [N, H] (detached), teacher_head_weight [V, H] or None (= the student head,
    detached), tokens [N] (y_t: the token that row i's logits predict). Any float dtype in, fp32 out.
    The contrastive term needs ℓ^S and ℓ^+ at the loss temperature: this gives both without a
    second pass over the vocabulary.
    """
    t_weight = _checked_teacher_head(student_hidden, student_head_weight, teacher_hidden, teacher_head_weight)
    tokens = _check_tokens(tokens, student_hidden.shape[0], student_head_weight.shape[0])
    spec = _make_spec(kind, beta, alpha, temperature, chunk_size, logit_softcap)
    div, s_logp, t_logp = _ChunkedHeadFunction.apply(
        student_hidden, student_head_weight, teacher_hidden.detach(), t_weight, tokens, spec
    )
    return DivergenceAndLogprobs(div, s_logp, t_logp)


def chunked_token_divergence(
    student_hidden: Tensor,
    student_head_weight: Tensor,
    teacher_hidden: Tensor,
    teacher_head_weight: Tensor | None = None,
    kind: str = "forward_kl",
    *,
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    logit_softcap: float | None = None,
) -> Tensor:
    """Per-token divergence D_t [N] from hidden states, never materialising [N, V].

    student_hidden [N, H], student_head_weight [V, H], teacher_hidden [N, H] (detached),
    teacher_head_weight [V, H] | None (None = the student head, detached). Logits are
    softcap(h Wᵀ)/τ in fp32. Gradients reach student_hidden and student_head_weight (when it
    requires grad) through a per-chunk recompute.
    """
    t_weight = _checked_teacher_head(student_hidden, student_head_weight, teacher_hidden, teacher_head_weight)
    spec = _make_spec(kind, beta, alpha, temperature, chunk_size, logit_softcap)
    div, _, _ = _ChunkedHeadFunction.apply(
        student_hidden, student_head_weight, teacher_hidden.detach(), t_weight, None, spec
    )
    return div


def sampled_token_logprobs(
    hidden: Tensor,
    head_weight: Tensor,
    tokens: Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    logit_softcap: float | None = None,
) -> Tensor:
    """log softmax(softcap(h Wᵀ)/τ)[token] for each row, chunked, fp32.

    hidden [..., H] (e.g. [K·B, T, H] for the K auxiliary views, or [N, H]), head_weight [V, H],
    tokens [...] (same leading shape). Returns tokens.shape. Differentiable w.r.t. hidden and
    head_weight (recompute in backward), so it also serves ℓ^S; under torch.no_grad it keeps nothing.
    """
    if hidden.dim() < 2:
        raise ValueError(f"hidden must be [..., H], got shape {tuple(hidden.shape)}")
    if tuple(hidden.shape[:-1]) != tuple(tokens.shape):
        raise ValueError(
            f"hidden leading shape {tuple(hidden.shape[:-1])} != tokens shape {tuple(tokens.shape)}"
        )
    flat = hidden.reshape(-1, hidden.shape[-1])
    _check_head_inputs(flat, head_weight, "sampled-token")
    flat_tokens = _check_tokens(tokens, flat.shape[0], head_weight.shape[0])
    spec = _make_spec(None, 0.5, 0.1, temperature, chunk_size, logit_softcap)
    _, logp, _ = _ChunkedHeadFunction.apply(flat, head_weight, None, None, flat_tokens, spec)
    return logp.reshape(tokens.shape)


class _ChunkedRecomputeFunction(torch.autograd.Function):
    """Generic chunked per-token function fn(log p^S, [log p^T_k]) → [c] with autograd recompute.

    Used for terms without a hand-written gradient (the distribution-level contrastive variant).
    Backward re-runs each chunk under autograd; peak memory is a few [chunk, V] tensors.
    Inputs: fn, spec, s_hidden [N, H], s_weight [V, H], then (hidden [N, H], weight [V, H]) pairs
    for each teacher (detached).
    """

    @staticmethod
    def forward(ctx, fn, spec: _HeadSpec, s_hidden, s_weight, *teachers):
        dtype = _compute_dtype(s_hidden.dtype)
        n = s_hidden.shape[0]
        out = s_hidden.new_zeros(n, dtype=dtype)
        with torch.autocast(device_type=s_hidden.device.type, enabled=False):
            ws = s_weight.detach().to(dtype)
            t_weights = [w.detach().to(dtype) for w in teachers[1::2]]
            for start in range(0, n, spec.chunk_size):
                rows = slice(start, min(start + spec.chunk_size, n))
                log_q = _log_softmax(_scaled_logits(s_hidden[rows].detach().to(dtype), ws, spec)[0])
                out[rows] = fn(log_q, _teacher_logps(teachers[0::2], t_weights, rows, dtype, spec))
        ctx.fn, ctx.spec = fn, spec
        ctx.save_for_backward(s_hidden, s_weight, *teachers)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        s_hidden, s_weight, *teachers = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        none_rest = (None,) * len(teachers)
        if not (need_h or need_w):
            return (None, None, None, None, *none_rest)
        spec: _HeadSpec = ctx.spec
        dtype = _compute_dtype(s_hidden.dtype)
        n = s_hidden.shape[0]
        grad_h = torch.zeros(s_hidden.shape, dtype=dtype, device=s_hidden.device) if need_h else None
        grad_w = torch.zeros(s_weight.shape, dtype=dtype, device=s_weight.device) if need_w else None
        with torch.autocast(device_type=s_hidden.device.type, enabled=False):
            ws = s_weight.detach().to(dtype).requires_grad_(need_w)
            t_weights = [w.detach().to(dtype) for w in teachers[1::2]]
            for start in range(0, n, spec.chunk_size):
                rows = slice(start, min(start + spec.chunk_size, n))
                h = s_hidden[rows].detach().to(dtype).requires_grad_(need_h)
                with torch.no_grad():
                    t_logps = _teacher_logps(teachers[0::2], t_weights, rows, dtype, spec)
                with torch.enable_grad():
                    log_q = _log_softmax(_scaled_logits(h, ws, spec)[0])
                    values = ctx.fn(log_q, t_logps)
                    inputs = [t for t, need in ((h, need_h), (ws, need_w)) if need]
                    grads = torch.autograd.grad(values, inputs, grad_outputs=grad_out[rows].to(dtype))
                grads = list(grads)
                if need_h:
                    grad_h[rows] = grads.pop(0)
                if need_w:
                    grad_w += grads.pop(0)
        grad_h = grad_h.to(s_hidden.dtype) if need_h else None
        grad_w = grad_w.to(s_weight.dtype) if need_w else None
        return (None, None, grad_h, grad_w, *none_rest)


def _teacher_logps(
    hiddens: tuple[Tensor, ...], weights: list[Tensor], rows: slice, dtype: torch.dtype, spec: _HeadSpec
) -> list[Tensor]:
    return [
        _log_softmax(_scaled_logits(h[rows].detach().to(dtype), w, spec)[0]) for h, w in zip(hiddens, weights)
    ]


def chunked_distribution_contrastive(
    student_hidden: Tensor,
    student_head_weight: Tensor,
    positive_hidden: Tensor,
    negative_hidden: Tensor,
    teacher_head_weight: Tensor | None = None,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    logit_softcap: float | None = None,
) -> Tensor:
    """Chunked `distribution_contrastive_divergence`: [N, H] hidden states in, [N] out.

    positive_hidden: teacher on (c*, x, y<t); negative_hidden: teacher on (c⁻, x, y<t); both detached
    and read through teacher_head_weight (None = the student head, detached).
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"distribution contrastive alpha must be in (0, 1), got {alpha}")
    _check_head_inputs(student_hidden, student_head_weight, "student")
    n, hidden_size = student_hidden.shape
    t_weight = (teacher_head_weight if teacher_head_weight is not None else student_head_weight).detach()
    _check_head_inputs(positive_hidden, t_weight, "positive teacher", rows=n, hidden_size=hidden_size)
    _check_head_inputs(negative_hidden, t_weight, "negative teacher", rows=n, hidden_size=hidden_size)
    spec = _make_spec(None, 0.5, 0.1, temperature, chunk_size, logit_softcap)

    def per_token(log_q: Tensor, teacher_logps: list[Tensor]) -> Tensor:
        return _distribution_contrastive_from_logprobs(log_q, teacher_logps, alpha)

    out = _ChunkedRecomputeFunction.apply(
        per_token,
        spec,
        student_hidden,
        student_head_weight,
        positive_hidden.detach(),
        t_weight,
        negative_hidden.detach(),
        t_weight,
    )
    return _check_nonnegative(out, "chunked distribution contrastive")


# ---------------------------------------------------------------------------------------------------
# Flattening, reductions, clipping, and the three loss terms
# ---------------------------------------------------------------------------------------------------


def flatten_valid(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Positions of the valid tokens of a [B, T] mask, row-major.

    Returns (flat_index [N] into the flattened B·T positions, seq_ids [N] in 0..B−1). Gather any
    [B, T, ...] tensor with `x.reshape(B * T, ...)[flat_index]` (keeps autograd).
    """
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, T], got shape {tuple(mask.shape)}")
    flat_index = mask.reshape(-1).bool().nonzero(as_tuple=True)[0]
    seq_ids = torch.div(flat_index, mask.shape[1], rounding_mode="floor")
    return flat_index, seq_ids


def _check_per_token(
    values: Tensor, seq_ids: Tensor, num_seqs: int, weights: Tensor | None, what: str
) -> None:
    if values.dim() != 1:
        raise ValueError(f"{what}: per-token values must be [N], got shape {tuple(values.shape)}")
    if seq_ids.shape != values.shape:
        raise ValueError(
            f"{what}: seq_ids shape {tuple(seq_ids.shape)} != values shape {tuple(values.shape)}"
        )
    if weights is not None and weights.shape != values.shape:
        raise ValueError(
            f"{what}: weights shape {tuple(weights.shape)} != values shape {tuple(values.shape)}"
        )
    if num_seqs < 1:
        raise ValueError(f"{what}: num_seqs must be ≥ 1, got {num_seqs}")
    if seq_ids.numel() and (int(seq_ids.min()) < 0 or int(seq_ids.max()) >= num_seqs):
        raise ValueError(
            f"{what}: seq_ids must lie in [0, {num_seqs}), got [{int(seq_ids.min())}, {int(seq_ids.max())}]"
        )


def reduce_per_token(
    values: Tensor,
    seq_ids: Tensor,
    num_seqs: int,
    *,
    weights: Tensor | None = None,
    reduction: Reduction = "sequence_mean",
    normalizer: float | Tensor | None = None,
    faithful: bool = False,
) -> Tensor:
    """Scalar loss from per-token values [N] of a micro-batch of `num_seqs` sequences.

    sequence_mean: Σ_i [Σ_t w v / max(1, Σ_t m)] / normalizer — each sequence's weighted sum over its
        token count, so a weight scales its tokens' and its sequence's contribution; normalizer = the
        non-empty sequences of the whole gradient-accumulation window (default: those of this
        micro-batch). `faithful` (the reference): divide each sequence by its summed weight
        Σ_t w instead — which cancels a per-sequence weight exactly, so sequence-level agreement
        computes plain SD's loss — and count empty sequences in the default normaliser. With equal
        micro-batches this is the reference's "per-sequence mean, batch mean, ÷ accumulation steps".
    token_mean: Σ_t w v / normalizer, normalizer = Σ w over every valid token of the whole window
        (default: this micro-batch's Σ w).
    Summing the returned losses over the micro-batches of a window gives the full-window loss: the
    accumulation division happens exactly once, here — the trainer must not divide again.
    Under DDP (which averages gradients over ranks) pass the global count divided by the world size;
    `unisd.objective.window_normalizers` does that.
    """
    _check_per_token(values, seq_ids, num_seqs, weights, "reduce_per_token")
    if reduction not in ("sequence_mean", "token_mean"):
        raise ValueError(f"reduction must be 'sequence_mean' or 'token_mean', got {reduction!r}")
    if normalizer is not None and not float(normalizer) > 0:
        raise ValueError(f"normalizer must be > 0, got {float(normalizer)}")
    w = weights.to(values.dtype) if weights is not None else torch.ones_like(values)
    if reduction == "sequence_mean":
        numerator = values.new_zeros(num_seqs).index_add(0, seq_ids, w * values)
        counts = values.new_zeros(num_seqs).index_add(
            0, seq_ids, w.detach() if faithful else torch.ones_like(w)
        )
        per_sequence = numerator / counts.clamp_min(1.0)
        if normalizer is None:
            non_empty = torch.unique(seq_ids).numel()
            normalizer = num_seqs if faithful else max(1, non_empty)
        return per_sequence.sum() / normalizer
    total = (w * values).sum()
    if normalizer is None:
        return total / w.detach().sum().clamp_min(torch.finfo(values.dtype).tiny)
    return total / normalizer


def clip_threshold(
    divergence: Tensor,
    clip: ClipMode,
    *,
    value: float = 10.0,
    quantile: float = 0.99,
    faithful: bool = False,
    group: dist.ProcessGroup | None = None,
) -> Tensor | None:
    """The clipping threshold c (detached 0-d tensor), or None for clip='none'.

    static: c = value. quantile: c = quantile_q(D over every valid token of the global batch —
    all ranks when torch.distributed is initialised; this micro-batch only when `faithful`),
    clamped ≥ 1e-6 (reference). A collective under DDP: every rank must call it.
    """
    if clip == "none":
        return None
    if clip == "static":
        if not value > 0:
            raise ValueError(f"static clip value must be > 0, got {value}")
        return torch.tensor(float(value), dtype=divergence.dtype, device=divergence.device)
    if clip == "quantile":
        if not 0.0 < quantile <= 1.0:
            raise ValueError(f"clip quantile must be in (0, 1], got {quantile}")
        threshold = global_quantile(divergence, quantile, faithful=faithful, group=group)
        return torch.nan_to_num(threshold, nan=math.inf).clamp_min(QUANTILE_THRESHOLD_FLOOR)
    raise ValueError(f"clip must be 'none', 'static' or 'quantile', got {clip!r}")


def clip_divergence(
    divergence: Tensor, threshold: Tensor | float | None, style: ClipStyle = "hard"
) -> Tensor:
    """Clip per-token divergences at `threshold`.

    hard (reference): D̃ = min(D, c) — tokens above c get exactly zero gradient.
    soft: D̃ = D · stopgrad(min(1, c / D)) — same value as hard, gradient keeps D's direction,
          scaled by c / D.
    """
    if threshold is None:
        return divergence
    if style not in ("hard", "soft"):
        raise ValueError(f"clip_style must be 'hard' or 'soft', got {style!r}")
    c = torch.as_tensor(threshold, dtype=divergence.dtype, device=divergence.device).detach()
    above = divergence.detach() > c
    if style == "hard":
        return torch.where(above, c, divergence)
    scale = torch.where(above, c / divergence.detach().clamp_min(torch.finfo(divergence.dtype).tiny), 1.0)
    return divergence * scale


def distillation_loss(
    divergence: Tensor,
    seq_ids: Tensor,
    num_seqs: int,
    *,
    weights: Tensor | None = None,
    clip: ClipMode = "none",
    clip_value: float = 10.0,
    clip_quantile: float = 0.99,
    clip_style: ClipStyle = "hard",
    reduction: Reduction = "sequence_mean",
    normalizer: float | Tensor | None = None,
    faithful: bool = False,
    group: dist.ProcessGroup | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """L_KD from per-token divergences of one micro-batch: clip, weight, reduce.

    divergence [N] (valid tokens only), seq_ids [N], weights [N] (agreement weights) or None.
    Order (reference): clip the raw D, then weight, then reduce (see `reduce_per_token`).
    Returns (scalar loss, stats): kd/div_mean, kd/div_max (raw D), kd/clip_threshold and
    kd/clip_frac (share of tokens above c) when clipping, kd/num_tokens.
    """
    _check_per_token(divergence, seq_ids, num_seqs, weights, "distillation_loss")
    if divergence.numel() and bool((divergence.detach() < -NEGATIVE_TOLERANCE).any()):
        raise FloatingPointError(
            f"distillation_loss: divergence {float(divergence.min()):.3e} < -{NEGATIVE_TOLERANCE:g}"
        )
    threshold = clip_threshold(
        divergence, clip, value=clip_value, quantile=clip_quantile, faithful=faithful, group=group
    )
    clipped = clip_divergence(divergence, threshold, clip_style)
    loss = reduce_per_token(
        clipped,
        seq_ids,
        num_seqs,
        weights=weights,
        reduction=reduction,
        normalizer=normalizer,
        faithful=faithful,
    )

    raw = divergence.detach()
    names = ["kd/div_mean", "kd/div_max"]
    values = [raw.mean(), raw.max()] if raw.numel() else [raw.new_zeros(()), raw.new_zeros(())]
    if threshold is not None:
        names += ["kd/clip_threshold", "kd/clip_frac"]
        frac = (raw > threshold).to(raw.dtype).mean() if raw.numel() else raw.new_zeros(())
        values += [threshold.to(raw.dtype), frac]
    stats = dict(zip(names, torch.stack(values).tolist()))  # one device sync for all stats
    stats["kd/num_tokens"] = float(raw.numel())
    return loss, stats


def contrastive_token_loss(
    student_logps: Tensor,
    positive_logps: Tensor,
    negative_logps: Tensor,
    seq_ids: Tensor,
    num_seqs: int,
    *,
    margin: float = 0.5,
    reduction: Reduction = "sequence_mean",
    normalizer: float | Tensor | None = None,
    faithful: bool = False,
) -> tuple[Tensor, dict[str, float]]:
    """Token-level hinge L_CL = mean_i (1/|y_i|) Σ_t relu(μ + |ℓ^S − ℓ^+| − |ℓ^S − ℓ^−|).

    All [N] over valid tokens, at the loss temperature. Gradient only through ℓ^S (ℓ^± detached).
    Returns (loss, stats: cl/pos_dist_mean, cl/neg_dist_mean, cl/violation_frac (hinge active),
    cl/student_logp_mean, cl/positive_logp_mean, cl/negative_logp_mean).
    """
    _check_per_token(student_logps, seq_ids, num_seqs, None, "contrastive_token_loss")
    for name, other in (("positive_logps", positive_logps), ("negative_logps", negative_logps)):
        if other.shape != student_logps.shape:
            raise ValueError(
                f"contrastive_token_loss: {name} shape {tuple(other.shape)} != {tuple(student_logps.shape)}"
            )
    if margin < 0:
        raise ValueError(f"contrastive margin must be ≥ 0, got {margin}")
    dtype = _compute_dtype(student_logps.dtype)
    ls = student_logps.to(dtype)
    pos_dist = (ls - positive_logps.detach().to(dtype)).abs()
    neg_dist = (ls - negative_logps.detach().to(dtype)).abs()
    hinge = torch.relu(margin + pos_dist - neg_dist)
    loss = reduce_per_token(
        hinge, seq_ids, num_seqs, reduction=reduction, normalizer=normalizer, faithful=faithful
    )
    names = [
        "cl/pos_dist_mean",
        "cl/neg_dist_mean",
        "cl/violation_frac",
        "cl/student_logp_mean",
        "cl/positive_logp_mean",
        "cl/negative_logp_mean",
    ]
    if ls.numel():
        values = [
            pos_dist.detach().mean(),
            neg_dist.detach().mean(),
            (hinge.detach() > 0).to(dtype).mean(),
            ls.detach().mean(),
            positive_logps.detach().to(dtype).mean(),
            negative_logps.detach().to(dtype).mean(),
        ]
        stats = dict(zip(names, torch.stack(values).tolist()))
    else:
        stats = dict.fromkeys(names, 0.0)
    return loss, stats


def feature_matching_loss(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    seq_ids: Tensor,
    num_seqs: int,
    *,
    reduction: Reduction = "sequence_mean",
    normalizer: float | Tensor | None = None,
    faithful: bool = False,
) -> Tensor:
    """L_FM = mean_i (1/|y_i|) Σ_t (1/H) ‖h^S_t − stopgrad(h^T_t)‖², in fp32.

    student_hidden, teacher_hidden: [N, H] final hidden states (after the final norm) at the valid
    completion-predicting positions — the same states the chunked logits use.
    """
    if student_hidden.dim() != 2 or student_hidden.shape != teacher_hidden.shape:
        raise ValueError(
            f"feature matching needs equal [N, H] hidden states, got {tuple(student_hidden.shape)} "
            f"and {tuple(teacher_hidden.shape)}"
        )
    dtype = _compute_dtype(student_hidden.dtype)
    per_token = (student_hidden.to(dtype) - teacher_hidden.detach().to(dtype)).pow(2).mean(dim=-1)
    return reduce_per_token(
        per_token, seq_ids, num_seqs, reduction=reduction, normalizer=normalizer, faithful=faithful
    )
