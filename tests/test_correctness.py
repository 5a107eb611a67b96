"""Trainer paths the MiniLM runs never reach: NCCL-style groups, half-precision checkpoints, RoBERTa-style and
decoder classifiers, position limits, loss weighting, label and dedupe rules, precision choice.

Models are tiny ones built from configs here (a 2-layer RoBERTa with MiniLM's tokenizer, the tiny GPT-2); each
training test runs a couple of steps through the real recipe.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kubetune.data import prepare_data
from kubetune.errors import UserError
from kubetune.jobfile import parse_job
from kubetune.netutil import free_port
from kubetune.samples import INSTRUCTIONS, sample_path
from kubetune.spec import FineTuneJobSpec
from kubetune.storage import local
from kubetune.train import distributed
from kubetune.train.batching import collate, epoch_batches
from kubetune.train.model import build_model, load_tokenizer
from kubetune.train.precision import choose_precision
from kubetune.train.recipe import FineTuneRecipe
from tests.fixtures_models import causal_job, classification_job
from tests.test_data import write_csv, write_jsonl, write_parquet

ROBERTA_POSITIONS = 34  # pad id 0 -> positions 1..33 usable: shorter than many reviews in MiniLM's tokens


def build_tiny_roberta(dest: Path, tokenizer_from: Path, dtype: torch.dtype = torch.float32) -> Path:
    """A 2-layer RoBERTa masked LM (random weights, saved in `dtype`) with MiniLM's tokenizer."""
    from transformers import AutoTokenizer, RobertaConfig, RobertaForMaskedLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=ROBERTA_POSITIONS, type_vocab_size=1,
                           pad_token_id=tokenizer.pad_token_id)
    RobertaForMaskedLM(config).to(dtype).save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


@pytest.fixture(scope="module")
def tiny_roberta(tmp_path_factory: pytest.TempPathFactory, minilm_path: Path) -> Path:
    return build_tiny_roberta(tmp_path_factory.mktemp("roberta"), minilm_path)


@pytest.fixture(autouse=True)
def _state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBETUNE_STATE_DIR", str(tmp_path / "state"))


def recipe_for(doc: dict[str, Any], work_dir: Path) -> FineTuneRecipe:
    recipe = FineTuneRecipe(parse_job(doc), work_dir)
    recipe.setup()
    return recipe


def small_classification(name: str, model: Path, train: Path, tmp_path: Path, **spec: Any) -> dict[str, Any]:
    hyper = {"batchSize": 4, "maxSteps": 2, "precision": "fp32", **spec.pop("hyperparameters", {})}
    return classification_job(name, model, train, tmp_path / "out", hyperparameters=hyper, **spec)


# -- 1: NCCL-style process groups ---------------------------------------------------------------------------------


