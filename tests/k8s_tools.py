"""Find the real kubectl and helm binaries that `make setup` puts into the virtual environment."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest


def binary(name: str) -> Path:
    """The venv's `name` (from .ci/install-k8s-tools), else the one on PATH; fail naming `make setup`."""
    in_venv = Path(sys.prefix) / "bin" / name
    if in_venv.is_file():
        return in_venv
    found = shutil.which(name)
    if found:
        return Path(found)
    pytest.fail(f"{name} not found in {in_venv.parent} or on PATH: run `make setup` (it runs .ci/install-k8s-tools)")
