"""Shared fixtures: the real SmolLM2 (loaded once per session) and tiny random models."""

from __future__ import annotations

import os
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# Sampled negatives are cached across runs; a test session starts with an empty cache of its own.
os.environ.setdefault("UNISD_SAMPLE_CACHE", tempfile.mkdtemp(prefix="unisd-sample-cache-"))


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the real SmolLM2-135M-Instruct on CPU, fp32."""
    from unisd.models import load_model, load_tokenizer

    return load_model("smollm2-135m-instruct", device="cpu"), load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_llama():
    """(model, tokenizer): a 2-layer random Llama with the SmolLM2 tokenizer (49,152 tokens)."""
    from unisd.models import load_model, load_tokenizer

    return load_model("tiny:llama", device="cpu"), load_tokenizer("tiny:llama")


@pytest.fixture(scope="module")
def single_thread():
    """Tiny tensors: on a shared, oversubscribed 2-core machine OpenMP synchronisation between two
    threads costs 100x the work (measured 4 ms vs 0.6-1.7 s for one chunked call). Restored after.
    Use per module: `pytestmark = pytest.mark.usefixtures("single_thread")`."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
