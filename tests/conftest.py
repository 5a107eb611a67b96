"""Shared fixtures. Parts that start real servers live in their own plugin modules."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

pytest_plugins = ["tests.fixtures_models", "tests.fixtures_s3", "tests.fixtures_prometheus", "tests.fixtures_k8s",
                  "tests.fixtures_operator"]