def _gpu_node_worker(rank: int, port: int, out: Path) -> None:
    """One rank of a 'GPU node' on CPU: nccl is played by gloo registered for cuda only (nccl serves only cuda)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", KUBETUNE_COLLECTIVE_TIMEOUT_SECONDS="60")
    real_init = dist.init_process_group
    bound: list[str] = []

    def init_as_on_gpus(backend: str, **options: Any) -> None:
        bound.append(str(options.pop("device_id", None)))  # gloo binds no GPU; NCCL gets the rank's (issue 25)
        real_init(backend="cuda:gloo" if backend == "nccl" else backend.replace("nccl", "gloo"), **options)

    torch.cuda.is_available = lambda: True  # type: ignore[assignment]
    torch.cuda.set_device = lambda device: None  # type: ignore[assignment]
    dist.init_process_group = init_as_on_gpus  # type: ignore[assignment]
    distributed.init()
    torch.cuda.is_available = lambda: False  # type: ignore[assignment]  # the collectives below: CPU tensors
    result = {
        "any_rank": distributed.any_rank(rank == 1),  # fetch_inputs' failure flag
        "sum": distributed.all_reduce_sum(torch.tensor([rank + 1.0, 2.0])).tolist(),  # loss, eval totals
        "gathered": distributed.gather_objects(rank),  # RNG states for checkpoints
        "broadcast": distributed.broadcast_object(f"rank {rank}"),  # checkpoint names
        "deviceId": bound,
    }
    distributed.barrier()
    (out / f"rank-{rank}.json").write_text(json.dumps(result))
    distributed.shutdown()


def test_nccl_style_group_serves_the_cpu_tensors_of_flags_losses_and_objects(tmp_path: Path) -> None:
    mp.spawn(_gpu_node_worker, args=(free_port(), tmp_path), nprocs=2, join=True)
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank-{rank}.json").read_text())
        assert result == {"any_rank": True, "sum": [3.0, 4.0], "gathered": [0, 1], "broadcast": "rank 0",
                          "deviceId": [f"cuda:{rank}"]}


# -- 2: fp32 master weights whatever the checkpoint's dtype -------------------------------------------------------


@pytest.mark.parametrize("saved", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoints_train_with_fp32_master_weights(tmp_path: Path, minilm_path: Path,
                                                                   saved: torch.dtype) -> None:
    model_dir = build_tiny_roberta(tmp_path / "model", minilm_path, dtype=saved)
    spec = parse_job(small_classification("half", model_dir, tmp_path / "x.jsonl", tmp_path,
                                          method={"type": "full"})).spec
    model, _ = build_model(spec, model_dir)
    assert {p.dtype for p in model.parameters()} == {torch.float32}

    # One AdamW step at lr 2e-5 must move every weight that got a gradient: in bf16 most updates round away.
    tokenizer = load_tokenizer(model_dir, str(model_dir))
    batch = collate([{"input_ids": tokenizer(t)["input_ids"], "label": i % 2}
                     for i, t in enumerate(["a fine day", "the worst product I ever bought", "ok"])],
                    tokenizer.pad_token_id)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5)
    # The fp16 GPU path's loss scaling, on CPU: it refuses fp16 gradients ("Attempting to unscale FP16 gradients").
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    model.train()
    scaler.scale(model(**batch).loss).backward()
    scaler.unscale_(optimizer)
    scaler.step(optimizer)
    with_grad = changed = 0
    for name, p in model.named_parameters():
        if p.grad is not None:
            moved = p.grad != 0
            with_grad += int(moved.sum())
            changed += int((p.detach() != before[name])[moved].sum())
    assert with_grad > 10_000 and changed / with_grad > 0.99


# -- 3, missing test 1, 6: the task head trains under every method ------------------------------------------------


def test_lora_on_a_roberta_head_trains_only_the_head_and_the_adapters(tmp_path: Path, tiny_roberta: Path) -> None:
    spec = parse_job(small_classification("lora", tiny_roberta, tmp_path / "x.jsonl", tmp_path)).spec
    model, counts = build_model(spec, tiny_roberta)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    # classifier.dense is new, but every encoder layer also has a `dense`: only the head's may become a full copy.
    assert [n for n in trainable if "lora_" not in n and ".classifier.modules_to_save." not in n] == []
    head = {n.split(".modules_to_save.default.", 1)[1] for n in trainable if "modules_to_save" in n}
    assert head == {"dense.weight", "dense.bias", "out_proj.weight", "out_proj.bias"}
    assert counts.percent < 15


def head_parameters(model: torch.nn.Module, head: str) -> dict[str, torch.Tensor]:
    """The trainable copy of the task head (under LoRA, peft's modules_to_save copy)."""
    return {n: p.detach().clone() for n, p in model.named_parameters()
            if f"{head}." in n and p.requires_grad and "original_module" not in n}


@pytest.mark.parametrize("method", ["full", "partial", "lora"])
@pytest.mark.parametrize("base", ["roberta", "gpt2"])
def test_new_head_is_trainable_and_changes_under_every_method(tmp_path: Path, tiny_roberta: Path, tiny_gpt2: Path,
                                                              reviews_subset: Path, base: str, method: str) -> None:
    model_dir, head, size = {"roberta": (tiny_roberta, "classifier", 32 * 32 + 32 + 32 * 2 + 2),
                             "gpt2": (tiny_gpt2, "score", 64 * 2)}[base]
    methods = {"full": {"type": "full"}, "partial": {"type": "partial", "partial": {"trainLastLayers": 1}},
               "lora": {"type": "lora"}}
    doc = small_classification("head", model_dir, reviews_subset, tmp_path, method=methods[method],
                               hyperparameters={"learningRate": 1e-2}, data={"maxSeqLength": 32})
    recipe = recipe_for(doc, tmp_path / "work")
    before = head_parameters(recipe.model, head)
    assert sum(p.numel() for p in before.values()) == size  # the whole new head trains
    recipe.train()  # batches of 4: a decoder classifier must know its pad token to pool the last real one
    after = head_parameters(recipe.model, head)
    assert [n for n in before if torch.equal(before[n], after[n])] == []


def test_decoder_classifier_pools_the_last_real_token_of_padded_batches(tmp_path: Path, tiny_gpt2: Path) -> None:
    spec = parse_job(small_classification("gpt2", tiny_gpt2, tmp_path / "x.jsonl", tmp_path)).spec
    tokenizer = load_tokenizer(tiny_gpt2, str(tiny_gpt2))
    model, _ = build_model(spec, tiny_gpt2, tokenizer.pad_token_id)
    texts = ["a short one", "a much longer text here"]
    examples = [{"input_ids": tokenizer(t)["input_ids"], "label": 0} for t in texts]
    batch = collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        together = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        alone = torch.cat([model(input_ids=torch.tensor([e["input_ids"]])).logits for e in examples])
    torch.testing.assert_close(together, alone)


# -- 7: maxSeqLength beyond the model's positions -----------------------------------------------------------------


def test_max_seq_length_is_clamped_to_the_positions_the_model_has(tmp_path: Path, tiny_roberta: Path,
                                                                   reviews_subset: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    doc = small_classification("long", tiny_roberta, reviews_subset, tmp_path, data={"maxSeqLength": 256})
    caplog.set_level(logging.WARNING, logger="kubetune.trainer")
    recipe = recipe_for(doc, tmp_path / "work")
    usable = ROBERTA_POSITIONS - 1  # RoBERTa numbers positions from pad_token_id + 1
    assert f"spec.data.maxSeqLength 256 is more than this model's {usable} positions" in caplog.text
    lengths = [len(e["input_ids"]) for e in recipe.train_set + recipe.test_set]
    assert max(lengths) == usable  # reviews are longer: they were cut, not left to crash the run
    recipe.train()
    assert recipe.state.step == 2 and recipe.test_metrics is not None


# -- 5: every target token weighs the same, however micro-batches and ranks split them ----------------------------


def gpt2_doc(name: str, model: Path, train: Path, tmp_path: Path) -> dict[str, Any]:
    # Unpacked: packed rows all hold about the same number of tokens, and these tests need uneven micro-batches.
    return causal_job(name, model, train, tmp_path / "out", method={"type": "full"}, data={"packing": False},
                      hyperparameters={"batchSize": 4, "precision": "fp32", "maxGradNorm": 0.0})


def uneven_group(recipe: FineTuneRecipe, count: int) -> list[list[int]]:
    """`count` micro-batches whose target-token counts differ the most (length grouping makes them uneven)."""
    batches = epoch_batches(recipe.lengths, 4, 0, 0, 1, 0)
    targets = [sum(sum(t != -100 for t in recipe.train_set[i]["labels"][1:]) for i in b) for b in batches]
    order = sorted(range(len(batches)), key=lambda i: targets[i])
    return [batches[i] for i in order[: count // 2] + order[-(count - count // 2):]]


def gradient_of_update(recipe: FineTuneRecipe, group: list[list[int]]) -> torch.Tensor:
    """The gradient the optimizer steps with in one _update over `group` (captured at optimizer.step)."""
    captured: list[torch.Tensor] = []
    step = recipe.optimizer.step

    def capture(*args: Any, **kwargs: Any) -> Any:
        captured.append(torch.cat([p.grad.flatten() for p in recipe.model.parameters() if p.grad is not None]))
        return step(*args, **kwargs)

    recipe.optimizer.step = capture  # type: ignore[method-assign]
    recipe.model.eval()  # no dropout: the same function as the reference below
    recipe._update(group)
    return captured[0]


def one_batch_gradient(model: torch.nn.Module, examples: list[dict[str, Any]], pad_id: int) -> torch.Tensor:
    """transformers' own mean over every target token of all the examples as one batch."""
    model.eval()
    model.zero_grad()
    model(**collate(examples, pad_id)).loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    model.zero_grad()
    return grads


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_loss_weights_every_target_token_alike_across_micro_batches(tmp_path: Path, tiny_gpt2: Path) -> None:
    recipe = recipe_for(gpt2_doc("weights", tiny_gpt2, sample_path(INSTRUCTIONS), tmp_path), tmp_path / "work")
    group = uneven_group(recipe, 4)
    counts = [sum(sum(t != -100 for t in recipe.train_set[i]["labels"][1:]) for i in b) for b in group]
    assert max(counts) > 2 * min(counts)  # uneven enough that a mean of means would be far off
    reference = one_batch_gradient(recipe.model, [recipe.train_set[i] for b in group for i in b],
                                   recipe.tokenizer.pad_token_id)
    assert relative_l2(gradient_of_update(recipe, group), reference) < 1e-4


def _two_rank_worker(rank: int, port: int, doc: dict[str, Any], work: Path, group: list[list[int]]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", OMP_NUM_THREADS="1")
    recipe = recipe_for(doc, work)
    gradient = gradient_of_update(recipe, group[2 * rank : 2 * rank + 2])  # each rank its own micro-batches
    if rank == 0:
        torch.save(gradient, work / "gradient.pt")
    recipe.cleanup()


def test_loss_weights_every_target_token_alike_across_ranks(tmp_path: Path, tiny_gpt2: Path) -> None:
    doc = gpt2_doc("ranks", tiny_gpt2, sample_path(INSTRUCTIONS), tmp_path)
    recipe = recipe_for(doc, tmp_path / "single")
    group = uneven_group(recipe, 4)  # rank 0 gets the two shortest micro-batches, rank 1 the two longest
    reference = one_batch_gradient(recipe.model, [recipe.train_set[i] for b in group for i in b],
                                   recipe.tokenizer.pad_token_id)
    mp.spawn(_two_rank_worker, args=(free_port(), doc, tmp_path / "two", group), nprocs=2, join=True)
    assert relative_l2(torch.load(tmp_path / "two" / "gradient.pt"), reference) < 1e-4


# -- 8, 10: one label rule for every format; dedupe on the input --------------------------------------------------


def digit_spec(train: Path) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate({"model": {"uri": "/m", "task": "sequence-classification",
                                                     "labels": ["1", "0"]},
                                           "data": {"train": str(train), "split": {"train": 0.5, "validation": 0.25,
                                                                                   "test": 0.25}},
                                           "output": {"uri": "/out"}})


def test_digit_label_names_mean_the_same_in_csv_jsonl_and_parquet(tmp_path: Path) -> None:
    rows = [{"text": f"text {i}", "label": i % 2} for i in range(16)]
    files = [write_jsonl(tmp_path / "t.jsonl", rows),
             write_csv(tmp_path / "t.csv", rows),  # values become the strings "1" and "0"
             write_parquet(tmp_path / "t.parquet", rows)]
    for file in files:
        out = prepare_data(digit_spec(file), {"train": file})
        labels = {r["text"]: r["label"] for part in (out.train, out.validation, out.test) for r in part}
        # label 1 is the name "1", index 0, whatever the format stored (a JSON 1 is not index 1 = "0")
        assert labels == {f"text {i}": 0 if i % 2 else 1 for i in range(16)}, file

    ambiguous = write_jsonl(tmp_path / "a.jsonl", [*rows, {"text": "x", "label": 2}])
    with pytest.raises(UserError, match=r"label 2 .*the names are numbers, so values are read as names"):
        prepare_data(digit_spec(ambiguous), {"train": ambiguous})


def test_dedupe_keys_on_the_input_and_drops_evaluation_rows_seen_in_train(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", [
        *({"text": f"review {i}", "label": ["negative", "positive"][i % 2]} for i in range(8)),
        {"text": "review 0", "label": "positive"},  # the same text with another label: a conflict
        {"text": "review 1", "label": "positive"},  # an exact duplicate
    ])
    validation = write_jsonl(tmp_path / "val.jsonl", [{"text": "review 2", "label": "negative"},  # in train
                                                      {"text": "fresh 1", "label": "negative"},
                                                      {"text": "fresh 2", "label": "positive"}])
    test = write_jsonl(tmp_path / "test.jsonl", [{"text": "review 3", "label": "negative"},  # in train, other label
                                                 {"text": "fresh 1", "label": "negative"},  # in validation
                                                 {"text": "fresh 3", "label": "positive"}])
    spec = FineTuneJobSpec.model_validate({
        "model": {"uri": "/m", "task": "sequence-classification", "labels": ["negative", "positive"]},
        "data": {"train": str(train), "validation": str(validation), "test": str(test)}, "output": {"uri": "/o"}})
    out = prepare_data(spec, {"train": train, "validation": validation, "test": test})
    assert [r["text"] for r in out.train].count("review 0") == 1
    assert {r["text"] for r in out.validation} == {"fresh 1", "fresh 2"}
    assert {r["text"] for r in out.test} == {"fresh 3"}
    assert out.report["dropped"] == {"empty": 0, "malformed": 0, "duplicate": 1, "conflict": 1, "crossSplit": 3}
    assert out.report["rowsKept"] == 8 + 2 + 1


# -- also check: emulated bf16 ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("gpu", "native", "expected"), [("T4", False, "fp16"), ("A100", True, "bf16")])
def test_auto_precision_takes_fp16_where_bf16_is_only_emulated(monkeypatch: pytest.MonkeyPatch, gpu: str,
                                                                native: bool, expected: str) -> None:
    # torch counts emulation as support unless asked not to (T4 and V100 emulate bf16, slowly).
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)
    assert choose_precision("auto", torch.device("cuda", 0)).name == expected, gpu


@pytest.mark.parametrize(("requested", "fast_bf16", "expected"), [
    ("bf16", False, "bf16 is emulated and several times slower than fp32"),
    ("fp16", False, "fp16 runs as bf16 on a CPU"),
    ("fp16", True, "fp16 runs as bf16 on a CPU"),
    ("bf16", True, None), ("fp32", False, None), ("auto", False, None),
])
def test_an_explicit_half_precision_on_a_cpu_says_what_it_costs(monkeypatch: pytest.MonkeyPatch, requested: str,
                                                                fast_bf16: bool, expected: str | None) -> None:
    from kubetune.train import precision

    monkeypatch.setattr(precision, "_cpu_has_fast_bf16", lambda: fast_bf16)
    note = precision.precision_note(requested, choose_precision(requested, torch.device("cpu")))
    if expected is None:
        assert note is None
    else:
        assert note is not None and note.startswith(f"hyperparameters.precision: {requested}: ") and expected in note
    if requested == "fp16" and not fast_bf16:
        assert note is not None and "emulated" in note  # both notes at once


# -- missing test 3: a local publish that fails midway leaves no manifest -----------------------------------------


def test_local_publish_failing_midway_leaves_no_manifest(tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    for rel in ("a.txt", "b/c.txt", "d.txt"):
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        (staging / rel).write_text(rel)
    target = tmp_path / "out"
    local.publish(staging, str(target))  # a previous, complete output
    assert local.read_manifest(str(target)) is not None
    local.delete(str(target / "b"))
    (target / "b").write_text("a file where the folder b/ must go")  # the second copy fails
    (staging / "a.txt").write_text("new a")
    with pytest.raises(OSError):
        local.publish(staging, str(target))
    assert (target / "a.txt").read_text() == "new a"  # it failed midway, after the first file
    assert local.read_manifest(str(target)) is None
    assert not (target / "manifest.json").exists()
