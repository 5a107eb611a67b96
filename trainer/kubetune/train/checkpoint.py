"""Checkpoints: one dict (weights, optimizer, scheduler, RNG of every rank, position, spec), manifest last."""

from __future__ import annotations

import logging
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kubetune.contract import CHECKPOINT_PREFIX, MANIFEST_NAME
from kubetune.errors import UserError
from kubetune.storage import IntegrityError, Storage, is_s3, join_uri
from kubetune.storage.manifest import sha256_file
from kubetune.train import distributed

log = logging.getLogger("kubetune.checkpoint")
STATE_FILE = "state.pt"
FORMAT_VERSION = 2  # 2: a sharded checkpoint's shards hold DTensors only, the rest is in state.pt


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(storage: Storage, root_uri: str, state: dict[str, Any], staging: Path, keep_last: int) -> str:
    """Write state to staging, publish it under root_uri/checkpoint-<step>/ (manifest last), prune old ones."""
    name = checkpoint_name(state["step"])
    uri = join_uri(root_uri, name)
    # Local checkpoints are written in place (publish then only adds the manifest): no second copy.
    folder = staging / name if is_s3(uri) else Path(uri)
    if is_s3(uri):
        shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MANIFEST_NAME).unlink(missing_ok=True)  # never vouch for a state.pt being rewritten
    write_state({**state, "format": FORMAT_VERSION}, folder / STATE_FILE)
    storage.publish(folder, uri, extra={"kind": "checkpoint", "step": state["step"]})
    if is_s3(uri):
        shutil.rmtree(folder, ignore_errors=True)
    prune(storage, root_uri, keep_last)
    return uri


def prune(storage: Storage, root_uri: str, keep_last: int) -> None:
    names = sorted(n for n in storage.list_prefixes(root_uri) if n.startswith(CHECKPOINT_PREFIX))
    complete = [n for n in names if storage.read_manifest(join_uri(root_uri, n)) is not None]
    keep = set(complete[-keep_last:])
    newest_kept = min(keep) if keep else ""
    for name in names:
        # Older than what we keep: delete, complete or not. Newer incomplete ones may be in flight elsewhere.
        if name not in keep and name < newest_kept:
            storage.delete(join_uri(root_uri, name))


def complete(storage: Storage, root_uri: str, warn: bool = False) -> list[str]:
    """URIs of the checkpoints under root_uri that have their manifest, newest first."""
    names = sorted((n for n in storage.list_prefixes(root_uri) if n.startswith(CHECKPOINT_PREFIX)), reverse=True)
    found = []
    for name in names:
        uri = join_uri(root_uri, name)
        if storage.read_manifest(uri) is not None:
            found.append(uri)
        elif warn:
            log.warning("skipping incomplete checkpoint %s (no manifest.json)", uri)
    return found


def write_state(state: dict[str, Any], path: Path) -> None:
    """Beside, then renamed over: a process reading the old file through a memory map (load) keeps it intact."""
    partial = path.with_name(f".{path.name}.tmp")
    torch.save(state, partial)
    os.replace(partial, path)


def find_latest(storage: Storage, root_uri: str, dest: Path,
                needs: Callable[[Path], list[str]] = lambda folder: []) -> tuple[str, Path] | None:
    """Called by every rank: the newest checkpoint that has a manifest and matches it, incomplete or corrupt ones
    skipped. Each node fetches it once and only in part: state.pt (and a sharded one's .metadata), then what
    `needs(folder)` names for any of the node's ranks (a sharded checkpoint's shard files that rank reads: for
    an 8B FSDP run, 1/8 of 128 GB per node instead of all of it). Local checkpoints are read in place."""
    uris = distributed.broadcast_object(complete(storage, root_uri, warn=True) if distributed.is_main() else None,
                                        io=True)
    for uri in uris:
        manifest = distributed.broadcast_object(storage.read_manifest(uri) if distributed.is_main() else None,
                                                io=True)
        folder = dest / uri.rstrip("/").rsplit("/", 1)[-1] if is_s3(uri) else Path(uri)
        if _fetch_for_node(storage, uri, folder, manifest, needs):
            return uri, folder
    return None


def _fetch_for_node(storage: Storage, uri: str, folder: Path, manifest: dict[str, Any],
                    needs: Callable[[Path], list[str]]) -> bool:
    """Every rank: True when every node holds the files its ranks read, each matching the manifest."""
    common = [e["path"] for e in manifest["files"] if e["path"] == STATE_FILE or e["path"].endswith("/.metadata")]
    error = _fetch_verified(storage, uri, folder, common, manifest) if distributed.local_rank() == 0 else None
    if distributed.any_rank(error is not None, io=True):
        return False
    mine: list[str] = []
    try:
        mine = needs(folder)
    except (OSError, RuntimeError, ValueError, KeyError) as exc:  # a state.pt or .metadata that cannot be read
        error = f"{uri}: {exc}"
        log.warning("skipping corrupt checkpoint: %s", error)
    wanted = distributed.gather_objects(mine, io=True)
    if error is None and distributed.local_rank() == 0:
        node = sorted({path for rank in distributed.node_ranks() for path in wanted[rank]})
        error = _fetch_verified(storage, uri, folder, node, manifest)
    return not distributed.any_rank(error is not None, io=True)


def _fetch_verified(storage: Storage, uri: str, folder: Path, paths: list[str],
                    manifest: dict[str, Any]) -> str | None:
    """The listed files of a checkpoint in folder (downloaded from S3, read in place otherwise), each checked
    against its manifest entry; what is wrong, or None."""
    entries = {entry["path"]: entry for entry in manifest.get("files", [])}
    try:
        for rel in paths:
            target, entry = folder / rel, entries.get(rel)
            if entry is None:
                raise IntegrityError(f"{rel}: not listed")
            if is_s3(uri):
                storage.fetch(join_uri(uri, rel), target.parent)
            if not target.is_file():
                raise IntegrityError(f"{rel}: missing")
            if target.stat().st_size != entry["size"] or sha256_file(target) != entry["sha256"]:
                raise IntegrityError(f"{rel}: sha256 mismatch")
    except (IntegrityError, UserError, OSError) as exc:
        log.warning("skipping corrupt checkpoint: %s: does not match its %s: %s", uri, MANIFEST_NAME, exc)
        return str(exc)
    return None


def load(path: Path) -> dict[str, Any]:
    """state.pt memory-mapped: the ranks of a node share its pages instead of each reading the whole file."""
    # weights_only=False: the dict holds RNG tuples and the spec; we only load checkpoints we wrote.
    state: dict[str, Any] = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False, mmap=True)
    return state
