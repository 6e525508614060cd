"""Teachers for self-distillation: the frozen initial model θ₀, or an EMA of the student.

The teacher is the student's own architecture, reading a different prompt (c*, x). Three kinds:

- `FrozenTeacher` — θ₀. Under LoRA (peft) it is the student with its adapter disabled: one model,
  no copy. Under full fine-tuning it is a deep-copied, frozen model.
- `EMATeacher` — full fine-tuning: φ ← β φ + (1−β) θ every N optimizer steps over every parameter;
  buffers are copied. Under ZeRO-3 both the student and the teacher (`unisd.distributed.partitioned_copy`,
  fp32) are partitioned: each update gathers θ (read only) and φ (modified on rank 0, re-partitioned from
  it) with `deepspeed.zero.GatheredParameters`; the head weight the loss reads and the checkpointed state are
  gathered the same way (tested against the single-process EMA under `DS_ACCELERATOR=cpu torchrun`).
- `LoraEMATeacher` — LoRA: one base model with a second adapter "teacher" whose weights are the EMA
  of the student adapter's. Note EMA(A)·EMA(B) ≠ EMA(B·A): averaging the factors is not averaging
  the low-rank update ΔW = B·A, it is a cheap proxy that stays rank-r. `faithful=True` reproduces the
  reference code, which skips LoRA weights when averaging, so its teacher never moves (= θ₀).

All teachers share one interface:

    with teacher.forward_context() as model:    # eval mode, no_grad, teacher weights active
        out = model(input_ids=..., attention_mask=...)
    teacher.head_weight()   # [V, H] teacher LM head for the chunked loss, or None = the student's
    teacher.step()          # call once after every optimizer step; True when it updated
    teacher.drift()         # {ema/...: float} how far an EMA teacher moved / lags (empty when frozen)

EMA cadence (`EMACadence`): the reference updates every N steps with β; `per_step` updates after every step
with β^(1/N) (the same half-life), so a run shorter than N steps still has a moving teacher.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterable, Iterator
from typing import Literal, Protocol

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

TeacherKind = Literal["frozen", "ema"]


class Teacher(Protocol):
    kind: str

    def forward_context(self) -> contextlib.AbstractContextManager[nn.Module]: ...

    def head_weight(self) -> Tensor | None: ...

    def step(self) -> bool: ...

    def drift(self) -> dict[str, float]: ...


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model inside DDP / DataParallel / a DeepSpeed engine."""
    while isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel) or (
        type(model).__name__ == "DeepSpeedEngine" and hasattr(model, "module")
    ):
        model = model.module
    return model


def is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # peft is a dependency, but keep full fine-tuning usable without it
        return False
    return isinstance(unwrap_model(model), PeftModel)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy with every parameter frozen and in eval mode (full fine-tuning teacher)."""
    teacher = copy.deepcopy(unwrap_model(model))
    teacher.requires_grad_(False)
    teacher.eval()
    return teacher


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) for the teacher pass; restores each module's own training flag."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode


def _is_zero3_partitioned(params: Iterable[Tensor]) -> bool:
    # DeepSpeed ZeRO-3 tags partitioned parameters with ds_id / ds_status.
    return any(hasattr(p, "ds_id") for p in params)


def _is_available(param: Tensor) -> bool:
    """A ZeRO-3 parameter that is whole right now (inside a GatheredParameters context or a module's forward)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return getattr(param, "ds_status", None) == ZeroParamStatus.AVAILABLE


@contextlib.contextmanager
def _gathered(read: list[Tensor], write: list[Tensor]) -> Iterator[None]:
    """Make ZeRO-3 partitioned parameters whole for the duration; `write` ones are re-partitioned
    from rank 0's copy on exit. A no-op for ordinary parameters."""
    if not _is_zero3_partitioned(read + write):
        yield
        return
    import deepspeed  # only reachable when parameters carry ZeRO-3 attributes, i.e. deepspeed is in use

    with (
        deepspeed.zero.GatheredParameters(read, modifier_rank=None),
        deepspeed.zero.GatheredParameters(write, modifier_rank=0),
    ):
        yield


def _head_of(model: nn.Module) -> nn.Module:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(model).__name__} has no output embedding (LM head) with a weight")
    return head


