"""Use a finished model: `kubetune predict` and `kubetune evaluate` on a verified output.

Both read the output the trainer published (local folder or s3://), refuse it unless manifest.json is
there and every file matches it, and rebuild the trainer's own data path (read, clean, encode) from the
run.json it wrote, so `evaluate` on the test file scores exactly what the run's test split scored.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from kubetune import contract
from kubetune.errors import UserError
from kubetune.spec import FineTuneJobSpec, StorageSpec
from kubetune.storage import IntegrityError, Storage, is_s3


@dataclass
class FinishedModel:
    """A verified output folder, loaded: the spec it was trained with, its model and tokenizer."""

    folder: Path
    spec: FineTuneJobSpec
    run: dict[str, Any]
    model: Any
    tokenizer: Any


def open_output(uri: str, storage: Storage, cache: Path) -> FinishedModel:
    """Fetch (S3) or use in place (local), verify against manifest.json, load merged/."""
    if storage.read_manifest(uri) is None:
        raise UserError(f"{uri}: no {contract.MANIFEST_NAME}: not a finished kubetune output (or still uploading)")
    dest = cache / uri.replace("s3://", "").strip("/").replace("/", "_") if is_s3(uri) else Path(uri)
    try:
        folder = storage.fetch(uri, dest)  # verifies every file against the manifest
    except IntegrityError as exc:
        raise UserError(str(exc)) from None  # it names the output and every file that differs
    run = json.loads((folder / contract.RUN_FILE).read_text())
    spec = FineTuneJobSpec.model_validate(run["spec"])
    merged = folder / contract.MERGED_DIR
    if not (merged / "config.json").is_file():
        raise UserError(f"{uri}: has no {contract.MERGED_DIR}/ (output.mergeAdapter was false); "
                        f"load {contract.ADAPTER_DIR}/ on its base model instead")
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a weight-loading bar on every prediction command is noise

    auto = AutoModelForSequenceClassification if spec.model.task == "sequence-classification" else AutoModelForCausalLM
    model = auto.from_pretrained(merged, dtype="float32")  # the trainer's master weights are fp32
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(merged)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # as in training: padding positions are masked anyway
    return FinishedModel(folder, spec, run, model, tokenizer)


def read_inputs(texts: list[str], input_file: str | None, field: str, stdin: TextIO) -> list[str]:
    """Texts from the command line, else a jsonl file (`field` or "text" per line), else stdin lines."""
    if texts:
        return texts
    if input_file:
        path = Path(input_file)
        if not path.is_file():
            raise UserError(f"--input: {path.resolve()} does not exist")
        return [_text_of(line, field, f"{path}, line {n}") for n, line in enumerate(path.read_text().splitlines(), 1)
                if line.strip()]
    if stdin.isatty():
        raise UserError("give texts as arguments, --input FILE (jsonl), or lines on standard input")
    return [line.rstrip("\n") for line in stdin if line.strip()]


def _text_of(line: str, field: str, where: str) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: not valid JSON ({exc.msg})") from None
    if isinstance(row, str):
        return row
    for key in (field, "text", "prompt"):
        if isinstance(row, dict) and isinstance(row.get(key), str):
            return str(row[key])
    raise UserError(f"{where}: no {field!r} field")


def predict(finished: FinishedModel, texts: list[str], max_new_tokens: int = 64) -> Iterator[dict[str, Any]]:
    import torch

    spec, model, tokenizer = finished.spec, finished.model, finished.tokenizer
    with torch.no_grad():
        for text in texts:
            if spec.model.task == "sequence-classification":
                encoded = tokenizer(text, truncation=True, max_length=spec.data.max_seq_length, return_tensors="pt")
                probs = torch.softmax(model(**encoded).logits[0].float(), -1).tolist()
                labels = spec.model.labels or []
                best = max(range(len(probs)), key=probs.__getitem__)
                yield {"text": text, "label": labels[best], "probabilities": dict(zip(labels, probs, strict=True))}
            else:
                yield {"prompt": text, "completion": _generate(finished, text, max_new_tokens)}


def _generate(finished: FinishedModel, prompt: str, max_new_tokens: int) -> str:
    tokenizer, model = finished.tokenizer, finished.model
    if getattr(tokenizer, "chat_template", None):
        # A chat model answers what its template renders for a user turn, as in training.
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
    else:
        ids = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    text: str = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    return text


def evaluate_file(finished: FinishedModel, data_uri: str, storage: Storage, cache: Path) -> dict[str, Any]:
    """The run's test metrics on another labelled file: same cleaning, encoding, batching and precision."""
    import torch

    from kubetune.data import encode_causal_lm, encode_classification
    from kubetune.data.clean import clean_files
    from kubetune.data.read import read_data
    from kubetune.train.evaluate import evaluate
    from kubetune.train.precision import choose_precision

    spec = finished.spec
    local = storage.fetch(data_uri, cache / "data") if is_s3(data_uri) else Path(data_uri)
    if not local.exists():
        raise UserError(f"--data: {local.resolve()} does not exist")
    dropped: Counter[str] = Counter()
    rows = clean_files(read_data(local, spec.data.format), spec, dropped)
    if not rows:
        raise UserError(f"--data: {data_uri}: no usable rows after cleaning ({dict(dropped)})")
    encode = encode_classification if spec.model.task == "sequence-classification" else encode_causal_lm
    examples = encode(rows, finished.tokenizer, spec.data.max_seq_length)
    recorded = finished.run.get("hardware", {}).get("precision", "fp32")
    precision = choose_precision(recorded if recorded in ("fp32", "bf16", "fp16") else "fp32", torch.device("cpu"))
    metrics = evaluate(finished.model, list(examples), spec.model.task, spec.model.labels or [],
                       spec.hyperparameters.batch_size, finished.tokenizer.pad_token_id, precision,
                       torch.device("cpu"))
    metrics["dropped"] = {k: v for k, v in dropped.items() if v}
    return metrics


def write_jsonl(rows: Iterable[dict[str, Any]], output: str | None) -> int:
    handle: TextIO = open(output, "w") if output else sys.stdout  # noqa: SIM115 - closed below
    count = 0
    try:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
            handle.flush()
            count += 1
    finally:
        if output:
            handle.close()
    return count


def storage_for(endpoint: str | None, region: str) -> Storage:
    return Storage(StorageSpec(endpoint=endpoint, region=region))
