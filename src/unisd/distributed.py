"""Training as N ranks: the process group, each rank's share of a window, global statistics, and the engine that
owns forward / backward / optimizer step — torch DDP, or DeepSpeed ZeRO-2/3.

    torchrun --nproc_per_node=N -m unisd train ...       # gloo on CPU (DS_ACCELERATOR=cpu), NCCL on GPU

The trainer's math does not depend on N: one optimizer step consumes the same global window of
`micro_batch_size × grad_accum` items whatever the number of ranks (rank r takes the r-th contiguous share of the
seeded epoch order and splits it into micro-batches), every normaliser and quantile is a statistic of the whole
window (all ranks), and the engines average gradients over ranks. So a 2-rank run computes what a 1-rank run
computes, up to float summation order (tested to 1e-5 on losses and weights).

Engines (`make_engine`):
- `TorchEngine` — one process, or `DistributedDataParallel` over the ranks (deepspeed="none"). Parameters and
  AdamW states stay in fp32 (the master weights); the forward runs under `torch.autocast` at the compute dtype
  (bf16 on GPU). Gradients are all-reduced once per window (`no_sync` on every micro-batch but the last).
- `DeepSpeedEngine` — DeepSpeed ZeRO-2 (optimizer states + gradients partitioned) or ZeRO-3 (parameters too),
  driven with `managed_gradient_accumulation: false` (the trainer owns the window: every `step()` is the
  accumulation boundary), `bf16` on GPU (bf16 parameters, fp32 master partitions in the ZeRO optimizer),
  optional CPU offload of the optimizer (DeepSpeedCPUAdam). ZeRO-3: the LM head weight is registered as an
  external parameter of the step module, because the chunked loss reads it outside the head's own forward.

Every micro-batch runs through one module call (`StudentStep`) so the engine sees the whole differentiable
computation. A micro-batch whose loss is not finite still runs a zero backward (a 1-token dummy pass × 0): every
rank makes the same sequence of collective calls, whatever its data.

Also here: the memory estimate printed at the start of training (`estimate_memory`), which refuses a
configuration that cannot fit the device and says what to change.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------
# ranks and the process group


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def launched_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 outside a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def current_ranks() -> Ranks:
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return Ranks()


def device_for(ranks: Ranks) -> str:
    """cuda:<local rank> on a GPU machine, else cpu."""
    if torch.cuda.is_available():
        torch.cuda.set_device(ranks.local_rank)
        return f"cuda:{ranks.local_rank}"
    return "cpu"


@contextlib.contextmanager
def process_group() -> Iterator[Ranks]:
    """torch.distributed for a torchrun launch (WORLD_SIZE > 1): NCCL on GPU, gloo on CPU. Uses a group that is
    already initialised; destroys on exit only the one it created. Outside a launcher: one rank, no group."""
    created = False
    if launched_world_size() > 1 and not dist.is_initialized():
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed on CPU (see STACK.md)
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
        created = True
    try:
        yield current_ranks()
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_gather_objects(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] (a collective); [obj] on one rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sum over ranks of a short list of floats (fp64)."""
    t = torch.tensor(list(values), dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
    return t.cpu().tolist()


def rank_share(window: Sequence[Any], ranks: Ranks) -> list[Any]:
    """Rank r's contiguous share of a global window (every rank gets the same number of items)."""
    if len(window) % ranks.world:
        raise ValueError(
            f"a window of {len(window)} items does not split evenly over {ranks.world} ranks: make "
            "micro_batch_size × grad_accum a multiple of the number of ranks"
        )
    n = len(window) // ranks.world
    return list(window[ranks.rank * n : (ranks.rank + 1) * n])


def micro_batches(share: Sequence[Any], micro_batch_size: int) -> list[list[Any]]:
    """A rank's share split into micro-batches of at most `micro_batch_size` items."""
    size = max(1, min(micro_batch_size, len(share)))
    return [list(share[i : i + size]) for i in range(0, len(share), size)]


def combine_window_stats(
    per_rank: Sequence[dict[str, float]], additive: Iterable[str], averaged_terms: Iterable[str]
) -> dict[str, float]:
    """One window's stats from every rank's share.

    `averaged_terms` (the loss terms) are each rank's share of the global mean, scaled by the world size (the
    window normalisers divide by global count / world, as DDP averages gradients): their global value is the
    mean over ranks. Other `additive` stats (counts) are summed. Everything else is a per-item mean over the
    rank's share and the shares are equal: averaged. A key missing on a rank (all its micro-batches skipped)
    counts as absent there.
    """
    additive, averaged_terms = set(additive), set(averaged_terms)
    world = len(per_rank)
    keys = sorted({k for stats in per_rank for k in stats})
    out: dict[str, float] = {}
    for k in keys:
        values = [stats[k] for stats in per_rank if k in stats]
        if k in averaged_terms:
            out[k] = sum(values) / world
        elif k in additive:
            out[k] = sum(values)
        else:
            out[k] = sum(values) / len(values)
    return out


# ----------------------------------------------------------------------------------------------------------
# ZeRO-3 partitioned parameters


def is_partitioned(param: Tensor) -> bool:
    """A DeepSpeed ZeRO-3 parameter (its data lives in per-rank shards, `ds_tensor`)."""
    return hasattr(param, "ds_id")


@contextlib.contextmanager
def full_parameters(params: Iterable[Tensor], *, modify: bool = False) -> Iterator[None]:
    """Make ZeRO-3 parameters whole for the duration (`modify`: rank 0's values are re-partitioned on exit).
    A no-op for ordinary parameters."""
    params = [p for p in params if is_partitioned(p) and not _available(p)]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None):
        yield


