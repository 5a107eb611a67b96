"""S3 backend (AWS, MinIO, SeaweedFS, Ceph): same contract as local.py, through boto3.

Transfers run many files at once: small ones as single requests on a thread pool, large ones through an
s3transfer TransferManager (multipart uploads, ranged GETs); everything streams to and from disk.
Errors that retrying cannot fix (no bucket, no key, denied, unreachable endpoint) become UserError (exit 2);
anything else fails after bounded retries as StorageError (exit 1).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Literal

import boto3
from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError
from s3transfer.futures import TransferFuture
from s3transfer.manager import TransferManager
from s3transfer.subscribers import BaseSubscriber
from s3transfer.utils import S3_RETRYABLE_DOWNLOAD_ERRORS

from kubetune import telemetry
from kubetune.contract import MANIFEST_NAME, SECRET_ACCESS_KEY_ID, SECRET_SECRET_ACCESS_KEY
from kubetune.errors import UserError
from kubetune.spec import StorageSpec, check_uri
from kubetune.storage.manifest import IntegrityError, build_manifest, local_files, manifest_bytes

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import ObjectIdentifierTypeDef, ObjectTypeDef

MiB = 1024 * 1024
DELETE_BATCH = 1000  # the S3 limit per DeleteObjects call
DOWNLOAD_ATTEMPTS = 2  # body reads cut mid-stream; botocore's own retries cover the request itself

# Error codes that retrying cannot fix: the uri or the credentials are wrong.
NOT_FOUND_CODES = frozenset({"NoSuchBucket", "NoSuchKey", "NotFound", "404"})
DENIED_CODES = frozenset({"AccessDenied", "Forbidden", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                          "InvalidToken", "ExpiredToken", "AllAccessDisabled", "AccountProblem"})


class StorageError(RuntimeError):
    """S3 kept failing after bounded retries (server down, network lost): exit 1, safe to retry the run."""


def split_uri(uri: str) -> tuple[str, str]:
    """s3://bucket/key -> (bucket, key), with the spec's rules (no '..', '.' or empty segments)."""
    try:
        check_uri(uri)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if not uri.startswith("s3://"):
        raise UserError(f"{uri!r}: not an s3:// uri")
    bucket, _, key = uri[5:].partition("/")
    return bucket, key


def as_prefix(key: str) -> str:
    """The key of a 'folder': '' (bucket root) or ending in exactly one '/'."""
    key = key.strip("/")
    return key + "/" if key else ""


def safe_parts(rel: str) -> list[str]:
    """Segments of a relative object path that cannot leave its prefix; UserError otherwise."""
    parts = rel.split("/")
    if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise UserError(f"{rel!r}: object paths must be relative, without '..', '.' or empty segments")
    return parts


def child_key(prefix: str, rel: str) -> str:
    """The key of rel below prefix; rel is checked so no value can escape the prefix."""
    return as_prefix(prefix) + "/".join(safe_parts(rel))


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _missing(exc: ClientError) -> bool:
    return _code(exc) in NOT_FOUND_CODES


class _KnownSize(BaseSubscriber):
    """Tells s3transfer the size we already listed, saving one HEAD per downloaded object."""

    def __init__(self, size: int) -> None:
        self.size = size

    def on_queued(self, future: Any, **kwargs: Any) -> None:
        future.meta.provide_transfer_size(self.size)


def _start_download(manager: TransferManager, *, bucket: str, key: str, target: Path, size: int) -> TransferFuture:
    return manager.download(bucket, key, str(target), subscribers=[_KnownSize(size)])


def _start_upload(manager: TransferManager, *, bucket: str, key: str, path: Path) -> TransferFuture:
    return manager.upload(str(path), bucket, key)


