"""`trainer_throughput.py --case dpo`: kubetune's DPO against TRL's DPOTrainer, same model, pairs and steps.

Both sides preference-tune the benchmark's GPT-2 (trainer_throughput.CAUSAL_SHAPE, random weights, the tiny
GPT-2's tokenizer) with LoRA (r 16, alpha 32, every GPT-2 linear, no dropout), the reference being the same model
with the adapters off, on kubetune's own train split of the shipped preference pairs (written to a file for
TRL): sigmoid loss, beta 0.1, batch 8 pairs, max length 256, the same learning rate and steps, no evaluation or
checkpoints inside the timed call. Precision is each side's default on this machine (kubetune: `auto`; TRL:
DPOConfig's). Pairs/s: pairs trained over the wall time of the training call (kubetune `recipe.train()` less
its evaluations and checkpoints, TRL `trainer.train()`). Model FLOPs per pair: the policy's forward and
backward over both answers' rows plus the reference's forward (bench/_mfu.py's counts; logits at every
position on both sides).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import _mfu

LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "targetModules": ["c_attn", "c_proj", "c_fc"]}
BETA, BATCH, MAX_LENGTH = 0.1, 8, 256


def job(model: Path, split: dict[str, str], output: Path, epochs: int, learning_rate: float) -> dict[str, Any]:
    from kubetune.jobfile import job_document

    return job_document("bench-dpo", {
        "model": {"uri": str(model), "task": "causal-lm"},
        "method": {"type": "dpo", "dpo": {"beta": BETA}, "lora": LORA},
        "data": {**split, "maxSeqLength": MAX_LENGTH},
        "hyperparameters": {"batchSize": BATCH, "epochs": epochs, "learningRate": learning_rate},
        "evaluation": {"metric": "eval_loss", "earlyStoppingPatience": None},
        "checkpoint": {"everySteps": 100000},
        "output": {"uri": str(output)},
    })


def pair_flops(model: Any, lengths: list[int]) -> float:
    """Policy forward + backward over the rows, and the reference's forward (2 FLOPs a weight a token)."""
    trainable, frozen = _mfu.matmul_weights(model)
    layers, width = _mfu.attention_shape(model)
    tokens, squares = sum(lengths), sum(n * n for n in lengths)
    return _mfu.step_flops(model, lengths) + 2 * (trainable + frozen) * tokens + 4 * layers * width * squares


def run_kubetune(config: dict[str, Any], stopwatch: Any) -> dict[str, Any]:
    from kubetune.jobfile import load_job
    from kubetune.train.batching import epoch_batches
    from kubetune.train.entry import setup_logging
    from kubetune.train.recipe import FineTuneRecipe

    setup_logging(0)
    spec_job = load_job(config["job"])
    recipe = FineTuneRecipe(spec_job, Path(config["workDir"]))
    recipe.setup()
    recipe._evaluate = stopwatch.wrap(recipe._evaluate)  # type: ignore[method-assign]
    recipe.save_checkpoint = stopwatch.wrap(recipe.save_checkpoint)  # type: ignore[method-assign]
    started = time.perf_counter()
    recipe.train()
    seconds = time.perf_counter() - started - stopwatch.seconds
    hp = spec_job.spec.hyperparameters
    batches = [b for epoch in range(hp.epochs) for b in epoch_batches(recipe.lengths, hp.batch_size, hp.seed,
                                                                      epoch, 1, 0)][: recipe.state.step]
    lengths = [len(recipe.train_set[i][side]["input_ids"]) for b in batches for i in b
               for side in ("chosen", "rejected")]
    pairs = recipe.state.samples_seen
    result = {"side": "kubetune", "pairs": pairs, "steps": recipe.state.step, "trainSeconds": seconds,
              "pairsPerSecond": pairs / seconds, "precision": recipe.precision.name,
              "trainFlops": pair_flops(recipe.model, lengths),
              "meanLoss": sum(r["loss"] for r in recipe.state.train_losses) / len(recipe.state.train_losses),
              "testPreferenceAccuracy": (recipe.test_metrics or {}).get("preference_accuracy")}
    recipe.cleanup()
    return result


def run_trl(config: dict[str, Any]) -> dict[str, Any]:
    """TRL's DPOTrainer as its docs show it: a PEFT config, no ref_model (the adapters switched off)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from kubetune.data.encode import fallback_template

    tokenizer = AutoTokenizer.from_pretrained(config["model"])
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = fallback_template(False)  # what kubetune gives a tokenizer without one

    def row(record: dict[str, Any]) -> dict[str, Any]:
        # One dataset cannot mix TRL's text and chat rows: chat prompts are rendered to text as kubetune renders
        # them (the answer follows the assistant header; TRL appends EOS as the template does).
        if "messages" in record:
            prompt = tokenizer.apply_chat_template(record["messages"], tokenize=False, add_generation_prompt=True)
            return {"prompt": prompt, "chosen": record["chosen"], "rejected": record["rejected"]}
        return {"prompt": record["prompt"], "chosen": " " + record["chosen"], "rejected": " " + record["rejected"]}

    records = [json.loads(line) for line in Path(config["train"]).read_text().splitlines()]
    torch.manual_seed(42)
    model = AutoModelForCausalLM.from_pretrained(config["model"])
    args = DPOConfig(output_dir=config["workDir"], per_device_train_batch_size=BATCH, beta=BETA,
                     loss_type=["sigmoid"], max_length=MAX_LENGTH, learning_rate=config["learningRate"],
                     num_train_epochs=config["epochs"], lr_scheduler_type="linear", save_strategy="no",
                     eval_strategy="no", logging_steps=10**6, report_to=[], use_cpu=True, seed=42,
                     dataloader_num_workers=0)
    trainer = DPOTrainer(model=model, args=args, processing_class=tokenizer,
                         train_dataset=Dataset.from_list([row(r) for r in records]),
                         peft_config=LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                                target_modules=LORA["targetModules"], task_type="CAUSAL_LM"))
    lengths = [len(e["prompt_ids"]) + len(e[side]) for e in trainer.train_dataset for side in ("chosen_ids",
                                                                                                "rejected_ids")]
    started = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - started
    pairs = len(records) * config["epochs"]
    epochs_lengths = lengths * config["epochs"]
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    return {"side": "trl", "pairs": pairs, "steps": output.global_step, "trainSeconds": seconds,
            "pairsPerSecond": pairs / seconds, "precision": precision,
            "trainFlops": pair_flops(trainer.model, epochs_lengths), "meanLoss": output.training_loss}