def _available(param: Tensor) -> bool:
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return getattr(param, "ds_status", None) == ZeroParamStatus.AVAILABLE


def full_copy(param: Tensor) -> Tensor:
    """A detached full copy of a (possibly ZeRO-3 partitioned) parameter; the tensor itself otherwise."""
    if not is_partitioned(param) or _available(param):
        return param.detach()
    with full_parameters([param]):
        return param.detach().clone()


# ----------------------------------------------------------------------------------------------------------
# precision


@dataclass(frozen=True)
class Precision:
    """Compute dtype and where the master weights live.

    master "fp32": parameters and optimizer states in fp32, the forward under torch.autocast at `compute` (bf16 on
    GPU) — or, under DeepSpeed, bf16 parameters with fp32 master partitions in the ZeRO optimizer.
    master "compute": parameters stored in the compute dtype and updated there (pure bf16: most updates of a
    2e-5 learning rate round away — kept only to show it).
    """

    compute: torch.dtype = torch.float32
    master: str = "fp32"
    device_type: str = "cpu"

    @property
    def mixed(self) -> bool:
        return self.master == "fp32" and self.compute != torch.float32

    @property
    def storage(self) -> torch.dtype:
        return torch.float32 if self.master == "fp32" else self.compute

    def autocast(self) -> contextlib.AbstractContextManager:
        if not self.mixed:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.compute)


# ----------------------------------------------------------------------------------------------------------
# the step module and the engines


