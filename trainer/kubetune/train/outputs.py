"""Write the fine-tuned model and its reports to a staging folder, then publish (manifest.json last)."""

from __future__ import annotations

import json
import platform
import shutil
import time
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune import contract
from kubetune.storage import Storage
from kubetune.train.curves import write_curves

if TYPE_CHECKING:
    import torch


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in ("kubetune", "torch", "transformers", "peft", "tokenizers", "safetensors", "pydantic", "boto3"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def hardware(device: torch.device, precision: str, world: int) -> dict[str, Any]:
    import torch  # here, not at the top: `kubetune run` imports this module for its summary

    info: dict[str, Any] = {
        "device": str(device),
        "precision": precision,
        "worldSize": world,
        "cpu": platform.processor() or platform.machine(),
        "cpuThreads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def save_model(model: Any, tokenizer: Any, method: str, merge: bool, staging: Path) -> list[str]:
    """adapter/ (PEFT format) for LoRA; merged/ is always a standalone model (LoRA folded in)."""
    written = []
    if method == "lora":
        model.save_pretrained(staging / contract.ADAPTER_DIR)
        tokenizer.save_pretrained(staging / contract.ADAPTER_DIR)
        written.append(contract.ADAPTER_DIR)
        if not merge:
            return written
        # merge_and_unload changes the model in place: it is the last thing done with it.
        model = model.merge_and_unload()
    model.save_pretrained(staging / contract.MERGED_DIR, safe_serialization=True)
    tokenizer.save_pretrained(staging / contract.MERGED_DIR)
    written.append(contract.MERGED_DIR)
    return written


def metric_rows(base: dict[str, Any] | None, tuned: dict[str, Any] | None) -> list[tuple[str, str, str]]:
    """(metric, base, fine-tuned) for every scalar test metric, '-' where the base run has none."""
    rows = []
    for key, value in (tuned or {}).items():
        if isinstance(value, float):
            before = (base or {}).get(key)
            rows.append((key, f"{before:.4f}" if isinstance(before, float) else "-", f"{value:.4f}"))
    return rows


def _metric_table(base: dict[str, Any] | None, tuned: dict[str, Any] | None) -> str:
    if not tuned:
        return "No test split was configured.\n"
    rows = ["| metric | base model | fine-tuned |", "|---|---|---|"]
    rows += [f"| {key} | {before} | {after} |" for key, before, after in metric_rows(base, tuned)]
    return "\n".join(rows) + "\n"


def model_card(job: dict[str, Any], metrics: dict[str, Any], run: dict[str, Any], folders: list[str]) -> str:
    spec = job["spec"]
    name = job["metadata"]["name"]
    task = spec["model"]["task"]
    auto = "AutoModelForSequenceClassification" if task == "sequence-classification" else "AutoModelForCausalLM"
    load = f'from transformers import {auto}\nmodel = {auto}.from_pretrained("merged")'
    if "adapter" in folders:
        load += (f'\n\n# or the adapter on top of the base model\nfrom peft import PeftModel\n'
                 f'base = {auto}.from_pretrained("<base model>")\nmodel = PeftModel.from_pretrained(base, "adapter")')
    split = run["data"].get("splitSizes", {})
    return f"""# {name}

Fine-tuned with [kubetune](https://kubetune.io) from `{spec['model']['uri']}` for **{task}**
using **{spec['method']['type']}** ({metrics['trainableParameters']:,} of {metrics['totalParameters']:,} parameters
trained).

## Test results

{_metric_table(metrics.get('baseTest'), metrics.get('test'))}
Best checkpoint: step {metrics.get('bestStep')} by `{spec['evaluation']['metric']}`
(stopped early: {metrics.get('stoppedEarly')}). Steps: {metrics.get('steps')}.

![training curves]({contract.CURVES_FILE})

## Data

Rows read {run['data'].get('rowsRead')}, kept {run['data'].get('rowsKept')} after cleaning
(dropped: {json.dumps(run['data'].get('dropped', {}))}). Split sizes: {json.dumps(split)}.
Labels: {spec['model'].get('labels')}.

## Training

Hyperparameters: `{json.dumps(spec['hyperparameters'])}`. Seed {spec['hyperparameters']['seed']}.
Hardware: `{json.dumps(run['hardware'])}`.

## Use

```python
{load}
```

Every file is listed with its size and sha256 in `manifest.json`; no manifest means an incomplete upload.
"""


def write_reports(staging: Path, metrics: dict[str, Any], run: dict[str, Any], job: dict[str, Any],
                  folders: list[str]) -> None:
    (staging / contract.METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    write_curves(staging / contract.CURVES_FILE, metrics)  # observability: loss/eval curves, in the card below
    (staging / contract.RUN_FILE).write_text(json.dumps(run, indent=2, default=str))
    (staging / contract.MODEL_CARD).write_text(model_card(job, metrics, run, folders))


def publish_outputs(storage: Storage, staging: Path, uri: str) -> dict[str, Any]:
    manifest = storage.publish(staging, uri, extra={"kind": "output"})
    shutil.rmtree(staging, ignore_errors=True)
    return manifest


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
