"""`kubetune validate`'s memory plan for Llama-3-8B and -70B shaped models (issue 25): full, LoRA and QLoRA on
1 x 80 GiB, 8 x 80 GiB and 8 x 40 GiB GPUs, as a user would ask for it (no GPU needed: the plan reads config.json).

    .venv/bin/python bench/memory_plans.py [--batch 2] [--seq 2048] [--checkpointing null|true|false]

Each set-up is a FineTuneJob for a local folder holding the model's published config.json (no weights) and is
checked by `kubetune validate FILE --device-memory SIZE` in a subprocess, exactly as a user runs it; a set-up
that cannot fit exits 2 with the amount it needs. Defaults follow torchtune's published table (batch 2, packed
rows of 2048 tokens); LoRA is r 16 on q, v, o and the MLP, as torchtune's Llama 3.1 70B LoRA config; precision
bf16 (what `auto` resolves to on an A100 or H100). The last line is one JSON object with every plan.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from kubetune.jobfile import job_document, write_job

LLAMA3 = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "vocab_size": 128256,
          "num_key_value_heads": 8, "max_position_embeddings": 8192, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
          "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128001}
MODELS = {  # meta-llama/Meta-Llama-3-8B and -70B config.json (the shapes that matter)
    "llama-3-8b": {**LLAMA3, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                   "num_attention_heads": 32},
    "llama-3-70b": {**LLAMA3, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                    "num_attention_heads": 64},
}
HARDWARE = {"1x80GiB": (1, "80Gi"), "8x80GiB": (8, "80Gi"), "8x40GiB": (8, "40Gi")}
METHODS = {"full": {"type": "full"},
           "lora": {"type": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "targetModules": [
               "q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}},
           "qlora": {"type": "qlora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "targetModules": [
               "q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}}}
ROW = re.compile(r"^\s+(weights|gathered|gradients|optimizer|activations|best copy|total|headroom|needed)"
                 r"\s+([\d.]+) GiB")
NEEDS = re.compile(r"needs about ([\d.]+) GiB per device \(weights ([\d.]+) GiB.*?; (ddp|fsdp), checkpointing (on|off)")


def plan(kubetune: list[str], job: Path, memory: str) -> dict[str, Any]:
    done = subprocess.run([*kubetune, "validate", str(job), "--device-memory", memory], capture_output=True,
                          text=True, timeout=120)
    if done.returncode == 0:
        rows = {m.group(1): float(m.group(2)) for m in map(ROW.match, done.stdout.splitlines()) if m}
        decided = re.search(r"strategy (\w+), gradient checkpointing (\w+)", done.stdout)
        assert decided, done.stdout
        return {"fits": True, **rows, "strategy": decided.group(1), "checkpointing": decided.group(2),
                "output": done.stdout}
    refused = NEEDS.search(done.stderr)
    assert done.returncode == 2 and refused, done.stderr
    return {"fits": False, "needed": float(refused.group(1)), "weights": float(refused.group(2)),
            "strategy": refused.group(3), "checkpointing": refused.group(4), "output": done.stderr}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--checkpointing", choices=["null", "true", "false"], default="null")
    args = parser.parse_args()
    checkpointing = {"null": None, "true": True, "false": False}[args.checkpointing]
    script = Path(sys.executable).parent / "kubetune"
    kubetune = [str(script)] if script.is_file() else [sys.executable, "-m", "kubetune.cli"]
    os.environ.pop("KUBETUNE_DEVICE_MEMORY", None)
    results = []
    with tempfile.TemporaryDirectory(prefix="kubetune-plans-") as tmp:
        work = Path(tmp)
        (work / "train.jsonl").write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
        for model, config in MODELS.items():
            (work / model).mkdir()
            (work / model / "config.json").write_text(json.dumps(config))
        setups = [(m, method, hw, {}) for m in MODELS for method in METHODS for hw in HARDWARE]
        setups.append(("llama-3-70b", "full", "8x80GiB", {"offloadOptimizer": True}))  # torchtune's 70B full
        for model, method, hardware, extra in setups:
            gpus, memory = HARDWARE[hardware]
            name = f"{model}-{method}-{hardware.lower()}" + ("-offload" if extra else "")
            doc = job_document(name, {
                "model": {"uri": str(work / model), "task": "causal-lm"}, "method": METHODS[method],
                "data": {"train": str(work / "train.jsonl"), "maxSeqLength": args.seq, "packing": True},
                "hyperparameters": {"batchSize": args.batch, "precision": "bf16",
                                    "gradientCheckpointing": checkpointing, **extra},
                "output": {"uri": str(work / "out")}, "resources": {"gpusPerNode": gpus}})
            found = plan(kubetune, write_job(doc, work / f"{name}.yaml"), memory)
            results.append({"model": model, "method": method + (" +offload" if extra else ""), "hardware": hardware,
                            **found})
    header = f"{'model':<12} {'method':<14} {'GPUs':<8} {'fits':<5} {'strategy':<9} {'ckpt':<5} {'total':>7} " \
             f"{'needed':>7}  (GiB per GPU)"
    print(header)
    for r in results:
        total = f"{r['total']:.1f}" if "total" in r else "-"
        print(f"{r['model']:<12} {r['method']:<14} {r['hardware']:<8} {'yes' if r['fits'] else 'NO':<5} "
              f"{r['strategy']:<9} {r['checkpointing']:<5} {total:>7} {r['needed']:>7.1f}")
    print(json.dumps({"benchmark": "memory_plans", "batch": args.batch, "seq": args.seq,
                      "checkpointing": args.checkpointing,
                      "plans": [{k: v for k, v in r.items() if k != "output"} for r in results]}))


if __name__ == "__main__":
    main()