class StudentStep(nn.Module):
    """The differentiable part of one micro-batch as one module call: student decoder → final hidden states at
    the completion positions → `loss_fn(hidden [B, T, H], lm_head_weight [V, H])` → (loss, stats).

    Wrapping it lets DDP and DeepSpeed see the whole computation (DDP's reducer is armed by its forward, ZeRO-3
    gathers the parameters a forward touches)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch, loss_fn: Callable[[Tensor, Tensor], Any]):
        from unisd.sequences import completion_hidden, lm_head_of

        return loss_fn(completion_hidden(self.model, batch), lm_head_of(self.model).weight)


def zero_loss(hidden: Tensor, head_weight: Tensor):
    """A finite loss of exactly zero gradient that touches every parameter of the forward (the stand-in for a
    micro-batch whose loss is not finite)."""
    return (hidden.float().sum() + head_weight.float().sum()) * 0.0, {}


def dummy_batch(pad_id: int, device) -> Any:
    from unisd.sequences import build_teacher_forcing_batch

    return build_teacher_forcing_batch([[pad_id]], [[pad_id]], pad_id=pad_id).to(device)


class PlainEngine:
    """Forward / backward in one process without an optimizer (bench/ and objective-diff step their own AdamW)."""

    kind = "plain"
    partitioned = False

    def __init__(self, model: nn.Module, precision: Precision | None = None):
        self.model, self.precision = model, precision or Precision()
        self.step_module = StudentStep(model)
        self.wrapped: nn.Module = self.step_module

    def micro(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def forward(self, batch, loss_fn):
        with self.precision.autocast():
            return self.wrapped(batch, loss_fn)

    @torch.no_grad()
    def forward_no_grad(self, batch, fn):
        with self.precision.autocast():
            return self.step_module(batch, fn)

    def backward(self, loss: Tensor) -> None:
        loss.backward()


class TorchEngine(PlainEngine):
    """One process, or DDP over the ranks: AdamW on the (fp32 master) trainable parameters, the cosine schedule,
    gradient-norm clipping; gradients are all-reduced once per window."""

    kind = "torch"

    def __init__(
        self, model: nn.Module, *, lr: float, weight_decay: float, schedule: Callable, ranks: Ranks, precision
    ):
        super().__init__(model, precision)
        self.ranks = ranks
        if ranks.distributed:
            self.kind = "ddp"
            device = next(model.parameters()).device
            self.wrapped = nn.parallel.DistributedDataParallel(
                self.step_module, device_ids=[device.index] if device.type == "cuda" else None
            )
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)

    def micro(self, last: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch's forward + backward: DDP reduces gradients only on the window's last."""
        if self.kind == "ddp" and not last:
            return self.wrapped.no_sync()
        return contextlib.nullcontext()

    def step(self, max_grad_norm: float) -> float:
        """Clip, step (skipped when the norm is not finite), schedule; returns the gradient norm."""
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_grad_norm)
        if torch.isfinite(grad_norm):
            self.optimizer.step()
        else:
            log.warning("non-finite gradient norm: optimizer step skipped")
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return float(grad_norm)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    # checkpoints: everything fits one file that rank 0 writes and every rank reads
    def state_dict(self) -> dict[str, Any]:
        return {
            "trainable": {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        params = dict(self.model.named_parameters())
        for name, value in state["trainable"].items():
            params[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def save_shards(self, directory: Path) -> None:  # nothing partitioned
        pass

    def load_shards(self, directory: Path) -> None:
        pass

    def full_state_dict(self) -> dict[str, Tensor] | None:
        """The model's full state dict for export (None: `save_pretrained` reads the model as it is)."""
        return None


class DeepSpeedEngine(TorchEngine):
    """DeepSpeed ZeRO-2/3 over the ranks; the trainer owns the accumulation window (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        *,
        lr: float,
        weight_decay: float,
        schedule: Callable,
        ranks: Ranks,
        precision: Precision,
        config: dict[str, Any],
    ):
        import deepspeed

        from unisd.sequences import lm_head_of

        self.model, self.ranks, self.precision = model, ranks, precision
        self.kind = f"zero{config['zero_optimization']['stage']}"
        self.partitioned = config["zero_optimization"]["stage"] == 3
        self.step_module = StudentStep(model)
        params = [p for p in model.parameters() if p.requires_grad]
        if config["zero_optimization"].get("offload_optimizer", {}).get("device") == "cpu":
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(params, lr=lr, weight_decay=weight_decay, adamw_mode=True)
        else:
            optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.step_module, optimizer=optimizer, lr_scheduler=scheduler, config=config
        )
        self.wrapped = self.engine
        self.params = params
        if self.partitioned:
            deepspeed.zero.register_external_parameter(self.step_module, lm_head_of(model).weight)

    def micro(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def forward(self, batch, loss_fn):
        return self.engine(batch, loss_fn)

    @torch.no_grad()
    def forward_no_grad(self, batch, fn):
        return self.step_module(batch, fn)

    def backward(self, loss: Tensor) -> None:
        # The window normalisers already divide by the window's counts: no division by the accumulation steps.
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self, max_grad_norm: float) -> float:
        self.engine.step()  # reduce (ZeRO-2: finalize), clip at gradient_clipping, AdamW, lr schedule
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    @property
    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def state_dict(self) -> dict[str, Any]:
        return {}  # all in the engine's own checkpoint (save_shards)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def save_shards(self, directory: Path) -> None:
        """Every rank writes its partition of the model / optimizer states (a collective)."""
        self.engine.save_checkpoint(str(directory), tag="engine", save_latest=False)

    def load_shards(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(
            str(directory), tag="engine", load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise FileNotFoundError(f"{directory}: no DeepSpeed engine checkpoint (tag 'engine')")

    def full_state_dict(self) -> dict[str, Tensor]:
        """The fp32 master weights, gathered from the ZeRO partitions (a collective; every rank gets them)."""
        from deepspeed.utils import safe_get_full_fp32_param

        out: dict[str, Tensor] = {}
        for name, p in self.model.named_parameters():
            value = safe_get_full_fp32_param(p) if p.requires_grad else full_copy(p)
            out[name] = value.detach().float().cpu().clone()
        for name, b in self.model.named_buffers():
            out[name] = b.detach().cpu().clone()
        return out


def deepspeed_config(
    stage: str,
    *,
    micro_batch_size: int,
    grad_accum: int,
    world: int,
    max_grad_norm: float,
    bf16: bool,
    offload_optimizer: bool = False,
    param_persistence_threshold: int = 100_000,
) -> dict[str, Any]:
    """The DeepSpeed config of a ZeRO-2/3 run (per-rank micro-batch and accumulation counts; the trainer owns the
    window: `managed_gradient_accumulation: false`)."""
    if stage not in ("zero2", "zero3"):
        raise ValueError(f"deepspeed must be 'zero2' or 'zero3', got {stage!r}")
    zero: dict[str, Any] = {
        "stage": 2 if stage == "zero2" else 3,
        # Unmanaged accumulation supports overlap_comm only at ZeRO-2; keep the reduction in the backward.
        "overlap_comm": False,
        "contiguous_gradients": True,
    }
    if stage == "zero3":
        zero.update(
            stage3_param_persistence_threshold=param_persistence_threshold,
            stage3_gather_16bit_weights_on_model_save=True,
        )
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * world,
        "gradient_clipping": max_grad_norm,
        "managed_gradient_accumulation": False,
        "zero_allow_untested_optimizer": True,  # torch AdamW: the same update as the DDP path
        "bf16": {"enabled": bf16},
        "zero_optimization": zero,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def partitioned_copy(model: nn.Module, config: dict[str, Any]) -> nn.Module:
    """A frozen copy of `model` partitioned by ZeRO-3 (an engine without optimizer): the full fine-tuning
    teacher under ZeRO-3, in fp32 (its EMA increments would round away in bf16)."""
    import copy

    import deepspeed

    teacher = copy.deepcopy(model)
    teacher.requires_grad_(False)
    teacher.eval()
    cfg = {
        "train_micro_batch_size_per_gpu": config["train_micro_batch_size_per_gpu"],
        "zero_optimization": {
            "stage": 3,
            "stage3_param_persistence_threshold": config["zero_optimization"].get(
                "stage3_param_persistence_threshold", 100_000
            ),
        },
        "bf16": {"enabled": False},
        "steps_per_print": 1 << 30,
    }
    engine, *_ = deepspeed.initialize(model=teacher, config=cfg)
    return engine.module


# ----------------------------------------------------------------------------------------------------------
# memory


GIB = 2**30


@dataclass
class MemoryEstimate:
    """Bytes per rank at the start of training (an estimate: allocator slack and library buffers not counted)."""

    parameters: int
    gradients: int
    optimizer: int
    teacher: int
    activations: int
    logits: int
    views: int
    available: int | None
    device: str
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return (
            self.parameters
            + self.gradients
            + self.optimizer
            + self.teacher
            + self.activations
            + self.logits
            + max(self.views, 0)
        )

    @property
    def fits(self) -> bool:
        return self.available is None or self.total <= self.available

    def table(self) -> str:
        rows = [
            ("parameters", self.parameters),
            ("gradients", self.gradients),
            ("optimizer", self.optimizer),
            ("teacher", self.teacher),
            ("activations", self.activations),
            ("logit chunks", self.logits),
            ("K-view scoring", self.views),
            ("total", self.total),
        ]
        avail = "unknown" if self.available is None else f"{self.available / GIB:.2f} GiB"
        lines = [f"memory estimate per rank ({self.device}, available {avail}):"]
        lines += [f"  {name:<15}{value / GIB:9.3f} GiB" for name, value in rows]
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def available_memory(device: str) -> int | None:
    """Total memory of the device a rank trains on (a GPU's memory; on CPU the machine's available RAM)."""
    if str(device).startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(device)).total_memory
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def estimate_memory(
    model: nn.Module,
    *,
    lora: bool,
    engine: str,
    world: int,
    precision: Precision,
    micro_batch_size: int,
    sequence_length: int,
    completion_length: int,
    teacher: str,
    num_views: int,
    chunk_size: int,
    gradient_checkpointing: bool,
    offload_optimizer: bool = False,
    device: str = "cpu",
    available: int | None = None,
) -> MemoryEstimate:
    """Per-rank memory of a training configuration, from the model's parameter counts and config.

    parameters: stored dtype (fp32 master; DeepSpeed bf16 + fp32 master partitions), ZeRO-3 divides by world;
    gradients: trainable params in the storage dtype (ZeRO-2/3 partition them); optimizer: AdamW's two fp32 moments
    (+ the fp32 master under DeepSpeed bf16), ZeRO divides by world, CPU offload moves them off the device;
    teacher: a full fp32 copy for full fine-tuning (ZeRO-3: partitioned), nothing under LoRA (the same base);
    activations: per layer ≈ B·L·H·(34 + 5·heads·L/H)/2 floats in the compute dtype without checkpointing
    (Korthikanti et al., halved for SDPA attention that keeps no score matrix), 2·B·L·H with checkpointing plus one
    layer's full set; logit chunks: a few fp32 [chunk, V] buffers of the chunked loss; K views: the no-grad K·B
    scoring pass of online mode (one layer's activations at a time + its logit chunks).
    """
    n_total, n_train = _parameter_counts(model)
    params, grads, opt = _training_state_bytes(
        n_train, n_total - n_train, lora=lora, engine=engine, world=world, precision=precision
    )
    notes: list[str] = []
    if offload_optimizer:
        notes.append(f"optimizer states offloaded to CPU memory ({opt / GIB:.2f} GiB there)")
        opt = 0
    shard = world if engine == "zero3" else 1
    teacher_bytes = 0 if lora else (n_total * 4) // shard
    if lora and teacher == "ema":
        teacher_bytes = n_train * 4
    b, seq = micro_batch_size, sequence_length
    activations, logits, views = _micro_batch_bytes(
        model, precision, b, seq, completion_length, num_views, chunk_size, gradient_checkpointing
    )
    return MemoryEstimate(
        parameters=int(params),
        gradients=int(grads),
        optimizer=int(opt),
        teacher=int(teacher_bytes),
        activations=int(activations),
        logits=int(logits),
        views=int(views),
        available=available,
        device=device,
        notes=notes,
    )


def _parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(all, trainable) parameter counts; a ZeRO-3 partitioned parameter counts whole (its ds_numel)."""
    n_total = sum(p.numel() if not is_partitioned(p) else p.ds_numel for p in model.parameters())
    n_train = sum(
        (p.numel() if not is_partitioned(p) else p.ds_numel) for p in model.parameters() if p.requires_grad
    )
    return n_total, n_train


def _training_state_bytes(
    n_train: int, n_frozen: int, *, lora: bool, engine: str, world: int, precision: Precision
) -> tuple[int, int, int]:
    """Per-rank bytes of (parameters, gradients, optimizer states), before any optimizer offload."""
    compute_bytes = torch.finfo(precision.compute).bits // 8
    if engine in ("zero2", "zero3"):  # DeepSpeed: compute-dtype parameters, fp32 masters in the optimizer
        shard = world if engine == "zero3" else 1
        params = (n_train * compute_bytes + n_frozen * compute_bytes) // shard
        grads = n_train * compute_bytes // world
        opt = n_train * (8 + (4 if precision.compute != torch.float32 else 0)) // world
    else:
        store = 4 if precision.master == "fp32" else compute_bytes
        frozen_store = compute_bytes if lora else store
        params = n_train * store + n_frozen * frozen_store
        grads = n_train * store
        opt = n_train * 8 if precision.master == "fp32" else n_train * 2 * compute_bytes
    return params, grads, opt


def _model_dims(model: nn.Module) -> tuple[int, int, int, int]:
    """(hidden size, layers, attention heads, vocabulary size) from the model's config; 0 (heads: 1) if unset."""
    cfg = getattr(model, "config", None)
    hidden = int(getattr(cfg, "hidden_size", 0) or 0)
    layers = int(getattr(cfg, "num_hidden_layers", 0) or 0)
    heads = int(getattr(cfg, "num_attention_heads", 1) or 1)
    vocab = int(getattr(cfg, "vocab_size", 0) or 0)
    return hidden, layers, heads, vocab


def _micro_batch_bytes(
    model: nn.Module,
    precision: Precision,
    b: int,
    seq: int,
    completion_length: int,
    num_views: int,
    chunk_size: int,
    gradient_checkpointing: bool,
) -> tuple[int, int, int]:
    """Bytes of (activations, logit chunks, K-view scoring) of one micro-batch of `b` sequences of `seq` tokens."""
    hidden, layers, heads, vocab = _model_dims(model)
    compute_bytes = torch.finfo(precision.compute).bits // 8
    per_layer_full = _layer_activation_bytes(b, seq, hidden, heads, compute_bytes)
    if gradient_checkpointing:
        activations = layers * 2 * b * seq * hidden * compute_bytes + per_layer_full
    else:
        activations = layers * per_layer_full
    n_tokens = b * completion_length
    logits = 3 * min(chunk_size, max(n_tokens, 1)) * vocab * 4 + 2 * n_tokens * hidden * 4
    views = 0
    if num_views:  # online mode's no-grad scoring: one layer's activations at a time + its logit chunks
        rows = num_views * b
        views = _layer_activation_bytes(rows, seq, hidden, heads, compute_bytes)
        views += 2 * min(chunk_size, rows * completion_length) * vocab * 4
    return activations, logits, views


def _layer_activation_bytes(rows: int, seq: int, hidden: int, heads: int, compute_bytes: int) -> int:
    """One layer's full activations for `rows` sequences of `seq` tokens (Korthikanti et al., halved for SDPA)."""
    return int(rows * seq * hidden * (34 + 5 * heads * seq / max(hidden, 1)) / 2 * compute_bytes / 2)


def advice(estimate: MemoryEstimate, *, lora: bool, engine: str, gradient_checkpointing: bool) -> list[str]:
    """What to change when a configuration does not fit, biggest lever first."""
    out = []
    state = estimate.parameters + estimate.gradients + estimate.optimizer + estimate.teacher
    if state > estimate.activations:
        if not lora:
            out.append(
                "train.lora.enabled=true (the frozen base needs no gradients, optimizer or teacher copy)"
            )
        if engine != "zero3" and not lora:
            out.append(
                "train.deepspeed=zero3 on more GPUs (parameters, gradients, optimizer and teacher partitioned)"
            )
        elif engine == "none":
            out.append("train.deepspeed=zero2 on more GPUs (gradients and optimizer states partitioned)")
        if estimate.optimizer:
            out.append(
                "train.offload_optimizer=true (AdamW states in CPU memory; needs deepspeed zero2/zero3)"
            )
    if not gradient_checkpointing:
        out.append("train.gradient_checkpointing=true (recompute activations in backward)")
    out.append("a smaller train.micro_batch_size (raise train.grad_accum to keep the window)")
    return out


class DoesNotFitError(RuntimeError):
    """The memory estimate of a training configuration exceeds the device."""


def check_memory(estimate: MemoryEstimate, **kw) -> None:
    """Refuse a configuration whose estimate exceeds the device, naming what to change."""
    if estimate.fits:
        return
    lines = [
        f"this training configuration needs ≈ {estimate.total / GIB:.2f} GiB per rank but the device "
        f"({estimate.device}) has {estimate.available / GIB:.2f} GiB. Change one of:",
        *[f"  - {a}" for a in advice(estimate, **kw)],
        estimate.table(),
        "(train.skip_memory_check=true runs it anyway)",
    ]
    raise DoesNotFitError("\n".join(lines))
