"""What a checkpoint belongs to, and whether a rerun has anything left to do.

A checkpoint resumes only the exact training it came from: the data files' and base model's content, the
spec fields that shape training, and the world size (ddp only: sharded checkpoints reshard). Each identity
keeps its checkpoints under its own prefix (<checkpoint.uri>/<digest>/checkpoint-N), so jobs never resume,
prune or overwrite each other's.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from kubetune import contract
from kubetune.spec import FineTuneJob
from kubetune.storage import IntegrityError, Storage, is_s3, join_uri
from kubetune.storage.manifest import verify_dir

log = logging.getLogger("kubetune.trainer")
SHAPING_FIELDS = ("model", "method", "data", "hyperparameters", "evaluation")
URI_FIELDS = {"model": ("uri",), "data": ("train", "validation", "test")}  # replaced by the content's sha256


def training_identity(job: FineTuneJob, model_sha256: str, data_files: list[dict[str, Any]],
                      world_size: int, strategy: str = "ddp") -> dict[str, Any]:
    """Everything that decides the training trajectory; moving a file elsewhere does not change it.

    Sharded (fsdp) checkpoints reshard on load and keep the data position in examples: the world size stays
    out of their identity, so a job preempted on 2 nodes continues on 1 and the reverse."""
    spec = job.spec.model_dump(mode="json", by_alias=True)
    shaping = {key: spec[key] for key in SHAPING_FIELDS}
    for key, fields in URI_FIELDS.items():
        shaping[key] = {k: v for k, v in shaping[key].items() if k not in fields}
    # Fields that do not move the trajectory (a gate on the result) or that only dpo reads stay out, so adding
    # them left every other job's checkpoints resumable.
    del shaping["evaluation"]["minImprovement"]
    if job.spec.method.type != "dpo":
        del shaping["method"]["dpo"], shaping["data"]["chosenField"], shaping["data"]["rejectedField"]
    found = {
        "model": model_sha256,
        "data": [[f["split"], f["sha256"]] for f in data_files],  # in reading order: order shapes training too
        "spec": shaping,
        "worldSize": world_size,
    }
    if strategy == "fsdp":
        del found["worldSize"]
        found["checkpointFormat"] = "sharded"  # `auto` may resolve either way: the format must match
    return found


def digest(identity: dict[str, Any]) -> str:
    """The checkpoint prefix of an identity: 16 hex digits of its sha256."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def finished_output(storage: Storage, job: FineTuneJob, newest_checkpoint: str | None,
                    scratch: Path) -> dict[str, Any] | None:
    """The published metrics when output.uri holds an intact output of exactly this training, else None.

    "Exactly this": its run.json names our newest checkpoint as the last one and records the same spec (storage
    aside: an embedded server's endpoint changes every run).
    """
    uri = job.spec.output.uri
    manifest = storage.read_manifest(uri) if newest_checkpoint else None
    if manifest is None:
        return None
    run, metrics = (_read_json(storage, uri, name, scratch) for name in (contract.RUN_FILE, contract.METRICS_FILE))
    spec = job.model_dump(mode="json", by_alias=True, exclude_none=True)["spec"]
    same_spec = {**run.get("spec", {}), "storage": None} == {**spec, "storage": None}
    if run.get("lastCheckpoint") != newest_checkpoint or not same_spec or not _intact(storage, uri, manifest):
        return None
    return metrics


def _read_json(storage: Storage, uri: str, name: str, scratch: Path) -> dict[str, Any]:
    try:
        path = storage.fetch(join_uri(uri, name), scratch)
        loaded = json.loads((path if path.is_file() else path / name).read_text())
    except (OSError, ValueError, IntegrityError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _intact(storage: Storage, uri: str, manifest: dict[str, Any]) -> bool:
    """Every file the manifest lists is there: by sha256 locally, by size in S3 (no download of the model)."""
    try:
        if not is_s3(uri):
            verify_dir(Path(uri).expanduser(), manifest, uri)
            return True
        sizes = {o["key"]: o["size"] for o in storage.describe(uri).get("objects", [])}
    except IntegrityError as exc:
        log.warning("republishing: %s", exc)
        return False
    return all(sizes.get(f["path"]) == f["size"] for f in manifest.get("files", []))
