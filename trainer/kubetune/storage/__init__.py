"""One storage module for every uri in the spec: local paths and s3://bucket/prefix.

The trainer and `kubetune run` only call `Storage`; it picks the backend per uri.
Writers stage files locally, then `publish()` uploads them with manifest.json last.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kubetune.spec import StorageSpec
from kubetune.storage import local
from kubetune.storage.manifest import IntegrityError, verify_dir

__all__ = ["IntegrityError", "Storage", "is_s3", "join_uri"]


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join_uri(base: str, *parts: str) -> str:
    """Join path segments under a uri; callers pass our own constant names, never user input."""
    out = base.rstrip("/")
    for part in parts:
        out += "/" + part.strip("/")
    return out


class Storage:
    def __init__(self, spec: StorageSpec | None = None) -> None:
        self.spec = spec or StorageSpec()
        self._s3: Any = None

    def s3(self) -> Any:
        """The S3 backend, created on first use so local-only runs never touch boto3."""
        if self._s3 is None:
            from kubetune.storage.s3 import S3Backend

            self._s3 = S3Backend(self.spec)
        return self._s3

    def fetch(self, uri: str, dest: Path) -> Path:
        """Make a file or prefix available locally; local uris are used in place.

        A prefix that carries a manifest is verified against it.
        """
        if is_s3(uri):
            path: Path = self.s3().fetch(uri, dest)
        else:
            path = local.fetch(uri)
        # The manifest came down with the prefix: verify against that copy, no second request.
        manifest = local.read_manifest(str(path)) if path.is_dir() else None
        if manifest is not None:
            verify_dir(path, manifest, uri)
        return path

    def publish(self, local_dir: Path, uri: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Upload every file under local_dir to uri, then manifest.json last."""
        if is_s3(uri):
            result: dict[str, Any] = self.s3().publish(local_dir, uri, extra)
            return result
        return local.publish(local_dir, uri, extra)

    def read_manifest(self, uri: str) -> dict[str, Any] | None:
        if is_s3(uri):
            result: dict[str, Any] | None = self.s3().read_manifest(uri)
            return result
        return local.read_manifest(uri)

    def list_prefixes(self, uri: str) -> list[str]:
        """Names of the immediate sub-folders / sub-prefixes of uri."""
        if is_s3(uri):
            result: list[str] = self.s3().list_prefixes(uri)
            return result
        return local.list_prefixes(uri)

    def delete(self, uri: str) -> None:
        if is_s3(uri):
            self.s3().delete(uri)
        else:
            local.delete(uri)

    def describe(self, uri: str) -> dict[str, Any]:
        """Object metadata for run.json (ETag, version) of a single S3 object; {} for local files."""
        if is_s3(uri):
            result: dict[str, Any] = self.s3().describe(uri)
            return result
        return {}
