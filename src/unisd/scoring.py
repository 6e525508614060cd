"""Multi-view scoring: sampled-token log-probs of each completion under the c*-teacher and K auxiliary views.

For item i with completion y_i, view k scores ℓ^k_t = log π(y_t | a_k, x, y<t) at temperature 1 — only the
sampled token's log-prob, so the views run as batched no-grad passes and never keep [K, B, T, V].

Work saved relative to "one HF forward per view per item":
- rows (item × view) are batched, sorted by length to waste little padding;
- only completion positions go through the LM head, in chunks (HF computes logits at every position);
- rows whose prompts share a long token prefix (induced and random contexts repeat across items) compute
  that prefix's KV cache once and run only their suffixes against it;
- adaptive budget: only the fraction `budget` of completions with the highest uncertainty gets the K-view
  re-scoring, the rest get weight 1. The signal is the student's surprisal on its own sample (the rollout's
  log-probs: no forward at all), the mean c*-teacher entropy, or the student–teacher KL (a teacher pass over
  every completion first; bench/bench_budget_signal.py compares them). With budget 1 no signal is computed.

Output per shard: `scores.safetensors` (flat per-token arrays + offsets), `ids.json`, `manifest.json`.
The trainer recomputes the agreement weights per global training batch (the quantile is a batch statistic);
the weights stored here use the shard as the batch and are for reports and inspection.
"""

from __future__ import annotations

import copy
import logging
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from unisd.artifacts import atomic_path, begin_stage, read_json, read_jsonl, write_json
from unisd.config import StrictModel
from unisd.rollout import load_completions, shard_range
from unisd.sequences import (
    build_teacher_forcing_batch,
    completion_hidden,
    decoder_of,
    lm_head_of,
    logit_softcap_of,
    split_by_lengths,
    stack_views,
)

log = logging.getLogger(__name__)


UncertaintySignal = Literal["teacher_entropy", "divergence", "student_surprisal"]
# The forward passes over every completion that each signal needs before the budget can choose.
PASSES_FOR_SIGNAL: dict[str, frozenset[str]] = {
    "teacher_entropy": frozenset({"teacher"}),
    "divergence": frozenset({"teacher", "student"}),
    "student_surprisal": frozenset(),
}


class ScoringConfig(StrictModel):
    batch_size: int = Field(8, ge=1)  # rows (item × view) per forward
    chunk_size: int = Field(1024, ge=1)  # completion tokens per LM-head chunk
    budget: float = Field(1.0, gt=0.0, le=1.0)  # fraction of completions that get the K-view re-scoring
    # student_surprisal needs no forward and chose as well as the teacher pass (bench/bench_budget_signal.py);
    # the default stays what results were computed with (experiment results record every setting).
    uncertainty: UncertaintySignal = "teacher_entropy"
    prefix_cache: bool = True
    min_shared_prefix: int = Field(16, ge=1)  # tokens; shorter shared prefixes are not worth a separate pass
    # Items per shard whose student log-probs are compared with the rollout's: a sampler check (≈0 when healthy,
    # ≈0.2 for stale weights), for which a few items' tokens are plenty (the demo uses 4).
    staleness_items: int = Field(16, ge=0)
    num_shards: int = Field(1, ge=1)
    shard_index: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _shard_in_range(self):
        if self.shard_index >= self.num_shards:
            raise ValueError(f"shard_index {self.shard_index} must be < num_shards {self.num_shards}")
        return self

    @property
    def passes(self) -> frozenset[str]:
        """The full-shard passes the budget's signal needs ("teacher", "student"); none at budget 1."""
        return PASSES_FOR_SIGNAL[self.uncertainty] if self.budget < 1.0 else frozenset()


