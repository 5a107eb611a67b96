"""Shared fixtures. Parts that start real servers live in their own plugin modules."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

pytest_plugins = ["tests.fixtures_models", "tests.fixtures_s3", "tests.fixtures_prometheus", "tests.fixtures_cluster"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests on the session's Kubernetes control plane run last, together: it starts once (seconds) and its
    idle components take no CPU from the training tests before it."""
    items.sort(key=lambda item: "kube" in getattr(item, "fixturenames", ()))  # stable: file order otherwise
