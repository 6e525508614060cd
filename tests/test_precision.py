"""Mixed precision: bf16 compute with fp32 master weights tracks an fp32 run; pure bf16 does not.

Full fine-tuning at lr 2e-5 for 10 steps on the tiny Llama (CPU bf16 autocast): with the parameters and AdamW in
bf16 (`master_weights=compute`, what training on GPU did before) most updates are smaller than half a bf16 ulp of
the weight and round away; with fp32 master weights and the forward under autocast they all land."""

from __future__ import annotations

import json

import pytest
import torch

from unisd.objective import preset
from unisd.train import LoraSettings, TrainConfig, build_models, run_train

SPEC = "tiny:llama"


def _train(root, prepared, rollout, name, **kw):
    from safetensors.torch import load_file

    cfg = TrainConfig(
        lora=LoraSettings(enabled=False),
        lr=2e-5,
        micro_batch_size=4,
        grad_accum=1,
        max_steps=10,
        checkpoint_every=100,
        warmup_ratio=0.0,
        seed=0,
        **kw,
    )
    run_train(
        cfg, preset("sd"), model_spec=SPEC, prepared_dir=prepared, rollout_dirs=[rollout], out_dir=root / name
    )
    losses = [json.loads(line)["loss"] for line in (root / name / "metrics.jsonl").read_text().splitlines()]
    return load_file(str(root / name / "merged" / "model.safetensors")), losses


def test_bf16_with_fp32_master_weights_tracks_fp32_where_pure_bf16_does_not(tmp_path):
    from test_train import make_artifacts

    from unisd.models import load_model

    prepared, _, rollout = make_artifacts(tmp_path, n_items=16)
    runs = {
        "fp32": _train(tmp_path, prepared, rollout, "fp32", dtype="float32"),
        "mixed": _train(tmp_path, prepared, rollout, "mixed", dtype="bfloat16"),
        "pure": _train(tmp_path, prepared, rollout, "pure", dtype="bfloat16", master_weights="compute"),
    }
    theta0 = {k: v.float() for k, v in load_model(SPEC, dtype="float32").state_dict().items()}
    keys = [k for k in runs["fp32"][0] if k in theta0]

    def delta(name):
        weights = runs[name][0]
        # (the bf16 run starts from θ0 rounded to bf16)
        return torch.cat(
            [(weights[k].float() - theta0[k].to(weights[k].dtype).float()).reshape(-1) for k in keys]
        )

    ref = delta("fp32")
    moved = ref != 0
    changed = {n: float((delta(n)[moved] != 0).float().mean()) for n in runs}
    rel_err = {n: float((delta(n) - ref).norm() / ref.norm()) for n in runs}
    loss_err = {
        n: max(abs(a - b) for a, b in zip(runs[n][1], runs["fp32"][1])) / max(runs["fp32"][1]) for n in runs
    }
    print({"changed": changed, "update_rel_err": rel_err, "loss_rel_err": loss_err})
    assert changed["mixed"] > 0.999 and rel_err["mixed"] < 0.05 and loss_err["mixed"] < 0.01
    assert changed["pure"] < 0.5 and rel_err["pure"] > 0.5 and loss_err["pure"] > loss_err["mixed"]
    assert runs["mixed"][0][keys[0]].dtype == torch.float32  # the exported weights are the fp32 masters


@pytest.mark.parametrize("lora", [False, True])
def test_mixed_precision_keeps_master_weights_and_the_ema_teacher_in_fp32(lora):
    cfg = TrainConfig(
        lora=LoraSettings(enabled=lora, r=4, alpha=8, target_modules=["q_proj"]), dtype="bfloat16"
    )
    _, model, teacher = build_models(cfg, preset("ema"), SPEC)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    if lora:  # the frozen base in the compute dtype, the teacher adapter's EMA state in fp32
        assert any(p.dtype == torch.bfloat16 for p in model.parameters() if not p.requires_grad)
        assert all(m.dtype == torch.float32 for m in teacher.masters)
    else:
        assert all(p.dtype == torch.float32 for p in teacher.model.parameters())
