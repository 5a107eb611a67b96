"""Preference tuning (issue 30): DPO's loss against TRL's DPOTrainer, the reference by disabled adapters, a run
that learns, exact resume after SIGTERM, and bad preference data.

TRL is a test-only dependency (the dev extra). The model is the tiny GPT-2 built from a config; runs are
`kubetune run` subprocesses in fp32 (deterministic, so a resumed run repeats the uninterrupted one's losses).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kubetune import contract
from kubetune.data.encode import encode_preference
from kubetune.jobfile import write_job
from kubetune.samples import PREFERENCES, sample_path
from kubetune.spec import DpoSpec, FineTuneJob
from kubetune.storage import Storage
from kubetune.train import preference
from kubetune.train.model import build_model
from tests.fixtures_models import causal_job
from tests.trainer_runs import SPLIT, Trainer, losses, poll, read_output, run_checkpoints, split_instructions, wait

GPT2_LINEARS = ["c_attn", "c_proj", "c_fc"]
BATCH, EPOCHS, EVERY = 8, 2, 5  # 14 steps an epoch, 28 in all: SIGTERM after the first checkpoint lands mid-run


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Fixed train/validation/test files of the shipped preference pairs."""
    return split_instructions(tmp_path_factory.mktemp("pairs"), PREFERENCES)


