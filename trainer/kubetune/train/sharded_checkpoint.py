"""Sharded checkpoints (fsdp) with torch.distributed.checkpoint: every rank writes its own shards in parallel,
then uploads them; rank 0 adds state.pt (scheduler, RNG, position, spec) and the manifest, last.

DCP stores global tensors in chunks, so a checkpoint written by W ranks loads on any other number (it
reshards on load). Layout: <checkpoint>/shards/{.metadata,__<rank>_0.distcp}, <checkpoint>/state.pt.
The shards hold the weights and AdamW's moments alone; what every rank holds alike (step counts, parameter
groups) goes into state.pt: DCP would scatter such items over all ranks' files, and each rank would then need
all of them. So a rank resuming on as many ranks reads its own file only (needed_files), and a node fetches
just those.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
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
from kubetune.train.checkpoint import FORMAT_VERSION, STATE_FILE, checkpoint_name, prune, write_state
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
    shards, replicated = split(tensors)
    dcp.save(shards, checkpoint_id=folder / SHARDS)
    if distributed.is_main():
        write_state({**state, "format": FORMAT_VERSION, "sharded": True, "hasBest": best is not None,
                     "replicated": replicated}, folder / STATE_FILE)
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


def split(tree: Any) -> tuple[Any, Any]:
    """(the weights and moments of a nested state dict, everything else: scalars such as AdamW's step counts,
    parameter groups), each keeping the nesting; empty parts dropped. By shape, not type: a one-process run's
    plain tensors must land where a sharded run's DTensors do, for either to resume the other."""
    if isinstance(tree, torch.Tensor) and tree.dim() > 0:
        return tree, None
    if not isinstance(tree, dict):
        return None, tree
    shards, rest = {}, {}
    for key, value in tree.items():
        mine, other = split(value)
        if not _empty(mine):
            shards[key] = mine
        if not _empty(other):
            rest[key] = other
    return shards, rest


def _empty(part: Any) -> bool:
    return part is None or (isinstance(part, dict) and not part)


def merge(shards: Any, rest: Any) -> Any:
    """split's inverse."""
    if isinstance(shards, dict) and isinstance(rest, dict):
        return {key: merge(shards.get(key), rest.get(key)) for key in {**shards, **rest}}
    return rest if _empty(shards) else shards


def _template(model: nn.Module, optimizer: torch.optim.Optimizer, has_best: bool) -> dict[str, Any]:
    """Sharded as this run shards: DCP fills it in place (resharding a checkpoint of another world size)."""
    tensors: dict[str, Any] = {"model": get_model_state_dict(model, options=TRAINABLE),
                               "optimizer": get_optimizer_state_dict(model, optimizer)}
    if has_best:
        tensors["best"] = trainable_state(model)
    return tensors


def needed_files(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, has_best: bool) -> list[str]:
    """The shard files this rank reads on load (path holds state.pt and shards/.metadata): DCP's own load plan."""
    metadata = FileSystemReader(path / SHARDS).read_metadata()
    planner = DefaultLoadPlanner()
    planner.set_up_planner(split(_template(model, optimizer, has_best))[0], metadata, is_coordinator=False)
    where = metadata.storage_data
    return sorted({f"{SHARDS}/{where[item.storage_index].relative_path}" for item in planner.create_local_plan().items})


def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
         saved: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """Load (and reshard) the checkpoint at path into model and optimizer (saved: its state.pt); returns the best
    weights if saved."""
    shards = split(_template(model, optimizer, saved["hasBest"]))[0]
    dcp.load(shards, checkpoint_id=path / SHARDS)
    tensors = merge(shards, saved["replicated"])
    set_model_state_dict(model, tensors["model"], options=TRAINABLE)
    set_optimizer_state_dict(model, optimizer, tensors["optimizer"])
    best: dict[str, torch.Tensor] | None = tensors.get("best")
    return best
