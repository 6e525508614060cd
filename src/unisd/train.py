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
from pydantic import Field, model_validator

from unisd import distributed
from unisd.artifacts import begin_stage, progress_dir, read_json, read_jsonl, write_json, write_jsonl
from unisd.config import StrictModel
from unisd.distributed import DeepSpeedEngine, PlainEngine, Precision, Ranks, TorchEngine, current_ranks
from unisd.host_memory import release_before_each_layer
from unisd.objective import LOSS_TERMS, ObjectiveConfig, compute_objective
from unisd.rollout import DecodePath
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
    # CPU only: hand freed heap memory back to the OS before each decoder layer (unisd.host_memory); glibc
    # otherwise keeps a step's resident set near twice what is live. Same numbers; with gradient
    # checkpointing the train step's peak goes 5.0 -> 2.1 GiB (SmolLM2, micro-batch 4) for +9-12% step time.
    # On tcmalloc (unisd.allocator, the `unisd` command's default where installed) it is not needed.
    release_host_memory: bool = False
    max_bad_fraction: float = Field(
        0.1, ge=0.0, le=1.0
    )  # hard stop when more items than this are skipped as bad
    # Rollouts cut at max_new_tokens (no EOS) are dropped, not trained on (DAPO's overlong filtering): a
    # small model's cut rollouts are mostly loops, and distilling them teaches the loop.
    drop_truncated: bool = False
    # Distributed engine (under torchrun): none = one process or DDP; zero2 / zero3 = DeepSpeed ZeRO (full
    # fine-tuning; LoRA: none or zero2). See unisd.distributed.
    deepspeed: Literal["none", "zero2", "zero3"] = "none"
    offload_optimizer: bool = False  # DeepSpeed: AdamW states in CPU memory (DeepSpeedCPUAdam)
    zero3_persistence_threshold: int = Field(
        100_000, ge=0
    )  # ZeRO-3: params below this many elements stay whole
    # fp32: fp32 parameters + optimizer (master weights), forward under autocast at `dtype` (DeepSpeed: bf16
    # parameters, fp32 master partitions). compute: parameters stored and updated in `dtype` (pure bf16 —
    # most small updates round away; only to compare).
    master_weights: Literal["fp32", "compute"] = "fp32"
    skip_memory_check: bool = False  # train even when the memory estimate exceeds the device
    save_merged: bool = True  # also save merged full weights (what the next round's rollout loads)
    init_adapter: str | None = None  # LoRA: continue from a previous round's adapter
    init_model: str | None = None  # full fine-tuning: continue from a previous round's merged weights
    init_teacher: str | None = (
        None  # ...and its EMA teacher (ema_teacher.safetensors), so the EMA spans rounds
    )
    # online mode only
    online_max_new_tokens: int = Field(128, ge=1)
    online_temperature: float = Field(0.7, ge=0.0)
    online_decode: DecodePath = "hf"
    # hf: generate with the training model; vllm: a colocated vLLM engine (sleep while training, weights
    # synced after every optimizer window). vLLM is CUDA-only: never run on this project's CI machines.
    online_backend: Literal["hf", "vllm"] = "hf"
    # staleness = mean |log p_rollout − log p_trainer| of the window's sampled tokens under the current student
    staleness_warn: float = Field(0.05, gt=0.0)  # log a warning above this (vLLM bf16 healthy ≈ 0.01–0.02)
    staleness_fail: float = Field(0.2, gt=0.0)  # fail the step above this (≈ 0.2: stale weights)

    @model_validator(mode="after")
    def _engine_fits_the_adapter(self) -> TrainConfig:
        if self.lora.enabled and self.deepspeed == "zero3":
            raise ValueError(
                "train.deepspeed=zero3 partitions the frozen base too; LoRA trains with deepspeed none (DDP) or "
                "zero2"
            )
        if self.offload_optimizer and self.deepspeed == "none":
            raise ValueError("train.offload_optimizer needs train.deepspeed=zero2 or zero3")
        if self.init_model and self.lora.enabled:
            raise ValueError(
                "train.init_model continues full fine-tuning; LoRA rounds continue train.init_adapter"
            )
        if self.staleness_fail < self.staleness_warn:
            raise ValueError("train.staleness_fail must be ≥ train.staleness_warn")
        return self


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


def precision_for(cfg: TrainConfig, device: str) -> Precision:
    """Compute dtype (`train.dtype`; auto = bf16 on GPU, fp32 on CPU) and where the master weights live."""
    from unisd.models import _resolve_dtype

    return Precision(
        compute=_resolve_dtype(cfg.dtype, device),
        master=cfg.master_weights,
        device_type=torch.device(device).type,
    )


