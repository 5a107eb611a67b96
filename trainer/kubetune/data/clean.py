"""Turn raw rows into task records: trim, drop bad rows (counted by reason), map labels, dedupe."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from kubetune.data.read import DataFile
from kubetune.errors import UserError
from kubetune.spec import DataSpec, FineTuneJobSpec

Record = dict[str, Any]
# duplicate: same input and target as an earlier row; conflict: same input, another label (the first row wins);
# crossSplit: an evaluation row whose input is also in train (or, for test, in validation); identical (preference
# data only): a pair whose chosen and rejected answers are the same, so there is nothing to prefer.
REASONS = ("empty", "malformed", "duplicate", "conflict", "crossSplit")
PREFERENCE_REASONS = (*REASONS, "identical")


class _BadLabel(Exception):
    """A label outside spec.model.labels: a user mistake reported with its file and row."""


class _Drop(Exception):
    """A row that cleaning drops, with the reason it is counted under."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def clean_files(files: list[DataFile], spec: FineTuneJobSpec, dropped: Counter[str]) -> list[Record]:
    """Clean every row of `files` (one split's source) in order; counts dropped rows into `dropped`."""
    data = spec.data
    classification = spec.model.task == "sequence-classification"
    preference = spec.method.type == "dpo"
    records: list[Record] = []
    seen: dict[str, Record] = {}
    for file in files:
        check_columns(file, data, classification, preference)
        for index, row in enumerate(file.rows):
            try:
                if row is None:
                    raise _Drop("malformed")
                if classification:
                    record = _classification(row, data, spec.model.labels or [])
                elif preference:
                    record = _preference(row, data)
                else:
                    record = _causal_lm(row, data)
            except _Drop as drop:
                dropped[drop.reason] += 1
                continue
            except _BadLabel as bad:
                labels = spec.model.labels or []
                indices = ("; the names are numbers, so values are read as names, never as indices"
                           if _numeric_names(labels) else f" nor an index 0..{len(labels) - 1}")
                raise UserError(
                    f"{file.where(index)}: label {bad.args[0]!r} (spec.data.labelField={data.label_field!r}) "
                    f"is not one of spec.model.labels [{', '.join(labels)}]{indices}"
                ) from None
            if data.cleaning.dedupe:
                key = input_key(record)
                if key in seen:
                    dropped["duplicate" if seen[key] == record else "conflict"] += 1
                    continue
                seen[key] = record
            records.append(record)
    return records


def input_key(record: Record) -> str:
    """What the model is given: the text for classification (so conflicting labels meet), the whole example else
    (a preference pair: its prompt and both answers)."""
    if "text" in record:
        return str(record["text"])
    return json.dumps(record, sort_keys=True, ensure_ascii=False)


def drop_cross_split(sources: dict[str, list[Record]], dropped: dict[str, Counter[str]]) -> None:
    """Remove evaluation rows whose input is in train (or, for test, in validation): they score memorised answers."""
    seen = {input_key(r) for r in sources["train"]}
    for part in ("validation", "test"):
        if part not in sources:
            continue
        kept = [r for r in sources[part] if input_key(r) not in seen]
        dropped[part]["crossSplit"] += len(sources[part]) - len(kept)
        seen |= {input_key(r) for r in kept}
        sources[part] = kept


def check_columns(file: DataFile, data: DataSpec, classification: bool, preference: bool = False) -> None:
    """A field that no row has is a wrong field name in the spec (or the wrong file), not bad rows."""
    keys: set[str] = set()
    for row in file.rows:
        if row is not None:
            keys.update(row)
    if not keys:
        return  # no readable row: its rows count as malformed and an empty dataset is reported after cleaning
    if classification:
        needed = [("spec.data.textField", data.text_field), ("spec.data.labelField", data.label_field)]
    elif preference:
        needed = [("spec.data.chosenField", data.chosen_field), ("spec.data.rejectedField", data.rejected_field)]
        if data.messages_field not in keys:
            needed.insert(0, ("spec.data.promptField", data.prompt_field))
    elif data.messages_field in keys:
        needed = []
    else:
        needed = [("spec.data.promptField", data.prompt_field), ("spec.data.completionField", data.completion_field)]
    for spec_field, name in needed:
        if name not in keys:
            extra = "" if classification else f" (or chat rows in spec.data.messagesField={data.messages_field!r})"
            found = ", ".join(sorted(keys)) or "none"
            raise UserError(
                f"{file.path}: no row has the field {name!r} set by {spec_field}{extra}; fields found: {found}"
            )


