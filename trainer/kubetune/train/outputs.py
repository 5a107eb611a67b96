"""Write the fine-tuned model and its reports to a staging folder, then publish (manifest.json last)."""

from __future__ import annotations

import json
import platform
import shutil
import time
from collections.abc import Collection
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune import contract
from kubetune.errors import UserError
from kubetune.spec import FineTuneJobSpec
from kubetune.storage import Storage, is_s3, join_uri
from kubetune.train import usage
from kubetune.train.curves import write_curves
from kubetune.train.quality import describe

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


def save_model(model: Any, tokenizer: Any, method: str, merge: bool, staging: Path,
               base_dir: Path | None = None, stop_ids: Collection[int] = ()) -> list[str]:
    """adapter/ (PEFT format) for LoRA and QLoRA; merged/ is always a standalone model (LoRA folded in), in the
    dtype the base was stored in (training's fp32 master weights would double its size and serving memory), whose
    generation stops on every token training ended answers with (stop_ids)."""
    from kubetune.train.model import stored_dtype

    written = []
    use_cache = getattr(model, "kubetune_use_cache", None)  # training turned the KV cache off; inference wants it
    if method in ("lora", "qlora"):
        model.save_pretrained(staging / contract.ADAPTER_DIR)
        tokenizer.save_pretrained(staging / contract.ADAPTER_DIR)
        written.append(contract.ADAPTER_DIR)
        if not merge:
            return written
        if method == "qlora":
            assert base_dir is not None, "qlora merges onto the base model's own weights"
            model = merge_onto_dequantised_base(model, staging / contract.ADAPTER_DIR, base_dir)
        else:
            # merge_and_unload changes the model in place: it is the last thing done with it.
            model = model.merge_and_unload()
    if use_cache is not None:
        model.config.use_cache = use_cache
    if base_dir is not None:
        model.to(stored_dtype(base_dir))  # in place: the trained model's last use
    add_stop_tokens(model, stop_ids)
    model.save_pretrained(staging / contract.MERGED_DIR, safe_serialization=True)
    tokenizer.save_pretrained(staging / contract.MERGED_DIR)
    written.append(contract.MERGED_DIR)
    return written


def add_stop_tokens(model: Any, stop_ids: Collection[int]) -> None:
    """generate() stops at the config's EOS only: a ChatML base learns to end turns with <|im_end|>, which
    generation would run past, so every trained stop token joins generation_config.eos_token_id."""
    config = getattr(model, "generation_config", None)
    if config is None or not stop_ids:
        return
    known = config.eos_token_id
    ids = [] if known is None else [known] if isinstance(known, int) else list(known)
    ids += sorted(set(stop_ids) - set(ids))
    config.eos_token_id = ids[0] if len(ids) == 1 else ids


