"""On-policy rollout: the student writes one completion per training prompt.

Two backends behind one interface:
- `hf`: batched `model.generate` (left padding, a per-batch seed derived from the batch's first item
  index, so a shard with the same layout and batch size reproduces its completions), truncation after the
  first EOS.
- `vllm`: `vllm.LLM` with token-ID prompts, `SamplingParams(seed=…)`, sleep level 1 / wake up around
  training, weight sync from the trainer once per optimizer step (online training: `unisd.train.VLLMGenerator`).
  vLLM is CUDA-only and pins its own torch, so it lives in its own image (docker/rollout.Dockerfile). Never
  executed on this project's CPU machines — coded against vLLM's public API and tested against a recording
  stand-in — so it runs only when asked for by name: `auto` means `hf` (and says so when vLLM is importable).

Both record the log-prob of each sampled token under the sampler (temperature 1, the raw distribution), so
scoring can report staleness = mean |logp_rollout − logp_trainer| (≈0 healthy for HF; ≈0.01–0.02 healthy for
vLLM in bf16; ≈0.2 means stale weights).

The stage is sharded by index range (`num_shards`, `shard_index`) so the pipeline fans out over pods, and
resumable: finished batches are appended to `partial.jsonl` and skipped on restart; a finished shard has a
manifest and is skipped entirely.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from tqdm.auto import tqdm

from unisd.artifacts import (
    begin_stage,
    progress_dir,
    read_jsonl,
    read_partial_jsonl,
    write_jsonl,
    write_text,
)
from unisd.config import StrictModel

log = logging.getLogger(__name__)


# The HF-model decode loops: "hf" = model.generate; "pruned" = finished rows leave the batch (generate_pruned);
# "continuous" = pruned, and waiting prompts take the freed rows (generate_continuous; the CPU's fastest);
# "static" = model.generate with a static KV cache and a compiled decode step (generate_static; for GPUs).
DecodePath = Literal["hf", "pruned", "continuous", "static"]


class RolloutConfig(StrictModel):
    backend: Literal["auto", "hf", "vllm"] = "auto"
    decode: DecodePath = "hf"
    # The weights the rollout stage decodes with (HF backend): "auto" = bf16 on CUDA, fp32 on CPU. bf16 on a
    # CPU with AVX512-BF16 decodes ≈1.6× faster; the recorded log-probs are then the bf16 sampler's own, and
    # scoring's staleness (|logp_rollout − logp_trainer|) shows the precision gap (docs/PERFORMANCE.md).
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    max_new_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.7, ge=0.0)  # 0 = greedy; the reference trains with T_r = 0.7, top_p = 1
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    batch_size: int = Field(8, ge=1)
    seed: int = Field(0, ge=0)
    num_shards: int = Field(1, ge=1)
    shard_index: int = Field(0, ge=0)
    vllm_gpu_memory_utilization: float = Field(0.45, gt=0.0, le=1.0)  # leaves room for the colocated trainer
    vllm_enable_sleep_mode: bool = True

    @model_validator(mode="after")
    def _shard_in_range(self):
        if self.shard_index >= self.num_shards:
            raise ValueError(f"shard_index {self.shard_index} must be < num_shards {self.num_shards}")
        return self


@dataclass
class Completion:
    id: str
    completion_ids: list[int]
    text: str
    finished: bool  # ended with EOS (False: cut at max_new_tokens)
    logps: list[float]  # sampler's log-prob of each completion token at temperature 1


def shard_range(n_items: int, num_shards: int, shard_index: int) -> tuple[int, int]:
    """Contiguous [start, end) slice of `n_items` for one shard; shards cover every item exactly once."""
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index {shard_index} out of range for num_shards={num_shards}")
    base, extra = divmod(n_items, num_shards)
    start = shard_index * base + min(shard_index, extra)
    return start, start + base + (1 if shard_index < extra else 0)


def pick_backend(requested: str) -> str:
    """The rollout backend for `requested`: "hf" | "vllm" as named; "auto" → "hf".

    vLLM is not a silent default: its code path has never run in this project's CI (no CUDA there), so a cluster
    run uses it only with `rollout.backend=vllm`; "auto" says so when vLLM is importable on a GPU machine."""
    if requested in ("hf", "vllm"):
        return requested
    if requested != "auto":
        raise ValueError(f"rollout backend must be 'auto', 'hf' or 'vllm', got {requested!r}")
    if importlib.util.find_spec("vllm") is not None and torch.cuda.is_available():
        log.warning(
            "rollout.backend=auto uses HF generate; vLLM is importable here but runs only when asked for by name "
            "(rollout.backend=vllm): its path is coded against vLLM's API and has not run in CI"
        )
    return "hf"


def _truncate_at_eos(ids: Sequence[int], eos_ids: set[int]) -> tuple[list[int], bool]:
    """Keep tokens up to and including the first EOS; report whether one was found."""
    out: list[int] = []
    for tok in ids:
        out.append(int(tok))
        if tok in eos_ids:
            return out, True
    return out, False


def eos_token_ids(tokenizer, model=None) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen_cfg = getattr(model, "generation_config", None)
    extra = getattr(gen_cfg, "eos_token_id", None)
    if isinstance(extra, int):
        ids.add(extra)
    elif extra:
        ids.update(extra)
    return ids


@torch.no_grad()
def generate_hf(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    cfg: RolloutConfig,
    *,
    first_index: int = 0,
    width: int | None = None,
    **generate_kwargs: Any,
) -> list[tuple[list[int], bool, list[float]]]:
    """Generate one completion per prompt with HF `generate` (one batch; left padding to `width`, default the
    longest prompt; `generate_kwargs` go to `model.generate`).

    The sampling seed is `cfg.seed + first_index` (reproducible for the same shard layout and batch size).
    Returns (completion ids truncated after the first EOS, finished, sampled-token log-probs).
    """
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    width = max(width or 0, max(len(p) for p in prompts))
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p) :] = torch.tensor(list(p))
        attention_mask[i, width - len(p) :] = 1
    eos = eos_token_ids(tokenizer, model)
    sample = cfg.temperature > 0
    torch.manual_seed(cfg.seed + first_index)
    out = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        max_new_tokens=cfg.max_new_tokens,
        do_sample=sample,
        temperature=cfg.temperature if sample else None,
        top_p=cfg.top_p if sample else None,
        top_k=0 if sample else None,  # the reference samples from the whole vocabulary (top_p=1, no top_k)
        pad_token_id=pad_id,
        eos_token_id=sorted(eos),
        output_logits=True,
        return_dict_in_generate=True,
        **generate_kwargs,
    )
    new_tokens = out.sequences[:, width:]
    # Raw logits of each step → log-prob of the sampled token at temperature 1 (one [B, V] at a time).
    step_logps = torch.stack(
        [
            torch.log_softmax(step.float(), dim=-1).gather(1, new_tokens[:, t : t + 1]).squeeze(1)
            for t, step in enumerate(out.logits)
        ],
        dim=1,
    ).cpu()
    results = []
    for i in range(len(prompts)):
        ids, finished = _truncate_at_eos(new_tokens[i].tolist(), eos)
        results.append((ids, finished, step_logps[i, : len(ids)].tolist()))
    return results


@torch.no_grad()
def generate_pruned(
    model, tokenizer, prompts: Sequence[Sequence[int]], cfg: RolloutConfig, *, first_index: int = 0
) -> list[tuple[list[int], bool, list[float]]]:
    """`generate_hf` without the wait: a row leaves the batch (and its KV cache) the moment it writes EOS, so
    every decode step runs only the rows still writing — short answers stop costing compute while long ones
    finish. Same returns as `generate_hf`.

    Greedy decoding gives the same tokens as HF generate (same prefill positions, same masks); the recorded
    log-probs are the model's own at temperature 1 under this path (staleness vs the trainer ≈ 0). Sampling
    draws from a generator seeded with `cfg.seed + first_index` (reproducible; not HF's random stream).
    """
    device = next(model.parameters()).device
    n = len(prompts)
    input_ids, attention, positions = _left_padded(prompts, tokenizer.pad_token_id, device)
    eos = torch.tensor(sorted(eos_token_ids(tokenizer, model)), device=device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed + first_index)
    out = model(
        input_ids=input_ids,
        attention_mask=attention,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
    )
    cache, logits = out.past_key_values, out.logits[:, -1]
    rows = torch.arange(n, device=device)  # batch position → prompt index, for the rows still writing
    tokens: list[list[int]] = [[] for _ in range(n)]
    logps: list[list[float]] = [[] for _ in range(n)]
    finished = [False] * n
    for step in range(cfg.max_new_tokens):
        next_ids, next_logps = _next_tokens(logits, cfg, generator)
        done = torch.isin(next_ids, eos)
        for r, t, lp, d in zip(rows.tolist(), next_ids.tolist(), next_logps.tolist(), done.tolist()):
            tokens[r].append(t)
            logps[r].append(lp)
            finished[r] = d
        keep = (~done).nonzero().squeeze(1)
        if keep.numel() == 0 or step == cfg.max_new_tokens - 1:
            break
        if keep.numel() < rows.numel():  # drop the finished rows from the batch and its cache
            cache.batch_select_indices(keep)
            rows, attention, next_ids = rows[keep], attention[keep], next_ids[keep]
        out, attention = _decode_step(model, next_ids, attention, cache)
        cache, logits = out.past_key_values, out.logits[:, -1]
    return [(tokens[i], finished[i], logps[i]) for i in range(n)]


def _left_padded(prompts: Sequence[Sequence[int]], pad_id: int, device):
    """Prompts left-padded to the longest → (input ids [B, W], attention [B, W], positions [B, W] as HF
    generate computes them)."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p) :] = torch.tensor(list(p))
        attention[i, width - len(p) :] = 1
    input_ids, attention = input_ids.to(device), attention.to(device)
    return input_ids, attention, (attention.cumsum(-1) - 1).masked_fill(attention == 0, 1)


def _decode_step(model, next_ids: torch.Tensor, attention: torch.Tensor, cache):
    """One token per row [B] after `cache` → (the model's output, attention [B, W + 1] with the new column)."""
    attention = torch.cat([attention, attention.new_ones(attention.shape[0], 1)], dim=1)
    out = model(
        input_ids=next_ids[:, None],
        attention_mask=attention,
        position_ids=attention.sum(-1, keepdim=True) - 1,
        past_key_values=cache,
        use_cache=True,
    )
    return out, attention


# `continuous` takes this many batches' prompts per call, batch_size of them in flight at a time, so that a row
# freed by a short answer has a waiting prompt to take it (a killed stage still keeps every finished call).
CONTINUOUS_QUEUE_BATCHES = 4
PREFILL_WIDTH_SPREAD = (
    1.25  # prompts prefilled together differ in length by at most this factor (less padding)
)


def prompts_per_call(cfg: RolloutConfig) -> int:
    """How many prompts a caller hands one `generate` call: a batch, or a queue of batches for `continuous`."""
    return cfg.batch_size * (CONTINUOUS_QUEUE_BATCHES if cfg.decode == "continuous" else 1)


def _length_buckets(lengths: Sequence[int]) -> list[list[int]]:
    """Indices grouped so that each group's longest prompt is ≤ PREFILL_WIDTH_SPREAD × its shortest."""
    buckets: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if buckets and lengths[i] <= PREFILL_WIDTH_SPREAD * lengths[buckets[-1][0]]:
            buckets[-1].append(i)
        else:
            buckets.append([i])
    return buckets


def _left_pad(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """`t` with zeros prepended along `dim` up to `width`."""
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _full_attention_layers(cache, model) -> list:
    """The cache's layers, refusing caches whose rows cannot be re-padded (sliding windows, recurrent state)."""
    from transformers.cache_utils import DynamicLayer

    layers = list(cache.layers)
    odd = sorted({type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer})
    if odd:
        raise ValueError(
            f"decode: continuous needs full-attention KV caches; {type(model).__name__} has {', '.join(odd)} "
            "layers — use decode: pruned for this model"
        )
    return layers


@torch.no_grad()
def generate_continuous(
    model, tokenizer, prompts: Sequence[Sequence[int]], cfg: RolloutConfig, *, first_index: int = 0
) -> list[tuple[list[int], bool, list[float]]]:
    """`generate_pruned` with refills: at most `cfg.batch_size` rows decode at once; when a quarter of them
    have finished, the next waiting prompts are prefilled and join the batch, so the batch stays full while
    long answers finish. Prefill groups prompts of similar length (no row pads past 1.25× its own length),
    and the joined rows' KV entries are left-padded to the batch's width and masked, exactly as a left-padded
    batch is. Same returns as `generate_hf`.

    Greedy tokens equal HF generate's (tests/test_rollout.py); the log-probs are the model's own at temperature
    1 from the logits each token was drawn from. Sampling draws row i from its own generator seeded
    `cfg.seed + first_index + i`, so a row's sample does not depend on which rows shared its batch.
    Full-attention models only (a sliding-window cache cannot be re-padded; use `pruned` there).
    """
    device = next(model.parameters()).device
    eos = torch.tensor(sorted(eos_token_ids(tokenizer, model)), device=device)
    n = len(prompts)
    generators = (
        [torch.Generator(device=device).manual_seed(cfg.seed + first_index + i) for i in range(n)]
        if cfg.temperature > 0
        else None
    )
    tokens: list[list[int]] = [[] for _ in range(n)]
    logps: list[list[float]] = [[] for _ in range(n)]
    finished = [False] * n
    waiting = list(range(n))[::-1]  # popped from the end: prompts join in the order given
    rows: list[int] = []  # batch position → prompt index, for the rows still writing
    keys: list[torch.Tensor] = []  # per layer [rows, kv heads, width, head dim]
    values: list[torch.Tensor] = []
    attention = torch.zeros(0, 0, dtype=torch.long, device=device)
    logits = torch.zeros(0, 0, device=device)
    refill_at = max(1, cfg.batch_size // 4)
    while rows or waiting:
        free = cfg.batch_size - len(rows)
        if waiting and (not rows or free >= refill_at):
            joined = [waiting.pop() for _ in range(min(free, len(waiting)))]
            parts = [(keys, values, attention, logits)] if rows else []
            for bucket in _length_buckets([len(prompts[i]) for i in joined]):
                parts.append(_prefill(model, tokenizer, [prompts[joined[b]] for b in bucket], device))
                rows += [joined[b] for b in bucket]
            keys, values, attention, logits = _join(parts)
        next_ids, next_logps = _next_tokens_per_row(logits, cfg, generators, rows)
        done = torch.isin(next_ids, eos)
        for b, (r, t, lp, d) in enumerate(zip(rows, next_ids.tolist(), next_logps.tolist(), done.tolist())):
            tokens[r].append(t)
            logps[r].append(lp)
            finished[r] = d
            done[b] = d or len(tokens[r]) == cfg.max_new_tokens
        keep = (~done).nonzero().squeeze(1)
        if keep.numel() < len(rows):  # drop the finished rows (a copy of the cache: only when one finished)
            rows = [rows[b] for b in keep.tolist()]
            if not rows:
                continue
            attention, next_ids = attention[keep], next_ids[keep]
            keys, values = [k[keep] for k in keys], [v[keep] for v in values]
            lead = int((attention.sum(0) == 0).cumprod(0).sum())  # columns every remaining row pads: drop
            if lead:
                attention = attention[:, lead:]
                keys, values = [k[:, :, lead:] for k in keys], [v[:, :, lead:] for v in values]
        out, attention = _decode_step(model, next_ids, attention, _cache_of(keys, values))
        layers = _full_attention_layers(out.past_key_values, model)
        keys, values = [layer.keys for layer in layers], [layer.values for layer in layers]
        logits = out.logits[:, -1]
    return [(tokens[i], finished[i], logps[i]) for i in range(n)]


def _prefill(model, tokenizer, prompts: Sequence[Sequence[int]], device):
    """One left-padded prefill → (per-layer keys, per-layer values, attention [B, W], last logits [B, V])."""
    input_ids, attention, positions = _left_padded(prompts, tokenizer.pad_token_id, device)
    out = model(
        input_ids=input_ids,
        attention_mask=attention,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
    )
    layers = _full_attention_layers(out.past_key_values, model)
    return [layer.keys for layer in layers], [layer.values for layer in layers], attention, out.logits[:, -1]


def _join(parts):
    """Several (per-layer keys, per-layer values, attention, logits) row groups as one batch, every group
    left-padded (zeros, masked) to the widest."""
    width = max(part[2].shape[1] for part in parts)
    layers = range(len(parts[0][0]))
    keys = [torch.cat([_left_pad(part[0][layer], width, 2) for part in parts]) for layer in layers]
    values = [torch.cat([_left_pad(part[1][layer], width, 2) for part in parts]) for layer in layers]
    attention = torch.cat([_left_pad(part[2], width, 1) for part in parts])
    return keys, values, attention, torch.cat([part[3] for part in parts])


def _cache_of(keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]):
    """A DynamicCache holding these per-layer key/value tensors."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=list(zip(keys, values)))


def _next_tokens_per_row(logits: torch.Tensor, cfg: RolloutConfig, generators, rows: Sequence[int]):
    """`_next_tokens` with each row drawing from its own prompt's generator (greedy needs none)."""
    if generators is None:
        return _next_tokens(logits, cfg, None)
    drawn = [_next_tokens(logits[b : b + 1], cfg, generators[r]) for b, r in enumerate(rows)]
    return torch.cat([d[0] for d in drawn]), torch.cat([d[1] for d in drawn])


STATIC_WIDTH_STEP = 128  # prompt widths are padded to a multiple of this: one compiled graph per bucket


def generate_static(
    model, tokenizer, prompts: Sequence[Sequence[int]], cfg: RolloutConfig, *, first_index: int = 0
) -> list[tuple[list[int], bool, list[float]]]:
    """`generate_hf` with a static KV cache and the decode step compiled by `torch.compile` (HF's
    `cache_implementation="static"`; the path measured 4.2–5.8× faster on an H100 in an earlier probe; on a
    2-core CPU it is not faster, see docs/PERFORMANCE.md). The compiled graph is specialised to the batch's
    shapes, so prompts are left-padded to a multiple of STATIC_WIDTH_STEP and a short last batch is filled
    with copies of its first prompt (dropped from the result): a stage compiles once per width bucket.
    Same returns as `generate_hf`; the log-probs come from the logits each token was drawn from (exact)."""
    from transformers import CompileConfig

    on_cuda = next(model.parameters()).device.type == "cuda"
    compile_config = CompileConfig(
        fullgraph=False, dynamic=False, mode="reduce-overhead" if on_cuda else "default"
    )
    compile_config._compile_all_devices = True  # HF compiles the decode step on accelerators only by default
    width = -(-max(len(p) for p in prompts) // STATIC_WIDTH_STEP) * STATIC_WIDTH_STEP
    rows = list(prompts) + [prompts[0]] * (cfg.batch_size - len(prompts))
    out = generate_hf(
        model,
        tokenizer,
        rows,
        cfg,
        first_index=first_index,
        width=width,
        cache_implementation="static",
        compile_config=compile_config,
    )
    return out[: len(prompts)]


def _next_tokens(logits: torch.Tensor, cfg: RolloutConfig, generator: torch.Generator):
    """[B, V] raw logits → (next token [B], its log-prob at temperature 1 [B]): greedy, or a sample at the
    rollout temperature with nucleus top_p (top_p=1: the whole vocabulary, as the reference samples)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    if cfg.temperature <= 0:
        next_ids = logp.argmax(-1)
    else:
        probs = torch.softmax(logits.float() / cfg.temperature, dim=-1)
        if cfg.top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            outside = sorted_p.cumsum(-1) - sorted_p > cfg.top_p  # keep the smallest set reaching top_p
            probs = probs.scatter(-1, order, sorted_p.masked_fill(outside, 0.0))
        next_ids = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return next_ids, logp.gather(1, next_ids[:, None]).squeeze(1)


DECODERS = {
    "hf": generate_hf,
    "pruned": generate_pruned,
    "continuous": generate_continuous,
    "static": generate_static,
}


def generate(model, tokenizer, prompts, cfg: RolloutConfig, *, first_index: int = 0):
    """The HF-model decode path `cfg.decode` names (DecodePath)."""
    return DECODERS[cfg.decode](model, tokenizer, prompts, cfg, first_index=first_index)


VLLM_INSECURE_SERIALIZATION = "VLLM_ALLOW_INSECURE_SERIALIZATION"


class VLLMRollout:
    """vLLM engine for rollouts, colocated with the trainer (sleep level 1 between rollouts).

    Not executed in this project's CI (no CUDA, and vLLM cannot share the training env); coded against
    vLLM's public API: `LLM(..., enable_sleep_mode=True)`, `generate(TokensPrompt, SamplingParams)`,
    `sleep(level=1)`, `wake_up()`, `collective_rpc` for the weight sync, `reset_prefix_cache()`.

    The online protocol per optimizer window (`unisd.train.VLLMGenerator`): generate → sleep → the trainer's
    forward/backward/step → wake_up → sync_weights → generate … . `colocated=True` (one engine per torchrun
    rank, tensor parallel 1) uses vLLM's `external_launcher` executor, which runs inside the rank's process
    instead of spawning its own workers.
    """

    def __init__(
        self, model_path: str, cfg: RolloutConfig, *, dtype: str = "bfloat16", colocated: bool = False
    ):
        import os

        # collective_rpc with a Python function (the weight loader below) pickles it to the workers.
        os.environ[VLLM_INSECURE_SERIALIZATION] = "1"
        from vllm import LLM

        self.cfg = cfg
        extra = {"distributed_executor_backend": "external_launcher"} if colocated else {}
        self.llm = LLM(
            model=model_path,
            dtype=dtype,
            seed=cfg.seed,
            gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
            enable_sleep_mode=cfg.vllm_enable_sleep_mode,
            enable_prefix_caching=True,
            logprobs_mode="raw_logprobs",  # the sampled token's log-prob under the raw distribution (T = 1)
            **extra,
        )
        self.asleep = False

    def generate(
        self, prompts: Sequence[Sequence[int]], *, first_index: int = 0
    ) -> list[tuple[list[int], bool, list[float]]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if self.asleep:
            self.wake_up()
        # One SamplingParams per prompt so each item's seed depends on its index, not on the batch.
        params = [
            SamplingParams(
                temperature=self.cfg.temperature,
                top_p=self.cfg.top_p,
                max_tokens=self.cfg.max_new_tokens,
                seed=self.cfg.seed + first_index + i,
                logprobs=0,  # the sampled token's log-prob
            )
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params)
        results = []
        for out in outputs:
            seq = out.outputs[0]
            ids = list(seq.token_ids)
            logps = [lp[tok].logprob for tok, lp in zip(ids, seq.logprobs or [])]
            results.append((ids, seq.finish_reason == "stop", logps))
        return results

    def sleep(self) -> None:
        """Free GPU memory for training: level 1 offloads weights to CPU and drops the KV cache."""
        if not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake_up(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def sync_weights(self, named_tensors) -> None:
        """Load the trainer's current weights (once per optimizer step). Must run AFTER wake_up: waking
        restores the weights offloaded at sleep time, which would overwrite a sync done while asleep. The
        prefix cache holds KV computed with the old weights: reset it."""
        if self.asleep:
            self.wake_up()
        payload = [(name, t.detach()) for name, t in named_tensors]
        self.llm.collective_rpc(_load_weights_on_worker, args=(payload,))
        self.llm.reset_prefix_cache()


def _load_weights_on_worker(worker, payload) -> None:
    worker.model_runner.model.load_weights(weights=payload)


def run_rollout(
    cfg: RolloutConfig,
    *,
    model_spec: str,
    prepared_dir: str | Path,
    out_dir: str | Path,
    model=None,
    tokenizer=None,
) -> dict:
    """Rollout stage: completions for this shard's slice of `prepared_dir/train.jsonl` → `out_dir`.

    Writes completions.jsonl (one Completion per item) and manifest.json; resumes from partial.jsonl.
    """
    from unisd.models import load_tokenizer

    prepared_dir, out_dir = Path(prepared_dir), Path(out_dir)
    train_file = prepared_dir / "train.jsonl"
    stage = rollout_stage(cfg, model_spec, train_file, out_dir)
    if stage.done:
        log.info("rollout shard %d/%d already complete in %s", cfg.shard_index, cfg.num_shards, out_dir)
        return stage.done
    timer = stage.timer
    items, start, end = _shard_items(cfg, train_file)
    partial = _partial_file(out_dir, stage.inputs_hash)
    done_rows = {r["id"]: r for r in resumable_rows(partial, stage.inputs_hash)}
    todo = [(start + i, it) for i, it in enumerate(items) if it["id"] not in done_rows]
    backend = pick_backend(cfg.backend)
    with timer("load"):
        tokenizer = tokenizer or load_tokenizer(model_spec)
        decode = _decoder(cfg, backend, model_spec, tokenizer, model=model)
    log.info(
        "rollout: backend=%s, %d items (%d already done) in shard %d/%d",
        backend,
        len(items),
        len(done_rows),
        cfg.shard_index,
        cfg.num_shards,
    )
    with timer("generate"):
        append_completions(todo, decode, tokenizer, prompts_per_call(cfg), partial, done_rows)
    rows = [done_rows[it["id"]] for it in items]
    _write_completions(out_dir, rows, partial)
    counts = _rollout_counts(cfg, rows, start, end, timer.timings)
    return stage.finish(counts=counts, extra={"backend": backend})


def _shard_items(cfg: RolloutConfig, train_file: Path) -> tuple[list[dict], int, int]:
    """Returns (this shard's rows of train.jsonl, the shard's start index, its end index)."""
    items = read_jsonl(train_file)
    start, end = shard_range(len(items), cfg.num_shards, cfg.shard_index)
    return items[start:end], start, end


def _partial_file(out_dir: Path, inputs_hash: str) -> Path:
    """Returns the partial.jsonl that keeps finished batches (creating `out_dir` and its folder)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # The cache PVC on a cluster: a retried pod finds the finished batches there.
    partial = progress_dir(out_dir, f"rollout-{inputs_hash[:16]}") / "partial.jsonl"
    partial.parent.mkdir(parents=True, exist_ok=True)
    return partial


def _decoder(cfg: RolloutConfig, backend: str, model_spec: str, tokenizer, *, model=None) -> Callable:
    """Returns decode(prompts, *, first_index) -> [(ids, finished, logps)] for the backend (loading its model)."""
    from unisd.models import load_model

    if backend == "vllm":
        from unisd.models import resolve_model_path

        engine = VLLMRollout(resolve_model_path(model_spec), cfg)
        return engine.generate
    model = model or load_model(model_spec, dtype=cfg.dtype)

    def decode(prompts, *, first_index):
        return generate(model, tokenizer, prompts, cfg, first_index=first_index)

    return decode


def _write_completions(out_dir: Path, rows: list[dict], partial: Path) -> None:
    """Writes completions.jsonl, then removes the partial progress and its key (the shard is complete)."""
    write_jsonl(out_dir / "completions.jsonl", rows)
    partial.unlink(missing_ok=True)
    (partial.parent / PARTIAL_KEY).unlink(missing_ok=True)


def _rollout_counts(
    cfg: RolloutConfig, rows: list[dict], start: int, end: int, timings: dict[str, float]
) -> dict:
    """Returns the manifest counts: items, shard and range, tokens, empty and unfinished rows, throughput."""
    n_tokens = sum(len(r["completion_ids"]) for r in rows)
    return {
        "items": len(rows),
        "shard": [cfg.shard_index, cfg.num_shards],
        "range": [start, end],
        "completion_tokens": n_tokens,
        "empty": sum(1 for r in rows if not r["completion_ids"]),
        "no_eos": sum(1 for r in rows if not r["finished"]),
        "tokens_per_s": round(n_tokens / max(timings.get("generate", 0.0), 1e-9), 2),
    }


PARTIAL_KEY = "partial.key"


def append_completions(todo, decode, tokenizer, per_call: int, partial: Path, done_rows: dict) -> None:
    """Generate the `todo` items (index, row) `per_call` at a time (`prompts_per_call`), appending each finished
    call's rows to `partial` (a killed rollout keeps every finished call) and to `done_rows`."""
    with open(partial, "a") as sink, tqdm(total=len(todo), desc="rollout", unit="item") as bar:
        for b in range(0, len(todo), per_call):
            chunk = todo[b : b + per_call]
            results = decode([it["student_prompt_ids"] for _, it in chunk], first_index=chunk[0][0])
            for (_, it), (ids, finished, logps) in zip(chunk, results):
                text = tokenizer.decode(ids, skip_special_tokens=True)
                done_rows[it["id"]] = row = asdict(Completion(it["id"], ids, text, finished, logps))
                sink.write(json.dumps(row) + "\n")
            sink.flush()
            bar.update(len(chunk))


def rollout_stage(cfg: RolloutConfig, model_spec: str, train_file: Path, out_dir: Path):
    """The rollout stage's bookkeeping (its inputs hash keys the partial progress too)."""
    config = {**cfg.model_dump(), "model": model_spec}
    return begin_stage("rollout", out_dir, config=config, inputs=[train_file], model=model_spec)


def resumable_rows(partial: Path, inputs_hash: str) -> list[dict]:
    """The finished rows of an interrupted run with the same inputs and settings. Progress made with other
    settings (another model, decoding setting or data) is discarded, never mixed in: the run starts over."""
    key_file = partial.parent / PARTIAL_KEY
    if partial.exists() and (not key_file.exists() or key_file.read_text().strip() != inputs_hash):
        log.warning("%s was written with other settings or inputs: discarding it and starting over", partial)
        partial.unlink()
    write_text(key_file, inputs_hash + "\n")
    return read_partial_jsonl(partial)


def load_completions(dirs: Sequence[str | Path]) -> dict[str, dict]:
    """Merge the completions of several rollout shard directories into {id: row}."""
    merged: dict[str, dict] = {}
    for d in dirs:
        for row in read_jsonl(Path(d) / "completions.jsonl"):
            if row["id"] in merged:
                raise ValueError(f"{d}: item {row['id']} appears in two rollout shards")
            merged[row["id"]] = row
    return merged
