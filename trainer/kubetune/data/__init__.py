"""Data pipeline: read files, clean rows, split train/validation/test, tokenize. Torch-free."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.data.clean import PREFERENCE_REASONS, REASONS, clean_files, drop_cross_split
from kubetune.data.encode import Encoded, encode_causal_lm, encode_classification, encode_preference
from kubetune.data.read import DataFile, read_data
from kubetune.data.split import PARTS, split_data
from kubetune.errors import UserError
from kubetune.spec import FineTuneJobSpec

__all__ = ["Encoded", "PreparedData", "encode_causal_lm", "encode_classification", "encode_preference",
           "prepare_data"]


@dataclass
class PreparedData:
    train: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    test: list[dict[str, Any]]
    report: dict[str, Any]  # goes into run.json


def prepare_data(spec: FineTuneJobSpec, paths: dict[str, Path | None]) -> PreparedData:
    """Read, clean and split. `paths`: local file or folder per part; validation/test may be None."""
    data = spec.data
    labels = spec.model.labels if spec.model.task == "sequence-classification" else None
    reasons = PREFERENCE_REASONS if spec.method.type == "dpo" else REASONS
    dropped: dict[str, Counter[str]] = {}
    files: dict[str, list[DataFile]] = {}
    sources: dict[str, list[dict[str, Any]]] = {}
    for part in PARTS:
        path = paths.get(part)
        if path is None:
            if part == "train":
                raise UserError("spec.data.train: no training data given")
            continue
        files[part] = read_data(Path(path), data.format)
        dropped[part] = Counter()
        sources[part] = clean_files(files[part], spec, dropped[part])
    if data.cleaning.dedupe:
        drop_cross_split(sources, dropped)
    for part, rows in sources.items():
        if not rows:
            read = sum(len(f.rows) for f in files[part])
            counts = ", ".join(f"{dropped[part][r]} {r}" for r in reasons)
            raise UserError(
                f"spec.data.{part}: no usable rows after cleaning ({read} rows read from {len(files[part])} "
                f"file(s) under {paths[part]}; dropped: {counts})"
            )

    fractions = {p: getattr(data.split, p) for p in PARTS}
    parts, carved = split_data(sources, fractions, data.split.seed, labels)

    report: dict[str, Any] = {
        "files": [
            {
                "split": part,
                "path": _report_path(getattr(data, part), paths[part], f),
                "sha256": f.sha256,
                "rows": len(f.rows),
            }
            for part, part_files in files.items()
            for f in part_files
        ],
        "rowsRead": sum(len(f.rows) for part_files in files.values() for f in part_files),
        "rowsKept": sum(len(rows) for rows in sources.values()),
        "dropped": {r: sum(c[r] for c in dropped.values()) for r in reasons},
        "splitSizes": {p: len(parts[p]) for p in PARTS},
        "splitFrom": carved,
    }
    if labels:
        report["labelCounts"] = {
            p: {name: sum(1 for r in parts[p] if r["label"] == i) for i, name in enumerate(labels)} for p in PARTS
        }
    return PreparedData(train=parts["train"], validation=parts["validation"], test=parts["test"], report=report)


def _report_path(uri: str | None, local: Path | None, file: DataFile) -> str:
    """Name a file by where the user put it (the spec's URI), not by the local download folder."""
    if not uri or local is None:
        return str(file.path)
    if not Path(local).is_dir():
        return uri
    return uri.rstrip("/") + "/" + file.path.relative_to(local).as_posix()
