"""Sampled texts kept across runs, one file per decode batch: the negative demonstrations (and induced
instructions) are the costliest part of a UniSD* round's extra work, and the same model asked the same
prompts with the same settings writes the same texts.

A batch's texts depend on the model (`models`-level fingerprint: a built-in name, or a trained model folder's
file contents), its prompts (token ids), where it starts in the stage (its sampling seed) and the decode
settings; that is the key. So a rerun in another run folder, the same items in a later experiment, or a stage
killed half-way reuses every batch already sampled, and any changed input samples afresh. Entries are small
JSON files under $UNISD_SAMPLE_CACHE (default: <unisd cache dir>/samples). CACHE_VERSION is part of the key:
bump it when the decode path changes what it samples.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from unisd import __version__
from unisd.artifacts import write_json

log = logging.getLogger(__name__)

CACHE_VERSION = 1


def sample_cache_dir() -> Path:
    from unisd.models import cache_dir

    env = os.environ.get("UNISD_SAMPLE_CACHE")
    return Path(env).expanduser() if env else cache_dir() / "samples"


class SampleCache:
    """The decoded texts of one decode batch: `get` (None when not cached) and `put`; counts its hits."""

    def __init__(self, model_id: str, settings: dict[str, Any], root: Path | None = None):
        self.root = root or sample_cache_dir()
        self.key_base = {"model": model_id, "settings": settings, "unisd": __version__, "v": CACHE_VERSION}
        self.hits = 0

    def _path(self, prompts: Sequence[Sequence[int]], first_index: int) -> Path:
        key = {**self.key_base, "first_index": first_index, "prompts": [[int(t) for t in p] for p in prompts]}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        return self.root / digest[:2] / f"{digest}.json"

    def get(self, prompts: Sequence[Sequence[int]], first_index: int) -> list[str] | None:
        try:
            texts = json.loads(self._path(prompts, first_index).read_text())["texts"]
        except (OSError, ValueError, KeyError, TypeError):
            return None  # absent, or unreadable: sampled again (and rewritten)
        if not (
            isinstance(texts, list) and len(texts) == len(prompts) and all(isinstance(t, str) for t in texts)
        ):
            return None
        self.hits += 1
        return texts

    def put(self, prompts: Sequence[Sequence[int]], first_index: int, texts: Sequence[str]) -> None:
        path = self._path(prompts, first_index)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, {"texts": list(texts)})
        except OSError as err:  # a read-only or full cache costs the reuse, not the run
            log.warning("sample cache entry not written (%s): %s", path, err)
