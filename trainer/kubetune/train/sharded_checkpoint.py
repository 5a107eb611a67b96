"""Sharded checkpoints (fsdp) with torch.distributed.checkpoint: every rank writes its own shards in parallel,
then uploads them; rank 0 adds state.pt (scheduler, RNG, position, spec) and the manifest, last.

DCP stores global tensors in chunks, so a checkpoint written by W ranks loads on any other number (it
reshards on load). Layout: <checkpoint>/shards/{.metadata,__<rank>_0.distcp}, <checkpoint>/state.pt.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from kubetune.contract import MANIFEST_NAME
from kubetune.storage import Storage, is_s3, join_uri
from kubetune.storage.manifest import manifest_bytes, sha256_file
from kubetune.storage.s3 import split_uri
from kubetune.train import distributed
from kubetune.train.checkpoint import FORMAT_VERSION, STATE_FILE, checkpoint_name, prune
from kubetune.train.model import trainable_state

SHARDS = "shards"
TRAINABLE = StateDictOptions(ignore_frozen_params=True)  # frozen weights are rebuilt from the base model


def save(storage: Storage, root_uri: str, model: nn.Module, optimizer: torch.optim.Optimizer,
         best: dict[str, torch.Tensor] | None, state: dict[str, Any], staging: Path, keep_last: int) -> str:
    """Called on every rank; returns the checkpoint's URI."""
    uri = join_uri(root_uri, checkpoint_name(state["step"]))
    remote = is_s3(uri)
    folder = staging / checkpoint_name(state["step"]) if remote else Path(uri)
    if distributed.local_rank() == 0 and remote:
        shutil.rmtree(folder, ignore_errors=True)  # each node stages its own ranks' files
    if distributed.is_main():
        folder.mkdir(parents=True, exist_ok=True)
        if remote:
            storage.delete(join_uri(uri, MANIFEST_NAME))
        (folder / MANIFEST_NAME).unlink(missing_ok=True)  # never vouch for files being rewritten
    distributed.barrier(io=True)
    tensors: dict[str, Any] = {"model": get_model_state_dict(model, options=TRAINABLE),
                               "optimizer": get_optimizer_state_dict(model, optimizer)}
    if best is not None:
        tensors["best"] = best
    dcp.save(tensors, checkpoint_id=folder / SHARDS)
    if distributed.is_main():
        torch.save({**state, "format": FORMAT_VERSION, "sharded": True, "hasBest": best is not None},
                   folder / STATE_FILE)
    distributed.barrier(io=True)
    extra = {"kind": "checkpoint", "step": state["step"], "worldSize": distributed.world_size()}
    if remote:
        _upload_in_parallel(storage, folder, uri, extra)
    elif distributed.is_main():
        storage.publish(folder, uri, extra=extra)  # files are in place: this adds the manifest
    if distributed.is_main():
        prune(storage, root_uri, keep_last)
    distributed.barrier(io=True)
    return uri


def _mine(folder: Path) -> list[Path]:
    """The files this rank uploads: its own shard files; rank 0 also the shared metadata and state.pt."""
    own = sorted((folder / SHARDS).glob(f"__{distributed.rank()}_*"))
    if distributed.is_main():
        own += [p for p in (folder / SHARDS).iterdir() if not p.name.startswith("__")] + [folder / STATE_FILE]
    return own


def _upload_in_parallel(storage: Storage, folder: Path, uri: str, extra: dict[str, Any]) -> None:
    files = _mine(folder)
    entries = []
    for path in files:
        rel = path.relative_to(folder).as_posix()
        storage.s3().upload_file(path, join_uri(uri, rel))
        entries.append({"path": rel, "size": path.stat().st_size, "sha256": sha256_file(path)})
    every = distributed.gather_objects(entries, io=True)  # after this every rank's uploads have finished
    if distributed.is_main():
        manifest = {"version": 1, "createdAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "files": sorted((e for rank in every for e in rank), key=lambda e: e["path"]), **extra}
        bucket, key = split_uri(join_uri(uri, MANIFEST_NAME))
        storage.s3().client.put_object(Bucket=bucket, Key=key, Body=manifest_bytes(manifest),
                                       ContentType="application/json")
    distributed.barrier(io=True)
    if distributed.local_rank() == 0:
        shutil.rmtree(folder, ignore_errors=True)


def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
         has_best: bool) -> dict[str, torch.Tensor] | None:
    """Load (and reshard) the checkpoint at path into model and optimizer; returns the best weights if saved."""
    tensors: dict[str, Any] = {"model": get_model_state_dict(model, options=TRAINABLE),
                               "optimizer": get_optimizer_state_dict(model, optimizer)}
    if has_best:
        tensors["best"] = trainable_state(model)  # a template sharded as this run shards: DCP fills it
    dcp.load(tensors, checkpoint_id=path / SHARDS)
    set_model_state_dict(model, tensors["model"], options=TRAINABLE)
    set_optimizer_state_dict(model, optimizer, tensors["optimizer"])
    best: dict[str, torch.Tensor] | None = tensors.get("best")
    return best
