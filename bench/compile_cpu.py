"""Does `torch.compile` pay for the trainer's step on this CPU? (issue 14, item 2: keep it only if it does)

The trainer's own optimizer step (`FineTuneRecipe._update`: forward, backward, clipping, AdamW) on MiniLM-L6 +
LoRA, on the first 10 length-grouped batches of the sample reviews, three ways in one process:
eager on the batches as the trainer pads them on a CPU (to their longest example), eager on batches padded to a
multiple of `--multiple` tokens (a compiled model needs few shapes: 128 / 16 = at most 8), and compiled
(inductor, static shapes, every shape compiled once first, recompile limit raised so nothing falls back to
eager) on the same padded batches. Eager runs alternate; each figure is the median of three passes.

With `--regional`, PyTorch's advice for repeated blocks instead: each transformer layer compiled on its own with
dynamic shapes (one compile serves every layer and every batch length, no padding), against eager on the same
unpadded batches; the first pass, compiling included, is reported.

    .venv/bin/python bench/compile_cpu.py [--multiple 16 | --regional]

The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _common as common


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--multiple", type=int, default=16, help="pad batches to a multiple of this many tokens")
    parser.add_argument("--regional", action="store_true", help="compile each transformer layer, dynamic shapes")
    args = parser.parse_args()
    common.setup_env()
    import torch
    import torch._dynamo

    import kubetune.train.recipe as recipe_module
    from kubetune.jobfile import load_job
    from kubetune.train.batching import epoch_batches, padded_length
    from kubetune.train.recipe import FineTuneRecipe

    with tempfile.TemporaryDirectory(prefix="kubetune-compile-") as tmp:
        work = Path(tmp)
        doc = common.job_document("compile", common.sample_path(common.REVIEWS), work / "out",
                                  method={"type": "lora", "lora": {"r": 8, "alpha": 16,
                                                                   "targetModules": ["query", "value"]}},
                                  data={"maxSeqLength": 128}, hyperparameters={"batchSize": 16, "epochs": 3})
        recipe = FineTuneRecipe(load_job(common.write_yaml(doc, work / "job.yaml")), work / "work")
        recipe.setup()
        recipe.ddp.train()
        batches = epoch_batches(recipe.lengths, 16, 42, 0, 1, 0)
        sample = batches[:10]

        def padded(batch: list[int]) -> int:
            return padded_length(max(recipe.lengths[i] for i in batch), args.multiple)

        def timed(multiple: int) -> float:
            recipe_module.length_multiple = lambda device: multiple  # what `_accumulate` pads to
            started = time.perf_counter()
            for batch in sample:
                recipe._update([batch])
            return time.perf_counter() - started

        timed(1)  # warm-up
        if args.regional:
            return regional(recipe, lambda: timed(1))
        unpadded, padded_eager = [], []
        for _ in range(3):
            unpadded.append(timed(1))
            padded_eager.append(timed(args.multiple))
        torch._dynamo.config.recompile_limit = 64  # each shape (and train/eval) is a recompile; none may fall back
        recipe.model.compile(dynamic=False)
        shapes = sorted({padded(b) for b in batches})
        compile_seconds = []
        recipe_module.length_multiple = lambda device: args.multiple
        for shape in shapes:
            started = time.perf_counter()
            recipe._update([next(b for b in batches if padded(b) == shape)])
            compile_seconds.append(time.perf_counter() - started)
        compiled = [timed(args.multiple) for _ in range(3)]
        recipe.cleanup()
    eager_padded, compiled_seconds = statistics.median(padded_eager), statistics.median(compiled)
    report("compile_cpu", recipe, {
        "multiple": args.multiple, "shapes": shapes, "compileSeconds": [round(s, 1) for s in compile_seconds],
        "eagerSeconds": statistics.median(unpadded), "eagerPaddedSeconds": eager_padded,
        "compiledSeconds": compiled_seconds, "speedupOverEagerPadded": eager_padded / compiled_seconds,
    }, lambda r: f"10 steps: eager {r['eagerSeconds']:.2f} s, eager padded to {args.multiple} "
                 f"{r['eagerPaddedSeconds']:.2f} s, compiled {r['compiledSeconds']:.2f} s after "
                 f"{sum(compile_seconds):.0f} s compiling {len(shapes)} shapes: {r['speedupOverEager']:.2f}x eager")


def regional(recipe: Any, timed: Callable[[], float]) -> None:
    import torch
    import torch._dynamo

    eager = [timed() for _ in range(3)]
    layers = [m for m in recipe.model.modules() if type(m).__name__.endswith("Layer")]  # MiniLM: 6 BertLayer
    torch._dynamo.config.recompile_limit = 64  # nothing may fall back to eager unnoticed
    for layer in layers:
        layer.compile(dynamic=True)
    first = timed()
    compiled = [timed() for _ in range(3)]
    recipe.cleanup()
    report("compile_cpu_regional", recipe, {
        "layers": len(layers), "firstPassSeconds": first, "eagerSeconds": statistics.median(eager),
        "compiledSeconds": statistics.median(compiled),
    }, lambda r: f"10 steps: eager {r['eagerSeconds']:.2f} s, {len(layers)} layers compiled "
                 f"{r['compiledSeconds']:.2f} s (first pass, compiling: {first:.0f} s): "
                 f"{r['speedupOverEager']:.2f}x eager")


def report(benchmark: str, recipe: Any, figures: dict[str, Any], line: Callable[[dict[str, Any]], str]) -> None:
    """The machine and precision, one line of figures, then everything as one JSON object (the last line)."""
    import torch

    result = {"benchmark": benchmark, "machine": common.machine(), "precision": recipe.precision.name,
              "threads": torch.get_num_threads(), **figures}
    result["speedupOverEager"] = result["eagerSeconds"] / result["compiledSeconds"]
    print(json.dumps(result["machine"]), f"precision {result['precision']}")
    print(line(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
