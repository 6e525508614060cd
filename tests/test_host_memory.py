"""Freed heap memory goes back to the OS during CPU training (unisd.host_memory), and nothing else changes."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from unisd.host_memory import decoder_layers, release_freed_memory
from unisd.objective import preset
from unisd.train import LoraSettings, TrainConfig, build_models

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")

# A child process fragments its heap the way a train step does (a large freed tensor raises glibc's mmap
# threshold, so the next tensors land on the heap; one still-live tensor above them pins the heap's top) and
# prints its resident MiB after freeing them, then after release_freed_memory().
FRAGMENT = textwrap.dedent(
    """
    import torch
    from unisd.host_memory import release_freed_memory

    def rss_mib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096 / 2**20

    del_me = torch.ones(16 * 2**20 // 4); del del_me          # 16 MiB via mmap, freed: threshold rises
    blocks = [torch.ones(2**20 // 4 * 2) for _ in range(300)]  # 300 x 2 MiB, now on the heap
    pin = torch.ones(1024)                                     # allocated last: above the blocks
    del blocks
    kept = rss_mib()
    assert release_freed_memory()
    print(kept, rss_mib())
    """
)


def test_release_returns_freed_heap_pages_to_the_os():
    out = subprocess.run([sys.executable, "-c", FRAGMENT], capture_output=True, text=True, check=True)
    kept, released = map(float, out.stdout.split())
    assert kept - released > 400, f"resident {kept:.0f} MiB before the release, {released:.0f} MiB after"


def _hooked_layers(model) -> int:
    return sum(len(layer._forward_pre_hooks) for layer in decoder_layers(model))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_step_is_the_same_with_the_release_hooks(checkpointing):
    objective = preset("sd")
    grads, losses = {}, {}
    for release in (False, True):
        cfg = TrainConfig(
            lora=LoraSettings(r=4, alpha=8, dropout=0.0),
            release_host_memory=release,
            gradient_checkpointing=checkpointing,
        )
        torch.manual_seed(0)
        _, model, _ = build_models(cfg, objective, "tiny:llama")
        assert _hooked_layers(model) == (2 if release else 0)  # tiny:llama has 2 decoder layers
        ids = torch.randint(100, 1000, (2, 12))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses[release] = loss.item()
        grads[release] = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    assert losses[True] == losses[False]
    assert all(torch.equal(a, b) for a, b in zip(grads[True], grads[False], strict=True))


def test_release_is_available_here():
    # this machine's glibc has malloc_trim; a silent no-op would hide a regression
    assert release_freed_memory()
