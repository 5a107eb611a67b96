"""manifest.json: every file's size and sha256, written LAST. No manifest, no complete output."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from kubetune.contract import MANIFEST_NAME

CHUNK = 1024 * 1024


class IntegrityError(Exception):
    """A prefix's files do not match its manifest (tampered, truncated or half-written)."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def local_files(root: Path) -> list[Path]:
    """Every regular file below root except the manifest itself, sorted for stable manifests."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() != MANIFEST_NAME)


def build_manifest(root: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    files = [
        {"path": p.relative_to(root).as_posix(), "size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in local_files(root)
    ]
    return {"version": 1, "createdAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files": files,
            **(extra or {})}


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    return json.dumps(manifest, indent=2, sort_keys=True).encode()


def verify_dir(root: Path, manifest: dict[str, Any], where: str) -> None:
    """Raise IntegrityError naming every file that is missing, resized or altered."""
    problems = []
    for entry in manifest.get("files", []):
        path = root / entry["path"]
        if not path.is_file():
            problems.append(f"{entry['path']}: missing")
        elif path.stat().st_size != entry["size"]:
            problems.append(f"{entry['path']}: size {path.stat().st_size} != {entry['size']}")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{entry['path']}: sha256 mismatch")
    if problems:
        raise IntegrityError(f"{where}: does not match its {MANIFEST_NAME}: " + "; ".join(problems))