def _check_lora_head_untouched(model: nn.Module) -> None:
    """The chunked loss reads the LM head weight directly; an adapted head would be silently ignored."""
    head = _head_of(model)
    from peft.tuners.tuners_utils import BaseTunerLayer

    if isinstance(head, BaseTunerLayer) or isinstance(getattr(head, "modules_to_save", None), nn.ModuleDict):
        raise NotImplementedError(
            "the LM head is adapted (LoRA target or modules_to_save); the chunked loss needs a plain head "
            "weight — target only decoder projections"
        )


EMASchedule = Literal["every", "per_step"]


class EMACadence:
    """When the EMA teacher updates and with which decay.

    every:    φ ← β φ + (1−β) θ after every N-th optimizer step (the reference; a run shorter than N
              steps never moves the teacher).
    per_step: φ ← β^(1/N) φ + (1 − β^(1/N)) θ after every step — the same half-life measured in steps,
              so the teacher follows the student from the first step on.
    """

    def __init__(self, beta: float, every: int, schedule: EMASchedule):
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"ema beta must be in [0, 1], got {beta}")
        if every < 1:
            raise ValueError(f"ema every must be ≥ 1, got {every}")
        if schedule not in ("every", "per_step"):
            raise ValueError(f"ema schedule must be 'every' or 'per_step', got {schedule!r}")
        self.beta, self.every, self.schedule = float(beta), int(every), schedule

    def decay_at(self, optimizer_step: int) -> float | None:
        """The decay to apply after optimizer step `optimizer_step` (1-based), or None for no update."""
        if self.schedule == "per_step":
            return self.beta ** (1.0 / self.every)
        return None if optimizer_step % self.every else self.beta


def _local(t: Tensor) -> Tensor:
    """A tensor's values on this rank: its ZeRO-3 shard (`ds_tensor`) when partitioned, else itself."""
    return t.ds_tensor if hasattr(t, "ds_tensor") else t


def _sum_over_shards(values: list[float], partitioned: bool) -> list[float]:
    """Sum per-rank partial sums over the ranks when the tensors were ZeRO-3 shards (a collective)."""
    import torch.distributed as dist

    if not (partitioned and dist.is_initialized() and dist.get_world_size() > 1):
        return values
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.cpu().tolist()


def _gap_stats(pairs: Iterable[tuple[Tensor, Tensor]]) -> dict[str, float]:
    """ema/teacher_student_gap = ‖φ − θ‖ / ‖θ‖ over (teacher, student) tensor pairs (ZeRO-3: the shards of
    every rank, summed)."""
    pairs = list(pairs)
    partitioned = _is_zero3_partitioned([t for pair in pairs for t in pair])
    gap = norm = 0.0
    for phi, theta in pairs:
        phi, theta = _local(phi), _local(theta)
        gap += float((phi.float() - theta.float()).pow(2).sum())
        norm += float(theta.float().pow(2).sum())
    gap, norm = _sum_over_shards([gap, norm], partitioned)
    return {"ema/teacher_student_gap": (gap**0.5) / max(norm**0.5, 1e-12)}


def _full_weight(weight: Tensor) -> Tensor:
    """The detached weight; a gathered full copy when it is a ZeRO-3 shard (the chunked loss reads all of it)."""
    if not _is_zero3_partitioned([weight]) or _is_available(weight):
        return weight.detach()
    with _gathered([weight], []):
        return weight.detach().clone()