def build_student(model_spec: str, cfg: TrainConfig, device: str, precision: Precision | None = None):
    """The student: `model_spec` (or a previous round's `init_model`) + the LoRA adapter when enabled.

    Storage dtype: full fine-tuning keeps fp32 parameters (the master weights; `master_weights=compute` stores
    them in the compute dtype); LoRA keeps the frozen base in the compute dtype and peft keeps the adapter in
    fp32."""
    from unisd.models import load_model

    precision = precision or precision_for(cfg, device)
    dtype = precision.compute if cfg.lora.enabled else precision.storage
    model = load_model(cfg.init_model or model_spec, device=device, dtype=dtype)
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
    if cfg.release_host_memory and torch.device(device).type == "cpu":
        release_before_each_layer(model)
    model.train()
    return model


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict[str, Any]:
    # numpy's state as plain ints + a tensor, so the checkpoint loads with torch.load(weights_only=True)
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = {
        "kind": kind,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rank_layout(cfg: TrainConfig, world: int) -> tuple[int, int]:
    """(micro-batch size, micro-batches) of one rank: the global window of micro_batch_size × grad_accum items
    splits evenly over the ranks, each rank's share into micro-batches of at most micro_batch_size."""
    window = cfg.micro_batch_size * cfg.grad_accum
    if window % world:
        raise ValueError(
            f"the window of micro_batch_size × grad_accum = {window} items does not split over {world} ranks; "
            "make it a multiple of the number of ranks"
        )
    share = window // world
    micro = min(cfg.micro_batch_size, share)
    return micro, -(-share // micro)


def deepspeed_config(cfg: TrainConfig, world: int = 1) -> dict[str, Any]:
    """The DeepSpeed config of a ZeRO-2/3 run of `cfg` over `world` ranks (see unisd.distributed)."""
    micro, accum = rank_layout(cfg, world)
    return distributed.deepspeed_config(
        cfg.deepspeed,
        micro_batch_size=micro,
        grad_accum=accum,
        world=world,
        max_grad_norm=cfg.max_grad_norm,
        bf16=torch.cuda.is_available() and cfg.dtype in ("auto", "bf16", "bfloat16"),
        offload_optimizer=cfg.offload_optimizer,
        param_persistence_threshold=cfg.zero3_persistence_threshold,
    )


def make_engine(cfg: TrainConfig, model, total_steps: int, ranks: Ranks, precision: Precision):
    """DDP / one process (deepspeed=none) or DeepSpeed ZeRO-2/3, with AdamW and the cosine schedule."""
    opt = dict(
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        schedule=cosine_with_warmup(total_steps, int(cfg.warmup_ratio * total_steps)),
        ranks=ranks,
        precision=precision,
    )
    if cfg.deepspeed == "none":
        return TorchEngine(model, **opt)
    return DeepSpeedEngine(model, **opt, config=deepspeed_config(cfg, ranks.world))


# ----------------------------------------------------------------------------------------------------------
# checkpoints


CHECKPOINT_FORMAT = 2


def save_checkpoint(ckpt_dir: Path, run: TrainingRun) -> Path | None:
    """checkpoints/step-XXXXXX/ written atomically (a tmp dir renamed by rank 0), then old ones pruned.

    Rank 0 writes `state.pt` (the engine's state when it is not partitioned, the teacher, every rank's RNG
    state) and `trainer_state.json` (step, data position); under DeepSpeed every rank also writes its partition
    of the model / optimizer into `engine/`. A collective: every rank calls it."""
    state, ranks = run.state, run.ranks
    final = ckpt_dir / f"step-{state['step']:06d}"
    tmp = ckpt_dir / f".tmp-step-{state['step']:06d}"
    rngs = distributed.all_gather_objects(rng_state())
    teacher = teacher_state(run.teacher)  # ZeRO-3: gathered (a collective)
    if ranks.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier()
    run.engine.save_shards(tmp / "engine")
    distributed.barrier()
    if ranks.main:
        blob = {
            "format": CHECKPOINT_FORMAT,
            "world": ranks.world,
            "engine_kind": run.engine.kind,
            "engine": run.engine.state_dict(),
            "teacher": teacher,
            "rng": rngs,
        }
        torch.save(blob, tmp / "state.pt")
        write_json(tmp / "trainer_state.json", state)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(ckpt_dir.glob("step-*"))[: -run.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return final if ranks.main else None


def load_checkpoint(path: Path, run: TrainingRun) -> dict[str, Any]:
    """Restore `run` from a checkpoint every rank reads (a collective under DeepSpeed / ZeRO-3)."""
    import pickle

    try:  # tensors and plain values only: a planted checkpoint cannot run code
        blob = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path / 'state.pt'} holds objects other than tensors and plain values; refusing to load it "
            f"({str(err).splitlines()[0]}). Rerun with --restart to discard it"
        ) from None
    if blob.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} was written by an older unisd (checkpoint format); rerun with --restart")
    if blob["engine_kind"] != run.engine.kind:
        raise ValueError(
            f"{path} was written by a {blob['engine_kind']} run, this one is {run.engine.kind}: resuming needs "
            "the same engine and number of ranks (rerun with --restart to start over)"
        )
    if blob["world"] != run.ranks.world:
        raise ValueError(
            f"{path} was written by {blob['world']} ranks, this run has {run.ranks.world}: an exact resume "
            "needs the same number (rerun with --restart to start over)"
        )
    run.engine.load_state_dict(blob["engine"])
    run.engine.load_shards(path / "engine")
    load_teacher_state(run.teacher, blob["teacher"])
    set_rng_state(blob["rng"][run.ranks.rank])
    return read_json(path / "trainer_state.json")


def teacher_state(teacher) -> dict[str, Any]:
    """What a checkpoint needs to restore the teacher exactly: its step counters and its weights
    (EMA copy for full fine-tuning, the teacher adapter's fp32 masters for LoRA EMA; nothing for a frozen θ0).
    ZeRO-3: gathered (a collective)."""
    state: dict[str, Any] = {
        k: getattr(teacher, k) for k in ("optimizer_steps", "updates") if hasattr(teacher, k)
    }
    if hasattr(teacher, "pairs"):  # LoRA EMA: the teacher adapter's tensors
        state["adapter"] = [t.detach().clone() for t in teacher.masters]
    elif teacher.kind == "ema":
        state["model"] = teacher.state_tensors()
    return state


@torch.no_grad()
def load_teacher_state(teacher, state: dict[str, Any]) -> None:
    for key in ("optimizer_steps", "updates"):
        if key in state:
            setattr(teacher, key, state[key])
    if "adapter" in state:
        teacher.load_masters(state["adapter"])
    elif "model" in state:
        teacher.load_state_tensors(state["model"])


EMA_TEACHER_FILE = "ema_teacher.safetensors"


def save_teacher_weights(teacher, path: Path, *, main: bool = True) -> Path:
    """The EMA teacher's weights as safetensors: the LoRA teacher adapter's tensors (in pair order), or the full
    fine-tuning EMA model by parameter name (ZeRO-3: gathered — a collective; rank 0 writes)."""
    from safetensors.torch import save_file

    from unisd.artifacts import atomic_path

    if hasattr(teacher, "pairs"):
        tensors = {f"{i:05d}": t.detach().contiguous().cpu() for i, t in enumerate(teacher.masters)}
    else:
        tensors = {k: v.contiguous() for k, v in teacher.state_tensors().items()}
    if main:
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp))
    return path


@torch.no_grad()
def load_teacher_weights(teacher, path: str | Path) -> None:
    """Continue a previous round's EMA teacher (see save_teacher_weights)."""
    from safetensors.torch import load_file

    saved = load_file(str(path))
    if hasattr(teacher, "pairs"):
        if len(saved) != len(teacher.pairs):
            raise ValueError(
                f"{path}: {len(saved)} teacher tensors, the model's adapter has {len(teacher.pairs)}"
            )
        teacher.load_masters([saved[key] for key in sorted(saved)])
        teacher.initial = [phi.detach().clone() for phi, _ in teacher.pairs]
    elif getattr(teacher, "kind", None) == "ema":
        teacher.load_state_tensors(saved)
    else:
        raise ValueError(f"init_teacher={path}: only an EMA teacher carries weights between rounds")


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    done = sorted(p for p in ckpt_dir.glob("step-*") if (p / "trainer_state.json").exists())
    return done[-1] if done else None


