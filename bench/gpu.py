"""The trainer on a CUDA GPU: LoRA's model FLOPs utilisation, an FSDP step, a QLoRA step (issues 12 and 14).

Every case runs the real trainer (`FineTuneRecipe`: setup, train, outputs) in its own subprocess on a
Llama-shaped causal LM built from a config (random weights, the demo's byte-level BPE tokenizer) and synthetic
text, packed into full rows:

    lora-mfu     LoRA (r 8, q/v) on the 683 M model, bf16 autocast, 16 rows of 1024 tokens: model FLOPs/s of the
                 steady steps (the first WARMUP_STEPS left out: kernel plans, allocator growth) against the bf16
                 matmul peak measured in the same run (best 8192^3 product), and a profile of 3 more steps.
                 Target >= 40%.
    lora-mfu-1b  the same on TinyLlama-1.1B's layer shape (0.97 B with the small vocabulary); not by default.
    qlora        method.type qlora: 4-bit NF4 base (bitsandbytes), LoRA adapters, merged/ rebuilt from the base.
    fsdp         full fine-tuning through FSDP2 (`fully_shard`, a 1-process NCCL group: this machine has one GPU)
                 with the bf16 mixed-precision policy; fsdp-offload: the same with the optimizer state on the host.

    python bench/gpu.py [--cases lora-mfu,qlora,fsdp,fsdp-offload] [--baseline-trainer DIR] [--compile]
                        [--work-dir DIR] [--tiny]

`--baseline-trainer DIR` runs lora-mfu a second time, first, with DIR's kubetune package (e.g. the previous
commit's `trainer/`): an A/B on the same GPU in one invocation. `--compile` also runs each lora-mfu case with
the trainer's model wrapped in `torch.compile` (here, not in the trainer: it measures whether compiling pays
before the trainer does it; the compile time shows as the first step's). `--tiny` shrinks model and data so that the
script's own path can be checked on a CPU (no figures). Peak memory is torch.cuda.max_memory_allocated of the
trainer process (the estimate from `kubetune validate` is shown beside it). The last line of output is one JSON
object with every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _mfu

TARGET_MFU = 0.40
WARMUP_STEPS = 3
# >= 0.5 B parameters: 24 layers x (4 x 1536^2 attention + 3 x 1536 x 4096 SwiGLU) = 680 M, head_dim 128.
SHAPE = {"hidden_size": 1536, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 12,
         "num_key_value_heads": 12, "max_position_embeddings": 2048}
# TinyLlama-1.1B's layers (grouped-query attention, 4 KV heads), with the demo tokenizer's small vocabulary: 0.97 B.
SHAPE_1B = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
            "num_key_value_heads": 4, "max_position_embeddings": 2048}
TINY_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 2, "max_position_embeddings": 256}
CASES = {  # name: (method, strategy, offload, batch rows, steps, model shape)
    "lora-mfu": ("lora", "ddp", False, 16, 25, "683m"),
    "lora-mfu-1b": ("lora", "ddp", False, 16, 25, "1b"),
    "qlora": ("qlora", "ddp", False, 8, 10, "683m"),
    "fsdp": ("full", "fsdp", False, 8, 6, "683m"),
    "fsdp-offload": ("full", "fsdp", True, 8, 4, "683m"),
}
SHAPES = {"683m": SHAPE, "1b": SHAPE_1B}
DEFAULT_CASES = ["lora-mfu", "qlora", "fsdp", "fsdp-offload"]


def build_model(dest: Path, shape: dict[str, int]) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from kubetune.demo import build_tiny_gpt2, instruction_texts

    build_tiny_gpt2(dest, instruction_texts())  # the tokenizer; its GPT-2 weights are replaced below
    tokenizer = AutoTokenizer.from_pretrained(dest)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,
                         eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False, **shape)
    for stale in dest.glob("model*.safetensors"):
        stale.unlink()
    LlamaForCausalLM(config).save_pretrained(dest)
    return dest


def write_texts(dest: Path, examples: int, max_words: int, seed: int = 0) -> Path:
    """Synthetic documents of random length from the instruction samples' words (the speed needs no meaning)."""
    from kubetune.demo import instruction_texts

    words = " ".join(instruction_texts()).split()
    rng = random.Random(seed)
    with dest.open("w") as out:
        for _ in range(examples):
            count = rng.randint(max_words // 8, max_words)
            text = [rng.choice(words) for _ in range(count)]
            out.write(json.dumps({"prompt": " ".join(text[:8]), "completion": " ".join(text[8:])}) + "\n")
    return dest


# ---- one case (child process) ----------------------------------------------------------------------
def run_case(config: dict[str, Any]) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from kubetune.jobfile import load_job
    from kubetune.train.batching import epoch_batches
    from kubetune.train.entry import setup_logging
    from kubetune.train.recipe import FineTuneRecipe

    setup_logging(0)
    if config["strategy"] == "fsdp":
        # One GPU: a 1-process group, so that the trainer shards (fully_shard, mixed precision, offload) as it
        # does on many. torchrun would set these; with WORLD_SIZE 1 the trainer itself skips the group.
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    cuda = torch.cuda.is_available()
    recipe = FineTuneRecipe(load_job(config["job"]), Path(config["workDir"]))
    recipe.setup()
    if config.get("compile"):
        recipe.model.compile()  # in place: the trainer's own forward calls (and DDP's) go through it
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    recipe.train()
    train_call = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    summary = recipe.write_outputs()
    hp = recipe.spec.hyperparameters
    batches = epoch_batches(recipe.lengths, hp.batch_size, hp.seed, 0, 1, 0)[: recipe.state.step]
    step_flops = [_mfu.step_flops(recipe.model, [n for i in b for n in _mfu.example_lengths(recipe.train_set[i])],
                                  _mfu.causal_targets(recipe, [b]))
                  for b in batches]
    step_seconds = [seconds for seconds, _ in recipe.step_times]
    steady = slice(WARMUP_STEPS, None) if len(step_seconds) > WARMUP_STEPS else slice(None)
    losses = [entry["loss"] for entry in recipe.state.train_losses]
    result = {
        "case": config["case"],
        "trainer": str(Path(str(sys.modules["kubetune"].__file__)).parent),  # which checkout ran
        "method": recipe.spec.method.type,
        "strategy": recipe.strategy,
        "sharded": type(recipe.ddp).__name__,
        "precision": recipe.precision.name,
        "parameters": recipe.counts.total,
        "trainable": recipe.counts.trainable,
        "steps": recipe.state.step,
        "rowsPerStep": hp.batch_size,
        "tokensPerStep": sum(recipe.lengths[i] for i in batches[0]) if batches else 0,
        "stepSeconds": step_seconds,
        "compiled": bool(config.get("compile")),
        "steadyStepSeconds": sum(step_seconds[steady]) / max(len(step_seconds[steady]), 1),
        "steadyFlopsPerSecond": sum(step_flops[steady]) / max(sum(step_seconds[steady]), 1e-9),
        "trainCallSeconds": train_call,
        "losses": losses,
        "lossesFinite": all(math.isfinite(loss) for loss in losses),
        "peakDeviceMiB": peak / 2**20,
        "estimate": recipe.memory.to_dict(),
        "testLoss": (recipe.test_metrics or {}).get("loss"),
        "outputs": sorted(p.name for p in Path(recipe.spec.output.uri).iterdir()),
        "trainSamplesPerSecond": summary.get("trainSamplesPerSecond"),
    }
    if cuda and config["case"].startswith("lora-mfu"):
        result["profile"] = profile_steps(recipe, batches[:3])
        print(result["profile"])
    recipe.cleanup()
    if dist.is_initialized():
        dist.destroy_process_group()
    return result


def profile_steps(recipe: Any, batches: list[list[int]]) -> str:
    """Where a step's GPU time goes: kernels of a few more updates (after the outputs are written)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for batch in batches:
            recipe._update([batch])
    return str(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=60))


# ---- driver ------------------------------------------------------------------------------------------
def cuda_matmul_peak(size: int = 8192, repeats: int = 20) -> float:
    """bf16 FLOP/s of the best of repeated square products on the GPU (CUDA events)."""
    import torch

    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1000)
    return 2 * size**3 / best


def environment() -> dict[str, Any]:
    import importlib.metadata as metadata

    import torch

    found: dict[str, Any] = {}
    for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        found["gpu"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs"
    return found


def case_job(case: str, model: Path, data: Path, work: Path, tiny: bool, name: str) -> Path:
    from kubetune.jobfile import job_document, write_job

    method, strategy, offload, rows, steps, _ = CASES[case]
    hyper: dict[str, Any] = {"batchSize": 2 if tiny else rows, "maxSteps": 4 if tiny else steps,
                             "strategy": strategy, "offloadOptimizer": offload, "gradientCheckpointing": False,
                             "precision": "auto", "learningRate": 2e-4 if method != "full" else 1e-5}
    doc = job_document(f"gpu-{name}", {
        "model": {"uri": str(model), "task": "causal-lm"},
        "method": {"type": method, **({"lora": {"r": 8, "alpha": 16}} if method != "full" else {})},
        "data": {"train": str(data), "maxSeqLength": 128 if tiny else 1024, "packing": True},
        "hyperparameters": hyper,
        "checkpoint": {"everySteps": 10_000},
        # Adapter-only for the speed case (merging writes 2.7 GB of fp32); qlora merges: its merged/ is checked.
        "output": {"uri": str(work / name / "published"), "mergeAdapter": case == "qlora"},
        "resources": {"gpusPerNode": 0 if tiny else 1},
    })
    return write_job(doc, work / name / "job.yaml")


def run_child(case: str, name: str, job: Path, work: Path, timeout: float, trainer: Path | None,
              compile_model: bool = False) -> dict[str, Any]:
    config = {"case": case, "job": str(job), "workDir": str(work / name / "work"), "strategy": CASES[case][1],
              "compile": compile_model}
    config_path, result_path = work / name / "config.json", work / name / "result.json"
    env = dict(os.environ)
    if trainer is not None:  # another checkout's trainer package first on the path
        env["PYTHONPATH"] = os.pathsep.join([str(trainer), env.get("PYTHONPATH", "")])
    config_path.write_text(json.dumps(config))
    started = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, __file__, "--child", str(config_path), str(result_path)],
                              capture_output=True, text=True, timeout=timeout, env=env)
        code, log = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        code, log = -1, f"timed out after {timeout:.0f} s\n{exc.stdout or ''}{exc.stderr or ''}"
    (work / f"{name}.log").write_text(str(log))
    result = json.loads(result_path.read_text()) if code == 0 and result_path.is_file() else {}
    return {"case": case, "name": name, "exitCode": code, "wallSeconds": time.perf_counter() - started,
            "logTail": "" if code == 0 else str(log)[-3000:], **result}


def report(result: dict[str, Any], peak: float) -> None:
    if result["exitCode"] != 0:
        print(f"{result['name']}: FAILED (exit {result['exitCode']})\n{result['logTail']}")
        return
    estimate = result["estimate"]
    estimated = sum(estimate.get(k, 0) for k in ("weights", "gradients", "optimizer", "activations")) / 2**20
    line = (f"{result['name']}: {result['method']} {result['strategy']} ({result['sharded']}), {result['precision']}, "
            f"{result['parameters'] / 1e6:.0f} M parameters ({result['trainable'] / 1e6:.1f} M trained), "
            f"{result['steps']} steps of {result['rowsPerStep']} rows ({result['tokensPerStep']} tokens), steady step "
            f"{1000 * result['steadyStepSeconds']:.0f} ms; losses {result['losses'][0]:.3f} -> "
            f"{result['losses'][-1]:.3f}; peak device memory {result['peakDeviceMiB']:.0f} MiB (estimate "
            f"{estimated:.0f} MiB); outputs {result['outputs']}")
    if result.get("compiled"):
        line += f"; compiled: first step {result['stepSeconds'][0]:.1f} s"
    print(line)
    if peak:
        result["mfu"] = result["steadyFlopsPerSecond"] / peak
        print(f"  model FLOPs/s {result['steadyFlopsPerSecond'] / 1e12:.1f} T = {100 * result['mfu']:.1f}% of the "
              f"bf16 matmul peak measured in this run ({peak / 1e12:.0f} TFLOP/s)")


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        Path(sys.argv[3]).write_text(json.dumps(run_case(json.loads(Path(sys.argv[2]).read_text()))))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--tiny", action="store_true", help="tiny model and data: checks the script on a CPU")
    parser.add_argument("--timeout", type=float, default=150.0, help="seconds per case")
    parser.add_argument("--baseline-trainer", type=Path, default=None,
                        help="also run the speed cases with this folder's kubetune package (e.g. the previous "
                             "commit's trainer/), in the same invocation: an A/B on the same GPU")
    parser.add_argument("--compile", action="store_true",
                        help="also run each lora-mfu case with the model wrapped in torch.compile")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    env = environment()
    print(json.dumps(env))
    with tempfile.TemporaryDirectory(prefix="kubetune-gpu-") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        cases = [c for c in args.cases.split(",") if not (args.tiny and c == "qlora")]  # qlora needs CUDA
        unknown = [c for c in cases if c not in CASES]
        if unknown:
            parser.error(f"--cases: unknown {unknown}")
        models = {key: build_model(work / f"model-{key}", TINY_SHAPE if args.tiny else SHAPES[key])
                  for key in dict.fromkeys(CASES[c][5] for c in cases)}
        data = write_texts(work / "texts.jsonl", 200 if args.tiny else 2000, 60 if args.tiny else 400)
        print(f"models and data built in {time.perf_counter() - started:.0f} s")
        peak = cuda_matmul_peak() if torch.cuda.is_available() else 0.0
        runs = [(c, c, None, False) for c in cases]
        if args.baseline_trainer:
            runs = [(c, f"{c}-baseline", args.baseline_trainer, False) for c in cases if c == "lora-mfu"] + runs
        if args.compile:
            runs += [(c, f"{c}-compiled", None, True) for c in cases if c.startswith("lora-mfu")]
        results = []
        for case, name, trainer, compile_model in runs:
            job = case_job(case, models[CASES[case][5]], data, work, args.tiny, name)
            result = run_child(case, name, job, work, args.timeout, trainer, compile_model)
            report(result, peak)
            results.append(result)
        if torch.cuda.is_available():
            peak = max(peak, cuda_matmul_peak())  # again after the runs: a warm, clocked-up GPU
        for result in results:
            if result["case"].startswith("lora-mfu") and result["exitCode"] == 0 and peak:
                mfu = result["mfu"] = result["steadyFlopsPerSecond"] / peak
                print(f"{result['name']}: LoRA MFU {100 * mfu:.1f}% of the best bf16 matmul peak of the run "
                      f"(target >= {100 * TARGET_MFU:.0f}%) {'MET' if mfu >= TARGET_MFU else 'NOT MET'}")
        print(json.dumps({"benchmark": "gpu", "environment": env, "shapes": SHAPES, "matmulPeakFlops": peak,
                          "targetMfu": TARGET_MFU, "results": results}))


if __name__ == "__main__":
    main()
