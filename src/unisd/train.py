"""Distillation trainer: records + rollouts + view log-probs (+ negatives) → a better student.

One optimizer step = one gradient-accumulation window of `grad_accum` micro-batches:

    for each micro-batch:
        student:  decoder(x + y)            → h^S [N, H]  (grad)
        teacher:  decoder(c* + x + y)       → h^T [N, H]  (no grad; frozen θ0 = adapter off, or EMA)
        negative: decoder(c⁻ + x + y)       → ℓ^−  [N]    (no grad; only when the contrastive term is on)
        loss = L_KD(h^S, h^T; agreement weights, clipping) + λc L_CL + λf L_FM   (chunked over the vocab)
        loss.backward()      # normalised over the whole window: summing micro-batches divides once
    clip grad norm → AdamW → cosine schedule → EMA teacher update every N steps → checkpoint every M steps

Agreement weights come from the scoring stage's per-token view log-probs, recomputed for each window so the
quantile is a statistic of the global batch (all ranks), as ALGORITHM.md asks.

Exact resume: a checkpoint holds the trainable weights, optimizer, scheduler, EMA teacher, every RNG state
and the data position (epoch, micro-batch index), so a killed run resumes to the same final weights.

Two rollout modes: `staged` consumes the rollout/scoring artifacts (what the KFP DAG does, R rounds);
`online` generates and scores the window's completions with the current student inside the loop (the
paper's colocated protocol).
"""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from unisd.artifacts import begin_stage, read_json, read_jsonl, write_json, write_jsonl
from unisd.config import StrictModel
from unisd.objective import LOSS_TERMS, ObjectiveConfig, compute_objective
from unisd.sequences import (
    build_teacher_forcing_batch,
    completion_hidden,
    lm_head_of,
    logit_softcap_of,
    paired_completion_hidden,
    stack_views,
)

log = logging.getLogger(__name__)
# Per-micro-batch stats that are shares of the window total (summed over micro-batches, not averaged).
ADDITIVE_STATS = frozenset({*LOSS_TERMS, "num_tokens", "num_sequences", "kd/num_tokens"})


class LoraSettings(StrictModel):
    enabled: bool = True
    r: int = Field(64, ge=1)  # reference: r=64, alpha=128, dropout 0.05 on all projections
    alpha: int = Field(128, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], min_length=1
    )


class TrainConfig(StrictModel):
    mode: Literal["staged", "online"] = "staged"
    lora: LoraSettings = LoraSettings()
    lr: float = Field(2e-5, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    micro_batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(4, ge=1)
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)  # optimizer steps; None = epochs over the data
    checkpoint_every: int = Field(50, ge=1)  # optimizer steps between checkpoints
    keep_checkpoints: int = Field(2, ge=1)
    seed: int = Field(0, ge=0)
    # bf16 on GPU, fp32 on CPU
    dtype: Literal["auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16", "float64"] = "auto"
    gradient_checkpointing: bool = False  # recompute activations in backward (less memory, ≈ +30% compute)
    max_bad_fraction: float = Field(
        0.1, ge=0.0, le=1.0
    )  # hard stop when more items than this are skipped as bad
    # Rollouts cut at max_new_tokens (no EOS) are dropped, not trained on (DAPO's overlong filtering): a
    # small model's cut rollouts are mostly loops, and distilling them teaches the loop.
    drop_truncated: bool = False
    deepspeed: Literal["none", "zero2", "zero3"] = "none"
    save_merged: bool = True  # also save merged full weights (what the next round's rollout loads)
    init_adapter: str | None = None  # continue from a previous round's adapter
    init_teacher: str | None = (
        None  # ...and its EMA teacher (ema_teacher.safetensors), so the EMA spans rounds
    )
    # online mode only
    online_max_new_tokens: int = Field(128, ge=1)
    online_temperature: float = Field(0.7, ge=0.0)
    online_decode: Literal["hf", "pruned"] = "hf"


