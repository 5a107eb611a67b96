# Trainer image: `kubetune trainer` is the pod entrypoint (spec mounted at /etc/kubetune/spec.yaml).
# TORCH_INDEX picks the torch build: the CPU wheel index by default, a CUDA one for GPU nodes.
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    KUBETUNE_WORK_DIR=/var/lib/kubetune

WORKDIR /opt/kubetune
# torch first and pinned: an open range would pull another build.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
COPY pyproject.toml README.md ./
COPY trainer ./trainer
COPY operator ./operator
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[trainer]"  # the project itself: its pins live in pyproject.toml

RUN useradd --create-home --uid 1000 kubetune && mkdir -p /var/lib/kubetune && chown kubetune /var/lib/kubetune
USER 1000
EXPOSE 9400
ENTRYPOINT ["kubetune", "trainer"]
