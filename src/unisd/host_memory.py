"""Give freed heap memory back to the OS while training on a CPU.

PyTorch's CPU allocator is plain malloc. glibc keeps freed heap blocks resident (its mmap threshold rises to
the size of the largest freed tensor, so activations land on the heap and stay there), and a train step's
resident set ends up at roughly twice what is live (docs/PERFORMANCE.md: 7.9 GiB for 4 GiB of live tensors
at micro-batch 4). `malloc_trim(0)` returns the free pages of every arena; calling it before each decoder
layer's forward — which under gradient checkpointing includes the layer's recomputation in backward — keeps
the resident set near what is live. It changes no numbers, only where freed memory goes; on other C
libraries (musl has no malloc_trim) it is a no-op.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return None


def release_freed_memory() -> bool:
    """Return free heap pages to the OS; False where the C library cannot."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def decoder_layers(model) -> list[Any]:
    """The model's decoder layers: modules whose class name ends in "DecoderLayer" (Llama, Qwen2, Gemma3, ...)."""
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


def release_before_each_layer(model) -> list[Any]:
    """Hook the release in front of every decoder layer's forward; returns the hook handles (none where the C
    library cannot release, or the model has no decoder layers)."""
    trim = _malloc_trim()
    if trim is None:
        return []

    def before_layer(module, args):  # a forward pre-hook that returns None leaves the inputs as they are
        trim(0)

    return [layer.register_forward_pre_hook(before_layer) for layer in decoder_layers(model)]
