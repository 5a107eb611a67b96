"""Local-path backend: same contract as S3 (files first, manifest.json last via atomic rename)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from kubetune import telemetry
from kubetune.contract import MANIFEST_NAME
from kubetune.errors import UserError
from kubetune.storage.manifest import build_manifest, local_files, manifest_bytes


def fetch(uri: str) -> Path:
    path = Path(uri).expanduser()
    if not path.exists():
        raise UserError(f"{uri}: no such file or folder")
    files = [path] if path.is_file() else local_files(path)
    telemetry.add_downloaded(sum(p.stat().st_size for p in files))
    return path


def publish(local_dir: Path, uri: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    target = Path(uri).expanduser()
    target.mkdir(parents=True, exist_ok=True)
    # An old manifest would vouch for files we are about to overwrite: remove it first.
    (target / MANIFEST_NAME).unlink(missing_ok=True)
    manifest = build_manifest(local_dir, extra)
    if target.resolve() != local_dir.resolve():
        for src in local_files(local_dir):
            dst = target / src.relative_to(local_dir)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
    tmp = target / f".{MANIFEST_NAME}.tmp"
    body = manifest_bytes(manifest)
    tmp.write_bytes(body)
    os.replace(tmp, target / MANIFEST_NAME)
    # In-place writers (local checkpoints) wrote the files to the destination themselves: they count too.
    telemetry.add_uploaded(sum(int(e["size"]) for e in manifest["files"]) + len(body))
    return manifest


def read_manifest(uri: str) -> dict[str, Any] | None:
    path = Path(uri).expanduser() / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        loaded: dict[str, Any] = json.loads(path.read_text())
        return loaded
    except (OSError, ValueError):
        return None


def list_prefixes(uri: str) -> list[str]:
    root = Path(uri).expanduser()
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def delete(uri: str) -> None:
    path = Path(uri).expanduser()
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
