"""Checkpoints: one dict (weights, optimizer, scheduler, RNG of every rank, position, spec), manifest last."""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from kubetune.contract import CHECKPOINT_PREFIX, MANIFEST_NAME
from kubetune.storage import IntegrityError, Storage, is_s3, join_uri

log = logging.getLogger("kubetune.checkpoint")
STATE_FILE = "state.pt"
FORMAT_VERSION = 1


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
    torch.save({**state, "format": FORMAT_VERSION}, folder / STATE_FILE)
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


def find_latest(storage: Storage, root_uri: str, dest: Path) -> tuple[str, Path] | None:
    """Newest checkpoint that has a manifest and matches it; incomplete or corrupt ones are skipped."""
    for uri in complete(storage, root_uri, warn=True):
        name = uri.rstrip("/").rsplit("/", 1)[-1]
        try:
            path = storage.fetch(uri, dest / name)
        except IntegrityError as exc:
            log.warning("skipping corrupt checkpoint: %s", exc)
            continue
        return uri, path
    return None


def load(path: Path) -> dict[str, Any]:
    # weights_only=False: the dict holds RNG tuples and the spec; we only load checkpoints we wrote.
    state: dict[str, Any] = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    return state
