"""Sequence packing for causal LM: rows, attention kept within each example, losses as unpacked, the spec rule."""

from __future__ import annotations

import contextlib
import itertools
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from kubetune.cli import main
from kubetune.data.encode import IGNORE_INDEX, encode_causal_lm
from kubetune.jobfile import parse_job, write_job
from kubetune.samples import INSTRUCTIONS, sample_path
from kubetune.train.batching import collate, model_inputs
from kubetune.train.evaluate import summed_loss
from kubetune.train.model import load_tokenizer
from kubetune.train.packing import pack_examples, pack_rows
from kubetune.train.recipe import FineTuneRecipe
from kubetune.train.speedups import segment_attention
from tests.fixtures_models import causal_job, classification_job

# fp32 sums of ~50 token losses, packed vs alone: only the summation order and the mask's shape differ.
LOSS_RTOL = 1e-5


@pytest.fixture(autouse=True)
def _state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBETUNE_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("KUBETUNE_METRICS_PORT", "0")


def test_rows_hold_every_example_once_best_fit_decreasing_and_deterministic() -> None:
    lengths = [70, 10, 60, 30, 40, 128, 5, 5, 90, 38]
    rows = pack_rows(lengths, 128)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 128 for row in rows)
    # 476 tokens need at least 4 rows of 128; greedy in reading order would take 5 ([70,10],[60,30],...).
    assert len(rows) == 4
    assert pack_rows(lengths, 128) == rows


def encoded_instructions(tiny_gpt2: Path, count: int) -> tuple[Any, list[dict[str, Any]]]:
    tokenizer = load_tokenizer(tiny_gpt2, str(tiny_gpt2))
    rows = [json.loads(line) for line in sample_path(INSTRUCTIONS).read_text().splitlines()[:count]]
    return tokenizer, encode_causal_lm(rows, tokenizer, 128)


def test_packed_rows_restart_positions_and_never_target_an_example_start(tiny_gpt2: Path) -> None:
    _, examples = encoded_instructions(tiny_gpt2, 40)
    packed = pack_examples(examples, 128)
    assert sum(r["examples"] for r in packed) == len(examples)
    assert sum(len(r["input_ids"]) for r in packed) == sum(len(e["input_ids"]) for e in examples)  # no padding
    for row in packed:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
        assert len(starts) == row["examples"]
        assert all(row["labels"][s] == IGNORE_INDEX for s in starts)
    target_tokens = sum(sum(t != IGNORE_INDEX for t in e["labels"][1:]) for e in examples)
    assert sum(sum(t != IGNORE_INDEX for t in r["labels"]) for r in packed) == target_tokens


def segments(row: dict[str, Any]) -> list[tuple[int, int]]:
    """[start, end) of each example in a packed row: where its position ids restart."""
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
    return list(itertools.pairwise(starts))


def per_example_losses(model: torch.nn.Module, rows: list[dict[str, Any]],
                       batch: dict[str, torch.Tensor]) -> list[float]:
    """Summed target loss of each example of the packed rows, from one forward pass over their batch."""
    with torch.no_grad():
        logits = model(**model_inputs(batch)).logits
    token_loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:],
                                                   ignore_index=IGNORE_INDEX, reduction="none")
    # position t predicts token t+1: an example spanning [s, e) owns the predictions s .. e-2
    return [float(token_loss[n, s : e - 1].sum()) for n, row in enumerate(rows) for s, e in segments(row)]


@pytest.mark.parametrize("attention", ["dense", "per-example"])
def test_packed_batch_gives_each_example_its_unpacked_loss(tiny_gpt2: Path, attention: str) -> None:
    """dense: transformers' block-diagonal mask over the row; per-example: train/speedups/segment_attention.py, as the
    trainer runs packed batches on a CPU."""
    tokenizer, examples = encoded_instructions(tiny_gpt2, 40)
    packed = pack_examples(examples, 128)
    rows = [r for r in packed if r["examples"] > 1][:4]
    rows.append(min(packed, key=lambda r: len(r["input_ids"])))  # a short row: a long padded tail
    assert sum(r["examples"] for r in rows) >= 9
    batch = collate(rows, tokenizer.pad_token_id)
    assert "attention_mask" not in batch
    assert int((batch["labels"][-1, len(rows[-1]["input_ids"]) :] != IGNORE_INDEX).sum()) == 0  # tail: no targets
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    expected = []
    for row in rows:
        for s, e in segments(row):
            alone = collate([{"input_ids": row["input_ids"][s:e], "labels": row["labels"][s:e]}], 0)
            with torch.no_grad():
                logits = model(**model_inputs(alone)).logits
            expected.append(float(summed_loss(logits, alone["labels"], "causal-lm")))
    per_example = attention == "per-example"
    with segment_attention.within(model, batch, torch.device("cpu")) if per_example else contextlib.nullcontext():
        assert per_example_losses(model, rows, batch) == pytest.approx(expected, rel=LOSS_RTOL)
    # The check can fail: one causal mask over the whole row (examples see each other; what a KV cache left on
    # did) moves the later examples' losses by about 4e-4 of their value on this random model, 40x the tolerance.
    leaky = {**batch, "attention_mask": torch.ones_like(batch["input_ids"])}
    assert per_example_losses(model, rows, leaky) != pytest.approx(expected, rel=LOSS_RTOL)


