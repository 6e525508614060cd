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


def release_before_each_layer(model) -> list[Any]:
    """Hook `release_freed_memory` in front of every decoder layer's forward; returns the hook handles.

    A layer is a module whose class name ends in "DecoderLayer" (Llama, Qwen2, Gemma3, ...); a model without
    such layers gets no hooks."""
    if _malloc_trim() is None:
        return []

    def before_layer(module, args):  # a forward pre-hook that returns None leaves the inputs as they are
        release_freed_memory()

    return [
        module.register_forward_pre_hook(before_layer)
        for module in model.modules()
        if type(module).__name__.endswith("DecoderLayer")
    ]