class S3Backend:
    def __init__(self, spec: StorageSpec, *, part_size: int = 8 * MiB, concurrency: int = 16,
                 max_attempts: int = 3, connect_timeout: float = 5.0, read_timeout: float = 15.0) -> None:
        self.where = spec.endpoint or f"AWS S3 ({spec.region})"
        self.part_size = part_size
        self.concurrency = concurrency
        # Credentials come from the standard chain (env, profile, web identity), never from the spec.
        session = boto3.session.Session()

        def client(attempts: int, connect: float, read: float) -> S3Client:
            # Other S3 servers (older MinIO, Ceph) reject the aws-chunked checksums boto3 sends by default;
            # our manifests carry sha256 end to end anyway.
            checksums: Literal["when_supported", "when_required"] = (
                "when_required" if spec.endpoint else "when_supported")
            config = Config(
                region_name=spec.region,
                signature_version="s3v4",
                s3={"addressing_style": "path" if spec.endpoint else "auto"},
                retries={"mode": "standard", "max_attempts": attempts},
                connect_timeout=connect,
                read_timeout=read,
                max_pool_connections=2 * concurrency + 2,  # the file pool and the TransferManager at once
                tcp_keepalive=True,
                request_checksum_calculation=checksums,
                response_checksum_validation=checksums,
            )
            return session.client("s3", endpoint_url=spec.endpoint, config=config)

        # Worst case per request: max_attempts x (connect + read) plus backoff, i.e. about a minute.
        self.client = client(max_attempts, connect_timeout, read_timeout)
        # The first call per bucket: one quick probe, so a wrong endpoint fails at once instead of a retry storm.
        self._probe = client(2, 3.0, 10.0)
        self.transfer = TransferConfig(multipart_threshold=part_size, multipart_chunksize=part_size,
                                       max_concurrency=concurrency, num_download_attempts=DOWNLOAD_ATTEMPTS,
                                       use_threads=True)
        self._checked: set[str] = set()

    # -- the Storage contract -------------------------------------------------------------------------------

    def fetch(self, uri: str, dest: Path) -> Path:
        """An object -> dest/<basename>; a prefix -> dest holding the tree below it."""
        bucket, key = self._bucket(uri)
        with self._errors(uri, "download"):
            size = self._object_size(bucket, key)
            if size is not None:
                dest.mkdir(parents=True, exist_ok=True)
                target = dest / PurePosixPath(key).name
                self._download(bucket, [(key, target, size)])
                return target
            prefix = as_prefix(key)
            objects = [o for o in self._list(bucket, prefix) if not o["Key"].endswith("/")]
            if not objects:
                raise UserError(f"{uri}: no such object or prefix at {self.where}")
            jobs = [(o["Key"], dest.joinpath(*safe_parts(o["Key"][len(prefix):])), o["Size"]) for o in objects]
            dest.mkdir(parents=True, exist_ok=True)
            self._download(bucket, jobs)
        return dest

    def publish(self, local_dir: Path, uri: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Upload every file under local_dir, then manifest.json last, only if every upload succeeded."""
        bucket, key = self._bucket(uri)
        manifest_key = child_key(key, MANIFEST_NAME)
        with self._errors(uri, "upload"):
            # An old manifest would vouch for objects we are about to overwrite: remove it first.
            self.client.delete_object(Bucket=bucket, Key=manifest_key)
            manifest = build_manifest(local_dir, extra)
            self._upload(bucket, [(local_dir / e["path"], child_key(key, e["path"])) for e in manifest["files"]])
            body = manifest_bytes(manifest)
            self.client.put_object(Bucket=bucket, Key=manifest_key, Body=body, ContentType="application/json")
            telemetry.add_uploaded(len(body))
        return manifest

    def read_manifest(self, uri: str) -> dict[str, Any] | None:
        bucket, key = self._bucket(uri)
        with self._errors(uri, "read manifest"):
            try:
                body = self.client.get_object(Bucket=bucket, Key=child_key(key, MANIFEST_NAME))["Body"].read()
            except ClientError as exc:
                if _missing(exc):
                    return None
                raise
        try:
            loaded = json.loads(body)
        except ValueError:
            return None
        return loaded if isinstance(loaded, dict) else None

    def list_prefixes(self, uri: str) -> list[str]:
        """Immediate child 'folders' of uri that hold at least one object."""
        bucket, key = self._bucket(uri)
        prefix = as_prefix(key)
        names: list[str] = []
        with self._errors(uri, "list"):
            for page in self.client.get_paginator("list_objects_v2").paginate(
                    Bucket=bucket, Prefix=prefix, Delimiter="/"):
                for common in page.get("CommonPrefixes", []):
                    # SeaweedFS still lists emptied folders; in S3 terms a prefix without objects does not exist.
                    if self.client.list_objects_v2(Bucket=bucket, Prefix=common["Prefix"], MaxKeys=1).get("KeyCount"):
                        names.append(common["Prefix"][len(prefix):].rstrip("/"))
        return sorted(n for n in names if n)

    def delete(self, uri: str) -> None:
        """Delete the object uri names and everything below it, manifest.json first."""
        bucket, key = self._bucket(uri)
        if not key.strip("/"):
            raise UserError(f"{uri}: refusing to delete a whole bucket")
        with self._errors(uri, "delete"):
            # Without its manifest a half-deleted prefix reads as incomplete, never as a finished output.
            self.client.delete_object(Bucket=bucket, Key=child_key(key, MANIFEST_NAME))
            keys = [o["Key"] for o in self._list(bucket, as_prefix(key))]
            if not key.endswith("/"):
                keys.append(key)
            for start in range(0, len(keys), DELETE_BATCH):
                batch: list[ObjectIdentifierTypeDef] = [{"Key": k} for k in keys[start:start + DELETE_BATCH]]
                response = self.client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
                if response.get("Errors"):
                    raise StorageError(f"{uri}: could not delete {response['Errors'][:3]} at {self.where}")

    def describe(self, uri: str) -> dict[str, Any]:
        """ETag, version and size for run.json; a prefix also lists each object's ETag and size."""
        bucket, key = self._bucket(uri)
        with self._errors(uri, "describe"):
            if key and not key.endswith("/"):
                try:
                    head = self.client.head_object(Bucket=bucket, Key=key)
                    return {"etag": head["ETag"].strip('"'), "versionId": head.get("VersionId"),
                            "size": head["ContentLength"]}
                except ClientError as exc:
                    if not _missing(exc):
                        raise
            prefix = as_prefix(key)
            objects = list(self._list(bucket, prefix))
        if not objects:
            raise UserError(f"{uri}: no such object or prefix at {self.where}")
        return {"etag": None, "versionId": None, "size": sum(o["Size"] for o in objects),
                "objects": [{"key": o["Key"][len(prefix):], "etag": o["ETag"].strip('"'), "size": o["Size"]}
                            for o in objects]}

    # -- helpers beyond the contract (embedded S3, benchmarks) ------------------------------------------------

    def upload_tree(self, local_dir: Path, uri: str) -> int:
        """Upload every file under local_dir below uri, without a manifest (input data); returns the count."""
        bucket, key = self._bucket(uri)
        files = local_files(local_dir)
        with self._errors(uri, "upload"):
            self._upload(bucket, [(p, child_key(key, p.relative_to(local_dir).as_posix())) for p in files])
        return len(files)

    def upload_file(self, path: Path, uri: str) -> None:
        bucket, key = self._bucket(uri)
        if not key or key.endswith("/"):
            raise UserError(f"{uri}: a file upload needs an object key, not a prefix")
        with self._errors(uri, "upload"):
            self._upload(bucket, [(path, key)])

    def list_objects(self, uri: str) -> list[tuple[str, int]]:
        """(key, size) of every object below uri, full keys, sorted."""
        bucket, key = self._bucket(uri)
        with self._errors(uri, "list"):
            return sorted((o["Key"], o["Size"]) for o in self._list(bucket, as_prefix(key)))

    def objects_at(self, uri: str) -> list[tuple[str, int]]:
        """(key, size) of the object uri names, else of every object below it: for reading samples."""
        bucket, key = self._bucket(uri)
        with self._errors(uri, "list"):
            size = self._object_size(bucket, key)
            if size is not None:
                return [(key, size)]
            return sorted((o["Key"], o["Size"]) for o in self._list(bucket, as_prefix(key)))

    def read_bytes(self, uri: str, key: str, limit: int | None = None) -> bytes:
        """The first `limit` bytes (all when None) of one object of uri's bucket."""
        bucket, _ = self._bucket(uri)
        with self._errors(uri, "read"):
            response = (self.client.get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{limit - 1}") if limit
                        else self.client.get_object(Bucket=bucket, Key=key))
            body: bytes = response["Body"].read()
        return body

    def ensure_bucket(self, bucket: str) -> None:
        """Create bucket unless it exists (idempotent)."""
        uri = f"s3://{bucket}/"
        split_uri(uri)
        with self._errors(uri, "create bucket"):
            try:
                self.client.create_bucket(Bucket=bucket)
            except ClientError as exc:
                if _code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    # -- internals -----------------------------------------------------------------------------------------

    def _bucket(self, uri: str) -> tuple[str, str]:
        """Parse uri and, once per bucket, check cheaply that the endpoint answers and the bucket exists."""
        bucket, key = split_uri(uri)
        if bucket in self._checked:
            return bucket, key
        try:
            self._probe.head_bucket(Bucket=bucket)
        except (NoCredentialsError, PartialCredentialsError):
            raise UserError(self._no_credentials(uri)) from None
        except ClientError as exc:
            if _missing(exc) or _status(exc) == 404:
                raise UserError(f"{uri}: bucket {bucket!r} does not exist at {self.where}") from None
            # 403 may still allow object reads/writes (object-only policies): the real call decides.
            if _status(exc) != 403:
                raise self._failure(uri, "check bucket", exc) from exc
        except BotoCoreError as exc:
            raise UserError(f"{uri}: cannot reach S3 endpoint {self.where}: {exc}") from None
        self._checked.add(bucket)
        return bucket, key

    def _object_size(self, bucket: str, key: str) -> int | None:
        """Size of the object at key, or None when key names no object (then it may be a prefix)."""
        if not key or key.endswith("/"):
            return None
        try:
            return self.client.head_object(Bucket=bucket, Key=key)["ContentLength"]
        except ClientError as exc:
            if _missing(exc):
                return None
            raise

    def _list(self, bucket: str, prefix: str) -> Iterator[ObjectTypeDef]:
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            yield from page.get("Contents", [])

    def _download(self, bucket: str, jobs: list[tuple[str, Path, int]]) -> None:
        for _, target, _ in jobs:
            target.parent.mkdir(parents=True, exist_ok=True)
        self._run([partial(_start_download, bucket=bucket, key=key, target=target, size=size)
                   for key, target, size in jobs if size >= self.part_size],
                  [partial(self._get_small, bucket, key, target) for key, target, size in jobs
                   if size < self.part_size])
        telemetry.add_downloaded(sum(size for _, _, size in jobs))

    def _upload(self, bucket: str, jobs: list[tuple[Path, str]]) -> None:
        sized = [(path, key, path.stat().st_size) for path, key in jobs]
        self._run([partial(_start_upload, bucket=bucket, key=key, path=path)
                   for path, key, size in sized if size >= self.part_size],
                  [partial(self._put_small, bucket, path, key) for path, key, size in sized
                   if size < self.part_size])
        telemetry.add_uploaded(sum(size for _, _, size in sized))

    def _run(self, large: list[Callable[[TransferManager], TransferFuture]], small: list[Callable[[], None]]) -> None:
        """Large files on the TransferManager (parts in parallel), small ones as single requests on a pool.

        The first failure cancels everything still queued instead of letting each file retry a dead server.
        """
        pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="kubetune-s3")
        try:
            with create_transfer_manager(self.client, self.transfer) as manager:
                futures: list[TransferFuture | Future[None]] = [start(manager) for start in large]
                futures += [pool.submit(task) for task in small]
                for future in futures:
                    future.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _put_small(self, bucket: str, path: Path, key: str) -> None:
        with open(path, "rb") as handle:  # botocore streams (and on retry rewinds) the open file
            self.client.put_object(Bucket=bucket, Key=key, Body=handle)

    def _get_small(self, bucket: str, key: str, target: Path) -> None:
        """Stream one object to a temp file beside target, then rename: no half-written file under its name."""
        temp = target.with_name(f".{target.name}.part")
        try:
            for attempt in range(DOWNLOAD_ATTEMPTS):
                try:
                    body = self.client.get_object(Bucket=bucket, Key=key)["Body"]
                    with open(temp, "wb") as handle:
                        shutil.copyfileobj(body, handle, MiB)
                    break
                except S3_RETRYABLE_DOWNLOAD_ERRORS:
                    if attempt + 1 == DOWNLOAD_ATTEMPTS:
                        raise
            os.replace(temp, target)
        finally:
            temp.unlink(missing_ok=True)

    def _no_credentials(self, uri: str) -> str:
        return (f"{uri}: no S3 credentials found: set {SECRET_ACCESS_KEY_ID} and {SECRET_SECRET_ACCESS_KEY} "
                "(in a cluster: the Secret in spec.storage.secretRef) or an AWS profile")

    def _failure(self, uri: str, doing: str, exc: Exception) -> Exception:
        """The exception to raise for exc: UserError for wrong uri or credentials, StorageError otherwise."""
        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return UserError(self._no_credentials(uri))
        if isinstance(exc, ClientError):
            message = exc.response.get("Error", {}).get("Message", "")
            if _missing(exc):
                return UserError(f"{uri}: not found at {self.where} ({_code(exc)}: {message})")
            if _code(exc) in DENIED_CODES or _status(exc) == 403:
                return UserError(f"{uri}: access denied by {self.where} while trying to {doing} "
                                 f"({_code(exc)}: {message}); check the credentials and their permissions")
        if isinstance(exc, OSError) and not isinstance(exc, BotoCoreError | ConnectionError | TimeoutError):
            return StorageError(f"{uri}: {doing} failed on this machine: {exc}")  # local disk, not the server
        return StorageError(f"{uri}: {doing} failed at {self.where} after retries: {exc}")

    @contextmanager
    def _errors(self, uri: str, doing: str) -> Iterator[None]:
        try:
            yield
        except (UserError, IntegrityError, StorageError):
            raise
        except (BotoCoreError, ClientError, OSError) as exc:
            raise self._failure(uri, doing, exc) from exc
        except Exception as exc:
            # s3transfer wraps some failures in its own types (cancelled, retries exceeded).
            if type(exc).__module__.startswith(("s3transfer", "boto")):
                raise self._failure(uri, doing, exc) from exc
            raise
