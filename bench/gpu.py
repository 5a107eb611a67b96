"""The trainer on a CUDA GPU: LoRA's model FLOPs utilisation, an FSDP step, a QLoRA step (issues 12, 14, 25).

Every case runs the real trainer (`FineTuneRecipe`: setup, train, outputs) in its own subprocess on a
Llama-shaped causal LM built from a config (random weights stored in bf16 as published checkpoints are, the
demo's byte-level BPE tokenizer) and synthetic text, packed into full rows:

    lora-mfu     LoRA (r 8, q/v) on the 683 M model, bf16 autocast, 16 rows of 1024 tokens: model FLOPs/s of the
                 steady steps (the first WARMUP_STEPS left out: kernel plans, allocator growth) against the bf16
                 matmul peak measured in the same run (best 8192^3 product), and a profile of 3 more steps.
                 Target >= 40%.
    lora-mfu-1b  the same on TinyLlama-1.1B's layer shape (0.97 B with the small vocabulary); not by default.
    qlora        method.type qlora: 4-bit NF4 base (bitsandbytes), LoRA adapters, merged/ rebuilt from the base.
    qlora-fp16   the same computing in fp16 (as `precision: auto` does before Ampere): 4-bit layers and autocast
                 must agree (issue 25, item 8); losses finite.
    fsdp         full fine-tuning through FSDP2 (`fully_shard`, a 1-process NCCL group: this machine has one GPU)
                 with the bf16 mixed-precision policy, validating every 2 steps and checkpointing every 3, so the
                 best model's host copy and sharded checkpoints of it are made (item 4); fsdp-offload: the same
                 with the optimizer state on the host, whose setup peak shows item 1 (rank 0 used to move its
                 whole fp32 model onto the GPU before sharding; now it shards from meta: about one tensor).
    varlen       no trainer: packed rows of a bf16 Llama through PyTorch's varlen flash kernel against the dense
                 block-diagonal mask, logits and gradients, and the time of each (item 12).

Issue 25's checks per case: peak *reserved* memory (what a GPU runs out of) against the plan (its tensors plus
the 10% allocator margin must be at or above the reserve, by at most 10%), merged/'s size against the base's
(item 7: the same dtype, the same size), and where the best model's copy lives (item 4: pinned host memory).

    python bench/gpu.py [--cases lora-mfu,qlora,fsdp,fsdp-offload] [--baseline-trainer DIR] [--compile]
                        [--work-dir DIR] [--tiny]

`--baseline-trainer DIR` runs lora-mfu a second time, first, with DIR's kubetune package (e.g. the previous
commit's `trainer/`): an A/B on the same GPU in one invocation. `--compile` also runs each lora-mfu case with
the trainer's model wrapped in `torch.compile` (here, not in the trainer: it measures whether compiling pays
before the trainer does it; the compile time shows as the first step's). `--tiny` shrinks model and data so that the
script's own path can be checked on a CPU (no figures). Peak memory is torch.cuda.max_memory_reserved (and
_allocated) of the trainer process, the plan the trainer made beside it. The last line of output is one JSON
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
    "qlora-fp16": ("qlora", "ddp", False, 8, 6, "683m"),
    "fsdp": ("full", "fsdp", False, 8, 6, "683m"),
    "fsdp-offload": ("full", "fsdp", True, 8, 4, "683m"),
    "varlen": ("", "", False, 4, 0, ""),  # no trainer: see varlen_case
}
EXTRA = {  # spec fields a case sets beyond the common ones
    "qlora-fp16": {"hyperparameters": {"precision": "fp16"}},
    "fsdp": {"evaluation": {"everySteps": 2}, "checkpoint": {"everySteps": 3}},
    "fsdp-offload": {"evaluation": {"everySteps": 2}, "checkpoint": {"everySteps": 3}},
}
SHAPES = {"683m": SHAPE, "1b": SHAPE_1B}
DEFAULT_CASES = ["lora-mfu", "qlora", "qlora-fp16", "fsdp", "fsdp-offload", "varlen"]
PLAN_MARGIN = 0.10  # the plan's tensors plus this share must cover the reserve, and exceed it by at most as much


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
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(dest)  # as published: merged/ must match its size
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
    if config["case"] == "varlen":
        return varlen_case()
    cuda = torch.cuda.is_available()
    if config["strategy"] == "fsdp":
        # One GPU: a 1-process group, so that the trainer shards (fully_shard, mixed precision, offload) as it
        # does on many. torchrun would set these; with WORLD_SIZE 1 the trainer itself skips the group.
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        device = {"device_id": torch.device("cuda", 0)} if cuda else {}  # as distributed.init binds it
        dist.init_process_group(backend="cpu:gloo,cuda:nccl" if cuda else "gloo", **device)
    recipe = FineTuneRecipe(load_job(config["job"]), Path(config["workDir"]))
    recipe.setup()
    setup_peak = torch.cuda.max_memory_reserved() if cuda else 0  # item 1: loading and sharding
    if config.get("compile"):
        recipe.model.compile()  # in place: the trainer's own forward calls (and DDP's) go through it
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    recipe.train()
    train_call = time.perf_counter() - started
    peak = torch.cuda.max_memory_reserved() if cuda else 0
    allocated = torch.cuda.max_memory_allocated() if cuda else 0
    best = recipe.best_weights or {}
    best_tensors = [t.to_local() if hasattr(t, "to_local") else t for t in best.values()]
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
        "peakDeviceMiB": peak / 2**20,  # reserved
        "peakAllocatedMiB": allocated / 2**20,
        "setupPeakReservedMiB": setup_peak / 2**20,
        "bestCopy": {"tensors": len(best_tensors), "onHost": all(t.device.type == "cpu" for t in best_tensors),
                     "pinned": all(t.is_pinned() for t in best_tensors) if cuda else None},
        "baseBytes": _weights_bytes(Path(recipe.spec.model.uri)),
        "mergedBytes": _weights_bytes(Path(recipe.spec.output.uri) / "merged"),
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


def _weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) if folder.is_dir() else 0


def varlen_case() -> dict[str, Any]:
    """Packed rows of a bf16 Llama (GQA) attended through the varlen kernel and through the dense mask: the
    largest logit and gradient differences, and the time of a forward and backward each way."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kubetune.train.speedups import segment_attention

    if not segment_attention.varlen_available(torch.device("cuda", 0) if torch.cuda.is_available() else
                                              torch.device("cpu")):
        return {"case": "varlen", "available": False}
    device = torch.device("cuda", 0)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                         num_key_value_heads=4, vocab_size=8000, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).to(device, torch.bfloat16)
    lengths = [[300, 200, 400, 124], [512, 512], [1024], [100] * 10 + [24]]  # rows of 1024 tokens
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    ids = torch.randint(0, 8000, positions.shape)
    host = {"input_ids": ids, "position_ids": positions}
    batch = {k: v.to(device) for k, v in host.items()}

    def step(varlen: bool) -> tuple[torch.Tensor, list[torch.Tensor], float]:
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        started = time.perf_counter()
        with segment_attention.within(model, host, device) if varlen else _nothing():  # else sdpa, dense mask
            logits = model(**batch, use_cache=False).logits
            logits.float().square().mean().backward()
        torch.cuda.synchronize()
        return logits.detach().float(), [p.grad.float() for p in model.parameters()], time.perf_counter() - started

    for varlen in (False, True, False, True):  # warm-up rounds: kernel plans
        step(varlen)
    dense_logits, dense_grads, dense_seconds = step(False)
    logits, grads, seconds = step(True)
    return {"case": "varlen", "available": True, "exitCode": 0,
            "maxLogitDiff": float((logits - dense_logits).abs().max()),
            "maxGradDiff": max(float((g - d).abs().max()) for g, d in zip(grads, dense_grads, strict=True)),
            "denseSeconds": dense_seconds, "varlenSeconds": seconds}


