"""In-process A/B of the trainer's optimizer step (`FineTuneRecipe._update`) on the causal-LM benchmark case:
the same recipe and batches, each way switched on in turn, alternating so drift of the machine hits both."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _common as common
import _mfu


def machine_and_peak() -> tuple[dict[str, Any], str, float]:
    """The machine, the precision the trainer picks on its CPU, and that precision's matmul peak (printed)."""
    import torch

    from kubetune.train.precision import choose_precision

    machine = common.machine()
    precision = choose_precision("auto", torch.device("cpu")).name  # what the trainer runs at here
    peak = _mfu.matmul_peak(precision)
    print(f"machine: {machine}; precision {precision}; {precision} matmul peak {peak / 1e9:.1f} GFLOP/s")
    return machine, precision, peak


def step_model_flops(recipe: Any, batches: list[list[int]]) -> float:
    """Model FLOPs of one step over these batches (the output layer at target tokens): what every way must do."""
    rows = [recipe.train_set[i] for batch in batches for i in batch]
    lengths = [n for row in rows for n in _mfu.example_lengths(row)]
    return _mfu.step_flops(recipe.model, lengths, _mfu.causal_targets(recipe, batches)) / len(batches)


def causal_recipe(model: Path, packing: bool, max_length: int, work: Path) -> Any:
    """trainer_throughput's causal-LM job (full fine-tuning, instruction samples, batch 8), set up for training."""
    from kubetune.jobfile import job_document, load_job
    from kubetune.samples import INSTRUCTIONS
    from kubetune.train.recipe import FineTuneRecipe

    doc = job_document("step-ab", {
        "model": {"uri": str(model), "task": "causal-lm"}, "method": {"type": "full"},
        "data": {"train": str(common.sample_path(INSTRUCTIONS)), "maxSeqLength": max_length, "packing": packing},
        "hyperparameters": {"batchSize": 8, "epochs": 8, "learningRate": 1e-3}, "output": {"uri": str(work / "out")},
    })
    recipe = FineTuneRecipe(load_job(common.write_yaml(doc, work / "job.yaml")), work / "work")
    recipe.setup()
    recipe.ddp.train()
    return recipe


def first_batches(recipe: Any, count: int) -> list[list[int]]:
    from kubetune.train.batching import epoch_batches

    return epoch_batches(recipe.lengths, 8, 42, 0, 1, 0)[:count]


def alternate(ways: dict[str, Callable[[], None]], recipe: Any, batches: list[list[int]],
              rounds: int) -> dict[str, list[float]]:
    """Seconds of one pass of `_update` over the batches per round and way; `ways` switch their way on."""
    def timed(way: str) -> float:
        ways[way]()
        started = time.perf_counter()
        for batch in batches:
            recipe._update([batch])
        return time.perf_counter() - started

    for way in ways:  # warm-up: allocator pools, thread pool
        timed(way)
    seconds: dict[str, list[float]] = {way: [] for way in ways}
    for round_ in range(rounds):
        for way in ways if round_ % 2 == 0 else reversed(list(ways)):
            seconds[way].append(timed(way))
    return seconds