def dpo_job(name: str, model: Path, data: dict[str, Path], output: Path, **spec: Any) -> dict[str, Any]:
    doc = causal_job(name, model, data["train"], output,
                     method={"type": "dpo", "dpo": {"beta": 0.1},
                             "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "targetModules": GPT2_LINEARS}},
                     data={"validation": str(data["validation"]), "test": str(data["test"]), "maxSeqLength": 128},
                     hyperparameters={"learningRate": 1e-2, "batchSize": BATCH, "epochs": EPOCHS, "maxSteps": None,
                                      "precision": "fp32"},
                     evaluation={"metric": "eval_preference_accuracy", "everySteps": EVERY},
                     checkpoint={"everySteps": EVERY})
    return _merge(doc, spec)


def _merge(doc: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    from kubetune.jobfile import job_document

    return job_document(doc["metadata"]["name"], doc["spec"], spec)


def _fixed_batch(tiny_gpt2: Path) -> tuple[Any, Any, dict[str, torch.Tensor]]:
    """The tiny GPT-2 as reference, a perturbed copy as policy (ratios far from 0), and six shipped pairs (prompt
    and chat ones) encoded as the trainer encodes them."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    reference = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    policy = copy.deepcopy(reference)
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    from kubetune.data.clean import _preference
    from kubetune.spec import DataSpec

    rows = [json.loads(line) for line in sample_path(PREFERENCES).read_text().splitlines()[:6]]
    records = [_preference(row, DataSpec(train="x.jsonl")) for row in rows]
    assert any("messages" in r for r in records) and any("prompt" in r for r in records)
    encoded = encode_preference(records, tokenizer, 128)
    return policy, reference, preference.collate_pairs(list(encoded), tokenizer.eos_token_id)


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_the_loss_on_a_fixed_batch_equals_trls_dpo_trainer(tiny_gpt2: Path, tmp_path: Path, loss: str) -> None:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    policy, reference, batch = _fixed_batch(tiny_gpt2)
    dpo = DpoSpec(beta=0.3, loss=loss)
    with torch.no_grad():
        logps, counts = preference.sequence_logps(policy(input_ids=batch["input_ids"],
                                                         attention_mask=batch["attention_mask"]).logits,
                                                  batch["labels"])
        ours = preference.Reference(policy, frozen=reference).logps(batch, contextlib.nullcontext)
        mine = preference.pair_terms(logps, ours, counts, dpo)["loss"].mean()
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    config = DPOConfig(output_dir=str(tmp_path), beta=0.3, loss_type=[loss], report_to=[], use_cpu=True,
                       bf16=False, fp16=False)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=config, processing_class=tokenizer,
                         train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
              "completion_mask": (batch["labels"] != -100).long()}  # the same rows: chosen ones, then rejected ones
    policy.eval()
    with torch.no_grad():
        theirs = trainer._compute_loss(trainer.model, inputs, False)
    assert float(mine) == pytest.approx(float(theirs), rel=1e-6)
    tie = math.log(2) if loss == "sigmoid" else (1 / (2 * 0.3)) ** 2  # the loss where policy = reference
    assert abs(float(mine) - tie) > 1e-3


def test_label_smoothing_is_conservative_dpo() -> None:
    policy, reference = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.0])  # one pair: chosen, rejected
    terms = preference.pair_terms(policy, reference, torch.tensor([3, 3]), DpoSpec(beta=0.5, label_smoothing=0.2))
    logits = torch.tensor(0.5 * (1.0 - (-1.0)))
    expected = -0.8 * torch.nn.functional.logsigmoid(logits) - 0.2 * torch.nn.functional.logsigmoid(-logits)
    assert float(terms["loss"][0]) == pytest.approx(float(expected))
    assert float(terms["preference_accuracy"][0]) == 1.0 and float(terms["reward_margin"][0]) == pytest.approx(1.0)
    tie = preference.pair_terms(reference, reference, torch.tensor([3, 3]), DpoSpec())
    assert float(tie["preference_accuracy"][0]) == 0.5  # the starting model prefers neither: chance


def test_lora_reference_by_disabled_adapters_equals_a_frozen_copy(tiny_gpt2: Path) -> None:
    spec = FineTuneJob.model_validate(causal_job("ref", tiny_gpt2, "x.jsonl", "out", method={
        "type": "dpo", "lora": {"targetModules": GPT2_LINEARS}})).spec
    model, _ = build_model(spec, tiny_gpt2)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)  # a trained adapter: the policy is no longer the base
    frozen = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    _, _, batch = _fixed_batch(tiny_gpt2)
    model.train()  # dropout on, as in training: the reference is still scored without it
    adapters_off = preference.Reference(model).logps(batch, contextlib.nullcontext)
    assert model.training  # back in training mode
    copy_of_base = preference.Reference(model, frozen=frozen).logps(batch, contextlib.nullcontext)
    assert torch.allclose(adapters_off, copy_of_base, rtol=1e-6, atol=0)  # float sums over ~100 tokens
    with torch.no_grad():
        policy = preference.sequence_logps(model.eval()(input_ids=batch["input_ids"],
                                                         attention_mask=batch["attention_mask"]).logits,
                                           batch["labels"])[0]
    assert not torch.allclose(policy, adapters_off, atol=1e-2)  # the adapters are on again afterwards


def test_a_dpo_run_raises_validation_preference_accuracy(tmp_path: Path, tiny_gpt2: Path,
                                                        pairs: dict[str, Path]) -> None:
    # Full weights: the tiny model's LoRA learns too, slower (examples/preferences-dpo.yaml, after SFT).
    doc = dpo_job("dpo-learns", tiny_gpt2, pairs, tmp_path / "out", method={"dpo": {"weights": "full"}},
                  hyperparameters={"learningRate": 1e-3})
    trainer = Trainer(write_job(doc, tmp_path / "job.yaml"), tmp_path / "state")
    code, log = trainer.run()
    assert code == contract.EXIT_OK, log
    metrics = json.loads((tmp_path / "out" / contract.METRICS_FILE).read_text())
    assert metrics["baseTest"]["preference_accuracy"] == 0.5  # the starting model: rewards 0, a tie on every pair
    best = max(v["eval_preference_accuracy"] for v in metrics["validation"])
    assert best > 0.6, metrics["validation"]
    assert metrics["quality"]["metric"] == "preference_accuracy" and metrics["quality"]["improved"]
    row = metrics["trainLoss"][-1]  # train-side metrics per step
    assert {"loss", "preference_accuracy", "reward_margin", "chosen_logp", "rejected_logp"} <= set(row)
    assert contract.MERGED_DIR in {p.name for p in (tmp_path / "out").iterdir()}


def test_resume_after_sigterm_repeats_the_uninterrupted_losses(tmp_path: Path, tiny_gpt2: Path,
                                                              pairs: dict[str, Path]) -> None:
    whole = Trainer(write_job(dpo_job("whole", tiny_gpt2, pairs, tmp_path / "whole"), tmp_path / "whole.yaml"),
                    tmp_path / "state-whole")
    assert whole.run()[0] == contract.EXIT_OK
    doc = dpo_job("cut", tiny_gpt2, pairs, tmp_path / "cut")
    job = write_job(doc, tmp_path / "cut.yaml")
    first = Trainer(job, tmp_path / "pod-1")
    process = first.start()
    storage = Storage()
    poll(lambda: bool(run_checkpoints(storage, str(tmp_path / "cut" / "checkpoints"))), process)
    os.kill(process.pid, signal.SIGTERM)
    assert wait(process, contract.DEFAULT_GRACE_SECONDS) == contract.EXIT_RETRY, first.log.read_text()
    assert 0 < first.result()["step"] < SPLIT["train"] // BATCH * EPOCHS
    code, log = Trainer(job, tmp_path / "pod-2").run()
    assert code == contract.EXIT_OK, log
    run = read_output(storage, str(tmp_path / "cut"), contract.RUN_FILE, tmp_path / "fetched-run")
    assert run["resumedFrom"] == [first.result()["lastCheckpoint"]]
    resumed = read_output(storage, str(tmp_path / "cut"), contract.METRICS_FILE, tmp_path / "fetched")
    expected = read_output(storage, str(tmp_path / "whole"), contract.METRICS_FILE, tmp_path / "fetched-2")
    assert [s for s, _ in losses(resumed)] == [s for s, _ in losses(expected)]
    assert [v for _, v in losses(resumed)] == pytest.approx([v for _, v in losses(expected)], rel=1e-5)
    assert [v["eval_preference_accuracy"] for v in resumed["validation"]] == \
        [v["eval_preference_accuracy"] for v in expected["validation"]]


def test_precomputed_reference_trains_as_the_frozen_copy(tmp_path: Path, tiny_gpt2: Path,
                                                        pairs: dict[str, Path]) -> None:
    """Full-weight dpo: a frozen copy, or reference log-probabilities computed once first: the same training."""
    runs = {}
    for precompute in (False, True):
        doc = dpo_job(f"full-{precompute}".lower(), tiny_gpt2, pairs, tmp_path / f"out-{precompute}",
                      method={"dpo": {"weights": "full", "precomputeReference": precompute}},
                      hyperparameters={"learningRate": 1e-3, "maxSteps": 6})
        trainer = Trainer(write_job(doc, tmp_path / f"{precompute}.yaml"), tmp_path / f"state-{precompute}")
        code, log = trainer.run()
        assert code == contract.EXIT_OK, log
        runs[precompute] = json.loads((tmp_path / f"out-{precompute}" / contract.METRICS_FILE).read_text())
    assert [v for _, v in losses(runs[True])] == pytest.approx([v for _, v in losses(runs[False])], rel=1e-4)
    assert runs[True]["test"]["preference_accuracy"] == runs[False]["test"]["preference_accuracy"]


@pytest.mark.parametrize(("rows", "expected"), [
    ([{"prompt": "p", "chosen": "a"}], ["no row has the field 'rejected' set by spec.data.rejectedField"]),
    ([{"prompt": "p", "chosen": "same", "rejected": "same"}] * 3,
     ["spec.data.train: no usable rows after cleaning (3 rows read", "3 identical"]),
])
def test_bad_preference_data_is_refused_naming_the_field(tmp_path: Path, tiny_gpt2: Path, rows: list[Any],
                                                         expected: list[str]) -> None:
    train = tmp_path / "bad.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    doc = dpo_job("bad", tiny_gpt2, {"train": train, "validation": train, "test": train}, tmp_path / "out")
    code, log = Trainer(write_job(doc, tmp_path / "bad.yaml"), tmp_path / "state").run()
    assert code == contract.EXIT_BAD_INPUT, log
    assert all(text in log for text in expected) and "Traceback" not in log, log


def test_identical_and_truncated_pairs_are_dropped_and_counted(tmp_path: Path, tiny_gpt2: Path,
                                                               pairs: dict[str, Path]) -> None:
    rows = [json.loads(line) for line in pairs["train"].read_text().splitlines()]
    rows += [{"prompt": "Same?", "chosen": "Yes.", "rejected": "Yes."}] * 2  # identical: nothing to prefer
    rows += [{"prompt": "word " * 200, "chosen": "a", "rejected": "b"}]  # the prompt fills maxSeqLength
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    doc = dpo_job("dropped", tiny_gpt2, {**pairs, "train": train}, tmp_path / "out",
                  hyperparameters={"maxSteps": 2})
    code, log = Trainer(write_job(doc, tmp_path / "job.yaml"), tmp_path / "state").run()
    assert code == contract.EXIT_OK, log
    assert "spec.data.maxSeqLength: 1 of the 113 training examples keep no two different answers" in log
    run = json.loads((tmp_path / "out" / contract.RUN_FILE).read_text())
    assert run["data"]["dropped"]["identical"] == 2 and run["data"]["droppedByTruncation"]["training"] == 1


def test_an_sft_jobs_adapter_is_a_starting_model(tmp_path: Path, tiny_gpt2: Path, pairs: dict[str, Path]) -> None:
    """Issue 30, item 4: model.uri may be another job's adapter/ (here an SFT job that wrote no merged/): its
    base, named in that job's run.json, with the adapter folded in is where DPO starts and its reference."""
    from peft import PeftModel

    from kubetune.cli import main as cli

    instructions = split_instructions(tmp_path / "sft-data")
    sft = causal_job("sft", tiny_gpt2, instructions["train"], tmp_path / "sft", method={"type": "lora"},
                     data={"packing": False}, hyperparameters={"learningRate": 1e-2, "maxSteps": 4})
    sft["spec"]["output"]["mergeAdapter"] = False
    code, log = Trainer(write_job(sft, tmp_path / "sft.yaml"), tmp_path / "state-sft").run()
    assert code == contract.EXIT_OK and not (tmp_path / "sft" / contract.MERGED_DIR).exists(), log
    adapter = tmp_path / "sft" / contract.ADAPTER_DIR
    job = write_job(dpo_job("after-sft", adapter, pairs, tmp_path / "dpo", hyperparameters={"maxSteps": 2}),
                    tmp_path / "dpo.yaml")
    assert cli(["validate", str(job)]) == contract.EXIT_OK  # the memory plan reads the base's config
    code, log = Trainer(job, tmp_path / "state-dpo").run()
    assert code == contract.EXIT_OK, log
    start = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_gpt2), adapter).merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    from kubetune.data.clean import _preference
    from kubetune.spec import DataSpec

    records = [_preference(json.loads(line), DataSpec(train="x.jsonl"))
               for line in pairs["test"].read_text().splitlines()]
    batch = preference.collate_pairs(list(encode_preference(records, tokenizer, 128)), tokenizer.eos_token_id)
    with torch.no_grad():
        logps = preference.Reference(start, frozen=start.eval()).logps(batch, contextlib.nullcontext)
    metrics = json.loads((tmp_path / "dpo" / contract.METRICS_FILE).read_text())
    assert metrics["baseTest"]["chosen_logp"] == pytest.approx(float(logps.chunk(2)[0].mean()), rel=1e-4)