@torch.no_grad()
def _head_stats(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    tokens: torch.Tensor,
    *,
    chunk_size: int,
    softcap: float | None,
    want_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[N, H] hidden, [V, H] head, [N] tokens → (log p(token) [N], entropy [N] or None), fp32, chunked."""
    logps = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    ent = torch.empty_like(logps) if want_entropy else None
    for s in range(0, hidden.shape[0], chunk_size):
        logits = hidden[s : s + chunk_size].float() @ head_weight.float().T
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        logp = torch.log_softmax(logits, dim=-1)
        logps[s : s + chunk_size] = logp.gather(1, tokens[s : s + chunk_size, None]).squeeze(1)
        if ent is not None:
            ent[s : s + chunk_size] = -(logp.exp() * logp).sum(-1)
    return logps, ent


@torch.no_grad()
def _score_rows_plain(
    model,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    *,
    pad_id: int,
    chunk_size: int,
    want_entropy: bool = False,
) -> list[tuple[list[float], list[float] | None]]:
    """One padded forward over rows → per-row (sampled-token log-probs, entropies)."""
    device = next(model.parameters()).device
    batch = build_teacher_forcing_batch(prompts, completions, pad_id=pad_id).to(device)
    hidden = completion_hidden(model, batch)
    mask = batch.completion_mask
    logps, ent = _head_stats(
        hidden[mask],
        lm_head_of(model).weight,
        batch.completion_ids[mask],
        chunk_size=chunk_size,
        softcap=logit_softcap_of(model),
        want_entropy=want_entropy,
    )
    lengths = mask.sum(1).tolist()
    entropies = split_by_lengths(ent, lengths) if ent is not None else [None] * len(lengths)
    return list(zip(split_by_lengths(logps, lengths), entropies))


@torch.no_grad()
def _score_rows_with_prefix(
    model,
    prefix: Sequence[int],
    suffixes: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    *,
    pad_id: int,
    chunk_size: int,
) -> list[list[float]]:
    """Rows = prefix + suffix_i + completion_i: the prefix's KV cache is computed once and shared."""
    device = next(model.parameters()).device
    decoder = decoder_of(model)
    prefix_ids = torch.tensor([list(prefix)], device=device)
    prefix_out = decoder(input_ids=prefix_ids, use_cache=True)
    batch = build_teacher_forcing_batch(suffixes, completions, pad_id=pad_id).to(device)
    n_rows, p_len = len(suffixes), len(prefix)
    cache = copy.deepcopy(prefix_out.past_key_values)
    cache.batch_repeat_interleave(n_rows)
    attention = torch.cat(
        [torch.ones(n_rows, p_len, dtype=batch.attention_mask.dtype, device=device), batch.attention_mask],
        dim=1,
    )
    positions = torch.arange(p_len, p_len + batch.input_ids.shape[1], device=device).expand(n_rows, -1)
    hidden = decoder(
        input_ids=batch.input_ids,
        attention_mask=attention,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
    ).last_hidden_state
    index = batch.gather_index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    comp_hidden = hidden.gather(1, index)
    mask = batch.completion_mask
    logps, _ = _head_stats(
        comp_hidden[mask],
        lm_head_of(model).weight,
        batch.completion_ids[mask],
        chunk_size=chunk_size,
        softcap=logit_softcap_of(model),
        want_entropy=False,
    )
    return split_by_lengths(logps, mask.sum(1).tolist())


def _common_prefix_len(rows: Sequence[Sequence[int]]) -> int:
    first = rows[0]
    n = min(len(r) for r in rows)
    for i in range(n):
        t = first[i]
        if any(r[i] != t for r in rows):
            return i
    return n


@torch.no_grad()
def score_views(
    model,
    rows: Sequence[tuple[Sequence[int], Sequence[int], str | None]],
    *,
    pad_id: int,
    batch_size: int,
    chunk_size: int,
    prefix_cache: bool = True,
    min_shared_prefix: int = 16,
    progress: bool = True,
) -> list[list[float]]:
    """Sampled-token log-probs of many (prompt, completion, group key) rows, as fast as we can.

    Rows with the same non-None group key (e.g. the id of a shared induced/random context) are scored
    against one cached prefix when their prompts share ≥ `min_shared_prefix` tokens; the rest are batched
    by length. Returns one list of log-probs per row, in input order.
    """
    results: list[list[float] | None] = [None] * len(rows)
    groups, plain = _group_rows(rows, prefix_cache)
    batching = {"pad_id": pad_id, "batch_size": batch_size, "chunk_size": chunk_size}
    bar = tqdm(total=len(rows), desc="scoring views", unit="row", disable=not progress)
    for members in groups.values():
        p_len = _group_prefix_len(rows, members)
        if p_len < min_shared_prefix:
            plain.extend(members)
            continue
        _score_group(model, rows, members, p_len, results, bar, **batching)
    _score_plain(model, rows, plain, results, bar, **batching)
    bar.close()
    return results  # type: ignore[return-value]


def _group_rows(
    rows: Sequence[tuple[Sequence[int], Sequence[int], str | None]], prefix_cache: bool
) -> tuple[dict[str, list[int]], list[int]]:
    """Returns ({group key: row indices} for keys shared by ≥ 2 rows, the indices of every other row)."""
    groups: dict[str, list[int]] = defaultdict(list)
    plain: list[int] = []
    for i, (_, _, key) in enumerate(rows):
        (groups[key] if prefix_cache and key is not None else plain).append(i)
    for key, members in list(groups.items()):
        if len(members) < 2:
            plain.extend(members)
            del groups[key]
    return groups, plain


def _group_prefix_len(
    rows: Sequence[tuple[Sequence[int], Sequence[int], str | None]], members: list[int]
) -> int:
    """Returns the length of the prompt prefix the group's rows share (at most the shortest prompt − 1)."""
    prompts = [rows[i][0] for i in members]
    # Leave ≥1 prompt token in every suffix: it produces the hidden state predicting the first token.
    return min(_common_prefix_len(prompts), min(len(p) for p in prompts) - 1)


def _score_group(
    model,
    rows: Sequence[tuple[Sequence[int], Sequence[int], str | None]],
    members: list[int],
    p_len: int,
    results: list[list[float] | None],
    bar,
    *,
    pad_id: int,
    batch_size: int,
    chunk_size: int,
) -> None:
    """Fills `results` for a group's rows, scored by length against their shared `p_len`-token prefix."""
    members = sorted(members, key=lambda i: len(rows[i][0]) + len(rows[i][1]))
    for b in range(0, len(members), batch_size):
        chunk = members[b : b + batch_size]
        scored = _score_rows_with_prefix(
            model,
            rows[chunk[0]][0][:p_len],
            [rows[i][0][p_len:] for i in chunk],
            [rows[i][1] for i in chunk],
            pad_id=pad_id,
            chunk_size=chunk_size,
        )
        for i, lp in zip(chunk, scored):
            results[i] = lp
        bar.update(len(chunk))


def _score_plain(
    model,
    rows: Sequence[tuple[Sequence[int], Sequence[int], str | None]],
    plain: list[int],
    results: list[list[float] | None],
    bar,
    *,
    pad_id: int,
    batch_size: int,
    chunk_size: int,
) -> None:
    """Fills `results` for the `plain` rows (no usable shared prefix), batched by total length."""
    plain.sort(key=lambda i: len(rows[i][0]) + len(rows[i][1]))
    for b in range(0, len(plain), batch_size):
        chunk = plain[b : b + batch_size]
        scored = _score_rows_plain(
            model,
            [rows[i][0] for i in chunk],
            [rows[i][1] for i in chunk],
            pad_id=pad_id,
            chunk_size=chunk_size,
        )
        for i, (lp, _) in zip(chunk, scored):
            results[i] = lp
        bar.update(len(chunk))


def select_for_budget(uncertainty: Sequence[float], budget: float) -> set[int]:
    """Indices of the ceil(budget · n) most uncertain items (ties broken by index, deterministic)."""
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"budget must be in (0, 1], got {budget}")
    n = len(uncertainty)
    k = min(n, int(-(-budget * n // 1)))
    order = sorted(range(n), key=lambda i: (-uncertainty[i], i))
    return set(order[:k])


def score_completions(
    model,
    prompts: Sequence[Sequence[int]],
    ys: Sequence[Sequence[int]],
    cfg: ScoringConfig,
    *,
    pad_id: int,
    want_entropy: bool = False,
    desc: str | None = None,
) -> list[tuple[list[float], list[float] | None]]:
    """(sampled-token log-probs, entropies) of each (prompt, completion), batched by total length."""
    order = sorted(range(len(ys)), key=lambda n: len(prompts[n]) + len(ys[n]))
    out: list[tuple[list[float], list[float] | None]] = [([], None)] * len(ys)
    batches = range(0, len(order), cfg.batch_size)
    for b in tqdm(batches, desc=desc, unit="batch", disable=desc is None):
        chunk = order[b : b + cfg.batch_size]
        scored = _score_rows_plain(
            model,
            [prompts[n] for n in chunk],
            [ys[n] for n in chunk],
            pad_id=pad_id,
            chunk_size=cfg.chunk_size,
            want_entropy=want_entropy,
        )
        for n, result in zip(chunk, scored):
            out[n] = result
    return out


def score_teacher_and_student(model, rows, ys, scorable, cfg: ScoringConfig, *, pad_id: int, timer):
    """The passes the budget's signal needs (`cfg.passes`) and the staleness check: ({item: (c*-teacher
    log-probs, entropies)}, {item: student log-probs}) over the non-empty completions that got them."""
    teacher: dict[int, tuple[list[float], list[float] | None]] = {}
    if "teacher" in cfg.passes:
        with timer("teacher"):
            scored = score_completions(
                model,
                [rows[n]["teacher_prompt_ids"] for n in scorable],
                [ys[n] for n in scorable],
                cfg,
                pad_id=pad_id,
                want_entropy=True,
                desc="scoring teacher",
            )
        teacher = dict(zip(scorable, scored))
    need = scorable if "student" in cfg.passes else scorable[: cfg.staleness_items]
    student: dict[int, list[float]] = {}
    if need:
        with timer("student"):
            prompts = [rows[n]["student_prompt_ids"] for n in need]
            scored = score_completions(model, prompts, [ys[n] for n in need], cfg, pad_id=pad_id)
        student = {n: lp for n, (lp, _) in zip(need, scored)}
    return teacher, student


def uncertainty_of(
    cfg: ScoringConfig, teacher: dict, student: dict[int, list[float]], rollout_logps: Sequence, ys
) -> list[float] | None:
    """Per item, the budget's signal (cfg.uncertainty): mean c*-teacher entropy; the sampled-token estimate of
    KL(student ‖ teacher) on y ~ student, mean_t (log p^S − log p^T); or the student's surprisal on its own
    sample, mean_t −log p^S(y_t) from the rollout's log-probs. None at budget 1 (every item gets the views)."""
    if cfg.budget >= 1.0:
        return None
    if cfg.uncertainty == "student_surprisal":
        return [-sum(lps) / max(1, len(lps)) for lps in rollout_logps]
    if cfg.uncertainty == "teacher_entropy":
        return [
            sum(ent or []) / max(1, len(ent or []))
            for _, ent in (teacher.get(n, ([], None)) for n in range(len(ys)))
        ]
    return [
        sum(s - t for s, t in zip(student.get(n, []), teacher.get(n, ([], None))[0])) / max(1, len(ys[n]))
        for n in range(len(ys))
    ]


def score_chosen_views(
    model, views_of: Sequence[list[dict]], ys, chosen: Sequence[int], cfg: ScoringConfig, *, pad_id: int
) -> dict[int, list[list[float]]]:
    """{item: K views' log-probs} for the chosen items, all rows in one pool (shared prefixes cached)."""
    rows, owners = [], []
    for n in chosen:
        for k, view in enumerate(views_of[n]):
            rows.append((view["prompt_ids"], ys[n], view.get("context_id")))
            owners.append((n, k))
    num_views = len(views_of[chosen[0]]) if chosen else 0
    out: dict[int, list[list[float]]] = {n: [[] for _ in range(num_views)] for n in chosen}
    scored = score_views(
        model,
        rows,
        pad_id=pad_id,
        batch_size=cfg.batch_size,
        chunk_size=cfg.chunk_size,
        prefix_cache=cfg.prefix_cache,
        min_shared_prefix=cfg.min_shared_prefix,
    )
    for (n, k), lp in zip(owners, scored):
        out[n][k] = lp
    return out


def pack_scores(
    ys, teacher, view_logps: dict[int, list[list[float]]], num_views: int, uncertainty, objective
):
    """Flat per-token arrays + offsets (the safetensors payload) and the inspection weights over the shard."""
    from unisd.objective import ObjectiveConfig
    from unisd.objective.reliability import agreement_weights

    lengths = [len(y) for y in ys]
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.long)
    total = int(offsets[-1])
    flat_views = torch.zeros(num_views, total)
    has_views = torch.zeros(len(ys), dtype=torch.bool)
    for n, per_view in view_logps.items():
        has_views[n] = True
        for k in range(num_views):
            flat_views[k, offsets[n] : offsets[n + 1]] = torch.tensor(per_view[k])
    weights = torch.ones(total)
    chosen = sorted(view_logps)
    if chosen and num_views >= 2:
        stacked, mask = stack_views(
            [torch.tensor(view_logps[n], dtype=torch.float32).reshape(num_views, -1) for n in chosen]
        )
        if objective is None or objective.agreement == "none":
            objective = ObjectiveConfig(agreement="token")
        # The shard is the batch here (faithful = per-batch quantiles): these weights are for inspection only.
        w = agreement_weights(stacked, mask, **{**objective.agreement_kwargs(), "faithful": True})
        for j, n in enumerate(chosen):
            weights[offsets[n] : offsets[n + 1]] = w[j, : lengths[n]]
    out = {
        "offsets": offsets,
        "view_logps": flat_views.contiguous(),
        "has_views": has_views,
        "weights": weights,
    }
    if teacher:  # the teacher pass ran (its signal chose the budget's items): kept for inspection
        empty: tuple[list[float], None] = ([], None)
        flat = [v for n in range(len(ys)) for v in teacher.get(n, empty)[0]]
        out["teacher_logps"] = torch.tensor(flat, dtype=torch.float32).reshape(-1)
    if uncertainty is not None:
        out["uncertainty"] = torch.tensor(uncertainty, dtype=torch.float32)
    return out


def run_scoring(
    cfg: ScoringConfig,
    *,
    model_spec: str,
    prepared_dir: str | Path,
    contexts_dir: str | Path,
    rollout_dirs: Sequence[str | Path],
    out_dir: str | Path,
    objective=None,
    model=None,
    tokenizer=None,
) -> dict:
    """Scoring stage for one shard (index range over the rolled-out items): the c*-teacher on every
    completion → uncertainty → the K views on the `budget` most uncertain → scores.safetensors.

    `objective` (an ObjectiveConfig; default: token agreement) sets how the inspection weights are computed;
    the trainer recomputes them per batch anyway.
    """
    from unisd.models import load_model, load_tokenizer

    out_dir = Path(out_dir)
    train_file, ctx_file = Path(prepared_dir) / "train.jsonl", Path(contexts_dir) / "contexts.jsonl"
    stage = begin_stage(
        "score",
        out_dir,
        config={**cfg.model_dump(), "model": model_spec},
        inputs=[train_file, ctx_file, *[Path(d) / "completions.jsonl" for d in rollout_dirs]],
        model=model_spec,
    )
    if stage.done:
        return stage.done
    timer = stage.timer
    prepared, contexts, completions, ids = _shard_inputs(cfg, train_file, ctx_file, rollout_dirs)
    with timer("load"):
        tokenizer = tokenizer or load_tokenizer(model_spec)
        model = model or load_model(model_spec)
    pad_id = tokenizer.pad_token_id
    ys = [completions[i]["completion_ids"] for i in ids]
    scorable = [n for n, y in enumerate(ys) if y]
    rows = [prepared[i] for i in ids]
    teacher, student = score_teacher_and_student(model, rows, ys, scorable, cfg, pad_id=pad_id, timer=timer)
    rollout_logps = (
        _rollout_logps(completions, ids, rollout_dirs) if cfg.uncertainty == "student_surprisal" else []
    )
    uncertainty = uncertainty_of(cfg, teacher, student, rollout_logps, ys)
    chosen = _choose_for_views(uncertainty, scorable, cfg.budget)
    views_of = [contexts[i]["views"] for i in ids]
    with timer("views"):
        view_logps = score_chosen_views(model, views_of, ys, chosen, cfg, pad_id=pad_id)
    num_views = len(views_of[0]) if ids else 0
    tensors = pack_scores(ys, teacher, view_logps, num_views, uncertainty, objective)
    _write_scores(out_dir, tensors, ids)
    counts = _scoring_counts(cfg, ids, scorable, chosen, num_views, student, completions, tensors["weights"])
    return stage.finish(counts=counts)


def _shard_inputs(
    cfg: ScoringConfig, train_file: Path, ctx_file: Path, rollout_dirs: Sequence[str | Path]
) -> tuple[dict[str, dict], dict[str, dict], dict[str, dict], list[str]]:
    """Returns (prepared rows by id, contexts rows by id, completions by id, this shard's sorted item ids)."""
    prepared = {r["id"]: r for r in read_jsonl(train_file)}
    contexts = {r["id"]: r for r in read_jsonl(ctx_file)}
    completions = load_completions(rollout_dirs)
    ids = sorted(i for i in completions if i in prepared)
    ids = ids[slice(*shard_range(len(ids), cfg.num_shards, cfg.shard_index))]
    return prepared, contexts, completions, ids


def _rollout_logps(completions: dict[str, dict], ids: list[str], rollout_dirs) -> list[list[float]]:
    """The rollout's log-prob of every completion token, per item of the shard (what student_surprisal reads)."""
    out = []
    for i in ids:
        row = completions[i]
        logps = row.get("logps")
        if not isinstance(logps, list) or len(logps) != len(row["completion_ids"]):
            raise ValueError(
                f"rollout {', '.join(map(str, rollout_dirs))}: item {i} has no log-prob per completion token "
                f"(field 'logps'), which scoring.uncertainty=student_surprisal reads; rerun the rollout with this "
                "version, or choose scoring.uncertainty=teacher_entropy"
            )
        out.append(logps)
    return out


def _choose_for_views(uncertainty: Sequence[float] | None, scorable: list[int], budget: float) -> list[int]:
    """Returns the items (indices into the shard) that get the K-view re-scoring, in shard order (all of them
    when there is no signal: budget 1)."""
    if uncertainty is None:
        return list(scorable)
    picked = select_for_budget([uncertainty[n] for n in scorable], budget) if scorable else set()
    return [scorable[j] for j in sorted(picked)]


def _write_scores(out_dir: Path, tensors: dict[str, torch.Tensor], ids: list[str]) -> None:
    """Writes scores.safetensors (atomically) and ids.json to `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "scores.safetensors") as tmp:
        save_file(tensors, str(tmp))
    write_json(out_dir / "ids.json", ids)


def _scoring_counts(
    cfg: ScoringConfig,
    ids: list[str],
    scorable: list[int],
    chosen: list[int],
    num_views: int,
    student: dict[int, list[float]],
    completions: dict[str, dict],
    weights: torch.Tensor,
) -> dict:
    """Returns the manifest counts: items, views scored, staleness against the rollout, weight range."""
    # Staleness: how far the student's log-probs now are from the ones the rollout recorded.
    staleness = [
        abs(a - b) for n, lp in student.items() for a, b in zip(completions[ids[n]].get("logps", []), lp)
    ]
    return {
        "items": len(ids),
        "empty_completions": len(ids) - len(scorable),
        "scored_views": len(chosen),
        "num_views": num_views,
        "view_rows": len(chosen) * num_views,
        "budget": cfg.budget,
        "staleness_mean_abs_logp": (sum(staleness) / len(staleness)) if staleness else None,
        "weight_min": float(weights.min()) if weights.numel() else None,
        "weight_mean": float(weights.mean()) if weights.numel() else None,
        "weight_max": float(weights.max()) if weights.numel() else None,
    }


def load_scores(dirs: Sequence[str | Path]) -> dict[str, dict[str, torch.Tensor]]:
    """Merge scoring shards into {id: {"view_logps": [K, T] or None, "weights": [T], "teacher_logps": [T] or
    None}}: teacher_logps only where the budget's signal ran a teacher pass."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for d in dirs:
        d = Path(d)
        tensors = load_file(str(d / "scores.safetensors"))
        ids = read_json(d / "ids.json")
        off = tensors["offsets"].tolist()
        for n, item_id in enumerate(ids):
            a, b = off[n], off[n + 1]
            out[item_id] = {
                "view_logps": tensors["view_logps"][:, a:b] if bool(tensors["has_views"][n]) else None,
                "weights": tensors["weights"][a:b],
                "teacher_logps": tensors["teacher_logps"][a:b] if "teacher_logps" in tensors else None,
            }
    return out