def _nothing() -> Any:
    import contextlib

    return contextlib.nullcontext()


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
    extra = EXTRA.get(case, {})
    hyper: dict[str, Any] = {"batchSize": 2 if tiny else rows, "maxSteps": 4 if tiny else steps,
                             "strategy": strategy, "offloadOptimizer": offload, "gradientCheckpointing": False,
                             "precision": "auto", "learningRate": 2e-4 if method != "full" else 1e-5,
                             **extra.get("hyperparameters", {})}
    doc = job_document(f"gpu-{name}", {
        "model": {"uri": str(model), "task": "causal-lm"},
        "method": {"type": method, **({"lora": {"r": 8, "alpha": 16}} if method != "full" else {})},
        "data": {"train": str(data), "maxSeqLength": 128 if tiny else 1024, "packing": True},
        "hyperparameters": hyper,
        "checkpoint": extra.get("checkpoint", {"everySteps": 10_000}),
        **({"evaluation": extra["evaluation"]} if "evaluation" in extra else {}),
        # Adapter-only for the speed case (its outputs are not what it measures); qlora merges: merged/ is checked.
        "output": {"uri": str(work / name / "published"), "mergeAdapter": case.startswith("qlora")},
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
    config_path.parent.mkdir(parents=True, exist_ok=True)
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
    if result["case"] == "varlen":
        print(f"varlen: {json.dumps({k: v for k, v in result.items() if k not in ('logTail',)})}")
        return
    estimate = result["estimate"]
    planned = estimate["total"] * (1 + PLAN_MARGIN)  # the plan's tensors and its allocator margin
    reserved = result["peakDeviceMiB"] * 2**20
    result["planOverReserved"] = planned / reserved if reserved else None
    result["planWithin"] = bool(reserved) and 1.0 <= planned / reserved <= 1.0 + PLAN_MARGIN
    line = (f"{result['name']}: {result['method']} {result['strategy']} ({result['sharded']}), {result['precision']}, "
            f"{result['parameters'] / 1e6:.0f} M parameters ({result['trainable'] / 1e6:.1f} M trained), "
            f"{result['steps']} steps of {result['rowsPerStep']} rows ({result['tokensPerStep']} tokens), steady step "
            f"{1000 * result['steadyStepSeconds']:.0f} ms; losses {result['losses'][0]:.3f} -> "
            f"{result['losses'][-1]:.3f} (finite: {result['lossesFinite']}); peak reserved "
            f"{result['peakDeviceMiB']:.0f} MiB, allocated {result['peakAllocatedMiB']:.0f} MiB, setup "
            f"{result['setupPeakReservedMiB']:.0f} MiB; plan {estimate['total'] / 2**20:.0f} MiB + "
            f"{100 * PLAN_MARGIN:.0f}% = {planned / 2**20:.0f} MiB ({'within' if result['planWithin'] else 'OFF'}: "
            f"{result['planOverReserved'] or 0:.2f}x the reserve), needed {estimate['needed'] / 2**20:.0f} MiB; "
            f"best copy {result['bestCopy']}; merged/ {result['mergedBytes'] / 2**20:.0f} MiB against the base's "
            f"{result['baseBytes'] / 2**20:.0f} MiB; outputs {result['outputs']}")
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
        cases = [c for c in args.cases.split(",") if not (args.tiny and c.startswith("qlora"))]  # qlora needs CUDA
        unknown = [c for c in cases if c not in CASES]
        if unknown:
            parser.error(f"--cases: unknown {unknown}")
        models = {key: build_model(work / f"model-{key}", TINY_SHAPE if args.tiny else SHAPES[key])
                  for key in dict.fromkeys(CASES[c][5] for c in cases) if key}
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
            job = case_job(case, models[CASES[case][5]], data, work, args.tiny, name) if CASES[case][5] else work
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