def run_recipe(doc: dict[str, Any], work: Path) -> FineTuneRecipe:
    recipe = FineTuneRecipe(parse_job(doc), work)
    recipe.setup()
    recipe.train()
    return recipe


def test_packed_training_reaches_the_loss_of_unpacked_training(tmp_path: Path, tiny_gpt2: Path) -> None:
    train = sample_path(INSTRUCTIONS)
    runs = {}
    # Packed rows hold about 2.5 examples: 4 rows a step is about the 10 examples of an unpacked step.
    for packing, batch in ((True, 4), (False, 10)):
        doc = causal_job(f"pack-{packing}".lower(), tiny_gpt2, train, tmp_path / f"out-{packing}",
                         method={"type": "full"}, data={"packing": packing, "maxSeqLength": 128},
                         hyperparameters={"learningRate": 5e-3, "batchSize": batch, "epochs": 3, "maxSteps": None,
                                          "precision": "fp32"},
                         evaluation={"earlyStoppingPatience": 0})
        runs[packing] = run_recipe(doc, tmp_path / f"work-{packing}")
    packed, plain = runs[True], runs[False]
    assert packed.packed and not plain.packed
    assert packed.state.samples_seen == plain.state.samples_seen  # every example trained on, 3 epochs each
    plain_first, plain_last = (plain.state.validation[i]["eval_loss"] for i in (0, -1))
    packed_first, packed_last = (packed.state.validation[i]["eval_loss"] for i in (0, -1))
    # Both learn past the first evaluation by more than the gap allowed between them (observed: 0.10 and 0.11
    # down, 0.5% apart): different batch compositions and step counts (36 vs 42), so close, not equal.
    assert plain_last < plain_first - 0.05 and packed_last < packed_first - 0.05
    assert packed_last == pytest.approx(plain_last, rel=0.01)


def test_packed_run_resumed_mid_epoch_matches_the_uninterrupted_one(tmp_path: Path, tiny_gpt2: Path) -> None:
    doc = causal_job("pack-resume", tiny_gpt2, sample_path(INSTRUCTIONS), tmp_path / "out", method={"type": "full"},
                     data={"maxSeqLength": 128},
                     hyperparameters={"batchSize": 4, "epochs": 2, "maxSteps": None, "precision": "fp32"},
                     checkpoint={"everySteps": 5, "keepLast": 10})
    whole = run_recipe(doc, tmp_path / "pod-1")
    assert whole.packed and whole.steps_per_epoch % 5 != 0  # so the checkpoint at step 5k+5 lands mid-epoch
    resume_at = 5 * (whole.steps_per_epoch // 5 + 1)  # the first checkpoint of the second epoch
    # Put the run back to that checkpoint: the ones after it never happened.
    for path in (tmp_path / "out" / "checkpoints").glob("*/checkpoint-*"):
        if int(path.name.rsplit("-", 1)[1]) > resume_at:
            shutil.rmtree(path)
    resumed = run_recipe(doc, tmp_path / "pod-2")
    assert [int(uri.rsplit("-", 1)[1]) for uri in resumed.state.resumed_from] == [resume_at]
    assert [r["step"] for r in resumed.state.train_losses] == [r["step"] for r in whole.state.train_losses]
    assert [r["loss"] for r in resumed.state.train_losses] == pytest.approx(
        [r["loss"] for r in whole.state.train_losses], rel=1e-5)


def test_packing_a_classification_job_is_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = classification_job("cls", tmp_path / "m", tmp_path / "t.jsonl", tmp_path / "out", data={"packing": True})
    assert main(["validate", str(write_job(doc, tmp_path / "job.yaml"))]) == 2
    err = capsys.readouterr().err
    assert "data.packing" in err and "Traceback" not in err
