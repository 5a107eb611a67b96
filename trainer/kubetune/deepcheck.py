"""`kubetune validate --deep`: everything a job needs, checked in seconds before any GPU is held.

Storage with the job's own credentials (buckets exist, inputs readable, output and checkpoint prefixes
writable: a marker is written, then deleted), the first rows of every data file with the declared
format and fields, labels against model.labels, the model's config and tokenizer (architecture, position
limit), and an estimate of the steps and of the memory per device. Every problem is one line naming the
field or file; all of them are collected before the command exits 2.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune import lineage
from kubetune.data.clean import check_columns, clean_files
from kubetune.data.read import EXTENSIONS, file_format, read_file
from kubetune.errors import UserError
from kubetune.memory import device_memory, plan, world_size
from kubetune.spec import FineTuneJob
from kubetune.storage import Storage, is_s3, join_uri

SAMPLE_BYTES = 1 << 20  # the first MiB of each text data file: enough rows to check, quick over any link
SAMPLE_FILES = 3        # of a folder of files, the first few
MODEL_FILES = ("config.json", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "tokenizer.model",
               "sentencepiece.bpe.model", "chat_template.jinja", "generation_config.json")


@dataclass
class DeepReport:
    problems: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    def check(self, what: Callable[[], Any]) -> Any:
        """Run one check; a UserError becomes a problem line and the other checks still run."""
        try:
            return what()
        except UserError as exc:
            self.problems.extend(str(exc).splitlines())
            return None


def deep_check(job: FineTuneJob, device_memory: int | None = None) -> DeepReport:
    spec = job.spec
    report = DeepReport()
    storage = Storage(spec.storage)
    with tempfile.TemporaryDirectory(prefix="kubetune-deep-") as scratch:
        work = Path(scratch)
        report.check(lambda: _check_writable(storage, "spec.output.uri", spec.output.uri))
        report.check(lambda: _check_writable(storage, "spec.checkpoint.uri", spec.checkpoint_uri()))
        rows = report.check(lambda: _check_data(job, storage, work)) or {}
        model = report.check(lambda: _check_model(job, storage, work / "model"))
        if model is not None:
            report.facts["model"] = model
            if device_memory is None:
                device_memory = _device_memory(job)
            report.facts["estimate"] = estimate(job, model, rows.get("train", 0), device_memory)
            report.check(lambda: _check_fits(job, report.facts["estimate"]))
        report.facts["rows"] = rows
    return report


# ---- storage ------------------------------------------------------------------------------------------

def _check_writable(storage: Storage, name: str, uri: str) -> None:
    """Write a marker under the prefix and delete it: proves the credentials may write there."""
    marker = f".kubetune-preflight-{uuid.uuid4().hex[:8]}"
    if not is_s3(uri):
        folder = Path(uri)
        parent = next((p for p in (folder, *folder.parents) if p.exists()), None)
        if parent is None or not os.access(parent, os.W_OK):
            raise UserError(f"{name}: {uri}: not writable by this user")
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / marker
        path.write_text("kubetune pre-flight marker; safe to delete\n")
        try:
            storage.s3().upload_file(path, join_uri(uri, marker))
        except UserError as exc:
            raise UserError(f"{name}: {exc}") from None
    try:
        storage.delete(join_uri(uri, marker))
    except UserError as exc:
        raise UserError(f"{name}: wrote a marker but cannot delete it ({exc}); old checkpoints could not be "
                        "pruned nor outputs replaced") from None


# ---- data ---------------------------------------------------------------------------------------------

def _check_data(job: FineTuneJob, storage: Storage, work: Path) -> dict[str, int]:
    """First rows of every part: format, fields, labels. Returns estimated row counts per part."""
    spec = job.spec
    problems, counts = [], {}
    for part in ("train", "validation", "test"):
        uri = getattr(spec.data, part)
        if uri is None:
            continue
        try:
            counts[part] = _check_part(job, storage, uri, work / part)
        except UserError as exc:
            problems.append(f"spec.data.{part}: {exc}")
    if problems:
        raise UserError("\n".join(problems))
    return counts


def _check_part(job: FineTuneJob, storage: Storage, uri: str, work: Path) -> int:
    spec = job.spec
    files = _sample_files(storage, uri, spec.data.format, work)
    classification = spec.model.task == "sequence-classification"
    estimated = 0
    for path, total_bytes in files:
        data = read_file(path, file_format(path, spec.data.format))
        check_columns(data, spec.data, classification, spec.method.type == "dpo")
        dropped: Counter[str] = Counter()
        kept = clean_files([data], spec, dropped)
        if not kept:
            raise UserError(f"{uri}: no usable rows in the first {len(data.rows)} of {path.name} "
                            f"(dropped: {dict(dropped)})")
        sampled = max(path.stat().st_size, 1)
        estimated += round(len(kept) * total_bytes / sampled)
    return estimated


def _sample_files(storage: Storage, uri: str, fmt: str, work: Path) -> list[tuple[Path, int]]:
    """(local sample, full size in bytes) of the first data files under uri."""
    work.mkdir(parents=True, exist_ok=True)
    if not is_s3(uri):
        path = Path(uri)
        if not path.exists():
            raise UserError(f"{uri}: no such file or folder (relative paths are relative to the manifest)")
        from kubetune.data.read import list_data_files

        local = list_data_files(path, fmt) if path.is_dir() else [path]
        return [(_head(p, fmt, work), p.stat().st_size) for p in local[:SAMPLE_FILES]]
    s3 = storage.s3()
    objects = [(k, s) for k, s in s3.objects_at(uri) if not k.endswith("/manifest.json")]
    data = [(k, s) for k, s in objects if Path(k).suffix.lower() in EXTENSIONS or fmt != "auto"]
    if not data:
        raise UserError(f"{uri}: no data files there (.jsonl, .json, .csv, .parquet, .pq)")
    samples = []
    for key, size in data[:SAMPLE_FILES]:
        target = work / Path(key).name
        # Parquet keeps its schema in the footer: read it whole. Text formats: the first MiB, whole lines.
        whole = file_format(target, fmt) == "parquet" or size <= SAMPLE_BYTES
        body = s3.read_bytes(uri, key, None if whole else SAMPLE_BYTES)
        target.write_bytes(body if whole else body[: body.rfind(b"\n") + 1])
        samples.append((target, size))
    return samples


def _head(path: Path, fmt: str, work: Path) -> Path:
    """The first MiB of a local text file, cut at a line end (parquet files are read whole)."""
    if file_format(path, fmt) == "parquet" or path.stat().st_size <= SAMPLE_BYTES:
        return path
    with open(path, "rb") as handle:
        head = handle.read(SAMPLE_BYTES)
    target = work / path.name
    target.write_bytes(head[: head.rfind(b"\n") + 1])
    return target


# ---- model --------------------------------------------------------------------------------------------

def _check_model(job: FineTuneJob, storage: Storage, work: Path) -> dict[str, Any]:
    """Config and tokenizer only (no weights): architecture, size, position limit, LoRA targets."""
    spec = job.spec
    uri = spec.model.uri
    folder = _model_files(storage, uri, work)
    for depth in range(lineage.MAX_DEPTH):  # another job's adapter/: the model is its base's shape
        if not lineage.is_adapter(folder):
            break
        uri = lineage.base_uri(storage, uri, work / f"lineage-{depth}")
        folder = _model_files(storage, uri, work / f"base-{depth}")
    if not (folder / "config.json").is_file():
        raise UserError(f"spec.model.uri: {uri}: not a model folder (no config.json)")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"spec.model.uri: {uri}: cannot read its config or tokenizer ({exc})") from None
    problems = []
    limits = [v for v in (getattr(config, "max_position_embeddings", None), getattr(config, "n_positions", None),
                          getattr(tokenizer, "model_max_length", None)) if isinstance(v, int) and v < 10**9]
    limit = min(limits) if limits else None
    if limit is not None and spec.data.max_seq_length > limit:
        problems.append(f"spec.data.maxSeqLength: {spec.data.max_seq_length} is beyond the model's position "
                        f"limit of {limit} tokens; set it to {limit} or less")
    if spec.model.task == "sequence-classification":
        config.num_labels = len(spec.model.labels or [])
        auto: Any = AutoModelForSequenceClassification
    else:
        auto = AutoModelForCausalLM
    try:
        with torch.device("meta"):  # shapes only: no memory, no weights read
            model = auto.from_config(config)
    except (ValueError, KeyError) as exc:
        raise UserError(f"spec.model.uri: {uri}: architecture {config.model_type!r} cannot do "
                        f"{spec.model.task} ({exc})") from None
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    if spec.method.weights in ("lora", "qlora") and spec.method.lora.target_modules:
        missing = [t for t in spec.method.lora.target_modules if t not in names]
        if missing:
            problems.append(f"spec.method.lora.targetModules: {missing} are not modules of this "
                            f"{config.model_type} model (it has e.g. {sorted(names)[:12]})")
    if problems:
        raise UserError("\n".join(problems))
    return {
        "modelType": config.model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
        "layers": getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 0),
        "hidden": getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0),
        "heads": getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1),
        "vocab": getattr(config, "vocab_size", 0),
        "positionLimit": limit,
        "config": json.loads((folder / "config.json").read_text()),
    }


def _model_files(storage: Storage, uri: str, work: Path) -> Path:
    if not is_s3(uri):
        path = Path(uri)
        if not path.is_dir():
            raise UserError(f"spec.model.uri: {uri}: no such folder (relative paths are relative to the manifest)")
        return path
    s3 = storage.s3()
    work.mkdir(parents=True, exist_ok=True)
    prefix = uri.rstrip("/") + "/"
    try:
        for key, _ in s3.objects_at(prefix):
            if key.rsplit("/", 1)[-1] in MODEL_FILES:
                (work / key.rsplit("/", 1)[-1]).write_bytes(s3.read_bytes(prefix, key))
    except UserError as exc:
        raise UserError(f"spec.model.uri: {exc}") from None
    return work


# ---- estimate ----------------------------------------------------------------------------------------

def estimate(job: FineTuneJob, model: dict[str, Any], train_rows: int, device_memory: int | None) -> dict[str, Any]:
    """Steps on the job's devices, and the memory plan (kubetune.memory, the trainer's own estimate)."""
    spec, hp = job.spec, job.spec.hyperparameters
    world = world_size(spec)
    fraction = spec.data.split.train if spec.data.validation is None or spec.data.test is None else 1.0
    per_step = hp.batch_size * hp.gradient_accumulation_steps * world
    steps = hp.max_steps or max(1, round(train_rows * fraction) // per_step) * hp.epochs
    memory = plan(spec, world_size=world, device_bytes=device_memory, config=model["config"])
    return {"steps": steps, "trainRows": train_rows, "worldSize": world, "memory": memory}


def _check_fits(job: FineTuneJob, estimate: dict[str, Any]) -> None:
    memory = estimate["memory"]
    if not memory.fits:
        raise UserError(memory.advice(job.spec))


def _device_memory(job: FineTuneJob) -> int | None:
    return device_memory(job.spec)


def render(report: DeepReport) -> str:
    facts = report.facts
    lines = []
    if "model" in facts:
        m = facts["model"]
        lines.append(f"model: {m['modelType']}, {m['parameters']:,} parameters, position limit {m['positionLimit']}")
    if "rows" in facts:
        lines.append("rows (estimated from the first MiB): " + json.dumps(facts["rows"]))
    if "estimate" in facts:
        e = facts["estimate"]
        lines.append(f"steps: about {e['steps']:,} on {e['worldSize']} device(s)")
        lines.append(e["memory"].table())
    return "\n".join(lines)