class FrozenTeacher:
    """θ₀. LoRA: the student with its adapter disabled (no second copy). Full FT: a frozen deep copy.

    `teacher_model`: pass a ready frozen copy yourself where deep-copying is not possible (ZeRO-3).
    """

    kind = "frozen"

    def __init__(self, student: nn.Module, *, teacher_model: nn.Module | None = None):
        model = unwrap_model(student)
        self.uses_adapter = is_peft_model(model) and teacher_model is None
        if self.uses_adapter:
            _check_lora_head_untouched(model)
            self.model = model
        else:
            self.model = teacher_model if teacher_model is not None else frozen_copy(model)
            self.model.requires_grad_(False)
        self.optimizer_steps = 0

    @contextlib.contextmanager
    def forward_context(self) -> Iterator[nn.Module]:
        with _eval_mode(self.model), torch.no_grad():
            if self.uses_adapter:
                with self.model.disable_adapter():
                    yield self.model
            else:
                yield self.model

    def head_weight(self) -> Tensor | None:
        return None if self.uses_adapter else _full_weight(_head_of(self.model).weight)

    def step(self) -> bool:
        self.optimizer_steps += 1
        return False

    def drift(self) -> dict[str, float]:
        return {}


class EMATeacher:
    """Full fine-tuning EMA teacher: φ ← β φ + (1−β) θ over every parameter, every `every` steps.

    φ starts as a frozen copy of the student (θ₀). Buffers are copied from the student at each
    update. After n updates with student weights θ_1..θ_n: φ_n = βⁿ φ_0 + (1−β) Σ_j β^(n−j) θ_j.
    In bf16 the per-update increment (1−β)(θ−φ) can fall below bf16 resolution; keep the teacher
    in fp32 (`teacher_model=`) if that matters. `faithful` changes nothing here: the reference
    averages every non-LoRA weight, which under full fine-tuning is all of them.
    """

    kind = "ema"

    def __init__(
        self,
        student: nn.Module,
        *,
        beta: float = 0.9,
        every: int = 10,
        schedule: EMASchedule = "every",
        faithful: bool = False,
        teacher_model: nn.Module | None = None,
    ):
        self.cadence = EMACadence(beta, every, schedule)
        model = unwrap_model(student)
        if is_peft_model(model):
            raise ValueError("student is a peft model: use LoraEMATeacher (build_teacher picks it)")
        self.student = model
        self.model = teacher_model if teacher_model is not None else frozen_copy(model)
        self.model.requires_grad_(False)
        self.beta, self.every, self.faithful = float(beta), int(every), faithful
        student_names = [n for n, _ in self.student.named_parameters()]
        teacher_names = [n for n, _ in self.model.named_parameters()]
        if student_names != teacher_names:
            raise ValueError(
                "teacher and student parameter names differ; the EMA needs the same architecture"
            )
        self.optimizer_steps = 0
        self.updates = 0

    @contextlib.contextmanager
    def forward_context(self) -> Iterator[nn.Module]:
        with _eval_mode(self.model), torch.no_grad():
            yield self.model

    def head_weight(self) -> Tensor | None:
        return _full_weight(_head_of(self.model).weight)

    def step(self) -> bool:
        self.optimizer_steps += 1
        decay = self.cadence.decay_at(self.optimizer_steps)
        if decay is None:
            return False
        self.update(decay)
        return True

    @torch.no_grad()
    def update(self, decay: float | None = None) -> None:
        """One EMA update now with `decay` (default β); step() calls this on the cadence's schedule."""
        decay = self.beta if decay is None else decay
        for (_, phi), (_, theta) in zip(self.model.named_parameters(), self.student.named_parameters()):
            with _gathered([theta], [phi]):
                phi.lerp_(theta.to(phi.dtype), 1.0 - decay)  # φ + (1−β)(θ−φ) = βφ + (1−β)θ
        for (_, buf_t), (_, buf_s) in zip(self.model.named_buffers(), self.student.named_buffers()):
            buf_t.copy_(buf_s)
        self.updates += 1

    @torch.no_grad()
    def state_tensors(self) -> dict[str, Tensor]:
        """φ by parameter name, full tensors on CPU (ZeRO-3: gathered; a collective), plus the buffers."""
        out = {}
        for name, phi in self.model.named_parameters():
            with _gathered([phi], []):
                out[name] = phi.detach().cpu().clone()
        for name, buf in self.model.named_buffers():
            out[name] = buf.detach().cpu().clone()
        return out

    @torch.no_grad()
    def load_state_tensors(self, state: dict[str, Tensor]) -> None:
        """Restore φ from `state_tensors` output (ZeRO-3: re-partitioned from rank 0's copy; a collective)."""
        params, buffers = dict(self.model.named_parameters()), dict(self.model.named_buffers())
        missing = sorted(set(params) - set(state))
        if missing:
            raise ValueError(f"the saved EMA teacher lacks {len(missing)} parameters, e.g. {missing[:3]}")
        for name, phi in params.items():
            with _gathered([], [phi]):
                phi.copy_(state[name].to(phi.dtype))
        for name, buf in buffers.items():
            if name in state:
                buf.copy_(state[name].to(buf.dtype))

    @torch.no_grad()
    def drift(self) -> dict[str, float]:
        """ema/teacher_student_gap: ‖φ − θ‖ / ‖θ‖ over every parameter (0 = the teacher is the student)."""
        pairs = [
            (phi, theta)
            for (_, phi), (_, theta) in zip(self.model.named_parameters(), self.student.named_parameters())
        ]
        return {"ema/updates": float(self.updates), **_gap_stats(pairs)}


