# unisd sandbox image: CPU-only, for the grade and negatives steps that execute model-written code, and for the
# chart's pipeline-upload Job (`unisd compile` + the kfp client). No GPU libraries.
#
# Build from the repository root:
#   docker build -f docker/sandbox.Dockerfile -t ghcr.io/unisd/unisd-sandbox:0.1.0 .
#
# Isolation is layered: in the cluster the pod runs non-root with a read-only root filesystem, no
# service-account token and a NetworkPolicy that denies traffic (manifests/base/networkpolicy.yaml);
# inside it unisd.sandbox runs each program under bubblewrap (no network namespace, read-only binds)
# and prlimit (util-linux, part of the base image) where the node lets it create namespaces.
#
# Base pinned by tag; to pin a digest pass --build-arg BASE=python:3.11-slim-bookworm@sha256:<digest>
# (look it up with `docker buildx imagetools inspect python:3.11-slim-bookworm`). `make images`
# (scripts/build_images.sh) builds it on a debootstrap'd Debian bookworm base instead
# (BASE=localhost/debian-base:bookworm, Python from apt) with a local torch CPU wheel.
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

ARG UNISD_VERSION=0.1.0
LABEL org.opencontainers.image.title="unisd-sandbox" \
      org.opencontainers.image.description="unisd CPU image for sandboxed evaluation and pipeline upload" \
      org.opencontainers.image.version="${UNISD_VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH}

# bubblewrap + util-linux (setpriv, prlimit): the sandbox backends. python3 from apt only where the base
# has none (the python:*-slim bases bring their own in /usr/local).
RUN apt-get update \
    && apt-get install -y --no-install-recommends bubblewrap util-linux ca-certificates \
        $(command -v python3 >/dev/null 2>&1 || echo python3 python3-venv) \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "${VIRTUAL_ENV}"

# The CPU build of torch 2.13.0 (PyPI's default wheel is the CUDA build and would add several GB of GPU
# libraries): from PyTorch's CPU index by default; the local build points pip at a CPU wheel on disk.
# unisd's torch==2.13.0 pin accepts 2.13.0+cpu.
ARG TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
RUN pip install ${TORCH_PIP_ARGS} torch==2.13.0 \
    && python -c "import torch; print('torch', torch.__version__)"

WORKDIR /opt/unisd
COPY pyproject.toml README.md ./
COPY src/ src/
# Editable (-e): the package finds configs/ relative to its source tree, /opt/unisd (see train.Dockerfile).
RUN pip install -e . kfp==2.17.0 kfp-kubernetes==2.17.0 mlflow-skinny==3.17.2 \
    && pip check

COPY components/ components/
COPY pipelines/ pipelines/
COPY configs/ configs/

RUN groupadd --gid 10001 unisd \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin unisd \
    && mkdir -p /cache \
    && chown 10001:10001 /cache
ENV HOME=/tmp \
    UNISD_PROJECT_ROOT=/opt/unisd \
    PYTHONPATH=/opt/unisd \
    HF_HOME=/cache/hf \
    HF_HUB_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    MLFLOW_DISABLE_TELEMETRY=true
USER 10001:10001

CMD ["unisd", "--help"]
