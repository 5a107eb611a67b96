# kubetune images, two targets from one file (`make images REGISTRY=... TAG=...` builds and pushes both):
#   docker build --target trainer  -t ghcr.io/kubetune/trainer:0.1.0 .    # GPU pods (CUDA-capable torch)
#   docker build --target trainer  --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu -t ...:0.1.0-cpu .
#   docker build --target operator -t ghcr.io/kubetune/operator:0.1.0 .   # torch-free, kopf
# Each target installs into /opt/venv in a build stage; the final stage copies only that venv, so no
# pip cache, build tools or source tree ship. Bases are pinned to an exact tag.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---------------------------------------------------------------- build stages
FROM ${PYTHON_IMAGE} AS build-base
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY trainer ./trainer
COPY operator ./operator

FROM build-base AS build-trainer
# PyPI's Linux torch wheel is the CUDA build (it brings its CUDA runtime; nodes need only the driver).
# CPU-only image: --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://pypi.org/simple
# torch first and pinned, from the chosen index: the project's open `torch>=` range must not pick another build.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}" \
 && pip install --no-cache-dir ".[trainer,tracking]"

FROM build-base AS build-operator
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[operator]"

# ---------------------------------------------------------------- shared runtime settings
FROM ${PYTHON_IMAGE} AS runtime
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.source="https://github.com/kubetune/kubetune" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="kubetune" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
# A real passwd entry (torch and getpass look the user up); uid 1000 is what the operator sets on trainer pods.
RUN useradd --no-log-init --uid 1000 --user-group --home-dir /var/lib/kubetune --create-home kubetune
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/var/lib/kubetune
WORKDIR /var/lib/kubetune

# ---------------------------------------------------------------- trainer: the pod entrypoint
FROM runtime AS trainer
LABEL org.opencontainers.image.title="kubetune-trainer" \
      org.opencontainers.image.description="kubetune trainer: fine-tunes one FineTuneJob (torchrun, S3 in and out)"
COPY --from=build-trainer /opt/venv /opt/venv
# tcmalloc under the trainer (LD_PRELOAD): glibc's heap keeps what PyTorch's CPU tensors free (FSDP's per-block
# gathers, autograd's buffers) and host memory only grows. Measured: bench/scale.py --preload (docs/benchmarks.md).
# A link at a fixed path serves amd64 and arm64 builds alike; the report threshold keeps big loads quiet.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libtcmalloc-minimal4=2.10-1 \
 && rm -rf /var/lib/apt/lists/* \
 && ln -s "$(find /usr/lib -name libtcmalloc_minimal.so.4 -print -quit)" /usr/local/lib/libtcmalloc_minimal.so.4
ENV LD_PRELOAD=/usr/local/lib/libtcmalloc_minimal.so.4 \
    TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD=1099511627776
# Offline and quiet by default: models come from object storage, never a hub; no telemetry.
ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    DO_NOT_TRACK=1 \
    HF_HOME=/var/lib/kubetune/.cache/huggingface \
    KUBETUNE_WORK_DIR=/var/lib/kubetune
USER 1000:1000
EXPOSE 9400
ENTRYPOINT ["kubetune", "trainer"]

# ---------------------------------------------------------------- operator: kopf, no torch
FROM runtime AS operator
LABEL org.opencontainers.image.title="kubetune-operator" \
      org.opencontainers.image.description="kubetune operator: runs FineTuneJobs as Kubernetes Jobs"
COPY --from=build-operator /opt/venv /opt/venv
ENV DO_NOT_TRACK=1
USER 1000:1000
EXPOSE 8080 9401
ENTRYPOINT ["kubetune", "operator"]