def adapter_parameter_pairs(
    model: nn.Module, student_adapter: str, teacher_adapter: str
) -> list[tuple[Tensor, Tensor]]:
    """(teacher param, student param) for every adapter weight of a peft model: LoRA A/B, embedding
    A/B, DoRA magnitudes, and modules_to_save copies."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    pairs: list[tuple[Tensor, Tensor]] = []

    def add(container) -> None:
        if student_adapter not in container or teacher_adapter not in container:
            return
        src, dst = container[student_adapter], container[teacher_adapter]
        if isinstance(src, nn.Parameter):
            pairs.append((dst, src))
            return
        src_params, dst_params = list(src.named_parameters()), list(dst.named_parameters())
        if [n for n, _ in src_params] != [n for n, _ in dst_params]:
            raise ValueError(f"adapters {student_adapter!r} and {teacher_adapter!r} have different shapes")
        pairs.extend((d, s) for (_, s), (_, d) in zip(src_params, dst_params))

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            for name in module.adapter_layer_names:
                container = getattr(module, name, None)
                if isinstance(container, nn.ModuleDict | nn.ParameterDict):
                    add(container)
        saved = getattr(module, "modules_to_save", None)
        if isinstance(saved, nn.ModuleDict):
            add(saved)
    return pairs


class LoraEMATeacher:
    """LoRA EMA teacher: a second adapter `teacher_adapter` on the same base model, EMA of the student's.

    φ_A ← β φ_A + (1−β) A and φ_B ← β φ_B + (1−β) B for every LoRA factor, every `every` optimizer
    steps. EMA(A)·EMA(B) ≠ EMA(B·A) — see the module docstring. The teacher adapter starts as a copy of
    the student adapter. `faithful=True`: the reference skips LoRA weights, so updates are no-ops and
    the teacher stays θ₀ + initial adapter (B = 0 → the base model).
    Save the student with `model.save_pretrained(dir, selected_adapters=["default"])` so the teacher
    adapter is not exported.
    """

    kind = "ema"

    def __init__(
        self,
        student: nn.Module,
        *,
        beta: float = 0.9,
        every: int = 10,
        schedule: EMASchedule = "every",
        faithful: bool = False,
        teacher_adapter: str = "teacher",
    ):
        self.cadence = EMACadence(beta, every, schedule)
        model = unwrap_model(student)
        if not is_peft_model(model):
            raise ValueError("LoraEMATeacher needs a peft model; use EMATeacher for full fine-tuning")
        _check_lora_head_untouched(model)
        self.model = model
        self.student_adapter = model.active_adapter
        if not isinstance(self.student_adapter, str):
            raise ValueError(f"expected one active adapter, got {self.student_adapter!r}")
        if teacher_adapter in model.peft_config:
            raise ValueError(f"the model already has an adapter named {teacher_adapter!r}")
        self.teacher_adapter = teacher_adapter
        model.add_adapter(teacher_adapter, copy.deepcopy(model.peft_config[self.student_adapter]))
        self.pairs = adapter_parameter_pairs(model, self.student_adapter, teacher_adapter)
        if not self.pairs:
            raise ValueError("found no adapter weights to average")
        with torch.no_grad():
            for phi, theta in self.pairs:
                phi.copy_(theta)
                phi.requires_grad_(False)
        # The EMA state in fp32 (φ itself may be bf16 under DeepSpeed bf16, where (1−β)(θ−φ) rounds away).
        self.masters = [phi.detach().float().clone() for phi, _ in self.pairs]
        self.initial = [phi.detach().clone() for phi, _ in self.pairs]  # φ₀: how far the teacher moved
        self.beta, self.every, self.faithful = float(beta), int(every), faithful
        if faithful:
            logger.warning(
                "LoraEMATeacher(faithful=True): LoRA weights are skipped as in the reference; the teacher never moves"
            )
        self.optimizer_steps = 0
        self.updates = 0

    @contextlib.contextmanager
    def forward_context(self) -> Iterator[nn.Module]:
        """Run the shared model with the teacher adapter active, then switch back to the student's.

        peft's set_adapter toggles requires_grad on the adapters; the flags are restored exactly.
        """
        flags = [(p, p.requires_grad) for pair in self.pairs for p in pair]
        self.model.set_adapter(self.teacher_adapter, inference_mode=True)
        try:
            with _eval_mode(self.model), torch.no_grad():
                yield self.model
        finally:
            self.model.set_adapter(self.student_adapter)
            for p, flag in flags:
                p.requires_grad_(flag)

    def head_weight(self) -> Tensor | None:
        return None  # the head is the base model's, shared with the student

    def step(self) -> bool:
        self.optimizer_steps += 1
        decay = self.cadence.decay_at(self.optimizer_steps)
        if decay is None:
            return False
        self.update(decay)
        return True

    @torch.no_grad()
    def update(self, decay: float | None = None) -> None:
        decay = self.beta if decay is None else decay
        if not self.faithful:
            for (phi, theta), master in zip(self.pairs, self.masters):
                with _gathered([theta], [phi]):
                    master.lerp_(theta.float(), 1.0 - decay)
                    phi.copy_(master)
        self.updates += 1

    @torch.no_grad()
    def load_masters(self, tensors: list[Tensor]) -> None:
        """Restore the teacher adapter (fp32 EMA state and φ) from saved tensors in pair order."""
        if len(tensors) != len(self.pairs):
            raise ValueError(f"{len(tensors)} saved teacher tensors, the adapter has {len(self.pairs)}")
        for (phi, _), master, saved in zip(self.pairs, self.masters, tensors):
            master.copy_(saved.float())
            phi.copy_(saved.to(phi.dtype))

    @torch.no_grad()
    def drift(self) -> dict[str, float]:
        """How far the teacher adapter moved from its start (ema/teacher_moved = ‖φ − φ₀‖) and how far it
        lags the student's (ema/teacher_student_gap = ‖φ − θ‖ / ‖θ‖), over every adapter tensor."""
        moved = sum(
            float((phi.float() - phi0.float()).pow(2).sum())
            for (phi, _), phi0 in zip(self.pairs, self.initial)
        )
        return {"ema/updates": float(self.updates), "ema/teacher_moved": moved**0.5, **_gap_stats(self.pairs)}


def build_teacher(
    kind: TeacherKind,
    student: nn.Module,
    *,
    beta: float = 0.9,
    every: int = 10,
    schedule: EMASchedule = "every",
    faithful: bool = False,
    teacher_model: nn.Module | None = None,
) -> FrozenTeacher | EMATeacher | LoraEMATeacher:
    """The teacher for `kind` ("frozen" | "ema"), picking the LoRA or full fine-tuning variant."""
    if kind == "frozen":
        return FrozenTeacher(student, teacher_model=teacher_model)
    if kind == "ema":
        ema = dict(beta=beta, every=every, schedule=schedule, faithful=faithful)
        if is_peft_model(student):
            return LoraEMATeacher(student, **ema)
        return EMATeacher(student, **ema, teacher_model=teacher_model)
    raise ValueError(f"teacher kind must be 'frozen' or 'ema', got {kind!r}")
