"""Fetch the base model and data once per node; the node's other processes read the local copy."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune import lineage
from kubetune.contract import MANIFEST_NAME
from kubetune.errors import UserError
from kubetune.spec import FineTuneJobSpec
from kubetune.storage import Storage, is_s3
from kubetune.storage.manifest import local_files, sha256_file
from kubetune.train import distributed

PATHS_FILE = "paths.json"


@dataclass
class Inputs:
    model: Path
    data: dict[str, Path | None]
    objects: list[dict[str, Any]]  # S3 object metadata (ETag, version) of the data, for run.json
    model_sha256: str  # the base model folder's content, part of a checkpoint's identity


def content_sha256(folder: Path) -> str:
    """One sha256 for a folder's files (paths and contents); a verified manifest saves reading them again."""
    manifest_file = folder / MANIFEST_NAME
    if manifest_file.is_file():  # Storage.fetch verified the files against it
        entries = [(f["path"], f["sha256"]) for f in json.loads(manifest_file.read_text())["files"]]
    else:
        entries = [(p.relative_to(folder).as_posix(), sha256_file(p)) for p in local_files(folder)]
    return hashlib.sha256("".join(f"{path} {sha}\n" for path, sha in sorted(entries)).encode()).hexdigest()


def start_model(storage: Storage, spec: FineTuneJobSpec, folder: Path, dest: Path) -> Path:
    """The model training starts from: the fetched folder, or, for another job's adapter/, that adapter (and the
    adapters under it) folded into the base model it was trained on."""
    uri, adapters = spec.model.uri, list[Path]()
    while lineage.is_adapter(folder):
        if len(adapters) == lineage.MAX_DEPTH:
            raise UserError(f"spec.model.uri: {spec.model.uri}: more than {lineage.MAX_DEPTH} adapters deep")
        adapters.append(folder)
        uri = lineage.base_uri(storage, uri, dest / f"lineage-{len(adapters)}")
        folder = storage.fetch(uri, dest / f"base-{len(adapters)}")
    if not adapters:
        return folder
    from kubetune.train.model import merge_adapters

    return merge_adapters(spec, folder, adapters[::-1], dest / "start")


def _fetch_all(storage: Storage, spec: FineTuneJobSpec, dest: Path) -> dict[str, Any]:
    model = start_model(storage, spec, storage.fetch(spec.model.uri, dest / "model"), dest)
    data: dict[str, str | None] = {}
    objects = []
    for split in ("train", "validation", "test"):
        uri = getattr(spec.data, split)
        if uri is None:
            data[split] = None
            continue
        data[split] = str(storage.fetch(uri, dest / "data" / split))
        if is_s3(uri):
            info = storage.describe(uri)
            if info:
                objects.append({"split": split, "uri": uri, **info})
    return {"model": str(model), "data": data, "objects": objects, "modelSha256": content_sha256(model)}


def fetch_inputs(storage: Storage, spec: FineTuneJobSpec, dest: Path) -> Inputs:
    dest.mkdir(parents=True, exist_ok=True)
    paths_file = dest / f"{PATHS_FILE}.{distributed.rank() - distributed.local_rank()}"
    error = None
    if distributed.local_rank() == 0:
        try:
            paths_file.write_text(json.dumps(_fetch_all(storage, spec, dest)))
        except Exception as exc:  # re-raised after the barrier so the other ranks do not wait forever
            error = exc
    # Any rank's failure must stop every rank, not leave them at the barrier.
    failed = distributed.any_rank(error is not None, io=True)  # local rank 0 may download for long
    if error is not None:
        raise error
    if failed:
        raise RuntimeError("another process failed to fetch the inputs; see its message")
    found = json.loads(paths_file.read_text())
    data = {k: Path(v) if v else None for k, v in found["data"].items()}
    return Inputs(Path(found["model"]), data, found["objects"], found["modelSha256"])
