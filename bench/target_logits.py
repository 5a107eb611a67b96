"""Causal LM: logits at target positions only (train/speedups/target_logits.py) against logits at every position.

The trainer's own optimizer step (`FineTuneRecipe._update`: forward, loss, backward, clipping, AdamW) on the
first 8 batches of the instruction samples, full fine-tuning of the benchmark's GPT-2 (n_embd 256, 4 layers,
bench/trainer_throughput.py's causal-LM case), packed rows and length-grouped padded batches, two vocabulary
sizes: the sample tokenizer's (600) and GPT-2's (50257, the same token ids, a bigger output layer, as a real
tokenizer has). Both ways run in one process on the same batches, alternating, median of `--rounds` passes.

    .venv/bin/python bench/target_logits.py [--rounds 6] [--vocab 600 50257]

The last line of output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import _common as common
import _mfu
import _step_ab


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6, help="timed passes over the batches per way")
    parser.add_argument("--vocab", type=int, nargs="+", default=[600, 50257], help="vocabulary sizes")
    args = parser.parse_args()
    common.setup_env()
    import torch

    machine, precision, peak = _step_ab.machine_and_peak()
    results = []
    with tempfile.TemporaryDirectory(prefix="kubetune-target-logits-") as tmp:
        for vocab in args.vocab:
            model = build_model(Path(tmp) / f"model-{vocab}", vocab, torch)
            for packing in (True, False):
                results.append(measure(model, packing, args.rounds, Path(tmp) / f"work-{vocab}-{packing}"))
                row = results[-1]
                row["vocab"] = vocab
                row["mfu"] = {way: row["modelFlops"] / row[f"{way}Seconds"] / peak for way in ("all", "targets")}
                print(f"vocab {vocab:>6}, {'packed' if packing else 'padded'}: {row['steps']} steps, targets "
                      f"{100 * row['targetShare']:.0f}% of the {row['tokens']} token positions; step time "
                      f"all positions {row['allSeconds']:.3f} s, targets only {row['targetsSeconds']:.3f} s: "
                      f"{row['speedup']:.2f}x; logits {row['logitsMiB']['all']:.0f} -> "
                      f"{row['logitsMiB']['targets']:.0f} MiB per pass (fp32, arithmetic)", flush=True)
    print(json.dumps({"benchmark": "target_logits", "machine": machine, "precision": precision,
                      "matmulPeakFlops": peak, "results": results}))


def build_model(dest: Path, vocab: int, torch: Any) -> Path:
    """trainer_throughput's causal-LM model; a bigger vocabulary only widens the embedding and output layer."""
    from trainer_throughput import build_causal_model
    from transformers import GPT2Config, GPT2LMHeadModel

    build_causal_model(dest)
    config = GPT2Config.from_pretrained(dest)
    if vocab != config.vocab_size:
        config.vocab_size = vocab
        torch.manual_seed(0)
        GPT2LMHeadModel(config).save_pretrained(dest)
    return dest


def measure(model: Path, packing: bool, rounds: int, work: Path) -> dict[str, Any]:
    from trainer_throughput import padding_stats

    import kubetune.train.recipe as recipe_module
    from kubetune.train.speedups.target_logits import TargetLogits

    recipe = _step_ab.causal_recipe(model, packing, 256, work)
    batches = _step_ab.first_batches(recipe, 8)

    def everywhere(model: Any, task: str, host_labels: Any, labels: Any) -> TargetLogits:
        return TargetLogits(model, "all positions", host_labels, labels)  # not causal-lm: nothing selected

    def use(way: Any) -> Any:
        return lambda: setattr(recipe_module, "TargetLogits", way)

    seconds = _step_ab.alternate({"all": use(everywhere), "targets": use(TargetLogits)}, recipe, batches, rounds)
    recipe_module.TargetLogits = TargetLogits  # type: ignore[misc]
    positions = padding_stats(batches, recipe.lengths)["paddedTokens"]
    targets = _mfu.causal_targets(recipe, batches) or 0
    vocab = recipe.model.config.vocab_size
    median = {way: statistics.median(values) for way, values in seconds.items()}
    step_flops = _step_ab.step_model_flops(recipe, batches)
    return {"packed": packing, "steps": len(batches), "modelFlops": step_flops, "tokens": positions, "targets": targets,
            "targetShare": targets / positions, "allSeconds": median["all"] / len(batches),
            "targetsSeconds": median["targets"] / len(batches), "speedup": median["all"] / median["targets"],
            "rounds": {way: [round(v, 3) for v in values] for way, values in seconds.items()},
            "logitsMiB": {"all": positions * vocab * 4 / 2**20, "targets": targets * vocab * 4 / 2**20}}


if __name__ == "__main__":
    main()
