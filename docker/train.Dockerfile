# unisd training image: PyTorch 2.13.0 + DeepSpeed 0.19.8 + unisd, kfp and the MLflow client.
# Runs the KFP steps that train or score (components/ with base_image=unisd.images.image("train")).
#
# Build from the repository root (the build context must be the repo, see .dockerignore):
#   docker build -f docker/train.Dockerfile -t ghcr.io/unisd/unisd-train:0.1.0 .
#
# Two variants from this one file, chosen by build arguments:
#   CUDA (the default, for GPU nodes): BASE is the CUDA image below and pip takes PyPI's torch 2.13.0, a
#     CUDA 13 build that brings its own cuDNN/cuBLAS/NCCL as nvidia-*-cu13 wheels; the node only needs an
#     NVIDIA driver that supports CUDA 13. The "base" flavour is enough. Pin a digest where you can reach
#     the registry (`docker buildx imagetools inspect nvidia/cuda:13.0.0-base-ubuntu24.04`), then
#     --build-arg BASE=nvidia/cuda:13.0.0-base-ubuntu24.04@sha256:<digest>.
#   CPU: `make images` (scripts/build_images.sh) passes BASE=localhost/debian-base:bookworm (debootstrap)
#     and TORCH_PIP_ARGS="--find-links /wheels" with a local torch 2.13.0+cpu wheel mounted at /wheels.
# Only the CPU variant has been built and run on the development machine: no registry is reachable there
# to pull nvidia/cuda from, and it has no GPU. The CUDA variant is unbuilt.
ARG BASE=nvidia/cuda:13.0.0-base-ubuntu24.04
FROM ${BASE}

ARG UNISD_VERSION=0.1.0
LABEL org.opencontainers.image.title="unisd-train" \
      org.opencontainers.image.description="unisd training/scoring image (PyTorch 2.13.0, DeepSpeed 0.19.8)" \
      org.opencontainers.image.version="${UNISD_VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH}

# python3 is 3.12 on Ubuntu 24.04 (3.11 on Debian bookworm). gcc/g++/python3-dev: Triton (torch.compile)
# and DeepSpeed's CPU ops compile small C/C++ extensions at run time. bubblewrap + util-linux: the sandbox
# backends for the steps of this image that run model-written code (eval, the contexts negatives check);
# without a working one the sandbox refuses. libtcmalloc-minimal4: every process of the image runs on
# tcmalloc (LD_PRELOAD below, through a fixed link on any architecture): glibc keeps a CPU train step's freed
# activations resident, 8.1 against 4.7 GiB (unisd.allocator, docs/PERFORMANCE.md). The sandbox's programs
# do not inherit it (their environment is built from scratch). apt versions follow the base's release.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates python3 python3-venv python3-dev gcc g++ ninja-build bubblewrap util-linux \
        libtcmalloc-minimal4 \
    && rm -rf /var/lib/apt/lists/* \
    && ln -s "$(ls /usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4)" /usr/local/lib/libtcmalloc_minimal.so.4 \
    && python3 -m venv "${VIRTUAL_ENV}"

# torch first and alone: every later install must see it, or pip pulls a different build.
# TORCH_PIP_ARGS: empty = PyPI's CUDA build; the CPU variant points pip at a local CPU wheel.
ARG TORCH_PIP_ARGS=""
RUN pip install ${TORCH_PIP_ARGS} torch==2.13.0 setuptools==84.2.1 wheel==0.48.0 \
    && python -c "import torch; print('torch', torch.__version__)"

# DeepSpeed is an sdist whose setup imports torch, hence --no-build-isolation. DS_BUILD_OPS=0: no
# ahead-of-time CUDA ops (there is no nvcc in this image); ZeRO with torch optimizers needs none.
RUN DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed==0.19.8

WORKDIR /opt/unisd
# The package first (changes less often than components/pipelines/configs: better layer reuse).
COPY pyproject.toml README.md ./
COPY src/ src/
# kfp, kfp-kubernetes and the MLflow client are already dependencies of the package; pinning them here
# again makes the build fail loudly if pyproject.toml and the images drift apart. Editable (-e): the
# package finds configs/ (objective presets, run configs) relative to its source tree, /opt/unisd here;
# a site-packages copy looks in /opt/venv/lib/python3.X/configs and fails (found running prepare here).
RUN pip install -e ".[deepspeed]" kfp==2.17.0 kfp-kubernetes==2.17.0 mlflow-skinny==3.17.2 \
    && pip check

COPY components/ components/
COPY pipelines/ pipelines/
COPY configs/ configs/

# Non-root, fixed uid (the manifests set runAsUser: 10001). Code stays root-owned and read-only.
# HF_HOME and the compile caches live on the mounted cache volume (the unisd-cache PVC at /cache).
RUN groupadd --gid 10001 unisd \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin unisd \
    && mkdir -p /cache \
    && chown 10001:10001 /cache
ENV HOME=/tmp \
    UNISD_PROJECT_ROOT=/opt/unisd \
    PYTHONPATH=/opt/unisd \
    HF_HOME=/cache/hf \
    TORCH_EXTENSIONS_DIR=/cache/torch_extensions \
    TRITON_CACHE_DIR=/cache/triton \
    HF_HUB_DISABLE_TELEMETRY=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    LD_PRELOAD=/usr/local/lib/libtcmalloc_minimal.so.4 \
    TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD=1099511627776
USER 10001:10001

CMD ["unisd", "--help"]
