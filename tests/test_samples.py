"""The embedded sample datasets: shape, balance, and enough variety that they are not a filled-in template."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from kubetune.samples import INSTRUCTIONS, PREFERENCES, REVIEWS, sample_path, write_samples

_WORD = re.compile(r"[a-z']+")


def _load(name: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for lineno, line in enumerate(sample_path(name).read_text(encoding="utf-8").splitlines(), start=1):
        assert line.strip(), f"{name}:{lineno} is blank"
        row = json.loads(line)
        assert isinstance(row, dict), f"{name}:{lineno} is not a JSON object"
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def reviews() -> list[dict[str, Any]]:
    return _load(REVIEWS)


@pytest.fixture(scope="module")
def instructions() -> list[dict[str, Any]]:
    return _load(INSTRUCTIONS)


def test_reviews_shape(reviews: list[dict[str, Any]]) -> None:
    assert len(reviews) >= 600
    for row in reviews:
        assert set(row) == {"text", "label"}
        assert isinstance(row["text"], str) and row["text"].strip()
        assert row["label"] in {"positive", "negative"}


def test_reviews_balanced(reviews: list[dict[str, Any]]) -> None:
    counts = Counter(row["label"] for row in reviews)
    assert set(counts) == {"positive", "negative"}
    share = counts["positive"] / len(reviews)
    assert 0.40 <= share <= 0.60, counts


def test_reviews_unique(reviews: list[dict[str, Any]]) -> None:
    texts = [row["text"].strip().lower() for row in reviews]
    dupes = [t for t, n in Counter(texts).items() if n > 1]
    assert not dupes, dupes[:5]


def test_reviews_lexical_variety(reviews: list[dict[str, Any]]) -> None:
    # Guards against a templated set: hand-written reviews over many products use a wide vocabulary ...
    tokenized = [_WORD.findall(row["text"].lower()) for row in reviews]
    vocab = {w for words in tokenized for w in words}
    assert len(vocab) > 3000, len(vocab)
    # ... and don't share long runs of words. Counted once per review, so one review repeating itself is fine.
    grams: Counter[tuple[str, ...]] = Counter()
    for words in tokenized:
        grams.update({tuple(words[i : i + 8]) for i in range(len(words) - 7)})
    common = [(" ".join(g), n) for g, n in grams.most_common(5) if n > 5]
    assert not common, common


def test_reviews_lengths_vary(reviews: list[dict[str, Any]]) -> None:
    lengths = [len(row["text"].split()) for row in reviews]
    assert min(lengths) <= 6 and max(lengths) >= 60, (min(lengths), max(lengths))


def test_instructions_shape(instructions: list[dict[str, Any]]) -> None:
    assert len(instructions) >= 150
    kinds: Counter[str] = Counter()
    for row in instructions:
        if "messages" in row:
            assert set(row) == {"messages"}
            messages = row["messages"]
            assert isinstance(messages, list) and messages
            for msg in messages:
                assert set(msg) == {"role", "content"}
                assert msg["role"] in {"system", "user", "assistant"}
                assert isinstance(msg["content"], str) and msg["content"].strip()
            assert any(msg["role"] == "assistant" for msg in messages)
            kinds["messages"] += 1
        else:
            assert set(row) == {"prompt", "completion"}
            assert isinstance(row["prompt"], str) and row["prompt"].strip()
            assert isinstance(row["completion"], str) and row["completion"].strip()
            kinds["prompt"] += 1
    # Both formats must be present so the demo and tests exercise both code paths.
    assert kinds["messages"] > 0 and kinds["prompt"] > 0, kinds


def test_instructions_unique(instructions: list[dict[str, Any]]) -> None:
    keys = [json.dumps(row, sort_keys=True) for row in instructions]
    assert len(keys) == len(set(keys))


def test_write_samples(tmp_path: Path) -> None:
    dest = tmp_path / "nested" / "samples"
    written = write_samples(dest)
    assert set(written) == {"reviews", "instructions", "preferences"}
    assert written["reviews"] == dest / REVIEWS
    assert written["instructions"] == dest / INSTRUCTIONS
    for key, name in (("reviews", REVIEWS), ("instructions", INSTRUCTIONS)):
        assert written[key].read_bytes() == sample_path(name).read_bytes()
    # Writing again over existing files is fine (the demo reruns into the same directory).
    assert write_samples(dest) == written


def test_sample_path_unknown() -> None:
    with pytest.raises(FileNotFoundError, match="known samples"):
        sample_path("nope.jsonl")


def test_preference_pairs_cover_the_instruction_prompts() -> None:
    """One pair per instruction prompt (issue 30): the instruction's own answer chosen, another reply rejected;
    chat pairs share the history up to the last user turn."""
    instructions = [json.loads(line) for line in sample_path(INSTRUCTIONS).read_text().splitlines()]
    pairs = [json.loads(line) for line in sample_path(PREFERENCES).read_text().splitlines()]
    assert len(pairs) == len(instructions)
    for pair, source in zip(pairs, instructions, strict=True):
        assert pair["chosen"] and pair["rejected"] and pair["chosen"] != pair["rejected"]
        if "prompt" in source:
            assert (pair["prompt"], pair["chosen"]) == (source["prompt"], source["completion"])
        else:
            assert pair["messages"][-1]["role"] == "user" and source["messages"][: len(pair["messages"])] == \
                pair["messages"]
            assert pair["chosen"] == source["messages"][len(pair["messages"])]["content"]