# ----------------------------------------------------------------------------------------------------------
# one micro-batch


@dataclass
class TeacherOutputs:
    """The no-grad teacher side of one micro-batch."""

    hidden: torch.Tensor  # [B, T, H] c*-teacher at the completion positions
    head: torch.Tensor | None  # [V, H] teacher LM head (None: the student's)
    negative_logps: torch.Tensor | None = None  # [B, T] c⁻-teacher ℓ^− at the loss temperature
    negative_hidden: torch.Tensor | None = None  # [B, T, H] c⁻-teacher hidden states


def _student_batch(items, pad_id, device):
    completions = [it["completion_ids"] for it in items]
    return build_teacher_forcing_batch(
        [it["student_prompt_ids"] for it in items], completions, pad_id=pad_id
    ).to(device)


@torch.no_grad()
def teacher_pass(
    model, teacher, objective: ObjectiveConfig, items, *, pad_id: int, engine=None
) -> TeacherOutputs:
    """c*-teacher (and c⁻-teacher) hidden states of one micro-batch, no grad, under the run's autocast.

    Under ZeRO-3 the teacher is partitioned and every forward is a collective, so the c*/c⁻ pair runs as two
    plain passes (the shared-prefix pass makes a data-dependent number of calls)."""
    from unisd.objective.losses import sampled_token_logprobs

    engine = engine or PlainEngine(model)
    device = next(model.parameters()).device
    completions = [it["completion_ids"] for it in items]
    with engine.precision.autocast(), teacher.forward_context() as teacher_model:
        head = teacher.head_weight()
        if not objective.uses_negative:
            batch = build_teacher_forcing_batch(
                [it["teacher_prompt_ids"] for it in items], completions, pad_id=pad_id
            ).to(device)
            return TeacherOutputs(completion_hidden(teacher_model, batch), head)
        positives = [it["teacher_prompt_ids"] for it in items]
        negatives = [it["negative_prompt_ids"] for it in items]
        if engine.partitioned:
            h_teacher, negative_hidden = (
                completion_hidden(
                    teacher_model, build_teacher_forcing_batch(p, completions, pad_id=pad_id).to(device)
                )
                for p in (positives, negatives)
            )
        else:  # c* and c⁻ share x: one pass, the prefix computed once
            h_teacher, negative_hidden = paired_completion_hidden(
                teacher_model, positives, negatives, completions, pad_id=pad_id
            )
        tokens = build_teacher_forcing_batch(positives, completions, pad_id=pad_id).completion_ids.to(device)
        negative_head = head
        if negative_head is None:
            negative_head = distributed.full_copy(lm_head_of(model).weight)
        negative_logps = sampled_token_logprobs(
            negative_hidden,
            negative_head,
            tokens,
            temperature=objective.loss_temperature,
            chunk_size=objective.chunk_size,
            logit_softcap=logit_softcap_of(model),
        )
    return TeacherOutputs(h_teacher, head, negative_logps, negative_hidden)


def _token_weights(items, weights_by_item, mask):
    if weights_by_item is None:
        return None
    token_weights = torch.zeros(mask.shape, dtype=torch.float32)
    for row, it in enumerate(items):
        w = weights_by_item[it["id"]]
        token_weights[row, : len(w)] = w
    return token_weights.to(mask.device)


