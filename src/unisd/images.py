"""Container images the KFP components and Kubernetes manifests run, tagged with the package version.

One place for the names, so components, manifests, charts and Dockerfiles can't drift apart.
Override the registry with UNISD_IMAGE_REGISTRY at compile time.
"""

from __future__ import annotations

import os

from unisd import __version__

DEFAULT_REGISTRY = "ghcr.io/unisd"


def image(kind: str, *, registry: str | None = None, tag: str | None = None) -> str:
    """Image reference for `kind` in {"train", "rollout", "sandbox"}, e.g. ghcr.io/unisd/unisd-train:0.1.0."""
    if kind not in ("train", "rollout", "sandbox"):
        raise ValueError(f"unknown image kind {kind!r}; expected train, rollout or sandbox")
    registry = registry or os.environ.get("UNISD_IMAGE_REGISTRY", DEFAULT_REGISTRY)
    return f"{registry.rstrip('/')}/unisd-{kind}:{tag or __version__}"
