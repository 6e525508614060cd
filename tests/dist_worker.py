"""One torchrun rank running several `unisd train` commands in a row (one process group, one start-up).

    torchrun --nproc_per_node=2 tests/dist_worker.py runs.json

runs.json: a list of argument lists for `unisd` (each e.g. ["train", "--config", ..., "--out", ...]). Used by
tests/test_distributed.py to pay the ranks' start-up (torch, transformers, DeepSpeed imports) once.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist


def main(path: str) -> int:
    from unisd.cli import main as unisd_main

    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    if ranks > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        for argv in json.loads(open(path).read()):
            rc = unisd_main(argv)
            if rc:
                print(f"unisd {' '.join(argv)} exited {rc}", file=sys.stderr)
                return rc
            if ranks > 1:
                dist.barrier()
    finally:
        if ranks > 1:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