def _text(value: Any, drop_empty: bool) -> str:
    if value is None:
        if drop_empty:
            raise _Drop("empty")
        return ""
    if not isinstance(value, str):
        raise _Drop("malformed")
    value = value.strip()
    if not value and drop_empty:
        raise _Drop("empty")
    return value


def _classification(row: Record, data: DataSpec, labels: list[str]) -> Record:
    text = _text(row.get(data.text_field), data.cleaning.drop_empty)
    label = row.get(data.label_field)
    if label is None or (isinstance(label, str) and not label.strip()):
        raise _Drop("empty")  # even with dropEmpty off: a row without a target cannot train
    return {"text": text, "label": label_index(label, labels)}


def label_index(value: Any, labels: list[str]) -> int:
    """Map a label name, or an index (1 or "1"), to its index in `labels`; the same rule for every file format.

    Names come first, and when any name is itself a number an index would be ambiguous: values are names only.
    """
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _Drop("malformed")
    text = str(value).strip()
    if text in labels:
        return labels.index(text)
    if text.isascii() and text.isdigit() and not _numeric_names(labels) and int(text) < len(labels):
        return int(text)
    raise _BadLabel(value)


def _numeric_names(labels: list[str]) -> bool:
    return any(name.strip().lstrip("-").isdigit() for name in labels)


def _causal_lm(row: Record, data: DataSpec) -> Record:
    messages = _messages(row, data)
    if messages is None:
        return {
            "prompt": _text(row.get(data.prompt_field), data.cleaning.drop_empty),
            "completion": _text(row.get(data.completion_field), data.cleaning.drop_empty),
        }
    # the assistant turns are the target: without one there is nothing to learn
    if not any(m["role"] == "assistant" and m["content"] for m in messages):
        raise _Drop("empty")
    return {"messages": messages}


def _messages(row: Record, data: DataSpec) -> list[Record] | None:
    """The row's chat messages, cleaned; None when it has none (a prompt/completion row)."""
    messages = row.get(data.messages_field)
    if isinstance(messages, str) and not messages.strip():
        return None  # an empty cell in a csv that mixes chat and prompt/completion rows
    if messages is None:
        return None
    if isinstance(messages, str):  # csv and some parquet exports store the list as JSON text
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            raise _Drop("malformed") from None
    if not isinstance(messages, list):
        raise _Drop("malformed")
    return [_message(m) for m in messages]


def _message(message: Any) -> Record:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise _Drop("malformed")
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        raise _Drop("malformed")
    return {"role": message["role"].strip(), "content": (content or "").strip()}


def _answer(value: Any) -> str:
    """A preference answer: text, or an assistant message ({role, content} or a list holding one)."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        message = _message(value)
        if message["role"] != "assistant":
            raise _Drop("malformed")
        value = message["content"]
    return _text(value, drop_empty=True)  # an empty answer is never a preference


def _preference(row: Record, data: DataSpec) -> Record:
    """{prompt | messages, chosen, rejected}: the shared context and the two answers to it."""
    messages = _messages(row, data)
    chosen, rejected = _answer(row.get(data.chosen_field)), _answer(row.get(data.rejected_field))
    if chosen == rejected:
        raise _Drop("identical")
    if messages is None:
        return {"prompt": _text(row.get(data.prompt_field), data.cleaning.drop_empty), "chosen": chosen,
                "rejected": rejected}
    if not messages or messages[-1]["role"] == "assistant":
        raise _Drop("malformed")  # the history must end where the answers start: after a user turn
    return {"messages": messages, "chosen": chosen, "rejected": rejected}
