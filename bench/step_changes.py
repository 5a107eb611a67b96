"""Causal LM: two changes to the trainer's step, each against the step without it, in one process.

- per-example attention (train/speedups/segment_attention.py): packed rows attend per example instead of over the whole
  row through transformers' block-diagonal mask; packed batches at max length 256, 512 and 1024.
- fused GELU (train/speedups/fused_gelu.py): torch's one-kernel tanh GELU instead of GPT-2's spelled-out `gelu_new`;
  packed and padded batches at max length 256.

The trainer's own optimizer step (`FineTuneRecipe._update`) on bench/trainer_throughput.py's causal-LM case
(GPT-2 n_embd 256, 4 layers, full fine-tuning, batch 8), its first 8 batches; the ways alternate, median of
`--rounds` passes. MFU: model FLOPs (bench/_mfu.py) over the fp32 (or bf16) matmul peak measured here.

    .venv/bin/python bench/step_changes.py [--rounds 6]

The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import _common as common
import _step_ab


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6, help="timed passes over the batches per way")
    args = parser.parse_args()
    common.setup_env()
    from trainer_throughput import build_causal_model

    machine, precision, peak = _step_ab.machine_and_peak()
    cases = [("per-example attention", True, length) for length in (256, 512, 1024)]
    cases += [("fused GELU", packing, 256) for packing in (True, False)]
    results = []
    with tempfile.TemporaryDirectory(prefix="kubetune-step-changes-") as tmp:
        model = build_causal_model(Path(tmp) / "model")
        for n, (change, packing, length) in enumerate(cases):
            row = measure(model, change, packing, length, args.rounds, Path(tmp) / f"work-{n}")
            row["mfu"] = {way: row["modelFlops"] / row[f"{way}Seconds"] / peak for way in ("without", "with")}
            results.append(row)
            print(f"{change}, {'packed' if packing else 'padded'}, max length {length}: {row['steps']} steps, "
                  f"step without {row['withoutSeconds']:.3f} s, with {row['withSeconds']:.3f} s: "
                  f"{row['speedup']:.2f}x; MFU {100 * row['mfu']['without']:.0f}% -> "
                  f"{100 * row['mfu']['with']:.0f}%", flush=True)
    print(json.dumps({"benchmark": "step_changes", "machine": machine, "precision": precision,
                      "matmulPeakFlops": peak, "results": results}))


@contextlib.contextmanager
def _dense_attention(*args: Any) -> Iterator[None]:
    yield  # what the trainer did before: transformers' sdpa with its block-diagonal mask


def switches(recipe: Any, change: str) -> dict[str, Callable[[], None]]:
    from transformers.activations import NewGELUActivation

    from kubetune.train.speedups import segment_attention
    from kubetune.train.speedups.fused_gelu import TanhGELU

    if change == "per-example attention":  # the trainer calls segment_attention.within per micro-batch
        def attention(way: Any) -> Callable[[], None]:
            return lambda: setattr(segment_attention, "within", way)

        real = segment_attention.within
        return {"without": attention(_dense_attention), "with": attention(real)}
    mlps = [m for m in recipe.model.modules() if isinstance(getattr(m, "act", None), TanhGELU)]
    assert mlps, "the benchmark's GPT-2 should have its GELU fused by the trainer"

    def activation(make: Callable[[], Any]) -> Callable[[], None]:
        def switch() -> None:
            for mlp in mlps:
                mlp.act = make()
        return switch

    return {"without": activation(NewGELUActivation), "with": activation(TanhGELU)}


def measure(model: Path, change: str, packing: bool, length: int, rounds: int, work: Path) -> dict[str, Any]:
    from kubetune.train.speedups import segment_attention

    recipe = _step_ab.causal_recipe(model, packing, length, work)
    batches = _step_ab.first_batches(recipe, 8)
    real = segment_attention.within
    try:
        seconds = _step_ab.alternate(switches(recipe, change), recipe, batches, rounds)
    finally:
        segment_attention.within = real  # type: ignore[assignment]
    step_flops = _step_ab.step_model_flops(recipe, batches)
    median = {way: statistics.median(values) / len(batches) for way, values in seconds.items()}
    return {"change": change, "packed": packing, "maxLength": length, "steps": len(batches),
            "modelFlops": step_flops, "withoutSeconds": median["without"], "withSeconds": median["with"],
            "speedup": median["without"] / median["with"],
            "rounds": {way: [round(v, 3) for v in values] for way, values in seconds.items()}}


if __name__ == "__main__":
    main()