class BadInputError(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------------------
# data


def train_inputs(
    prepared_dir: str | Path,
    contexts_dir: str | Path | None,
    rollout_dirs: Sequence[str | Path],
    score_dirs: Sequence[str | Path],
) -> list[Path]:
    """The files the train stage reads (its inputs hash)."""
    paths = [Path(prepared_dir) / "train.jsonl"]
    if contexts_dir:
        paths.append(Path(contexts_dir) / "contexts.jsonl")
    paths += [Path(d) / "completions.jsonl" for d in rollout_dirs]
    paths += [Path(d) / name for d in score_dirs for name in ("scores.safetensors", "ids.json")]
    return paths


def gold_completion_ids(row: dict[str, Any], tokenizer) -> list[int]:
    """The SFT target of a prepared row: its gold completion (student answer format) + EOS."""
    from unisd.data.prompts import gold_completion
    from unisd.data.records import Record

    text = gold_completion(Record.from_dict(row["record"]))
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def load_training_items(
    prepared_dir: str | Path,
    contexts_dir: str | Path | None,
    rollout_dirs: Sequence[str | Path],
    score_dirs: Sequence[str | Path],
    *,
    need_views: bool,
    need_negatives: bool,
    gold_tokenizer=None,
    drop_truncated: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Join the stage artifacts by item id; count (not hide) items that can't be trained on.

    `gold_tokenizer` (SFT): every item's completion is its gold completion, tokenized with it."""
    from unisd.rollout import load_completions
    from unisd.scoring import load_scores

    prepared = read_jsonl(Path(prepared_dir) / "train.jsonl")
    contexts = {r["id"]: r for r in read_jsonl(Path(contexts_dir) / "contexts.jsonl")} if contexts_dir else {}
    completions = load_completions(rollout_dirs) if rollout_dirs else {}
    scores = load_scores(score_dirs) if score_dirs else {}
    skipped = {"no_completion": 0, "empty_completion": 0, "no_context": 0, "no_negative": 0}
    items = []
    for row in prepared:
        item = {
            "id": row["id"],
            "student_prompt_ids": row["student_prompt_ids"],
            "teacher_prompt_ids": row["teacher_prompt_ids"],
        }
        if gold_tokenizer is not None:
            item["completion_ids"] = gold_completion_ids(row, gold_tokenizer)
        elif completions:
            comp = completions.get(row["id"])
            if comp is None:
                skipped["no_completion"] += 1
                continue
            if not comp["completion_ids"]:
                skipped["empty_completion"] += 1
                continue
            if drop_truncated and not comp.get("finished", True):
                skipped["truncated"] = skipped.get("truncated", 0) + 1
                continue
            item["completion_ids"] = comp["completion_ids"]
        ctx = contexts.get(row["id"])
        if (need_views or need_negatives) and contexts and ctx is None:
            skipped["no_context"] += 1  # dropped by the contexts stage (length limits)
            continue
        if need_negatives:
            if not ctx or not ctx.get("negative"):
                skipped["no_negative"] += 1
                continue
            item["negative_prompt_ids"] = ctx["negative"]["prompt_ids"]
        if need_views and ctx:
            item["view_prompt_ids"] = [v["prompt_ids"] for v in ctx["views"]]
            item["view_context_ids"] = [v.get("context_id") for v in ctx["views"]]
        score = scores.get(row["id"])
        if score is not None and score["view_logps"] is not None:
            item["view_logps"] = score["view_logps"]  # [K, T]
        items.append(item)
    return items, skipped


def epoch_order(n_items: int, seed: int, epoch: int) -> list[int]:
    return random.Random(f"{seed}:{epoch}").sample(range(n_items), n_items)


# ----------------------------------------------------------------------------------------------------------
# model, optimizer, schedule


def cosine_with_warmup(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_student(model_spec: str, cfg: TrainConfig, device: str):
    from unisd.models import load_model

    dtype = cfg.dtype if cfg.dtype != "auto" else None
    model = load_model(model_spec, device=device, dtype=dtype)
    if cfg.lora.enabled:
        from peft import LoraConfig, PeftModel, get_peft_model

        if cfg.init_adapter:
            model = PeftModel.from_pretrained(model, cfg.init_adapter, is_trainable=True)
        else:
            present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
            targets = [t for t in cfg.lora.target_modules if t in present]
            if not targets:
                raise ValueError(
                    f"none of the LoRA target modules {cfg.lora.target_modules} exist in {model_spec}"
                )
            model = get_peft_model(
                model,
                LoraConfig(
                    r=cfg.lora.r,
                    lora_alpha=cfg.lora.alpha,
                    lora_dropout=cfg.lora.dropout,
                    target_modules=targets,
                    task_type="CAUSAL_LM",
                ),
            )
    if cfg.gradient_checkpointing:
        # Recompute each decoder layer's activations in backward instead of keeping them: the activations of
        # a micro-batch are most of a train step's memory (≈ 30 layers × B × L × (4H + 3I) floats for SmolLM2).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.lora.enabled:
            model.enable_input_require_grads()  # the frozen embeddings must hand a graph to the first layer
    model.train()
    return model


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def deepspeed_config(stage: str, cfg: TrainConfig) -> dict[str, Any]:
    """DeepSpeed config for ZeRO-2/3 (multi-GPU; on CPU: DS_ACCELERATOR=cpu torchrun + gloo, see STACK.md)."""
    zero = {"stage": 2 if stage == "zero2" else 3, "overlap_comm": True, "contiguous_gradients": True}
    if stage == "zero3":
        zero.update(stage3_gather_16bit_weights_on_model_save=True, stage3_param_persistence_threshold=1e5)
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.max_grad_norm,
        "bf16": {"enabled": torch.cuda.is_available()},
        "zero_optimization": zero,
    }


# ----------------------------------------------------------------------------------------------------------
# checkpoints


def save_checkpoint(
    ckpt_dir: Path, *, model, optimizer, scheduler, teacher, state: dict[str, Any], keep: int
) -> Path:
    """Atomically write checkpoints/step-XXXXXX/ (tmp dir + rename), then prune old ones."""
    final = ckpt_dir / f"step-{state['step']:06d}"
    tmp = ckpt_dir / f".tmp-step-{state['step']:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(
        {
            "trainable": trainable_state(model),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "teacher": teacher_state(teacher),
            "rng": rng_state(),
        },
        tmp / "state.pt",
    )
    write_json(tmp / "trainer_state.json", state)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(ckpt_dir.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def teacher_state(teacher) -> dict[str, Any]:
    """What a checkpoint needs to restore the teacher exactly: its step counters and its weights
    (EMA copy for full fine-tuning, the teacher adapter for LoRA EMA; nothing for a frozen θ0)."""
    state: dict[str, Any] = {
        k: getattr(teacher, k) for k in ("optimizer_steps", "updates") if hasattr(teacher, k)
    }
    if hasattr(teacher, "pairs"):  # LoRA EMA: the teacher adapter's tensors
        state["adapter"] = [t.detach().clone() for t, _ in teacher.pairs]
    elif teacher.kind == "ema":
        state["model"] = {k: v.detach().clone() for k, v in teacher.model.state_dict().items()}
    return state


@torch.no_grad()
def load_teacher_state(teacher, state: dict[str, Any]) -> None:
    for key in ("optimizer_steps", "updates"):
        if key in state:
            setattr(teacher, key, state[key])
    if "adapter" in state:
        for (t, _), saved in zip(teacher.pairs, state["adapter"]):
            t.copy_(saved)
    elif "model" in state:
        teacher.model.load_state_dict(state["model"])


EMA_TEACHER_FILE = "ema_teacher.safetensors"


def save_teacher_weights(teacher, path: Path) -> Path:
    """The LoRA EMA teacher adapter's tensors (in pair order) as safetensors."""
    from safetensors.torch import save_file

    from unisd.artifacts import atomic_path

    with atomic_path(path) as tmp:
        save_file(
            {f"{i:05d}": t.detach().contiguous().cpu() for i, (t, _) in enumerate(teacher.pairs)}, str(tmp)
        )
    return path


@torch.no_grad()
def load_teacher_weights(teacher, path: str | Path) -> None:
    """Continue a previous round's LoRA EMA teacher (see save_teacher_weights)."""
    from safetensors.torch import load_file

    if not hasattr(teacher, "pairs"):
        raise ValueError(f"init_teacher={path}: only a LoRA EMA teacher carries weights between rounds")
    saved = load_file(str(path))
    if len(saved) != len(teacher.pairs):
        raise ValueError(
            f"{path}: {len(saved)} teacher tensors, the model's adapter has {len(teacher.pairs)}"
        )
    for (phi, _), key in zip(teacher.pairs, sorted(saved)):
        phi.copy_(saved[key].to(phi.dtype))
    teacher.initial = [phi.detach().clone() for phi, _ in teacher.pairs]


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    done = sorted(p for p in ckpt_dir.glob("step-*") if (p / "trainer_state.json").exists())
    return done[-1] if done else None


def load_checkpoint(path: Path, *, model, optimizer, scheduler, teacher) -> dict[str, Any]:
    blob = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in blob["trainable"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    load_teacher_state(teacher, blob["teacher"])
    set_rng_state(blob["rng"])
    return read_json(path / "trainer_state.json")


# ----------------------------------------------------------------------------------------------------------
# one micro-batch


def micro_batch_loss(
    model,
    teacher,
    objective: ObjectiveConfig,
    items: Sequence[dict[str, Any]],
    *,
    pad_id: int,
    weights_by_item: dict[str, torch.Tensor] | None,
    normalizers,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Forward passes + objective for one micro-batch; returns (loss to backward, stats)."""
    from unisd.objective import compute_sft_objective
    from unisd.objective.losses import sampled_token_logprobs

    device = next(model.parameters()).device
    completions = [it["completion_ids"] for it in items]
    student_batch = build_teacher_forcing_batch(
        [it["student_prompt_ids"] for it in items], completions, pad_id=pad_id
    ).to(device)
    mask, tokens = student_batch.completion_mask, student_batch.completion_ids
    h_student = completion_hidden(model, student_batch)  # [B, T, H], grad
    if objective.is_sft:  # no teacher: cross-entropy on the gold completion
        return compute_sft_objective(
            objective,
            student_hidden=h_student,
            student_head_weight=lm_head_of(model).weight,
            tokens=tokens,
            mask=mask,
            normalizers=normalizers,
            logit_softcap=logit_softcap_of(model),
        )
    softcap = logit_softcap_of(model)
    negative_logps = negative_hidden = None
    with teacher.forward_context() as teacher_model:
        if objective.uses_negative:  # c* and c⁻ share x: one pass, the prefix computed once
            h_teacher, negative_hidden = paired_completion_hidden(
                teacher_model,
                [it["teacher_prompt_ids"] for it in items],
                [it["negative_prompt_ids"] for it in items],
                completions,
                pad_id=pad_id,
            )
            head = teacher.head_weight()
            negative_logps = sampled_token_logprobs(
                negative_hidden,
                lm_head_of(model).weight.detach() if head is None else head,
                tokens,
                temperature=objective.loss_temperature,
                chunk_size=objective.chunk_size,
                logit_softcap=softcap,
            )
        else:
            teacher_prompts = [it["teacher_prompt_ids"] for it in items]
            teacher_batch = build_teacher_forcing_batch(teacher_prompts, completions, pad_id=pad_id).to(
                device
            )
            h_teacher = completion_hidden(teacher_model, teacher_batch)
    token_weights = None
    if weights_by_item is not None:
        token_weights = torch.zeros(mask.shape, dtype=torch.float32)
        for row, it in enumerate(items):
            w = weights_by_item[it["id"]]
            token_weights[row, : len(w)] = w
        token_weights = token_weights.to(device)
    return compute_objective(
        objective,
        student_hidden=h_student,
        student_head_weight=lm_head_of(model).weight,
        teacher_hidden=h_teacher,
        teacher_head_weight=teacher.head_weight(),
        tokens=tokens,
        mask=mask,
        token_weights=token_weights,
        negative_logps=negative_logps,
        negative_hidden=negative_hidden if objective.contrastive_variant == "distribution" else None,
        normalizers=normalizers,
        logit_softcap=softcap,
    )


# ----------------------------------------------------------------------------------------------------------
# the loop


def _completion_mask(items: Sequence[dict[str, Any]]) -> torch.Tensor:
    """[B, T] validity mask from completion lengths (no forward needed)."""
    lengths = [len(it["completion_ids"]) for it in items]
    return torch.arange(max(1, max(lengths))).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)


def window_weights(
    objective: ObjectiveConfig, window: Sequence[dict[str, Any]], micro_batch_size: int
) -> dict[str, torch.Tensor] | None:
    """Agreement weights {item id: [T]} for one accumulation window.

    The token-level quantile is a statistic of the global batch (the whole window, all ranks);
    `faithful` computes it per micro-batch, as the reference does. Items without view log-probs
    (outside the scoring budget) get weight 1.
    """
    from unisd.objective.reliability import agreement_weights

    if not objective.uses_views:
        return None
    out: dict[str, torch.Tensor] = {it["id"]: torch.ones(len(it["completion_ids"])) for it in window}
    groups = (
        [window[i : i + micro_batch_size] for i in range(0, len(window), micro_batch_size)]
        if objective.faithful
        else [window]
    )
    for group in groups:
        scored = [it for it in group if it.get("view_logps") is not None]
        if not scored:
            continue
        views, mask = stack_views([it["view_logps"] for it in scored])
        weights = agreement_weights(views, mask, **objective.agreement_kwargs())
        for b, it in enumerate(scored):
            out[it["id"]] = weights[b, : len(it["completion_ids"])]
    return out


def window_normalizer_counts(
    window: Sequence[dict[str, Any]],
    weights: dict[str, torch.Tensor] | None,
    micro_batch_size: int,
    *,
    faithful: bool = False,
):
    from unisd.objective import window_normalizers

    micro = [window[i : i + micro_batch_size] for i in range(0, len(window), micro_batch_size)]
    masks = [_completion_mask(m) for m in micro]
    if weights is None:
        return window_normalizers(masks, faithful=faithful)
    per_micro = []
    for m, mask in zip(micro, masks):
        w = torch.zeros(mask.shape)
        for row, it in enumerate(m):
            w[row, : len(weights[it["id"]])] = weights[it["id"]]
        per_micro.append(w)
    return window_normalizers(masks, per_micro, faithful=faithful)


def _online_refresh(model, tokenizer, teacher, objective, window, cfg: TrainConfig, step: int) -> None:
    """Online mode: the current student writes this window's completions, then the views score them."""
    from unisd.rollout import RolloutConfig, generate
    from unisd.scoring import score_views

    rollout_cfg = RolloutConfig(
        temperature=cfg.online_temperature,
        max_new_tokens=cfg.online_max_new_tokens,
        seed=cfg.seed,
        decode=cfg.online_decode,
    )
    was_training = model.training
    model.eval()
    with torch.no_grad():
        results = generate(
            model,
            tokenizer,
            [it["student_prompt_ids"] for it in window],
            rollout_cfg,
            first_index=step * len(window),
        )
        for it, (ids, _, _) in zip(window, results):
            it["completion_ids"] = ids or [tokenizer.eos_token_id]
        if objective.uses_views:
            rows, owners = [], []
            for n, it in enumerate(window):
                for prompt, key in zip(it["view_prompt_ids"], it["view_context_ids"]):
                    rows.append((prompt, it["completion_ids"], key))
                    owners.append(n)
            with teacher.forward_context() as teacher_model:
                scored = score_views(
                    teacher_model,
                    rows,
                    pad_id=tokenizer.pad_token_id,
                    batch_size=len(rows),
                    chunk_size=objective.chunk_size,
                    progress=False,
                )
            per_item: dict[int, list[list[float]]] = {}
            for n, lp in zip(owners, scored):
                per_item.setdefault(n, []).append(lp)
            for n, it in enumerate(window):
                it["view_logps"] = torch.tensor(per_item[n], dtype=torch.float32)
    model.train(was_training)


def build_models(cfg: TrainConfig, objective: ObjectiveConfig, model_spec: str):
    """(tokenizer, student, teacher) on the default device; the teacher per the objective (SFT: none used)."""
    from unisd.models import default_device, load_tokenizer
    from unisd.objective.teacher import build_teacher

    tokenizer = load_tokenizer(model_spec)
    model = build_student(model_spec, cfg, default_device())
    teacher = build_teacher(
        "frozen" if objective.is_sft else objective.teacher,
        model,
        beta=objective.ema_beta,
        every=objective.ema_every,
        schedule=objective.effective_ema_schedule,
        faithful=objective.faithful,
    )
    if cfg.init_teacher:
        load_teacher_weights(teacher, cfg.init_teacher)
    return tokenizer, model, teacher


def check_items(items: list[dict[str, Any]], skipped: dict[str, int], cfg: TrainConfig) -> None:
    """Refuse to train on nothing, or on what is left after too many unusable items."""
    n_skipped = sum(
        n for reason, n in skipped.items() if reason != "truncated"
    )  # truncated: dropped by policy
    if not items:
        raise BadInputError(f"no trainable items (skipped: {skipped}); check the rollout/contexts artifacts")
    if n_skipped > cfg.max_bad_fraction * (len(items) + n_skipped):
        raise BadInputError(
            f"{n_skipped}/{len(items) + n_skipped} items unusable ({skipped}) — over "
            f"max_bad_fraction={cfg.max_bad_fraction}; refusing to train on what is left"
        )
    if sum(skipped.values()):
        log.warning("skipping %d items: %s", sum(skipped.values()), skipped)


def total_steps_for(cfg: TrainConfig, n_items: int) -> int:
    window_size = cfg.micro_batch_size * cfg.grad_accum
    steps_per_epoch = max(1, n_items // window_size)
    return cfg.max_steps or steps_per_epoch * cfg.epochs


def accumulate_window(
    model,
    teacher,
    objective: ObjectiveConfig,
    window: Sequence[dict[str, Any]],
    *,
    micro_batch_size: int,
    pad_id: int,
) -> tuple[dict[str, float], int]:
    """Forward + backward over one gradient-accumulation window (gradients accumulate in .grad).

    Returns (the window's stats, items skipped for a non-finite loss). Loss terms and counts of the
    micro-batches are shares of the window total and are summed (logged = optimised); means are
    averaged over the window's items.
    """
    weights = window_weights(objective, window, micro_batch_size)
    normalizers = window_normalizer_counts(window, weights, micro_batch_size, faithful=objective.faithful)
    stats: dict[str, float] = {}
    bad = 0
    for m in range(0, len(window), micro_batch_size):
        micro = window[m : m + micro_batch_size]
        loss, micro_stats = micro_batch_loss(
            model, teacher, objective, micro, pad_id=pad_id, weights_by_item=weights, normalizers=normalizers
        )
        if not torch.isfinite(loss):
            bad += len(micro)
            log.warning("non-finite loss in micro-batch %d of the window: skipped", m // micro_batch_size)
            continue
        loss.backward()
        for k, v in micro_stats.items():
            share = 1.0 if k in ADDITIVE_STATS else len(micro) / len(window)
            stats[k] = stats.get(k, 0.0) + float(v) * share
    return stats, bad


def apply_update(params, optimizer, scheduler, teacher, max_grad_norm: float) -> float:
    """Clip the gradient norm, step the optimizer (skipped when the norm is not finite), the schedule and the
    teacher; returns the gradient norm."""
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if torch.isfinite(grad_norm):
        optimizer.step()
    else:
        log.warning("non-finite gradient norm: optimizer step skipped")
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    teacher.step()
    return float(grad_norm)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


@dataclass
class TrainingRun:
    """The state of one training run between optimizer steps: what a checkpoint saves and restores."""

    cfg: TrainConfig
    objective: ObjectiveConfig
    tokenizer: Any
    model: Any
    teacher: Any
    items: list[dict[str, Any]]
    params: list[torch.Tensor]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    total_steps: int
    state: dict[str, Any]
    started: float = 0.0
    tokens_seen: int = 0

    @classmethod
    def create(cls, cfg, objective, tokenizer, model, teacher, items) -> TrainingRun:
        total = total_steps_for(cfg, len(items))
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        schedule = cosine_with_warmup(total, int(cfg.warmup_ratio * total))
        state = {"step": 0, "epoch": 0, "position": 0, "bad_items": 0, "seen_items": 0}
        run = cls(cfg, objective, tokenizer, model, teacher, items, params, optimizer, None, total, state)
        run.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        run.started = time.perf_counter()
        return run

    @property
    def window_size(self) -> int:
        return self.cfg.micro_batch_size * self.cfg.grad_accum

    @property
    def done(self) -> bool:
        return self.state["step"] >= self.total_steps

    def resume(self, ckpt_dir: Path, inputs_hash: str) -> None:
        """Continue from the latest checkpoint, if it was written for the same inputs (refuse otherwise)."""
        if (ckpt := latest_checkpoint(ckpt_dir)) is not None:
            if read_json(ckpt / "trainer_state.json").get("inputs_hash") != inputs_hash:
                raise ValueError(
                    f"{ckpt_dir} holds checkpoints of an unfinished run with other settings or inputs; resuming "
                    "would mix the two. Rerun with --restart to discard them, or use a new --out"
                )
            parts = dict(
                model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, teacher=self.teacher
            )
            self.state = load_checkpoint(ckpt, **parts)
            log.info("resumed from %s (step %d)", ckpt, self.state["step"])
        self.state["inputs_hash"] = inputs_hash

    def next_window(self) -> list[dict[str, Any]]:
        """The next accumulation window of the seeded epoch order (online: completions of the current student)."""
        state = self.state
        order = epoch_order(len(self.items), self.cfg.seed, state["epoch"])
        if state["position"] + self.window_size > len(order) and state["position"] > 0:
            state["epoch"], state["position"] = state["epoch"] + 1, 0
            order = epoch_order(len(self.items), self.cfg.seed, state["epoch"])
        window = [self.items[i] for i in order[state["position"] : state["position"] + self.window_size]]
        if self.cfg.mode == "online" and self.objective.uses_rollouts:
            window = [dict(it) for it in window]
            _online_refresh(
                self.model, self.tokenizer, self.teacher, self.objective, window, self.cfg, state["step"]
            )
        return window

    def step(self, window: list[dict[str, Any]]) -> dict[str, Any]:
        """One optimizer step on `window`; returns its metrics record."""
        state, cfg = self.state, self.cfg
        stats, bad = accumulate_window(
            self.model,
            self.teacher,
            self.objective,
            window,
            micro_batch_size=cfg.micro_batch_size,
            pad_id=self.tokenizer.pad_token_id,
        )
        state["bad_items"] += bad
        state["seen_items"] += len(window)
        if state["bad_items"] > cfg.max_bad_fraction * max(state["seen_items"], self.window_size):
            raise BadInputError(
                f"{state['bad_items']} of {state['seen_items']} items gave non-finite losses "
                f"(max_bad_fraction={cfg.max_bad_fraction}); stopping"
            )
        grad_norm = apply_update(self.params, self.optimizer, self.scheduler, self.teacher, cfg.max_grad_norm)
        state["step"] += 1
        state["position"] += self.window_size
        self.tokens_seen += int(stats.get("num_tokens", 0))
        return {
            "step": state["step"],
            **{k: round(v, 6) for k, v in stats.items()},
            **self.teacher.drift(),
            "train/grad_norm": grad_norm,
            "train/lr": self.scheduler.get_last_lr()[0],
            "train/tokens_per_s": self.tokens_seen / max(time.perf_counter() - self.started, 1e-9),
            "train/bad_items": state["bad_items"],
        }

    def checkpoint(self, ckpt_dir: Path) -> None:
        parts = dict(
            model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, teacher=self.teacher
        )
        save_checkpoint(ckpt_dir, **parts, state=self.state, keep=self.cfg.keep_checkpoints)


def items_for(cfg, objective, tokenizer, prepared_dir, contexts_dir, rollout_dirs, score_dirs):
    """The training items this run uses: staged rollouts + scores, or (online / SFT) the prepared rows alone."""
    online = cfg.mode == "online" and objective.uses_rollouts
    staged = cfg.mode == "staged" and objective.uses_rollouts
    items, skipped = load_training_items(
        prepared_dir,
        contexts_dir,
        rollout_dirs if staged else [],
        score_dirs if staged else [],
        need_views=online and objective.uses_views,
        need_negatives=objective.uses_negative,
        gold_tokenizer=tokenizer if objective.is_sft else None,
        drop_truncated=cfg.drop_truncated,
    )
    check_items(items, skipped, cfg)
    return items, skipped


def run_train(
    cfg: TrainConfig,
    objective: ObjectiveConfig,
    *,
    model_spec: str,
    prepared_dir: str | Path,
    out_dir: str | Path,
    contexts_dir: str | Path | None = None,
    rollout_dirs: Sequence[str | Path] = (),
    score_dirs: Sequence[str | Path] = (),
    log_metrics: Callable[[dict[str, float], int], None] | None = None,
    stop_after_steps: int | None = None,
    restart: bool = False,
) -> dict[str, Any]:
    """Train stage. Resumes from the latest checkpoint in `out_dir/checkpoints` when it was written with the
    same settings and inputs (refuses otherwise; `restart` discards it).

    Writes `out_dir/adapter` (LoRA) and/or `out_dir/merged` (full HF model dir), `metrics.jsonl`,
    `manifest.json`. `stop_after_steps` ends the process early (used to test kill-and-resume).
    """
    out_dir = Path(out_dir)
    ckpt_dir, metrics_path = out_dir / "checkpoints", out_dir / "metrics.jsonl"
    stage = begin_stage(
        "train",
        out_dir,
        config={"train": cfg.model_dump(), "objective": objective.model_dump(), "model": model_spec},
        inputs=train_inputs(prepared_dir, contexts_dir, rollout_dirs, score_dirs),
        model=cfg.init_adapter,
    )
    if stage.done:
        log.info("train: %s is complete for these inputs", out_dir)
        return stage.done
    if stage.stale or restart:  # the checkpoints are another run's: start fresh, never mix
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        metrics_path.unlink(missing_ok=True)
    seed_everything(cfg.seed)
    with stage.timer("load"):
        tokenizer, model, teacher = build_models(cfg, objective, model_spec)
    items, skipped = items_for(
        cfg, objective, tokenizer, prepared_dir, contexts_dir, rollout_dirs, score_dirs
    )
    run = TrainingRun.create(cfg, objective, tokenizer, model, teacher, items)
    run.resume(ckpt_dir, stage.inputs_hash)
    history = [
        h
        for h in (read_jsonl(metrics_path) if metrics_path.exists() else [])
        if h["step"] <= run.state["step"]
    ]
    from tqdm.auto import tqdm

    bar = tqdm(total=run.total_steps, initial=run.state["step"], desc="train", unit="step")
    while not run.done:
        with stage.timer("step"):
            record = run.step(run.next_window())
        history.append(record)
        if log_metrics:
            log_metrics({k: v for k, v in record.items() if k != "step"}, record["step"])
        bar.update(1)
        bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}")
        if record["step"] % cfg.checkpoint_every == 0 or run.done:
            write_jsonl(metrics_path, history)
            run.checkpoint(ckpt_dir)
        if stop_after_steps is not None and stop_after_steps <= record["step"] and not run.done:
            bar.close()
            return {"stopped_at": record["step"]}
    bar.close()
    with stage.timer("save"):
        write_jsonl(metrics_path, history)
        export = save_trained_model(model, tokenizer, out_dir, cfg)
        if objective.teacher == "ema" and hasattr(teacher, "pairs"):  # LoRA EMA: the next round continues it
            export["ema_teacher"] = str(save_teacher_weights(teacher, out_dir / EMA_TEACHER_FILE))
    counts = {
        "items": len(items),
        "skipped": skipped,
        "steps": run.state["step"],
        "bad_items": run.state["bad_items"],
        "tokens": int(sum(h.get("num_tokens", 0) for h in history)),
        "final": history[-1] if history else {},
    }
    return stage.finish(counts=counts, extra={"export": export})


def save_trained_model(model, tokenizer, out_dir: Path, cfg: TrainConfig) -> dict[str, str]:
    """Save the adapter (LoRA) and/or merged full weights as HF folders; returns their paths."""
    export: dict[str, str] = {}
    model.eval()
    if cfg.lora.enabled:
        adapter_dir = out_dir / "adapter"
        model.save_pretrained(adapter_dir, selected_adapters=["default"])
        export["adapter"] = str(adapter_dir)
    if cfg.save_merged or not cfg.lora.enabled:
        merged_dir = out_dir / "merged"
        merged = _merged_copy(model) if cfg.lora.enabled else model
        merged.save_pretrained(merged_dir, safe_serialization=True)
        tokenizer.save_pretrained(merged_dir)
        export["merged"] = str(merged_dir)
    return export


def _merged_copy(peft_model):
    """A plain model with the student ("default") LoRA adapter folded in; the training model is untouched."""
    import copy

    clone = copy.deepcopy(peft_model)
    if "teacher" in getattr(clone, "peft_config", {}):
        clone.delete_adapter("teacher")
    clone.set_adapter("default")
    return clone.merge_and_unload()
