# unisd rollout image: vLLM 0.33.0 for fast student sampling, plus unisd installed WITHOUT its deps.
# Runs the KFP rollout step (components/ with base_image=unisd.images.image("rollout")).
#
# Build from the repository root:
#   docker build -f docker/rollout.Dockerfile -t ghcr.io/unisd/unisd-rollout:0.1.0 .
#
# Why a separate environment: vllm==0.33.0 pins torch==2.14.0 and transformers>=5.16.1,<5.21, while
# unisd pins torch==2.13.0 and transformers==5.23.0 (pyproject.toml). Both cannot hold in one env, so
# here vLLM's pins win and unisd goes in with --no-deps; the rollout code path must therefore work on
# vLLM's transformers (<5.21). `pip check` would flag unisd's own torch/transformers pins, so it is
# replaced below by an explicit check of the versions vLLM needs.
#
# Base pinned by tag (see train.Dockerfile for pinning a digest: --build-arg BASE=...@sha256:...). vLLM's
# torch 2.14.0 is a CUDA 13 build that ships its CUDA libraries as wheels, so the "base" flavour is enough.
# CUDA-only: vLLM 0.33.0 has no CPU wheel, and this image cannot be built on the development machine (no
# registry to pull nvidia/cuda from, no GPU); `make images` does not build it.
ARG BASE=nvidia/cuda:13.0.0-base-ubuntu24.04
FROM ${BASE}

ARG UNISD_VERSION=0.1.0
LABEL org.opencontainers.image.title="unisd-rollout" \
      org.opencontainers.image.description="unisd rollout image (vLLM 0.33.0, torch 2.14.0)" \
      org.opencontainers.image.version="${UNISD_VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH}

# gcc + python3-dev: Triton builds a small C launcher the first time a kernel runs.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates python3 python3-venv python3-dev gcc \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "${VIRTUAL_ENV}"

# One resolver run for vLLM and the light dependencies unisd's rollout path imports, so pip picks
# versions that satisfy both (kfp pins requests/urllib3 exactly; vLLM needs requests>=2.33).
# Packages vLLM already depends on (numpy, pydantic, pyyaml, safetensors, tqdm, gguf) are left to it.
RUN pip install \
        vllm==0.33.0 \
        kfp==2.17.0 \
        kfp-kubernetes==2.17.0 \
        mlflow-skinny==3.17.2 \
        peft==0.21.2 \
        accelerate==1.15.0 \
        platformdirs==4.14.7 \
    && python -c "import torch, transformers; from packaging.version import Version as V; \
assert torch.__version__.split('+')[0] == '2.14.0', torch.__version__; \
assert V('5.16.1') <= V(transformers.__version__) < V('5.21'), transformers.__version__"

WORKDIR /opt/unisd
COPY pyproject.toml README.md ./
COPY src/ src/
# --no-deps: keep vLLM's torch/transformers (see the header). vllm is not imported here: the build has
# no GPU, so only its installed version is printed.
RUN pip install --no-deps . \
    && python -c "import unisd; from importlib.metadata import version; \
print('unisd', unisd.__version__, 'vllm', version('vllm'))"

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
    TRITON_CACHE_DIR=/cache/triton \
    VLLM_CACHE_ROOT=/cache/vllm \
    VLLM_NO_USAGE_STATS=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    MLFLOW_DISABLE_TELEMETRY=true
USER 10001:10001

CMD ["unisd", "--help"]
