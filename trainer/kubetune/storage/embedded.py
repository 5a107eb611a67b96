"""`kubetune run --embedded-s3`: serve every uri of a job from a local SeaweedFS, as a cluster would from S3.

Local inputs are uploaded first and the spec is rewritten to point at them; the trainer then reads its model
and data and publishes its outputs through the same S3 code path a cluster uses.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kubetune.contract import CHECKPOINTS_DIR, MANIFEST_NAME, SECRET_ACCESS_KEY_ID, SECRET_SECRET_ACCESS_KEY
from kubetune.errors import UserError
from kubetune.preflight import resolve_local
from kubetune.spec import FineTuneJob, FineTuneJobSpec, StorageSpec
from kubetune.storage import Storage, is_s3, join_uri
from kubetune.storage.s3 import S3Backend
from kubetune.storage.seaweed import HOST, SeaweedServer

MODELS_BUCKET = "kubetune-models"
DATA_BUCKET = "kubetune-data"
OUTPUTS_BUCKET = "kubetune-outputs"
# The embedded server has no identities, so it accepts any key; botocore only needs one to sign with.
EMBEDDED_CREDENTIALS = {SECRET_ACCESS_KEY_ID: "kubetune", SECRET_SECRET_ACCESS_KEY: "kubetune-embedded"}


@contextmanager
def _environment() -> Iterator[None]:
    """Placeholder credentials where none are set, loopback exempt from proxies; the trainer inherits both."""
    names = (*EMBEDDED_CREDENTIALS, "NO_PROXY", "no_proxy")
    saved = {name: os.environ.get(name) for name in names}
    for name, value in EMBEDDED_CREDENTIALS.items():
        os.environ.setdefault(name, value)
    for name in ("NO_PROXY", "no_proxy"):
        # An HTTP(S)_PROXY from the user's shell must not intercept the loopback server.
        os.environ[name] = ",".join(filter(None, (os.environ.get(name), HOST)))
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


def _upload_input(backend: S3Backend, uri: str, manifest_file: Path, target: str, with_manifest: bool) -> str:
    """Upload a local file or folder below target; returns its s3:// uri."""
    path = Path(resolve_local(uri, manifest_file)).expanduser()
    if path.is_file():
        dest = f"{target}{path.name}"
        backend.upload_file(path, dest)
        return dest
    if not path.is_dir():
        raise UserError(f"{uri}: no such file or folder")
    if with_manifest:
        backend.publish(path, target, {"source": str(path)})  # fetch() then verifies the model it reads
    else:
        backend.upload_tree(path, target)  # data prefixes stay plain: every object is a data file
    return target


@contextmanager
def embedded_s3(job: FineTuneJob, state_dir: Path, manifest_file: Path) -> Iterator[FineTuneJob]:
    """Start SeaweedFS under state_dir/s3, upload local inputs, yield a copy of job with every uri on S3."""
    name = job.metadata.name
    with SeaweedServer(Path(state_dir) / "s3") as server, _environment():
        storage_spec = job.spec.storage.model_copy(update={"endpoint": server.endpoint, "secret_ref": None})
        backend = S3Backend(storage_spec)
        for bucket in (MODELS_BUCKET, DATA_BUCKET, OUTPUTS_BUCKET):
            backend.ensure_bucket(bucket)

        spec = job.spec.model_copy(deep=True)
        spec.storage = storage_spec
        if not is_s3(spec.model.uri):
            spec.model.uri = _upload_input(backend, spec.model.uri, manifest_file,
                                           f"s3://{MODELS_BUCKET}/{name}/", with_manifest=True)
        for split in ("train", "validation", "test"):
            uri = getattr(spec.data, split)
            if uri is not None and not is_s3(uri):
                target = f"s3://{DATA_BUCKET}/{name}/{split}/"
                setattr(spec.data, split, _upload_input(backend, uri, manifest_file, target, with_manifest=False))
        spec.output.uri = f"s3://{OUTPUTS_BUCKET}/{name}/"
        if spec.checkpoint.uri is not None:
            spec.checkpoint.uri = f"s3://{OUTPUTS_BUCKET}/{name}/{CHECKPOINTS_DIR}/"
        yield job.model_copy(update={"spec": spec})


def list_objects(where: Storage | StorageSpec | str, uri: str) -> list[tuple[str, int]]:
    """(key, size) of every object below uri; where is a Storage, its spec, or an endpoint URL."""
    if isinstance(where, str):
        where = StorageSpec(endpoint=where)
    storage = where if isinstance(where, Storage) else Storage(where)
    objects: list[tuple[str, int]] = storage.s3().list_objects(uri)
    return objects


def local_copy_spec(job: FineTuneJob, state_dir: Path) -> FineTuneJobSpec:
    """The job's spec with output.uri where the copy goes: the manifest's own output folder when it is
    local, else <state dir>/outputs/<name>. Checked before training like any output."""
    from kubetune.train.outputs import check_output

    uri = job.spec.output.uri
    spec = job.spec.model_copy(deep=True)
    spec.output.uri = uri if not is_s3(uri) else str(Path(state_dir) / "outputs" / job.metadata.name)
    spec.checkpoint.uri = None  # whatever sits in <copy>/checkpoints/ stays
    spec.storage = StorageSpec()
    check_output(Storage(), spec)
    return spec


def save_local_copy(s3_job: FineTuneJob, local_spec: FineTuneJobSpec) -> Path:
    """Download the published output (not its checkpoints), verify it against its manifest, publish it locally."""
    from kubetune.storage.manifest import verify_dir
    from kubetune.train.outputs import publish_outputs

    storage = Storage(s3_job.spec.storage)
    uri = s3_job.spec.output.uri
    manifest = storage.read_manifest(uri)
    if manifest is None:
        raise UserError(f"{uri}: no {MANIFEST_NAME}; the output is incomplete")
    dest = Path(local_spec.output.uri).expanduser()
    staging = dest.parent / f".{dest.name}.download"
    shutil.rmtree(staging, ignore_errors=True)
    for entry in manifest["files"]:
        storage.fetch(join_uri(uri, entry["path"]), (staging / entry["path"]).parent)
    verify_dir(staging, manifest, uri)
    publish_outputs(Storage(), staging, local_spec)
    return dest
