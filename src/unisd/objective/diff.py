"""How far each preset's computation is from plain `sd` on the same batch — so an inert component shows.

For every preset we train a fresh LoRA student from the same seed on the same window (the trainer's own
`accumulate_window` / `apply_update`, real forward passes of the student, c*-teacher, c⁻-teacher and K
scored views) for a few optimizer steps, and compare with `sd`:

    loss_rel     |L − L_sd| / L_sd at step 1 (before any update)
    grad_cos     cosine of the step-1 adapter gradient with sd's
    grad_rel     ‖g − g_sd‖ / ‖g_sd‖ at step 1
    traj_rel     ‖θ_T − θ_T,sd‖ / ‖θ_T,sd − θ_0‖ after T steps (catches the EMA teacher, which only
                 differs once it has moved, and anything that changes later steps)

A component whose every figure is ~0 computes plain SD's loss: the check that found sequence-level agreement
cancelling in the reference reduction. `unisd objective-diff` prints the table; tests assert on it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from unisd.objective import PRESETS, ObjectiveConfig, preset

CONTEXT_KINDS = ("random", "retrieval", "induced")


@dataclass(frozen=True)
class PresetDiff:
    preset: str
    loss: float
    loss_rel: float
    grad_cos: float
    grad_rel: float
    traj_rel: float

    @property
    def inert(self) -> bool:
        return max(self.loss_rel, self.grad_rel, self.traj_rel) < 1e-6

    def to_dict(self) -> dict:
        return {**asdict(self), "inert": self.inert}


def synthetic_window(tokenizer, model, *, items: int, num_views: int, seed: int) -> dict[str, list[dict]]:
    """One training window per context kind: random prompt ids (student x, teacher c*+x, negative c⁻+x, K
    views a_k+x) and completions, with the views scored by the base model (the scoring stage's scorer)."""
    from unisd.scoring import score_views

    rng = random.Random(seed)
    vocab = min(len(tokenizer), 2000)

    def toks(lo: int, hi: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))]

    base = []
    for i in range(items):
        x = toks(6, 12)
        base.append(
            {
                "id": f"synthetic/{i}",
                "student_prompt_ids": x,
                "teacher_prompt_ids": toks(8, 16) + x,
                "negative_prompt_ids": toks(8, 16) + x,
                "completion_ids": toks(6, 14),
                "x": x,
            }
        )
    windows: dict[str, list[dict]] = {}
    for kind in CONTEXT_KINDS:
        rows = [(toks(6, 14) + it["x"], it["completion_ids"], None) for it in base for _ in range(num_views)]
        with torch.no_grad():
            scored = score_views(
                model, rows, pad_id=tokenizer.pad_token_id, batch_size=16, chunk_size=1024, progress=False
            )
        window = []
        for n, it in enumerate(base):
            views = scored[n * num_views : (n + 1) * num_views]
            window.append({**{k: v for k, v in it.items() if k != "x"}, "view_logps": torch.tensor(views)})
        windows[kind] = window
    return windows


def _adapter_grads(params: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


def _flat(params: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def train_preset(
    objective: ObjectiveConfig, model_spec: str, window: list[dict], *, steps: int, seed: int, lr: float
) -> tuple[float, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(step-1 loss, step-1 gradient, θ_0, θ_T) of a fresh LoRA student trained `steps` steps on `window`."""
    from unisd.train import (
        LoraSettings,
        TrainConfig,
        accumulate_window,
        apply_update,
        build_models,
        cosine_with_warmup,
    )

    torch.manual_seed(seed)
    cfg = TrainConfig(lora=LoraSettings(r=4, alpha=8, dropout=0.0), lr=lr, micro_batch_size=4, seed=seed)
    tokenizer, model, teacher = build_models(cfg, objective, model_spec)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(steps, 0))
    theta0 = _flat(params)
    first_loss, first_grad = float("nan"), torch.empty(0)
    for step in range(steps):
        stats, _ = accumulate_window(
            model,
            teacher,
            objective,
            window,
            micro_batch_size=cfg.micro_batch_size,
            pad_id=tokenizer.pad_token_id,
        )
        if step == 0:
            first_loss, first_grad = stats["loss"], _adapter_grads(params).clone()
        apply_update(params, optimizer, scheduler, teacher, cfg.max_grad_norm)
    return first_loss, first_grad, theta0, _flat(params)


def objective_diff(
    model_spec: str = "tiny:llama",
    presets: Sequence[str] | None = None,
    *,
    steps: int = 3,
    items: int = 8,
    seed: int = 0,
    lr: float = 5e-3,
    overrides: dict | None = None,
) -> list[PresetDiff]:
    """PresetDiff per preset (default: every distillation preset; `sft` trains on other data) vs `sd`.

    `overrides`: ObjectiveConfig fields set on every preset, sd included (e.g. {"faithful": True})."""
    from unisd.models import load_model, load_tokenizer

    if steps < 1 or items < 1:
        raise ValueError(f"objective_diff needs steps ≥ 1 and items ≥ 1, got steps={steps}, items={items}")
    names = list(presets) if presets else [n for n in PRESETS if not PRESETS[n].is_sft]
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        raise ValueError(f"unknown preset(s) {unknown}; known: {sorted(PRESETS)}")
    tokenizer, base = load_tokenizer(model_spec), load_model(model_spec)
    num_views = max(PRESETS[n].num_views for n in names)
    windows = synthetic_window(tokenizer, base, items=items, num_views=num_views, seed=seed)
    del base

    def run(name: str):
        obj = preset(name).model_copy(update=overrides or {})
        window = [{**it, "view_logps": it["view_logps"][: obj.num_views]} for it in windows[obj.context_kind]]
        return train_preset(obj, model_spec, window, steps=steps, seed=seed, lr=lr)

    sd_loss, sd_grad, theta0, sd_final = run("sd")
    sd_moved = float((sd_final - theta0).norm())
    rows = []
    for name in names:
        loss, grad, _, final = (sd_loss, sd_grad, theta0, sd_final) if name == "sd" else run(name)
        rows.append(
            PresetDiff(
                preset=name,
                loss=loss,
                loss_rel=abs(loss - sd_loss) / max(abs(sd_loss), 1e-12),
                grad_cos=float(torch.nn.functional.cosine_similarity(grad, sd_grad, dim=0)),
                grad_rel=float((grad - sd_grad).norm() / sd_grad.norm().clamp_min(1e-12)),
                traj_rel=float((final - sd_final).norm()) / max(sd_moved, 1e-12),
            )
        )
    return rows


def diff_table(rows: Sequence[PresetDiff]) -> str:
    lines = [
        "| preset | loss (step 1) | Δloss vs sd | grad cos vs sd | Δgrad vs sd | Δθ after T steps vs sd | inert? |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.preset} | {r.loss:.5f} | {r.loss_rel:.2e} | {r.grad_cos:.6f} | {r.grad_rel:.2e} "
            f"| {r.traj_rel:.2e} | {'(reference)' if r.preset == 'sd' else '**yes**' if r.inert else 'no'} |"
        )
    return "\n".join(lines) + "\n"
