"""unisd.teacher on tiny random Llamas: frozen θ₀, full fine-tuning EMA, LoRA EMA (and the faithful bug)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from unisd.teacher import EMATeacher, FrozenTeacher, LoraEMATeacher, build_teacher, unwrap_model

# Tiny tensors: single-threaded torch (see conftest.single_thread).
pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    return LlamaForCausalLM(config)


def tiny_lora(seed: int = 0, dropout: float = 0.1):
    return get_peft_model(
        tiny_llama(seed),
        LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["q_proj", "v_proj"]),
    )


INPUT_IDS = torch.tensor([[1, 5, 9, 17, 33, 2], [4, 8, 15, 16, 23, 42]])


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits


def student_adapter_params(model):
    return {n: p for n, p in model.named_parameters() if ".default." in n}


def randomize_student_adapter(model, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(student_adapter_params(model).items()):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def test_ema_full_finetuning_matches_closed_form():
    student = tiny_llama()
    beta, every, updates = 0.9, 3, 4
    teacher = EMATeacher(student, beta=beta, every=every)
    phi0 = {n: p.detach().clone() for n, p in teacher.model.named_parameters()}
    assert all(not p.requires_grad for p in teacher.model.parameters())
    assert teacher.model is not student

    thetas = []
    g = torch.Generator().manual_seed(1)
    for _ in range(updates):
        with torch.no_grad():  # "train": set the student to known weights θ_j
            for p in student.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        thetas.append({n: p.detach().clone() for n, p in student.named_parameters()})
        fired = [teacher.step() for _ in range(every)]
        assert fired == [False] * (every - 1) + [True]  # updates only every N optimizer steps
    assert teacher.updates == updates and teacher.optimizer_steps == every * updates

    for name, phi in teacher.model.named_parameters():
        # φ_n = βⁿ φ_0 + (1−β) Σ_j β^(n−j) θ_j   (j = 1..n)
        expected = beta**updates * phi0[name].double()
        for j, theta in enumerate(thetas, start=1):
            expected += (1 - beta) * beta ** (updates - j) * theta[name].double()
        torch.testing.assert_close(phi.double(), expected, rtol=1e-5, atol=1e-6)
    for (_, buf_t), (_, buf_s) in zip(teacher.model.named_buffers(), student.named_buffers()):
        assert torch.equal(buf_t, buf_s)
    # The teacher model runs and reads its own head.
    with teacher.forward_context() as model:
        assert model(input_ids=INPUT_IDS).logits.shape == (2, 6, 128)
    assert torch.equal(teacher.head_weight(), teacher.model.get_output_embeddings().weight)
    assert not torch.equal(teacher.head_weight(), student.get_output_embeddings().weight)


def test_frozen_full_finetuning_is_an_untouched_copy():
    student = tiny_llama()
    before = logits_of(student)
    teacher = build_teacher("frozen", torch.nn.parallel.DataParallel(student))  # wrappers are unwrapped
    assert isinstance(teacher, FrozenTeacher) and not teacher.uses_adapter
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.1)
    assert not torch.allclose(logits_of(student), before)
    with teacher.forward_context() as model:
        torch.testing.assert_close(model(input_ids=INPUT_IDS).logits, before)
    assert teacher.step() is False
    assert unwrap_model(torch.nn.parallel.DataParallel(student)) is student


def test_frozen_lora_teacher_is_the_student_with_adapter_disabled():
    student = tiny_lora(dropout=0.0)
    base = logits_of(student)  # B = 0 at init: adapter output == base
    randomize_student_adapter(student, seed=3)
    adapted = logits_of(student)
    assert not torch.allclose(adapted, base)
    n_params = sum(p.numel() for p in student.parameters())
    teacher = build_teacher("frozen", student)
    assert isinstance(teacher, FrozenTeacher) and teacher.uses_adapter and teacher.model is student
    assert sum(p.numel() for p in student.parameters()) == n_params  # no second copy
    with teacher.forward_context() as model:
        torch.testing.assert_close(model(input_ids=INPUT_IDS).logits, base)
    torch.testing.assert_close(logits_of(student), adapted)  # adapter back on afterwards
    assert teacher.head_weight() is None


def test_lora_ema_teacher_moves_with_the_closed_form():
    student = tiny_lora()
    student.train()
    base = logits_of(student)
    beta, every = 0.8, 2
    teacher = build_teacher("ema", student, beta=beta, every=every)
    assert isinstance(teacher, LoraEMATeacher)
    assert list(student.peft_config) == ["default", "teacher"] and student.active_adapter == "default"
    pairs = teacher.pairs
    assert len(pairs) == 8  # 2 layers × (q, v) × (A, B)
    phi0 = [phi.detach().clone() for phi, _ in pairs]
    assert all(not phi.requires_grad for phi, _ in pairs) and all(theta.requires_grad for _, theta in pairs)

    thetas = []
    for j in range(3):
        randomize_student_adapter(student, seed=10 + j)
        thetas.append([theta.detach().clone() for _, theta in pairs])
        for _ in range(every):
            teacher.step()
    assert teacher.updates == 3
    for i, (phi, _) in enumerate(pairs):
        expected = beta**3 * phi0[i]
        for j, theta in enumerate(thetas, start=1):
            expected = expected + (1 - beta) * beta ** (3 - j) * theta[i]
        torch.testing.assert_close(phi, expected)

    student_logits = logits_of(student.eval())
    student.train()
    with teacher.forward_context() as model:
        assert not model.training  # dropout off for the teacher pass
        teacher_logits = model(input_ids=INPUT_IDS).logits
    assert student.training and all(m.training for m in student.modules())  # train mode restored
    assert not torch.allclose(teacher_logits, base, atol=1e-4)  # the teacher adapter moved
    assert not torch.allclose(teacher_logits, student_logits, atol=1e-4)  # ... and is not the student
    # Back on the student adapter, with the same trainable set as before.
    assert student.active_adapter == "default"
    assert all(theta.requires_grad for _, theta in pairs) and all(not phi.requires_grad for phi, _ in pairs)
    loss = student(input_ids=INPUT_IDS, labels=INPUT_IDS).loss
    loss.backward()
    assert all(theta.grad is not None for _, theta in pairs) and all(phi.grad is None for phi, _ in pairs)


def test_lora_ema_faithful_reproduces_the_frozen_teacher_bug():
    student = tiny_lora(dropout=0.0)
    base = logits_of(student)
    teacher = LoraEMATeacher(student, beta=0.5, every=1, faithful=True)
    phi0 = [phi.detach().clone() for phi, _ in teacher.pairs]
    randomize_student_adapter(student, seed=5)
    for _ in range(4):
        assert teacher.step() is True
    assert all(torch.equal(phi, before) for (phi, _), before in zip(teacher.pairs, phi0))
    with teacher.forward_context() as model:
        torch.testing.assert_close(model(input_ids=INPUT_IDS).logits, base)  # never moved: θ₀


def test_teacher_construction_errors():
    with pytest.raises(ValueError, match="use LoraEMATeacher"):
        EMATeacher(tiny_lora())
    with pytest.raises(ValueError, match="needs a peft model"):
        LoraEMATeacher(tiny_llama())
    with pytest.raises(ValueError, match="beta"):
        EMATeacher(tiny_llama(), beta=1.5)
    with pytest.raises(ValueError, match="teacher kind"):
        build_teacher("ensemble", tiny_llama())
    lora = tiny_lora()
    LoraEMATeacher(lora)
    with pytest.raises(ValueError, match="already has an adapter"):
        LoraEMATeacher(lora)


@pytest.mark.parametrize("lora", [False, True])
def test_per_step_ema_moves_from_the_first_step_with_the_same_half_life(lora):
    """per_step: φ ← β^(1/N) φ + (1 − β^(1/N)) θ after every step. With the student held at θ for N steps
    that is exactly one reference update, φ_N = β φ_0 + (1−β) θ — but the teacher already moved at step 1."""
    student = tiny_lora(dropout=0.0) if lora else tiny_llama()
    beta, every = 0.9, 4
    teacher = build_teacher("ema", student, beta=beta, every=every, schedule="per_step")
    if lora:
        randomize_student_adapter(student, seed=7)
        pairs = teacher.pairs
    else:
        pairs = list(zip(teacher.model.parameters(), student.parameters()))
        phi_start = [phi.detach().clone() for phi, _ in pairs]
        with torch.no_grad():
            for p in student.parameters():
                p.add_(0.5)
    phi0 = [phi.detach().clone() for phi, _ in pairs]
    assert teacher.step() is True and teacher.updates == 1
    assert any(not torch.equal(phi, p0) for (phi, _), p0 in zip(pairs, phi0))  # moved after one step
    for _ in range(every - 1):
        teacher.step()
    for (phi, theta), p0 in zip(pairs, phi0):
        torch.testing.assert_close(phi, beta * p0 + (1 - beta) * theta.detach(), rtol=1e-5, atol=1e-6)
    drift = teacher.drift()
    assert drift["ema/updates"] == every and 0 < drift["ema/teacher_student_gap"] < 1
    if lora:
        assert drift["ema/teacher_moved"] > 0
    else:
        assert not all(torch.equal(phi, p) for (phi, _), p in zip(pairs, phi_start))
    with pytest.raises(ValueError, match="schedule"):
        build_teacher("ema", tiny_llama(), schedule="sometimes")
