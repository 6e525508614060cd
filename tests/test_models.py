from __future__ import annotations

import logging

import pytest
import torch

from unisd import models
from unisd.models import (
    ARCHITECTURES,
    BUILTIN_MODELS,
    TINY_ARCHES,
    UnknownModelError,
    cache_dir,
    describe_spec,
    load_model,
    materialize_builtin,
    tiny_model,
)


def test_unknown_model_lists_builtin_names():
    with pytest.raises(UnknownModelError) as err:
        load_model("no-such-model")
    for name in BUILTIN_MODELS:
        assert name in str(err.value)


def test_unknown_tiny_arch_lists_arches():
    with pytest.raises(UnknownModelError, match="llama"):
        load_model("tiny:nope")


def test_describe_spec(tmp_path):
    assert describe_spec("smollm2-135m-instruct") == "builtin"
    assert describe_spec("tiny:llama") == "tiny"
    assert describe_spec("random:qwen2.5-7b") == "random"
    assert describe_spec(str(tmp_path)) == "path"
    assert describe_spec("Qwen/Qwen2.5-7B-Instruct") == "hub"


def test_hub_id_offline_gives_clear_error():
    with pytest.raises(OSError, match="built-in name"):
        load_model("unisd-test/definitely-not-a-model", device="cpu")


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("UNISD_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"


@pytest.mark.parametrize("arch", sorted(TINY_ARCHES))
def test_tiny_models_forward_and_are_seeded(arch):
    a = tiny_model(arch, vocab_size=256, seed=3)
    b = tiny_model(arch, vocab_size=256, seed=3)
    c = tiny_model(arch, vocab_size=256, seed=4)
    ids = torch.randint(0, 256, (2, 7))
    out_a, out_b, out_c = (m(input_ids=ids).logits for m in (a, b, c))
    assert out_a.shape == (2, 7, 256)
    assert torch.equal(out_a, out_b)
    assert not torch.allclose(out_a, out_c)


def test_random_full_size_architecture_matches_published_config():
    # Build on the meta device: the config is what matters, not 135M random floats.
    from unisd.models import _tiny_config

    cfg = _tiny_config("smollm2-135m", vocab_size=0)
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    assert 134e6 < n_params < 136e6, n_params  # SmolLM2-135M
    assert set(ARCHITECTURES) >= {"smollm2-135m", "qwen2.5-7b"}


def test_smollm2_builtin_loads_from_cache_and_answers_paris(smollm2, tmp_path):
    model, tok = smollm2
    target = materialize_builtin("smollm2-135m-instruct")
    files = sorted(target.glob("*.safetensors"))
    assert files and (target / "config.json").exists()
    mtimes = [f.stat().st_mtime_ns for f in files]
    again = load_model("smollm2-135m-instruct", device="cpu")  # must reuse the cache, not re-dequantize
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    assert type(again).__name__ == "LlamaForCausalLM"
    # The cache is a plain model: no GGUF quantization record, so a trained copy can be saved.
    assert "quantization_config" not in (target / "config.json").read_text()
    again.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "config.json").exists()
    enc = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**enc, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id)
    answer = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
    assert tok.padding_side == "left" and tok.pad_token_id is not None


EPYC = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 fma\n\nprocessor\t: 1\n"
SAPPHIRE = "model name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: avx2 avx512f avx512_bf16 amx_bf16\n"


def test_cpu_bf16_native_reads_the_cpus_flags():
    assert models.cpu_flags(EPYC) == ("AMD EPYC", {"fpu", "sse2", "avx2", "fma"})
    assert not models.cpu_bf16_native(EPYC) and models.cpu_bf16_native(SAPPHIRE)
    assert models.cpu_flags("") == ("", set())


def test_bf16_on_a_cpu_without_native_bf16_warns(monkeypatch, caplog):
    # emulated bf16 ran a SmolLM2 forward 6x slower than fp32: a user who asks for it hears why it is slow
    for native, warned in ((False, True), (True, False)):
        monkeypatch.setattr(models, "cpu_bf16_native", lambda cpuinfo=None, native=native: native)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="unisd.models"):
            model = models.load_model("tiny:llama", dtype="bfloat16", device="cpu")
        assert next(model.parameters()).dtype == torch.bfloat16
        assert ("without native bf16" in caplog.text) == warned
