"""Teacher-forcing batches: (prompt ids, completion ids) → final hidden states at completion positions.

Every scorer in unisd (student, c*-teacher, K auxiliary views, c⁻-teacher) sees the same completion y after
a different prompt. We concatenate prompt + completion per row, right-pad, run the *decoder only* (never the
LM head over all positions, never `output_hidden_states=True`), and gather the final (post-norm) hidden
state at the positions that predict each completion token. The loss code then applies the LM head in
chunks, so no [B, L, V] tensor exists anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class TeacherForcingBatch:
    """A right-padded batch of prompt+completion rows.

    input_ids       [B, L]  prompt + completion tokens, right-padded with pad_id
    attention_mask  [B, L]  1 on real tokens
    gather_index    [B, T]  position in the row whose hidden state predicts completion token t
                            (= prompt_len + t - 1); 0 where t is past the completion (masked)
    completion_ids  [B, T]  completion tokens, right-padded with pad_id
    completion_mask [B, T]  1 on real completion tokens
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    gather_index: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor

    def to(self, device) -> TeacherForcingBatch:
        return TeacherForcingBatch(*(t.to(device) for t in vars(self).values()))


def build_teacher_forcing_batch(
    prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], *, pad_id: int
) -> TeacherForcingBatch:
    """Concatenate each prompt with its completion and right-pad (see TeacherForcingBatch for shapes).

    Every prompt must be non-empty (the first completion token is predicted from the last prompt token).
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    batch = len(prompts)
    seq_len = max(len(p) + len(c) for p, c in zip(prompts, completions))
    comp_len = max(1, max(len(c) for c in completions))
    input_ids = torch.full((batch, seq_len), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, seq_len), dtype=torch.long)
    gather_index = torch.zeros((batch, comp_len), dtype=torch.long)
    completion_ids = torch.full((batch, comp_len), pad_id, dtype=torch.long)
    completion_mask = torch.zeros((batch, comp_len), dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        n_p, n_c = len(p), len(c)
        input_ids[i, : n_p + n_c] = torch.tensor(list(p) + list(c), dtype=torch.long)
        attention_mask[i, : n_p + n_c] = 1
        if n_c:
            gather_index[i, :n_c] = torch.arange(n_p - 1, n_p + n_c - 1)
            completion_ids[i, :n_c] = torch.tensor(list(c), dtype=torch.long)
            completion_mask[i, :n_c] = True
    return TeacherForcingBatch(input_ids, attention_mask, gather_index, completion_ids, completion_mask)


def decoder_of(model) -> torch.nn.Module:
    """The transformer body (embeddings → blocks → final norm) of a causal LM, also under peft.

    LoRA layers are injected in place, so calling the body directly still runs the adapters.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, "model", None)
    if decoder is None:
        raise TypeError(f"cannot find the decoder body of {type(base).__name__}")
    return decoder


def lm_head_of(model) -> torch.nn.Linear:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise NotImplementedError("LM heads with a bias are not supported by the chunked losses")
    return head


def logit_softcap_of(model) -> float | None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base.config, "final_logit_softcapping", None)


def final_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs) -> torch.Tensor:
    """[B, L] → [B, L, H] final hidden states after the final norm (what the LM head reads)."""
    out = decoder_of(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
    return out.last_hidden_state


def completion_hidden(model, batch: TeacherForcingBatch) -> torch.Tensor:
    """[B, T, H]: hidden states that predict each completion token (garbage where completion_mask is 0)."""
    hidden = final_hidden(model, batch.input_ids, batch.attention_mask)
    index = batch.gather_index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    return hidden.gather(1, index)


def split_by_lengths(flat: torch.Tensor, lengths: Sequence[int]) -> list[list[float]]:
    """[sum(lengths)] per-token values (rows concatenated) → one list per row."""
    return [part.tolist() for part in torch.split(flat.detach().cpu(), list(lengths))]


def stack_views(per_item: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """K views' per-token values of B items ([K, T_i] each) → ([K, B, T] zero-padded, mask [B, T])."""
    lengths = [v.shape[1] for v in per_item]
    width = max(1, max(lengths))
    views = torch.zeros(per_item[0].shape[0], len(per_item), width)
    for b, v in enumerate(per_item):
        views[:, b, : v.shape[1]] = v
    mask = torch.arange(width).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    return views, mask


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@torch.no_grad()
def paired_completion_hidden(
    model, prompts_a: Sequence[Sequence[int]], prompts_b: Sequence[Sequence[int]], completions, *, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T, H] hidden states of the same completions after two prompts per item that share a prefix (the
    c*-teacher and the c⁻-teacher: the same x, different demonstrations), in one no-grad pass: each item's
    shared prefix runs once, then both suffixes run together against its KV cache (2B rows).

    Equal to `completion_hidden` of each prompt set alone (up to float rounding); the win is the prefix,
    computed once instead of twice, and one batched call instead of two.
    """
    device = next(model.parameters()).device
    n = len(completions)
    # Keep ≥ 1 prompt token in each suffix: it gives the hidden state that predicts the first completion token.
    shared = [min(common_prefix_len(a, b), len(a) - 1, len(b) - 1) for a, b in zip(prompts_a, prompts_b)]
    if min(shared, default=0) < 1:  # nothing to share for some item: two plain batches
        return (
            completion_hidden(
                model, build_teacher_forcing_batch(prompts_a, completions, pad_id=pad_id).to(device)
            ),
            completion_hidden(
                model, build_teacher_forcing_batch(prompts_b, completions, pad_id=pad_id).to(device)
            ),
        )
    width = max(shared)
    prefix = torch.full((n, width), pad_id, dtype=torch.long)
    prefix_mask = torch.zeros((n, width), dtype=torch.long)
    for i, (p, k) in enumerate(zip(prompts_a, shared)):
        prefix[i, :k] = torch.tensor(list(p[:k]))
        prefix_mask[i, :k] = 1
    prefix, prefix_mask = prefix.to(device), prefix_mask.to(device)
    decoder = decoder_of(model)
    positions = torch.arange(width, device=device).expand(n, -1)
    cache = decoder(
        input_ids=prefix, attention_mask=prefix_mask, position_ids=positions, use_cache=True
    ).past_key_values
    cache.batch_repeat_interleave(2)  # rows: a_0, b_0, a_1, b_1, ...
    suffixes = [list(p[k:]) for a, b, k in zip(prompts_a, prompts_b, shared) for p in (a, b)]
    batch = build_teacher_forcing_batch(suffixes, [c for c in completions for _ in (0, 1)], pad_id=pad_id).to(
        device
    )
    attention = torch.cat([prefix_mask.repeat_interleave(2, dim=0), batch.attention_mask], dim=1)
    starts = torch.tensor(shared, device=device).repeat_interleave(2)
    suffix_positions = starts[:, None] + torch.arange(batch.input_ids.shape[1], device=device)[None, :]
    hidden = decoder(
        input_ids=batch.input_ids,
        attention_mask=attention,
        position_ids=suffix_positions,
        past_key_values=cache,
        use_cache=True,
    ).last_hidden_state
    gathered = hidden.gather(1, batch.gather_index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    return gathered[0::2], gathered[1::2]
