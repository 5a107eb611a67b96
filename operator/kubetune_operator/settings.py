"""Operator settings from environment variables (the chart's Deployment sets them), one line each."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version

from kubetune import contract


def _package_version() -> str:
    try:
        return version("kubetune")
    except PackageNotFoundError:  # running from a source tree without an install
        return "latest"


def _flag(name: str, default: bool) -> bool:
    return os.environ.get(name, str(default)).strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Settings:
    # Trainer image used when spec.image is empty.
    trainer_image: str = field(default_factory=lambda: os.environ.get(
        "KUBETUNE_TRAINER_IMAGE", f"ghcr.io/kubetune/trainer:{_package_version()}"))
    # Namespaces to watch, comma separated; empty watches the whole cluster.
    namespaces: tuple[str, ...] = field(default_factory=lambda: tuple(
        n.strip() for n in os.environ.get("KUBETUNE_NAMESPACES", "").split(",") if n.strip()))
    # Port of the operator's own /metrics.
    metrics_port: int = field(default_factory=lambda: int(os.environ.get(
        "KUBETUNE_OPERATOR_METRICS_PORT", contract.DEFAULT_OPERATOR_METRICS_PORT)))
    # Port of /healthz (liveness and readiness).
    health_port: int = field(default_factory=lambda: int(os.environ.get("KUBETUNE_HEALTH_PORT", 8080)))
    # Seconds between scrapes of a running job's rank 0 (progress, loss); also the retry delay of a failed pass.
    refresh_seconds: float = field(default_factory=lambda: float(os.environ.get("KUBETUNE_REFRESH_SECONDS", 10)))
    # Seconds between safety passes over every unfinished job (changes themselves are watched, not polled).
    resync_seconds: float = field(default_factory=lambda: float(os.environ.get("KUBETUNE_RESYNC_SECONDS", 300)))
    # Seconds a running job's step may stand still before the Stalled condition turns True.
    stall_seconds: float = field(default_factory=lambda: float(os.environ.get("KUBETUNE_STALL_SECONDS", 900)))
    # Leader election between replicas (kopf peering); off: one replica by design.
    peering: bool = field(default_factory=lambda: _flag("KUBETUNE_PEERING", False))
    # ServiceAccount of trainer pods (no token is mounted; the account only names them).
    trainer_service_account: str = field(default_factory=lambda: os.environ.get(
        "KUBETUNE_TRAINER_SERVICE_ACCOUNT", "kubetune-trainer"))
    # Run `kubetune validate --deep` as a small CPU Job before any GPU pod (off: start training at once).
    preflight: bool = field(default_factory=lambda: _flag("KUBETUNE_PREFLIGHT", True))
    # Where rank 0's metrics are scraped; test-only override, `{pod_ip}` and `{port}` are filled in.
    trainer_metrics_url: str = field(default_factory=lambda: os.environ.get(
        "KUBETUNE_TRAINER_METRICS_URL", "http://{pod_ip}:{port}/metrics"))


def load() -> Settings:
    return Settings()