def micro_batch_loss(
    model,
    teacher,
    objective: ObjectiveConfig,
    items: Sequence[dict[str, Any]],
    *,
    pad_id: int,
    weights_by_item: dict[str, torch.Tensor] | None,
    normalizers,
    engine=None,
    teacher_outputs: TeacherOutputs | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Forward passes + objective for one micro-batch; returns (loss to backward, stats).

    The student side (decoder → hidden states → the objective over the LM head) is one call of the engine's
    step module, so DDP / DeepSpeed see all of it."""
    from unisd.objective import compute_sft_objective

    engine = engine or PlainEngine(model)
    device = next(model.parameters()).device
    batch = _student_batch(items, pad_id, device)
    mask, tokens = batch.completion_mask, batch.completion_ids
    softcap = logit_softcap_of(model)
    if objective.is_sft:  # no teacher: cross-entropy on the gold completion

        def sft_loss(h_student, w_student):
            return compute_sft_objective(
                objective,
                student_hidden=h_student,
                student_head_weight=w_student,
                tokens=tokens,
                mask=mask,
                normalizers=normalizers,
                logit_softcap=softcap,
            )

        return engine.forward(batch, sft_loss)
    t = teacher_outputs or teacher_pass(model, teacher, objective, items, pad_id=pad_id, engine=engine)
    token_weights = _token_weights(items, weights_by_item, mask)

    def distill_loss(h_student, w_student):
        return compute_objective(
            objective,
            student_hidden=h_student,
            student_head_weight=w_student,
            teacher_hidden=t.hidden,
            teacher_head_weight=t.head,
            tokens=tokens,
            mask=mask,
            token_weights=token_weights,
            negative_logps=t.negative_logps,
            negative_hidden=t.negative_hidden if objective.contrastive_variant == "distribution" else None,
            normalizers=normalizers,
            logit_softcap=softcap,
        )

    return engine.forward(batch, distill_loss)


# ----------------------------------------------------------------------------------------------------------
# the loop


def _completion_mask(items: Sequence[dict[str, Any]]) -> torch.Tensor:
    """[B, T] validity mask from completion lengths (no forward needed)."""
    lengths = [len(it["completion_ids"]) for it in items]
    return torch.arange(max(1, max(lengths))).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)


def window_weights(
    objective: ObjectiveConfig, window: Sequence[dict[str, Any]], micro_batch_size: int
) -> dict[str, torch.Tensor] | None:
    """Agreement weights {item id: [T]} for one accumulation window (this rank's share of it).

    The token-level quantile is a statistic of the global batch (the whole window, all ranks: a collective
    that every rank joins, also one with no scored item); `faithful` computes it per micro-batch on each rank,
    as the reference does. Items without view log-probs (outside the scoring budget) get weight 1.
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
    collective = not objective.faithful and objective.agreement == "token" and current_ranks().distributed
    for group in groups:
        scored = [it for it in group if it.get("view_logps") is not None]
        if not scored:
            if collective:  # join the all-gather of the global quantile with nothing to add
                empty = torch.zeros(objective.num_views, 0, 1)
                agreement_weights(empty, torch.zeros(0, 1, dtype=torch.bool), **objective.agreement_kwargs())
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


@torch.no_grad()
def window_clip_threshold(
    model, objective: ObjectiveConfig, micro: Sequence[Sequence[dict]], teachers, *, pad_id: int, engine
) -> float:
    """The quantile clipping threshold c over every valid token of the global window (all ranks' micro-batches):
    a no-grad pass of the current student (eval mode: no dropout) over the window first, as ALGORITHM.md asks.
    (Without it c would be a statistic of one micro-batch: batch-composition dependent.)"""
    from unisd.objective.losses import chunked_token_divergence, clip_threshold, flatten_valid

    device = next(model.parameters()).device
    softcap = logit_softcap_of(model)
    values = []
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        for items, t in zip(micro, teachers):
            batch = _student_batch(items, pad_id, device)
            flat_index, _ = flatten_valid(batch.completion_mask)

            def divergence(h_student, w_student, t=t, flat_index=flat_index):
                def flat(x):
                    return x.reshape(-1, x.shape[-1])[flat_index]

                return chunked_token_divergence(
                    flat(h_student),
                    w_student,
                    flat(t.hidden),
                    t.head,
                    kind=objective.divergence,
                    beta=objective.jsd_beta,
                    alpha=objective.skew_alpha,
                    temperature=objective.loss_temperature,
                    chunk_size=objective.chunk_size,
                    logit_softcap=softcap,
                )

            values.append(engine.forward_no_grad(batch, divergence).float().reshape(-1))
    finally:
        for m, mode in modes:
            m.training = mode
    all_values = torch.cat(values) if values else torch.zeros(0)
    return float(clip_threshold(all_values, "quantile", quantile=objective.clip_quantile))


def accumulate_window(
    model,
    teacher,
    objective: ObjectiveConfig,
    window: Sequence[dict[str, Any]],
    *,
    micro_batch_size: int,
    pad_id: int,
    engine=None,
) -> tuple[dict[str, float], int]:
    """Forward + backward over one gradient-accumulation window — this rank's share of it (gradients
    accumulate in .grad / the engine's buffers; the engine reduces them over ranks).

    Returns (this rank's stats, items skipped for a non-finite loss). Loss terms and counts of the
    micro-batches are shares of the window total and are summed (logged = optimised); means are
    averaged over the window's items. A micro-batch whose loss is not finite is skipped with a zero backward
    so that every rank makes the same collective calls.
    """
    engine = engine or PlainEngine(model)
    micro = distributed.micro_batches(window, micro_batch_size)
    size = len(micro[0]) if micro else micro_batch_size
    weights = window_weights(objective, window, size)
    normalizers = window_normalizer_counts(window, weights, size, faithful=objective.faithful)
    teachers: list[TeacherOutputs | None] = [None] * len(micro)
    if objective.clip == "quantile" and not objective.faithful and not objective.is_sft:
        teachers = [teacher_pass(model, teacher, objective, m, pad_id=pad_id, engine=engine) for m in micro]
        threshold = window_clip_threshold(model, objective, micro, teachers, pad_id=pad_id, engine=engine)
        objective = objective.model_copy(update={"clip": "static", "clip_value": threshold})
    stats: dict[str, float] = {}
    bad = 0
    device = next(model.parameters()).device
    for index, items in enumerate(micro):
        with engine.micro(last=index == len(micro) - 1):
            loss, micro_stats = micro_batch_loss(
                model,
                teacher,
                objective,
                items,
                pad_id=pad_id,
                weights_by_item=weights,
                normalizers=normalizers,
                engine=engine,
                teacher_outputs=teachers[index],
            )
            if not torch.isfinite(loss):
                bad += len(items)
                log.warning("non-finite loss in micro-batch %d of the window: skipped", index)
                loss, micro_stats = engine.forward(
                    distributed.dummy_batch(pad_id, device), distributed.zero_loss
                )
                micro_stats = {}
            engine.backward(loss)
        for k, v in micro_stats.items():
            share = 1.0 if k in ADDITIVE_STATS else len(items) / len(window)
            stats[k] = stats.get(k, 0.0) + float(v) * share
    return stats, bad


def apply_update(params, optimizer, scheduler, teacher, max_grad_norm: float) -> float:
    """Clip the gradient norm, step the optimizer (skipped when the norm is not finite), the schedule and the
    teacher; returns the gradient norm. (One process without an engine: bench/, objective-diff.)"""
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


# ----------------------------------------------------------------------------------------------------------
# online mode: generation with the current student, staleness


class StaleRolloutError(RuntimeError):
    """The rollout engine's log-probs disagree with the trainer's for the current student (stale weights)."""


def export_weights(model):
    """(HF parameter name, full tensor) of the current student as a plain model — LoRA folded in (W + ΔW), peft
    prefixes and adapter tensors dropped; ZeRO-3 parameters gathered one at a time. What a vLLM weight sync loads."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    lora_layers = {
        name: module
        for name, module in base.named_modules()
        if isinstance(module, BaseTunerLayer) and hasattr(module, "base_layer")
    }
    for name, param in base.named_parameters():
        if ".lora_" in name or "lora_magnitude" in name or ".modules_to_save." in name:
            continue
        owner = name.rsplit(".", 2)[0] if ".base_layer." in name else None
        value = distributed.full_copy(param)
        if owner is not None and owner in lora_layers and name.endswith("base_layer.weight"):
            layer = lora_layers[owner]
            with distributed.full_parameters(p for p in layer.parameters()):
                delta = sum(
                    (layer.get_delta_weight(a) for a in layer.active_adapters if a in layer.lora_A),
                    torch.zeros_like(value),
                )
            value = value + delta.to(value.dtype)
        yield name.replace(".base_layer.", "."), value


class HFGenerator:
    """Online generation with the training model itself (HF generate / the pruned decode loop)."""

    backend = "hf"

    def __init__(self, tokenizer, cfg: TrainConfig):
        from unisd.rollout import RolloutConfig

        self.tokenizer = tokenizer
        self.rollout_cfg = RolloutConfig(
            temperature=cfg.online_temperature,
            max_new_tokens=cfg.online_max_new_tokens,
            seed=cfg.seed,
            decode=cfg.online_decode,
            backend="hf",
        )

    def generate(self, model, prompts, *, first_index: int):
        from unisd.rollout import generate

        return generate(model, self.tokenizer, prompts, self.rollout_cfg, first_index=first_index)

    def before_training(self) -> None:
        pass

    def after_update(self, model) -> None:
        pass


class VLLMGenerator(HFGenerator):
    """Online generation with a vLLM engine colocated on this rank's GPU: it sleeps (level 1) while the trainer
    runs the window and, after every optimizer step, wakes up and loads the current weights — in that order,
    because waking restores the weights offloaded at sleep time (see unisd.rollout.VLLMRollout)."""

    backend = "vllm"

    def __init__(self, tokenizer, cfg: TrainConfig, model_path: str, model, ranks: Ranks):
        from unisd.rollout import VLLMRollout

        super().__init__(tokenizer, cfg)
        self.rollout_cfg = self.rollout_cfg.model_copy(
            update={"backend": "vllm", "seed": cfg.seed + ranks.rank}
        )
        self.engine = VLLMRollout(model_path, self.rollout_cfg, colocated=ranks.distributed)
        self.engine.sync_weights(export_weights(model))  # a resumed run's weights, not the checkpoint on disk

    def generate(self, model, prompts, *, first_index: int):
        return self.engine.generate(prompts, first_index=first_index)

    def before_training(self) -> None:
        self.engine.sleep()

    def after_update(self, model) -> None:
        self.engine.wake_up()
        self.engine.sync_weights(export_weights(model))


def make_generator(cfg: TrainConfig, objective, tokenizer, model, model_spec: str, ranks: Ranks):
    if not (cfg.mode == "online" and objective.uses_rollouts):
        return None
    if cfg.online_backend == "vllm":
        from unisd.models import resolve_model_path

        log.warning(
            "online generation with vLLM (train.online_backend=vllm): coded against vLLM's API, never executed "
            "in this project's CI (no CUDA there)"
        )
        return VLLMGenerator(tokenizer, cfg, resolve_model_path(cfg.init_model or model_spec), model, ranks)
    return HFGenerator(tokenizer, cfg)


@torch.no_grad()
def rollout_staleness(model, rows, results, *, pad_id: int, chunk_size: int) -> dict[str, float]:
    """mean / max |log p_rollout − log p_trainer| over the window's sampled tokens, the trainer's log-probs from
    a teacher-forced pass of the current student (eval mode, temperature 1) — over every rank's share."""
    from unisd.scoring import score_views

    abs_sum, count, worst = 0.0, 0, 0.0
    scored_rows = [(prompt, ids, None) for prompt, (ids, _, _) in zip(rows, results) if ids]
    rollout = [lps for ids, _, lps in results if ids]
    if scored_rows:
        with distributed.full_parameters([lm_head_of(model).weight]):
            trainer = score_views(
                model,
                scored_rows,
                pad_id=pad_id,
                batch_size=len(scored_rows),
                chunk_size=chunk_size,
                progress=False,
            )
        for a, b in zip(rollout, trainer):
            n = min(len(a), len(b))
            diff = (torch.tensor(a[:n], dtype=torch.float64) - torch.tensor(b[:n], dtype=torch.float64)).abs()
            abs_sum, count = abs_sum + float(diff.sum()), count + n
            worst = max(worst, float(diff.max()) if n else 0.0)
    parts = distributed.all_gather_objects((abs_sum, count, worst))
    total, tokens = sum(p[0] for p in parts), sum(p[1] for p in parts)
    return {
        "train/staleness": total / max(tokens, 1),
        "train/staleness_max": max(p[2] for p in parts),
        "rollout/tokens": float(tokens),
    }


def check_staleness(stats: dict[str, float], cfg: TrainConfig, step: int) -> None:
    value = stats["train/staleness"]
    if value > cfg.staleness_fail:
        raise StaleRolloutError(
            f"step {step}: rollout log-probs differ from the current student's by {value:.4f} on average "
            f"(> train.staleness_fail={cfg.staleness_fail}): the rollout engine is not generating with the weights "
            "being trained (a weight sync lost, e.g. done before wake_up)"
        )
    if value > cfg.staleness_warn:
        log.warning(
            "step %d: rollout staleness %.4f > train.staleness_warn=%s (healthy: ≈0 for HF, ≈0.01–0.02 for vLLM bf16)",
            step,
            value,
            cfg.staleness_warn,
        )


def _online_refresh(
    model,
    tokenizer,
    teacher,
    objective,
    window,
    cfg: TrainConfig,
    step: int,
    *,
    generator=None,
    engine=None,
    first_index: int | None = None,
) -> dict[str, float]:
    """Online mode: the current student writes this window's completions (HF or a colocated vLLM engine), the
    trainer measures their staleness, then the views score them. Returns the staleness stats (global)."""
    from unisd.scoring import score_views

    generator = generator or HFGenerator(tokenizer, cfg)
    engine = engine or PlainEngine(model)
    first_index = step * len(window) if first_index is None else first_index
    was_training = model.training
    model.eval()
    # ZeRO-3: whole parameters for the window's generation and scoring (data-dependent numbers of forwards
    # would otherwise desynchronise the ranks' collectives).
    partitioned = list(model.parameters()) + (list(teacher.model.parameters()) if engine.partitioned else [])
    with torch.no_grad(), distributed.full_parameters(partitioned if engine.partitioned else []):
        prompts = [it["student_prompt_ids"] for it in window]
        with engine.precision.autocast():
            results = generator.generate(model, prompts, first_index=first_index)
        generator.before_training()
        for it, (ids, _, _) in zip(window, results):
            it["completion_ids"] = ids or [tokenizer.eos_token_id]
        with engine.precision.autocast():  # the trainer's log-probs as training computes them
            stats = rollout_staleness(
                model, prompts, results, pad_id=tokenizer.pad_token_id, chunk_size=objective.chunk_size
            )
        if objective.uses_views:
            rows, owners = [], []
            for n, it in enumerate(window):
                for prompt, key in zip(it["view_prompt_ids"], it["view_context_ids"]):
                    rows.append((prompt, it["completion_ids"], key))
                    owners.append(n)
            with engine.precision.autocast(), teacher.forward_context() as teacher_model:
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
    return stats


# ----------------------------------------------------------------------------------------------------------
# models, memory


def build_models(
    cfg: TrainConfig, objective: ObjectiveConfig, model_spec: str, *, ranks: Ranks | None = None
):
    """(tokenizer, student, teacher) on this rank's device; the teacher per the objective (SFT: none used).

    Full fine-tuning: the frozen teacher is θ₀ (`model_spec`, also in later rounds that continue `init_model`),
    the EMA teacher starts as a copy of the student; both are fp32 (the EMA's small increments round away in
    bf16) and, under ZeRO-3, partitioned like the student."""
    from unisd.models import load_model, load_tokenizer
    from unisd.objective.teacher import build_teacher, frozen_copy

    ranks = ranks or current_ranks()
    device = distributed.device_for(ranks)
    precision = precision_for(cfg, device)
    tokenizer = load_tokenizer(model_spec)
    model = build_student(model_spec, cfg, device, precision)
    kind = "frozen" if objective.is_sft else objective.teacher
    teacher_model = None
    if not cfg.lora.enabled:
        if kind == "frozen" and cfg.init_model:
            teacher_model = load_model(model_spec, device=device, dtype=precision.storage)
        elif cfg.deepspeed == "zero3":
            teacher_model = frozen_copy(model)
        if teacher_model is not None and cfg.deepspeed == "zero3":
            teacher_model = distributed.partitioned_copy(teacher_model, deepspeed_config(cfg, ranks.world))
    teacher = build_teacher(
        kind,
        model,
        beta=objective.ema_beta,
        every=objective.ema_every,
        schedule=objective.effective_ema_schedule,
        faithful=objective.faithful,
        teacher_model=teacher_model,
    )
    if cfg.init_teacher:
        load_teacher_weights(teacher, cfg.init_teacher)
    return tokenizer, model, teacher


def meta_student(model_spec: str, cfg: TrainConfig):
    """The student's architecture on the meta device (no memory): what the memory estimate counts."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from unisd.models import describe_spec, load_model, resolve_model_path

    spec = cfg.init_model or model_spec
    with torch.device("meta"):
        if describe_spec(spec) in ("tiny", "random"):
            model = load_model(spec, device="meta", dtype="float32")
        else:
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(resolve_model_path(spec)))
        if cfg.lora.enabled:
            from peft import LoraConfig, get_peft_model

            present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
            targets = [t for t in cfg.lora.target_modules if t in present] or None
            model = get_peft_model(
                model, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, target_modules=targets)
            )
    return model


def memory_estimate(cfg: TrainConfig, objective, model, items, ranks: Ranks, device: str):
    """The per-rank memory estimate of this run at its data's lengths (see unisd.distributed.estimate_memory)."""
    online = cfg.mode == "online" and objective.uses_rollouts
    completion = (
        cfg.online_max_new_tokens if online else max(len(it.get("completion_ids", ())) for it in items)
    )
    prompt = max(len(it["student_prompt_ids"]) for it in items)
    available = distributed.available_memory(device)
    if available is not None and not str(device).startswith("cuda"):
        available //= int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # ranks on one machine share its RAM
    micro, _ = rank_layout(cfg, ranks.world)
    return distributed.estimate_memory(
        model,
        lora=cfg.lora.enabled,
        engine=cfg.deepspeed,
        world=ranks.world,
        precision=precision_for(cfg, device),
        micro_batch_size=micro,
        sequence_length=prompt + completion,
        completion_length=completion,
        teacher=objective.teacher,
        num_views=objective.num_views if (online and objective.uses_views) else 0,
        chunk_size=objective.chunk_size,
        gradient_checkpointing=cfg.gradient_checkpointing,
        offload_optimizer=cfg.offload_optimizer,
        device=device,
        available=available,
    )


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


# ----------------------------------------------------------------------------------------------------------
# the run


@dataclass
class TrainingRun:
    """The state of one training run between optimizer steps: what a checkpoint saves and restores.

    Every rank holds one; they agree on `state` (step, data position, bad items) after every step."""

    cfg: TrainConfig
    objective: ObjectiveConfig
    tokenizer: Any
    model: Any
    teacher: Any
    items: list[dict[str, Any]]
    engine: Any
    total_steps: int
    state: dict[str, Any]
    ranks: Ranks
    generator: Any = None
    started: float = 0.0
    tokens_seen: int = 0
    pending: dict[str, float] | None = None  # online: the window's staleness stats, logged with its step

    @classmethod
    def create(
        cls, cfg, objective, tokenizer, model, teacher, items, *, ranks: Ranks | None = None, model_spec=None
    ) -> TrainingRun:
        ranks = ranks or current_ranks()
        rank_layout(cfg, ranks.world)  # refuse a window that does not split over the ranks, before any work
        total = total_steps_for(cfg, len(items))
        device = str(next(model.parameters()).device)
        engine = make_engine(cfg, model, total, ranks, precision_for(cfg, device))
        state = {"step": 0, "epoch": 0, "position": 0, "bad_items": 0, "seen_items": 0}
        run = cls(cfg, objective, tokenizer, model, teacher, items, engine, total, state, ranks)
        run.generator = make_generator(cfg, objective, tokenizer, model, model_spec or "", ranks)
        run.started = time.perf_counter()
        return run

    @property
    def params(self) -> list[torch.Tensor]:
        return self.engine.params

    @property
    def optimizer(self):
        return self.engine.optimizer

    @property
    def scheduler(self):
        return self.engine.scheduler

    @property
    def window_size(self) -> int:
        """Items per optimizer step, over all ranks."""
        return self.cfg.micro_batch_size * self.cfg.grad_accum

    @property
    def done(self) -> bool:
        return self.state["step"] >= self.total_steps

    def resume(self, ckpt_dir: Path, inputs_hash: str) -> None:
        """Continue from the latest checkpoint, if it was written for the same inputs (refuse otherwise). Rank 0
        picks the checkpoint; every rank restores it."""
        ckpt = distributed.broadcast_object(latest_checkpoint(ckpt_dir) if self.ranks.main else None)
        if ckpt is not None:
            if read_json(ckpt / "trainer_state.json").get("inputs_hash") != inputs_hash:
                raise ValueError(
                    f"{ckpt_dir} holds checkpoints of an unfinished run with other settings or inputs; resuming "
                    "would mix the two. Rerun with --restart to discard them, or use a new --out"
                )
            self.state = load_checkpoint(ckpt, self)
            log.info("resumed from %s (step %d)", ckpt, self.state["step"])
        self.state["inputs_hash"] = inputs_hash

    def next_window(self) -> list[dict[str, Any]]:
        """This rank's share of the next accumulation window of the seeded epoch order (online: completions of
        the current student)."""
        state = self.state
        order = epoch_order(len(self.items), self.cfg.seed, state["epoch"])
        if state["position"] + self.window_size > len(order) and state["position"] > 0:
            state["epoch"], state["position"] = state["epoch"] + 1, 0
            order = epoch_order(len(self.items), self.cfg.seed, state["epoch"])
        window = [self.items[i] for i in order[state["position"] : state["position"] + self.window_size]]
        share = distributed.rank_share(window, self.ranks)
        log.debug(
            "rank %d/%d: items %s of the window",
            self.ranks.rank,
            self.ranks.world,
            [it["id"] for it in share],
        )
        self.pending = None
        if self.generator is not None:
            share = [dict(it) for it in share]
            self.pending = _online_refresh(
                self.model,
                self.tokenizer,
                self.teacher,
                self.objective,
                share,
                self.cfg,
                state["step"],
                generator=self.generator,
                engine=self.engine,
                first_index=state["step"] * self.window_size + self.ranks.rank * len(share),
            )
            check_staleness(self.pending, self.cfg, state["step"] + 1)
        return share

    def step(self, window: list[dict[str, Any]]) -> dict[str, Any]:
        """One optimizer step on this rank's share `window` (a collective); returns the step's metrics record,
        the same on every rank."""
        state, cfg = self.state, self.cfg
        micro, _ = rank_layout(cfg, self.ranks.world)
        stats, bad = accumulate_window(
            self.model,
            self.teacher,
            self.objective,
            window,
            micro_batch_size=micro,
            pad_id=self.tokenizer.pad_token_id,
            engine=self.engine,
        )
        shares = distributed.all_gather_objects((stats, bad))
        stats = distributed.combine_window_stats(
            [s for s, _ in shares], additive=ADDITIVE_STATS, averaged_terms=LOSS_TERMS
        )
        state["bad_items"] += sum(b for _, b in shares)
        state["seen_items"] += self.window_size
        if state["bad_items"] > cfg.max_bad_fraction * max(state["seen_items"], self.window_size):
            raise BadInputError(
                f"{state['bad_items']} of {state['seen_items']} items gave non-finite losses "
                f"(max_bad_fraction={cfg.max_bad_fraction}); stopping"
            )
        grad_norm = self.engine.step(cfg.max_grad_norm)
        self.teacher.step()
        if self.generator is not None:
            self.generator.after_update(self.model)
        state["step"] += 1
        state["position"] += self.window_size
        self.tokens_seen += int(stats.get("num_tokens", 0))
        return {
            "step": state["step"],
            **{k: round(v, 6) for k, v in stats.items()},
            **(self.pending or {}),
            **self.teacher.drift(),
            "train/grad_norm": grad_norm,
            "train/lr": self.engine.lr,
            "train/tokens_per_s": self.tokens_seen / max(time.perf_counter() - self.started, 1e-9),
            "train/bad_items": state["bad_items"],
        }

    def checkpoint(self, ckpt_dir: Path) -> None:
        save_checkpoint(ckpt_dir, self)


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


NO_MODEL = (
    "no_model.json"  # a "previous round" folder that means the base model (pipeline_steps.starting_model)
)


def previous_round(
    previous: str | Path | None, cfg: TrainConfig, objective: ObjectiveConfig
) -> dict[str, str]:
    """The TrainConfig updates that make a round continue the previous round's train folder: its LoRA adapter
    (`init_adapter`) or, for full fine-tuning, its merged weights (`init_model`), and its EMA teacher."""
    if not previous or (Path(previous) / NO_MODEL).exists():
        return {}
    prev, updates = Path(previous), {}
    if cfg.lora.enabled and (prev / "adapter").exists():
        updates["init_adapter"] = str(prev / "adapter")
    elif not cfg.lora.enabled and (prev / "merged" / "config.json").exists():
        updates["init_model"] = str(prev / "merged")
    elif not cfg.lora.enabled:
        raise FileNotFoundError(f"{prev} holds no merged/ model: a full fine-tuning round continues from one")
    if objective.teacher == "ema" and (prev / EMA_TEACHER_FILE).exists():
        updates["init_teacher"] = str(prev / EMA_TEACHER_FILE)
    return updates


def _begin_stage(ranks: Ranks, **kw):
    """begin_stage on every rank, rank 0 first (it alone discards a stale manifest; the others then agree)."""
    stage = begin_stage("train", **kw) if ranks.main else None
    distributed.barrier()
    return stage if ranks.main else begin_stage("train", **kw)


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
    """Train stage, as one process or as every rank of a torchrun launch (WORLD_SIZE > 1: it joins the process
    group). Resumes from the latest checkpoint in `out_dir/checkpoints` when it was written with the same
    settings and inputs (refuses otherwise; `restart` discards it).

    Writes (rank 0) `out_dir/adapter` (LoRA) and/or `out_dir/merged` (full HF model dir), `metrics.jsonl`,
    `manifest.json`; returns the manifest on every rank. `stop_after_steps` ends early (kill-and-resume tests).
    """
    with distributed.process_group() as ranks:
        return _run_train(
            ranks,
            cfg,
            objective,
            model_spec=model_spec,
            prepared_dir=prepared_dir,
            out_dir=Path(out_dir),
            contexts_dir=contexts_dir,
            rollout_dirs=rollout_dirs,
            score_dirs=score_dirs,
            log_metrics=log_metrics,
            stop_after_steps=stop_after_steps,
            restart=restart,
        )


def check_memory_fits(cfg: TrainConfig, objective, model_spec: str, items, ranks: Ranks) -> None:
    """Estimate this run's memory per rank on the meta device (no weights loaded), log the table, and refuse a
    run that cannot fit before any model is loaded (`train.skip_memory_check` turns the refusal off)."""
    device = distributed.device_for(ranks)
    try:
        estimate = memory_estimate(cfg, objective, meta_student(model_spec, cfg), items, ranks, device)
    except Exception as err:  # an architecture the meta device cannot build: train without an estimate
        log.warning("no memory estimate for %s: %s", model_spec, err)
        return
    if ranks.main:
        log.info("%s", estimate.table())
    if not cfg.skip_memory_check:
        distributed.check_memory(
            estimate,
            lora=cfg.lora.enabled,
            engine=cfg.deepspeed,
            gradient_checkpointing=cfg.gradient_checkpointing,
        )


def train_until_done(
    run: TrainingRun,
    stage,
    history: list[dict],
    ckpt_dir: Path,
    metrics_path: Path,
    *,
    log_metrics,
    stop_after_steps,
) -> int | None:
    """The step loop: a window per optimizer step, metrics to MLflow and `metrics_path`, a checkpoint every
    `checkpoint_every` steps and at the end. Returns the step it stopped at early (`stop_after_steps`), else None."""
    from tqdm.auto import tqdm

    main = run.ranks.main
    bar = tqdm(total=run.total_steps, initial=run.state["step"], desc="train", unit="step", disable=not main)
    try:
        while not run.done:
            with stage.timer("step"):
                record = run.step(run.next_window())
            history.append(record)
            if log_metrics and main:
                log_metrics({k: v for k, v in record.items() if k != "step"}, record["step"])
            bar.update(1)
            bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}")
            if record["step"] % run.cfg.checkpoint_every == 0 or run.done:
                if main:
                    write_jsonl(metrics_path, history)
                run.checkpoint(ckpt_dir)
            if stop_after_steps is not None and stop_after_steps <= record["step"] and not run.done:
                return record["step"]
    finally:
        bar.close()
    return None


def _run_train(
    ranks: Ranks,
    cfg,
    objective,
    *,
    model_spec,
    prepared_dir,
    out_dir: Path,
    contexts_dir,
    rollout_dirs,
    score_dirs,
    log_metrics,
    stop_after_steps,
    restart,
) -> dict[str, Any]:
    inputs = train_inputs(prepared_dir, contexts_dir, rollout_dirs, score_dirs)
    inputs += [Path(p) for p in (cfg.init_model, cfg.init_teacher) if p]
    stage = _begin_stage(
        ranks,
        out_dir=out_dir,
        config={"train": cfg.model_dump(), "objective": objective.model_dump(), "model": model_spec},
        inputs=inputs,
        model=cfg.init_adapter,
    )
    if stage.done:
        log.info("train: %s is complete for these inputs", out_dir)
        return stage.done
    # checkpoints and the metrics so far live in the progress dir (on a cluster: the cache PVC, keyed by these
    # inputs, so a retried pod resumes); out_dir gets only the finished model, metrics.jsonl and the manifest
    progress = progress_dir(out_dir, f"train-{stage.inputs_hash[:16]}")
    ckpt_dir, metrics_path = progress / "checkpoints", progress / "metrics.jsonl"
    if ranks.main and (stage.stale or restart):  # the checkpoints are another run's: start fresh, never mix
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        metrics_path.unlink(missing_ok=True)
    distributed.barrier()
    seed_everything(cfg.seed)
    with stage.timer("load"):
        from unisd.models import load_tokenizer

        items, skipped = items_for(
            cfg, objective, load_tokenizer(model_spec), prepared_dir, contexts_dir, rollout_dirs, score_dirs
        )
        check_memory_fits(cfg, objective, model_spec, items, ranks)
        tokenizer, model, teacher = build_models(cfg, objective, model_spec, ranks=ranks)
        run = TrainingRun.create(
            cfg, objective, tokenizer, model, teacher, items, ranks=ranks, model_spec=model_spec
        )
    run.resume(ckpt_dir, stage.inputs_hash)
    history = [
        h
        for h in (read_jsonl(metrics_path) if ranks.main and metrics_path.exists() else [])
        if h["step"] <= run.state["step"]
    ]
    stopped_at = train_until_done(
        run,
        stage,
        history,
        ckpt_dir,
        metrics_path,
        log_metrics=log_metrics,
        stop_after_steps=stop_after_steps,
    )
    if stopped_at is not None:
        return {"stopped_at": stopped_at}
    return finish_training(run, stage, history, out_dir, skipped)


def finish_training(run: TrainingRun, stage, history: list[dict], out_dir: Path, skipped) -> dict[str, Any]:
    """Save the model (adapter / merged, the EMA teacher the next round continues), metrics.jsonl and the
    manifest (rank 0); returns the manifest on every rank."""
    main = run.ranks.main
    with stage.timer("save"):
        if main:
            write_jsonl(out_dir / "metrics.jsonl", history)
        export = save_trained_model(run.model, run.tokenizer, out_dir, run.cfg, engine=run.engine, main=main)
        if run.objective.teacher == "ema":  # the next round continues it
            path = save_teacher_weights(run.teacher, out_dir / EMA_TEACHER_FILE, main=main)
            export["ema_teacher"] = str(path)
    counts = {
        "items": len(run.items),
        "skipped": skipped,
        "steps": run.state["step"],
        "bad_items": run.state["bad_items"],
        "tokens": int(sum(h.get("num_tokens", 0) for h in history)),
        "final": history[-1] if history else {},
        "ranks": run.ranks.world,
        "engine": run.engine.kind,
    }
    manifest = stage.finish(counts=counts, extra={"export": export}) if main else None
    distributed.barrier()
    return manifest if main else read_json(out_dir / "manifest.json")


def save_trained_model(
    model, tokenizer, out_dir: Path, cfg: TrainConfig, *, engine=None, main: bool = True
) -> dict[str, str]:
    """Save the adapter (LoRA) and/or merged full weights as HF folders (rank 0); returns their paths. Under
    DeepSpeed the fp32 master weights are gathered from the ZeRO partitions first (a collective)."""
    export: dict[str, str] = {}
    state = engine.full_state_dict() if engine is not None and not cfg.lora.enabled else None
    if not main:
        return {
            **({"adapter": str(out_dir / "adapter")} if cfg.lora.enabled else {}),
            **({"merged": str(out_dir / "merged")} if cfg.save_merged or not cfg.lora.enabled else {}),
        }
    model.eval()
    if state is not None:  # the master weights into the (bf16 / partitioned) module
        state = {k: v for k, v in state.items() if k in set(model.state_dict())}
    if cfg.lora.enabled:
        adapter_dir = out_dir / "adapter"
        model.save_pretrained(adapter_dir, selected_adapters=["default"])
        export["adapter"] = str(adapter_dir)
    if cfg.save_merged or not cfg.lora.enabled:
        merged_dir = out_dir / "merged"
        if cfg.lora.enabled:
            _merged_copy(model).save_pretrained(merged_dir, safe_serialization=True)
        else:
            model.save_pretrained(merged_dir, safe_serialization=True, state_dict=state)
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