def test_two_processes_train_the_same_global_batches(tmp_path: Path, tiny_gpt2: Path, pairs: dict[str, Path]) -> None:
    """torchrun with 2 processes of 4 pairs against one process of 4 pairs x 2 accumulation steps: the same
    global batches (each pair whole on one rank), the same sharded evaluation sums; dropout draws differ."""
    runs = {}
    for nproc, accumulation in ((1, 2), (2, 1)):
        doc = dpo_job(f"world-{nproc}", tiny_gpt2, pairs, tmp_path / f"out-{nproc}",
                      hyperparameters={"batchSize": 4, "gradientAccumulationSteps": accumulation, "maxSteps": 6})
        trainer = Trainer(write_job(doc, tmp_path / f"{nproc}.yaml"), tmp_path / f"state-{nproc}", nproc=nproc)
        code, log = trainer.run()
        assert code == contract.EXIT_OK, log
        runs[nproc] = json.loads((tmp_path / f"out-{nproc}" / contract.METRICS_FILE).read_text())
    one, two = runs[1], runs[2]
    assert two["baseTest"] == pytest.approx(one["baseTest"], rel=1e-5)  # every pair scored once across ranks
    assert two["globalBatchSize"] == one["globalBatchSize"] == 8 and two["steps"] == one["steps"] == 6
    assert two["test"]["loss"] == pytest.approx(one["test"]["loss"], abs=0.05)