def merge_onto_dequantised_base(model: Any, adapter_dir: Path, base_dir: Path) -> Any:
    """QLoRA's merged/: the adapter folded into the base's original weights in their stored dtype, not into
    4-bit ones (rounding the merged weights to NF4 again would lose most of what the adapter learned)."""
    from peft import PeftModel

    from kubetune.train.model import stored_dtype

    trained = model.get_base_model()
    config = type(trained.config).from_dict(trained.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    base = type(trained).from_pretrained(base_dir, config=config, dtype=stored_dtype(base_dir),
                                         ignore_mismatched_sizes=True)  # a fresh head comes from the adapter
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()


def metric_rows(base: dict[str, Any] | None, tuned: dict[str, Any] | None) -> list[tuple[str, str, str, str]]:
    """(metric, base, fine-tuned, difference) for every scalar test metric, '-' where the base run has none."""
    rows = []
    for key, value in (tuned or {}).items():
        if isinstance(value, float):
            before = (base or {}).get(key)
            rows.append((key, f"{before:.4f}", f"{value:.4f}", f"{value - before:+.4f}") if isinstance(before, float)
                        else (key, "-", f"{value:.4f}", "-"))
    return rows


def _metric_table(base: dict[str, Any] | None, tuned: dict[str, Any] | None) -> str:
    if not tuned:
        return "No test split was configured.\n"
    rows = ["| metric | base model | fine-tuned | difference |", "|---|---|---|---|"]
    rows += [f"| {' | '.join(row)} |" for row in metric_rows(base, tuned)]
    return "\n".join(rows) + "\n"


def _quality_line(quality: dict[str, Any] | None, published: bool) -> str:
    """The gate's verdict under the table: both numbers, the difference, and what happened to the model."""
    if quality is None:
        return ""
    verdict = "better than the base" if quality["improved"] else "NOT better than the base"
    if quality["minImprovement"] is not None:
        verdict = (f"{'meets' if quality['improved'] else 'misses'} evaluation.minImprovement "
                   f"{quality['minImprovement']:g}")
    fate = "" if published else " Nothing was published: this folder holds the report only."
    return f"\n**Quality:** {describe(quality)}: {verdict}.{fate}\n"


def _qlora_note(method: str, folders: list[str]) -> str:
    """merged/ of a QLoRA run is not the model that was tested: say so where the test results are."""
    if method != "qlora" or contract.MERGED_DIR not in folders:
        return ""
    return (f"\nThese test results are those of the 4-bit (NF4) base with the adapter (`{contract.ADAPTER_DIR}/`). "
            f"`{contract.MERGED_DIR}/` folds the adapter into the base's original, unquantised weights, so its "
            f"scores can differ slightly from these (`kubetune evaluate` scores `{contract.MERGED_DIR}/`).\n")


def model_card(job: dict[str, Any], metrics: dict[str, Any], run: dict[str, Any], folders: list[str],
               use: str = "") -> str:
    spec = job["spec"]
    name = job["metadata"]["name"]
    task = spec["model"]["task"]
    split = run["data"].get("splitSizes", {})
    return f"""# {name}

Fine-tuned with [kubetune](https://kubetune.io) from `{spec['model']['uri']}` for **{task}**
using **{spec['method']['type']}** ({metrics['trainableParameters']:,} of {metrics['totalParameters']:,} parameters
trained).

## Test results

{_metric_table(metrics.get('baseTest'), metrics.get('test'))}{_quality_line(metrics.get('quality'), bool(folders))}
Best checkpoint: step {metrics.get('bestStep')} by `{spec['evaluation']['metric']}`
(stopped early: {metrics.get('stoppedEarly')}). Steps: {metrics.get('steps')}.
Ties on the metric go to the lower validation loss, then to the later step.
{_qlora_note(spec['method']['type'], folders)}
![training curves]({contract.CURVES_FILE})

## Data

Rows read {run['data'].get('rowsRead')}, kept {run['data'].get('rowsKept')} after cleaning
(dropped: {json.dumps(run['data'].get('dropped', {}))}). Split sizes: {json.dumps(split)}.
Labels: {spec['model'].get('labels')}.

## Training

Hyperparameters: `{json.dumps(spec['hyperparameters'])}`. Seed {spec['hyperparameters']['seed']}.
Hardware: `{json.dumps(run['hardware'])}`.

## Use

{use}
Every file is listed with its size and sha256 in `manifest.json`; no manifest means an incomplete upload.
"""


def write_reports(staging: Path, metrics: dict[str, Any], run: dict[str, Any], job: dict[str, Any],
                  folders: list[str], example: dict[str, Any] | None = None) -> None:
    """metrics.json, run.json and the model card; example (a training record) fills the card's snippets."""
    (staging / contract.METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    write_curves(staging / contract.CURVES_FILE, metrics)  # observability: loss/eval curves, in the card below
    (staging / contract.RUN_FILE).write_text(json.dumps(run, indent=2, default=str))
    use = (usage.use_section(job["spec"], folders, example, usage.rendered_prompt(staging, folders, example))
           if folders else "No model was published: it did not meet spec.evaluation.minImprovement (above).\n")
    (staging / contract.MODEL_CARD).write_text(model_card(job, metrics, run, folders, use))


# What kubetune writes at the top of an output prefix (a half-done publish leaves only these).
OUR_NAMES = {contract.ADAPTER_DIR, contract.MERGED_DIR, contract.METRICS_FILE, contract.RUN_FILE, contract.CURVES_FILE,
             contract.MODEL_CARD, contract.MANIFEST_NAME, contract.DRY_RUN_DIR, contract.NOT_IMPROVED_DIR,
             f".{contract.MANIFEST_NAME}.tmp"}


def _below(child: str, parent: str) -> str | None:
    """child's path relative to parent when it lies inside it (the default checkpoints/ does)."""
    child, parent = child.rstrip("/") + "/", parent.rstrip("/") + "/"
    if not is_s3(parent):
        child, parent = str(Path(child).expanduser().resolve()) + "/", str(Path(parent).expanduser().resolve()) + "/"
    return child[len(parent):].rstrip("/") if child.startswith(parent) and child != parent else None


def output_files(storage: Storage, spec: FineTuneJobSpec) -> list[str]:
    """Paths of every file under output.uri, relative to it, except the checkpoints kept inside it."""
    uri = spec.output.uri
    if is_s3(uri):
        prefix = uri[5:].partition("/")[2].strip("/")
        prefix = prefix + "/" if prefix else ""
        files = [key[len(prefix):] for key, _ in storage.s3().list_objects(uri)]
    else:
        root = Path(uri).expanduser()
        files = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()] if root.is_dir() else []
    keep = _below(spec.checkpoint_uri(), uri)
    return sorted(f for f in files if not (keep and (f + "/").startswith(keep + "/")))


def check_output(storage: Storage, spec: FineTuneJobSpec) -> list[str]:
    """The files a publish will replace; UserError (exit 2) when some of them are not kubetune's."""
    files = output_files(storage, spec)
    manifest = storage.read_manifest(spec.output.uri) if files else None
    listed = {e["path"] for e in manifest.get("files", [])} if manifest and manifest.get("kind") == "output" else set()
    foreign = [f for f in files if f not in listed and f.split("/", 1)[0] not in OUR_NAMES]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise UserError(f"spec.output.uri: {spec.output.uri} holds files kubetune did not write ({shown}); "
                        "publishing replaces that folder's contents: choose an empty output.uri or move them away")
    return files


def publish_outputs(storage: Storage, staging: Path, spec: FineTuneJobSpec,
                    folder: str | None = None) -> dict[str, Any]:
    """Replace the output prefix's contents with staging: old manifest first, stale files, then publish.
    folder: publish staging into that subfolder instead (a rejected model's report), with no manifest at the top."""
    uri = spec.output.uri
    old = check_output(storage, spec)
    new = {f"{folder}/{p.relative_to(staging).as_posix()}" if folder else p.relative_to(staging).as_posix()
           for p in staging.rglob("*") if p.is_file()}
    if contract.MANIFEST_NAME in old:
        storage.delete(join_uri(uri, contract.MANIFEST_NAME))  # from here on the prefix reads as incomplete
    new_tops = {f.split("/", 1)[0] for f in new}
    for top in sorted({f.split("/", 1)[0] for f in old} - new_tops - {contract.MANIFEST_NAME}):
        storage.delete(join_uri(uri, top))  # e.g. adapter/ after switching from lora to full
    for stale in (f for f in old if f not in new and f.split("/", 1)[0] in new_tops):
        storage.delete(join_uri(uri, stale))
    target, kind = (join_uri(uri, folder), folder) if folder else (uri, "output")
    manifest = storage.publish(staging, target, extra={"kind": kind})
    shutil.rmtree(staging, ignore_errors=True)
    return manifest


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
