"""Operator settings from environment variables (the chart's Deployment sets them), one line each."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from kubetune import contract


def _package_version() -> str:
    try:
        return version("kubetune")
    except PackageNotFoundError:  # running from a source tree without an install
        return "latest"


def _flag(name: str, default: bool) -> bool:
    return os.environ.get(name, str(default)).strip().lower() in ("1", "true", "yes", "on")


def _names(name: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in os.environ.get(name, "").split(",") if n.strip())


def _json(name: str) -> Any:
    """A JSON value from the chart (toJson of a value); empty or unset: None, which the builders read as unset."""
    text = os.environ.get(name, "").strip()
    return json.loads(text) if text else None


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
    # Leader election between replicas through a Lease; off: one replica, which always leads.
    leader_election: bool = field(default_factory=lambda: _flag("KUBETUNE_LEADER_ELECTION", False))
    # The Lease: its namespace (the operator's own), its name, and this replica's identity (its pod name).
    lease_namespace: str = field(default_factory=lambda: os.environ.get("KUBETUNE_LEASE_NAMESPACE", "default"))
    lease_name: str = field(default_factory=lambda: os.environ.get("KUBETUNE_LEASE_NAME", "kubetune-operator"))
    identity: str = field(default_factory=lambda: os.environ.get("KUBETUNE_POD_NAME") or socket.gethostname())
    # ServiceAccount of trainer pods (no token is mounted; the account only names them).
    trainer_service_account: str = field(default_factory=lambda: os.environ.get(
        "KUBETUNE_TRAINER_SERVICE_ACCOUNT", "kubetune-trainer"))
    # Run `kubetune validate --deep` as a small CPU Job before any GPU pod (off: start training at once).
    preflight: bool = field(default_factory=lambda: _flag("KUBETUNE_PREFLIGHT", True))
    # Seconds a trainer pod may keep failing to pull its image before the job fails (registry hiccups pass).
    image_pull_seconds: float = field(default_factory=lambda: float(os.environ.get(
        "KUBETUNE_IMAGE_PULL_SECONDS", 300)))
    # Where rank 0's metrics are scraped; test-only override, `{pod_ip}` and `{port}` are filled in.
    trainer_metrics_url: str = field(default_factory=lambda: os.environ.get(
        "KUBETUNE_TRAINER_METRICS_URL", "http://{pod_ip}:{port}/metrics"))
    # Registry Secrets on every trainer and pre-flight pod besides a job's spec.imagePullSecrets (comma list).
    image_pull_secrets: tuple[str, ...] = field(default_factory=lambda: _names("KUBETUNE_IMAGE_PULL_SECRETS"))
    # Image of the pre-flight pods of jobs without spec.image (a CPU build of the trainer); empty: the trainer image.
    preflight_image: str = field(default_factory=lambda: os.environ.get("KUBETUNE_PREFLIGHT_IMAGE", ""))
    # Pre-flight pods' nodeSelector (a JSON object); empty: the job's own resources.nodeSelector.
    preflight_node_selector: dict[str, str] | None = field(
        default_factory=lambda: _json("KUBETUNE_PREFLIGHT_NODE_SELECTOR"))
    # Pre-flight pods' tolerations (a JSON list); empty: the job's own resources.tolerations.
    preflight_tolerations: list[dict[str, Any]] | None = field(
        default_factory=lambda: _json("KUBETUNE_PREFLIGHT_TOLERATIONS"))


def load() -> Settings:
    return Settings()
