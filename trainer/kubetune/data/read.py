"""Read jsonl, csv and parquet files (or folders of them) into raw rows, with a sha256 per file."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune.errors import UserError

EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
SKIPPED_NAMES = {"manifest.json"}  # written by kubetune itself next to data it uploads


@dataclass
class DataFile:
    """One file as read: `rows[i]` is None where the line or row could not be parsed (a malformed row)."""

    path: Path
    sha256: str
    rows: list[dict[str, Any] | None] = field(default_factory=list)
    numbers: list[int] = field(default_factory=list)  # line (jsonl, csv) or row (parquet) number of each row
    unit: str = "line"

    def where(self, index: int) -> str:
        return f"{self.path}, {self.unit} {self.numbers[index]}"


def read_data(path: Path, fmt: str) -> list[DataFile]:
    """Read a file, or every data file under a folder (sorted), in format `fmt` (auto = by extension)."""
    if not path.exists():
        raise UserError(f"data path {path} does not exist")
    files = list_data_files(path, fmt) if path.is_dir() else [path]
    return [read_file(f, file_format(f, fmt)) for f in files]


def list_data_files(folder: Path, fmt: str) -> list[Path]:
    def is_data(p: Path) -> bool:
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or p.name in SKIPPED_NAMES or not p.is_file():
            return False
        # an explicit format also covers extension-less part files (e.g. part-00000)
        return p.suffix.lower() in EXTENSIONS or (fmt != "auto" and not p.suffix)

    files = sorted((p for p in folder.rglob("*") if is_data(p)), key=lambda p: p.relative_to(folder).as_posix())
    if not files:
        raise UserError(f"data folder {folder} has no data files (.jsonl, .json, .csv, .parquet, .pq)")
    return files


def file_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    found = EXTENSIONS.get(path.suffix.lower())
    if found is None:
        raise UserError(
            f"{path}: cannot tell the format from the extension {path.suffix!r}; "
            "use .jsonl/.json, .csv or .parquet, or set spec.data.format"
        )
    return found


def read_file(path: Path, fmt: str) -> DataFile:
    raw = path.read_bytes()
    data = DataFile(path=path, sha256=hashlib.sha256(raw).hexdigest())
    if fmt == "parquet":
        _read_parquet(raw, data)
    else:
        try:
            text = raw.decode("utf-8-sig")  # -sig: spreadsheet exports often start with a BOM
        except UnicodeDecodeError as exc:
            raise UserError(f"{path}: not a {fmt} file (not UTF-8 text at byte {exc.start})") from None
        if "\x00" in text:
            raise UserError(f"{path}: not a {fmt} file (contains NUL bytes; binary data?)")
        if fmt == "jsonl":
            _read_jsonl(text, data)
        else:
            _read_csv(text, data)
    return data


def _read_jsonl(text: str, data: DataFile) -> None:
    if text.lstrip().startswith("["):  # a .json file holding one array of objects
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{data.path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        data.unit = "item"
        for number, row in enumerate(rows, start=1):
            data.rows.append(row if isinstance(row, dict) else None)
            data.numbers.append(number)
        return
    failed = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        failed += row is None
        data.rows.append(row if isinstance(row, dict) else None)
        data.numbers.append(number)
    # a few bad lines are dropped rows; mostly bad lines means the file is not jsonl at all
    if data.rows and failed * 2 > len(data.rows):
        raise UserError(
            f"{data.path}: not a jsonl file ({failed} of {len(data.rows)} lines are not JSON); "
            "check the file or spec.data.format"
        )


def _read_csv(text: str, data: DataFile) -> None:
    csv.field_size_limit(1 << 30)  # long documents in one cell are normal for fine-tuning data
    reader = csv.DictReader(io.StringIO(text, newline=""), restkey="\x00extra")
    try:
        for row in reader:
            # extra cells beyond the header mean the row was split wrongly (e.g. an unquoted comma)
            data.rows.append(None if "\x00extra" in row else dict(row))
            data.numbers.append(reader.line_num)
    except csv.Error as exc:
        raise UserError(f"{data.path}: not a valid csv file ({exc} near line {reader.line_num})") from None
    if reader.fieldnames is None:
        raise UserError(f"{data.path}: csv file is empty (no header row)")


def _read_parquet(raw: bytes, data: DataFile) -> None:
    import pyarrow as pa  # imported here: the operator image has no pyarrow
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(raw))
    except Exception as exc:  # pyarrow raises several types for corrupt or non-parquet input
        raise UserError(f"{data.path}: not a parquet file ({exc})") from None
    data.unit = "row"
    data.rows.extend(table.to_pylist())
    data.numbers.extend(range(1, table.num_rows + 1))
