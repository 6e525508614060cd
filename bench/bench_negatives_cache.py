"""The negatives' sample cache: the demo's contexts stage run twice, into two run folders, starting from an
empty cache. The first samples every negative candidate; the second reads them back.

    python bench/bench_negatives_cache.py            # configs/demo.yaml's items, model and settings
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ["UNISD_SAMPLE_CACHE"] = tempfile.mkdtemp(prefix="bench-sample-cache-")

from unisd.contexts import write_contexts  # noqa: E402
from unisd.prepare import run_prepare  # noqa: E402
from unisd.runconfig import RunConfig  # noqa: E402


def main() -> None:
    cfg = RunConfig(**yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text()))
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared"
        run_prepare(cfg.prepare, model_spec=cfg.model, out_dir=prepared)
        for name in ("first run folder", "second run folder"):
            started = time.perf_counter()
            manifest = write_contexts(
                cfg.contexts_config(), model_spec=cfg.model, prepared_dir=prepared, out_dir=Path(tmp) / name
            )
            print(
                f"{name}: stage {time.perf_counter() - started:.1f} s, sampling the negatives "
                f"{manifest['timings_s'].get('negatives_generate', 0.0):.1f} s, "
                f"{manifest['counts']['negative_candidates']} candidates"
            )


if __name__ == "__main__":
    main()
