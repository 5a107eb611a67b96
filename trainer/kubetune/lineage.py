"""model.uri may be another FineTuneJob's output: its merged/ folder is a model like any other; its adapter/
folder is a LoRA adapter whose base is the model that job started from, named in its run.json beside adapter/.

Torch-free, so `kubetune validate` and the pre-flight can follow it too; the trainer folds the adapter into its
base before training (train/inputs.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from kubetune.contract import RUN_FILE
from kubetune.errors import UserError
from kubetune.storage import Storage, join_uri

ADAPTER_CONFIG = "adapter_config.json"
MAX_DEPTH = 8  # an adapter of an adapter of ...: a loop in run.json files must end


def is_adapter(folder: Path) -> bool:
    """A PEFT adapter folder (kubetune's adapter/), not a whole model."""
    return (folder / ADAPTER_CONFIG).is_file() and not (folder / "config.json").is_file()


def base_uri(storage: Storage, adapter_uri: str, scratch: Path) -> str:
    """The model.uri of the job that wrote adapter_uri: what its adapter trained on top of."""
    parent = adapter_uri.rstrip("/").rsplit("/", 1)[0] if "/" in adapter_uri.rstrip("/") else "."
    try:
        path = storage.fetch(join_uri(parent, RUN_FILE), scratch)
        run = json.loads((path if path.is_file() else path / RUN_FILE).read_text())
        uri = run["spec"]["model"]["uri"]
    except (OSError, ValueError, KeyError, TypeError, UserError) as exc:
        raise UserError(f"spec.model.uri: {adapter_uri}: a LoRA adapter, but the {RUN_FILE} of the job that wrote "
                        f"it, which names its base model, is not beside it ({exc}); point model.uri at that job's "
                        "merged/ folder or at a model") from None
    if not isinstance(uri, str) or not uri:
        raise UserError(f"spec.model.uri: {adapter_uri}: its job's {RUN_FILE} names no base model")
    return uri
