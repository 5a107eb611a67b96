"""The memory plan (kubetune.memory): parameter arithmetic, decisions, accuracy against measured peaks, refusal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from kubetune.jobfile import write_job
from kubetune.memory import model_shape, plan
from kubetune.spec import FineTuneJob
from tests.fixtures_models import causal_job, classification_job
from tests.trainer_runs import KUBETUNE, Trainer, split_instructions

MiB, GiB = 1 << 20, 1 << 30
LLAMA_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000, "hidden_act": "silu",
            "max_position_embeddings": 4096, "tie_word_embeddings": False}


def spec_of(doc: dict[str, Any]) -> Any:
    return FineTuneJob.model_validate(doc).spec


@pytest.fixture(scope="module")
def gpt2_medium(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GPT-2 big enough (5 M parameters, 8k vocabulary) for its memory to stand out of the process's noise."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("gpt2-medium")
    GPT2LMHeadModel(GPT2Config(vocab_size=8000, n_positions=256, n_embd=256, n_layer=4, n_head=4)).save_pretrained(
        folder)
    return folder


def test_parameter_counts_match_the_built_models(minilm_path: Path) -> None:
    """Architecture arithmetic from config.json equals what transformers builds (meta device: no memory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, GPT2Config

    configs = [("causal-lm", GPT2Config(vocab_size=600, n_positions=256, n_embd=64, n_layer=2, n_head=2)),
               ("sequence-classification", GPT2Config(vocab_size=600, n_embd=64, n_layer=2, n_head=2)),
               ("causal-lm", AutoConfig.for_model(**{**LLAMA_7B, "hidden_size": 256, "intermediate_size": 688,
                                                     "num_hidden_layers": 2, "num_key_value_heads": 8})),
               ("sequence-classification", AutoConfig.from_pretrained(minilm_path))]
    for task, config in configs:
        config.num_labels = 2
        auto: Any = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
        with torch.device("meta"):
            built = sum(p.numel() for p in auto.from_config(config).parameters())
        assert model_shape(config.to_dict()).parameters(task, 2) == built, (config.model_type, task)


def _job(model: Path, task: str, method: str, batch: int, checkpointing: bool) -> dict[str, Any]:
    make = causal_job if task == "causal-lm" else classification_job
    return make("probe", model, "unused.jsonl", "/tmp/unused", method={"type": method},
                data={"train": "unused.jsonl", "maxSeqLength": 128},
                hyperparameters={"batchSize": batch, "precision": "fp32", "gradientCheckpointing": checkpointing},
                resources={"gpusPerNode": 0})


CONFIGURATIONS = {  # name: (model fixture, task, method, batch size, gradient checkpointing)
    "gpt2 full": ("gpt2_medium", "causal-lm", "full", 8, False),
    "minilm lora": ("minilm_path", "sequence-classification", "lora", 16, False),
    "gpt2 full, checkpointing": ("gpt2_medium", "causal-lm", "full", 8, True),
}


@pytest.mark.parametrize("name", list(CONFIGURATIONS))
def test_estimate_within_25_percent_of_the_measured_peak(name: str, request: pytest.FixtureRequest,
                                                         tmp_path: Path) -> None:
    """Peak RSS of two real training steps in a fresh process (tests/memory_probe.py) against plan().total."""
    fixture, task, method, batch, checkpointing = CONFIGURATIONS[name]
    model: Path = request.getfixturevalue(fixture)
    doc = _job(model, task, method, batch, checkpointing)
    (tmp_path / "job.json").write_text(json.dumps(doc))
    # A fixed mmap threshold makes glibc hand freed tensors back at once: RSS then follows what torch holds.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2", "MALLOC_MMAP_THRESHOLD_": "65536"}
    probe = subprocess.run([sys.executable, "-m", "tests.memory_probe", str(tmp_path / "job.json"), str(model)],
                           capture_output=True, text=True, env=env, timeout=300,
                           cwd=Path(__file__).resolve().parent.parent)
    assert probe.returncode == 0, probe.stderr[-3000:]
    measured = json.loads(probe.stdout.strip().splitlines()[-1])
    assert measured["checkpointing"] is checkpointing
    estimate = plan(spec_of(doc), world_size=1, device_bytes=None)
    ratio = estimate.total / measured["peakBytes"]
    print(f"{name}: estimate {estimate.total / MiB:.0f} MiB, measured {measured['peakBytes'] / MiB:.0f} MiB, "
          f"ratio {ratio:.2f}")
    assert 0.75 <= ratio <= 1.25, f"{name}: estimate {estimate.total / MiB:.0f} MiB vs measured " \
                                  f"{measured['peakBytes'] / MiB:.0f} MiB"


def _llama(method: str, nodes: int, gpus: int, batch: int, seq: int, **hyper: Any) -> Any:
    doc = causal_job("big", "s3://models/llama/", "s3://data/x.jsonl", "s3://out/big/", method={"type": method},
                     data={"train": "s3://data/x.jsonl", "maxSeqLength": seq},
                     hyperparameters={"batchSize": batch, "precision": "bf16", **hyper},
                     resources={"nodes": nodes, "gpusPerNode": gpus})
    return spec_of(doc)


def test_auto_shards_when_a_replica_does_not_fit() -> None:
    """Full fine-tuning of a 7 B model: 16 B/parameter replicated is ~100 GiB, sharded over 16 GPUs it fits 80."""
    one = plan(_llama("full", 2, 8, 1, 512), world_size=16, device_bytes=80 * GiB, config=LLAMA_7B)
    assert one.parameters == 6_738_415_616  # Llama-2-7B's published count
    assert one.strategy == "fsdp" and one.fits
    replicated = plan(_llama("full", 2, 8, 1, 512, strategy="ddp"), world_size=16, device_bytes=80 * GiB,
                      config=LLAMA_7B)
    assert not replicated.fits and replicated.weights + replicated.gradients + replicated.optimizer > 80 * GiB
    # Sharded by world size; gathered apart: the root unit (embeddings, norm, head) and two layers (computing,
    # prefetched) in bf16, the root's and one layer's gradients in fp32. 202,383,360 parameters per Llama-7B layer
    # (4 x 4096^2 attention, 3 x 4096 x 11008 MLP, two norms); root 2 x 32000 x 4096 + 4096.
    assert one.weights == pytest.approx(replicated.weights / 16, rel=1e-6)
    root, layer = 2 * 32000 * 4096 + 4096, 202_383_360
    assert one.gathered == (root + 2 * layer) * 2 + (root + layer) * 4
    lora = plan(_llama("lora", 1, 1, 1, 512), world_size=1, device_bytes=80 * GiB, config=LLAMA_7B)
    assert lora.strategy == "ddp" and lora.fits and lora.trainable < lora.parameters / 100
    # On a GPU, LoRA's frozen base is held in bf16 (model.frozen_weights_dtype), the adapters in fp32.
    assert lora.weights == lora.parameters * 2 + lora.trainable * 4
    # `auto` may be fp16 (pre-Ampere), where the base stays fp32: counted at 4 bytes, never an underestimate.
    auto = plan(_llama("lora", 1, 1, 1, 512, precision="auto"), world_size=1, device_bytes=80 * GiB, config=LLAMA_7B)
    assert auto.weights == auto.parameters * 4 + auto.trainable * 4
    qlora = plan(_llama("qlora", 1, 1, 1, 512), world_size=1, device_bytes=80 * GiB, config=LLAMA_7B)
    assert qlora.weights < lora.weights / 2  # 4-bit layers: ~0.56 B/parameter instead of 2
    # auto never picks fsdp for qlora: the trainer refuses to shard 4-bit weights (validate said it would fit).
    tight = plan(_llama("qlora", 1, 8, 8, 4096), world_size=8, device_bytes=24 * GiB, config=LLAMA_7B)
    assert tight.strategy == "ddp" and not tight.fits
    offloaded = plan(_llama("full", 2, 8, 1, 512, offloadOptimizer=True), world_size=16, device_bytes=80 * GiB,
                     config=LLAMA_7B)
    assert offloaded.optimizer == 0


def test_checkpointing_follows_the_spec_and_the_estimate() -> None:
    """null: on only when activations would not fit otherwise; true/false: as written."""
    roomy = plan(_llama("lora", 1, 1, 1, 512), world_size=1, device_bytes=80 * GiB, config=LLAMA_7B)
    assert not roomy.gradient_checkpointing
    tight_spec = _llama("lora", 1, 1, 8, 4096)
    off = plan(_llama("lora", 1, 1, 8, 4096, gradientCheckpointing=False), world_size=1, device_bytes=80 * GiB,
               config=LLAMA_7B)
    tight = plan(tight_spec, world_size=1, device_bytes=80 * GiB, config=LLAMA_7B)
    assert not off.fits and off.activations > tight.activations * 4  # every layer kept vs inputs + one layer
    assert tight.gradient_checkpointing and tight.fits
    unknown = plan(tight_spec, world_size=1, device_bytes=None, config=LLAMA_7B)
    assert unknown.fits and not unknown.gradient_checkpointing and "fit not checked" in unknown.table()
    message = off.advice(_llama("lora", 1, 1, 8, 4096, gradientCheckpointing=False))
    for field in ("spec.method.type: qlora", "spec.hyperparameters.batchSize", "gradientCheckpointing",
                  "spec.resources.nodes", "spec.data.maxSeqLength"):
        assert field in message


def test_advice_fits_the_jobs_hardware() -> None:
    """A CPU job is not told to use qlora (CUDA only) or more GPUs; a GPU job still is (issue 28, item 6)."""
    for method in ("full", "lora"):
        cpu_spec = _llama(method, 1, 0, 8, 4096, gradientCheckpointing=False, precision="fp32")
        cpu = plan(cpu_spec, world_size=1, device_bytes=4 * GiB, config=LLAMA_7B)
        assert not cpu.fits
        message = cpu.advice(cpu_spec)
        assert "qlora" not in message and "GPU" not in message, message
        assert "spec.resources.memory 32Gi" in message and "spec.resources.nodes" in message
        gpu_spec = _llama(method, 1, 1, 8, 4096, gradientCheckpointing=False)
        gpu = plan(gpu_spec, world_size=1, device_bytes=4 * GiB, config=LLAMA_7B)
        assert "qlora" in gpu.advice(gpu_spec) and "more GPUs" in gpu.advice(gpu_spec)


def _validate(job: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*KUBETUNE, "validate", str(job)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})


def test_validate_prints_the_table_and_rejects_a_job_that_cannot_fit(minilm_path: Path, reviews_subset: Path,
                                                                     tmp_path: Path) -> None:
    def job(memory: str, gpus: int = 0) -> Path:
        doc = classification_job("fit", minilm_path, reviews_subset, tmp_path / "out", method={"type": "full"},
                                 hyperparameters={"batchSize": 32, "gradientCheckpointing": False},
                                 resources={"gpusPerNode": gpus, "memory": memory})
        return write_job(doc, tmp_path / f"job-{memory}-{gpus}.yaml")

    fits = _validate(job("16Gi"))
    assert fits.returncode == 0, fits.stderr
    for text in ("memory per device", "weights", "gradients", "optimizer", "activations", "total",
                 "strategy ddp", "gradient checkpointing off"):
        assert text in fits.stdout
    too_small = _validate(job("256Mi"))
    assert too_small.returncode == 2, too_small.stdout
    assert "Traceback" not in too_small.stderr and len(too_small.stderr.strip().splitlines()) == 1
    for text in ("spec.resources", "0.25 GiB", "spec.method.type: lora", "spec.hyperparameters.batchSize",
                 "spec.hyperparameters.gradientCheckpointing: true", "spec.data.maxSeqLength"):
        assert text in too_small.stderr, too_small.stderr
    # A GPU job: the device's memory comes from $KUBETUNE_DEVICE_MEMORY (or --device-memory), else no check.
    gpu = job("1Gi", gpus=1)
    assert "fit not checked" in _validate(gpu).stdout
    assert _validate(gpu, KUBETUNE_DEVICE_MEMORY="100Mi").returncode == 2
    for bad in ("plenty", "0", "0Gi"):  # 0 once read as a device of 0.00 GiB, with the advice for a big model
        refused = _validate(gpu, KUBETUNE_DEVICE_MEMORY=bad)
        assert refused.returncode == 2 and f"KUBETUNE_DEVICE_MEMORY: '{bad}' is not a memory size" in refused.stderr


def test_the_trainer_refuses_a_job_that_cannot_fit_before_training(tiny_gpt2: Path, tmp_path: Path) -> None:
    data = split_instructions(tmp_path / "data")
    doc = causal_job("nofit", tiny_gpt2, data["train"], tmp_path / "out", method={"type": "full"},
                     resources={"gpusPerNode": 0, "memory": "64Gi"})  # validate passes: the device is smaller
    trainer = Trainer(write_job(doc, tmp_path / "job.yaml"), tmp_path / "state")
    trainer_env = trainer.env
    trainer.env = lambda: {**trainer_env(), "KUBETUNE_DEVICE_MEMORY": "4Mi"}  # type: ignore[method-assign]
    code, out = trainer.run()
    assert code == 2, out
    assert "Traceback" not in out and "spec.resources" in out and "spec.hyperparameters.batchSize" in out
    assert trainer.result()["reason"] == "InvalidInput"
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_the_estimate_needs_no_torch() -> None:
    """The operator's pre-flight image has no torch: importing and planning must not pull it in."""
    code = ("import sys; from kubetune.memory import model_shape; "
            "model_shape({'model_type': 'gpt2', 'n_embd': 64, 'n_layer': 2}); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


LLAMA3_8B = {**LLAMA_7B, "intermediate_size": 14336, "num_key_value_heads": 8, "vocab_size": 128256,
             "max_position_embeddings": 8192}


def test_the_plan_counts_the_precision_resolved_for_the_device(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 25, item 10: `auto` on a GPU that runs bf16 holds LoRA's frozen base in bf16; counted as fp32 (the
    unresolved spec's worst case), 8B LoRA on 8 x 40 GiB went to fsdp though bf16 ddp fits."""
    from kubetune.train.memcheck import check_memory

    assert model_shape(LLAMA3_8B).parameters("causal-lm", 0) == 8_030_261_248  # Llama-3-8B's published count
    spec = _llama("lora", 1, 8, 1, 2048, precision="auto")
    unresolved = plan(spec, world_size=8, device_bytes=40 * GiB, config=LLAMA3_8B)
    assert unresolved.strategy == "fsdp" and unresolved.precision == "auto"
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B))
    monkeypatch.setenv("KUBETUNE_DEVICE_MEMORY", "40Gi")
    monkeypatch.setenv("WORLD_SIZE", "8")
    resolved = check_memory(spec, tmp_path, torch.device("cuda", 0), "bf16")  # what the trainer passes on an H100
    assert resolved.strategy == "ddp" and resolved.fits and resolved.precision == "bf16"
    assert resolved.weights == resolved.parameters * 2 + resolved.trainable * 4
    assert resolved.needed < 36 * GiB


def test_the_fit_keeps_headroom_and_fsdp_counts_the_gathered_root() -> None:
    """Issue 25, item 5: 10% + 2 GiB on a GPU (context, NCCL, fragmentation), 10% on a CPU; a job whose tensors
    fill the device exactly does not fit. Under fsdp the root unit (1.05 B parameters of Llama-3-8B) stays
    gathered from forward to backward, with its gradients: not one layer's worth."""
    spec = _llama("full", 1, 8, 1, 2048, gradientAccumulationSteps=4, gradientCheckpointing=False)
    full = plan(spec, world_size=8, device_bytes=80 * GiB, config=LLAMA3_8B, precision="bf16")
    assert full.strategy == "fsdp" and full.fits
    assert full.headroom == int(full.total * 0.10 + 2 * GiB) and full.needed == full.total + full.headroom
    root = 2 * 128256 * 4096 + 4096
    assert model_shape(LLAMA3_8B).root_parameters("causal-lm", 0) == root
    assert full.gathered > root * (2 + 4)  # bf16 weights and fp32 gradients of the root, plus two layers
    exact = plan(spec, world_size=8, device_bytes=full.total, config=LLAMA3_8B, precision="bf16")
    assert not exact.fits  # it once fitted: 100% of the device
    assert plan(spec, world_size=8, device_bytes=full.needed, config=LLAMA3_8B, precision="bf16").fits
    # Accumulation adds nothing under fsdp: the trainer reduce-scatters every micro-batch (tests/test_sharding.py).
    single = plan(_llama("full", 1, 8, 1, 2048, gradientCheckpointing=False), world_size=8, device_bytes=80 * GiB,
                  config=LLAMA3_8B, precision="bf16")
    assert single.gradients == full.gradients and single.gathered == full.gathered
    cpu = plan(_llama("lora", 1, 0, 1, 512, precision="fp32"), world_size=1, device_bytes=64 * GiB, config=LLAMA_7B)
    assert cpu.headroom == int(cpu.total * 0.10)


def test_the_best_model_copy_is_counted_where_it_lives() -> None:
    """Issue 25, item 4: the best weights are copied to host memory; on a CPU that is the device."""
    gpu = plan(_llama("full", 2, 8, 1, 512), world_size=16, device_bytes=80 * GiB, config=LLAMA_7B)
    assert gpu.best == 0 and any("best model's copy" in note for note in gpu.notes)
    cpu = plan(_llama("lora", 1, 0, 1, 512, precision="fp32"), world_size=1, device_bytes=64 * GiB, config=LLAMA_7B)
    assert cpu.best == cpu.trainable * 4 and "best copy" in cpu.table()


def test_the_dry_run_reports_reserved_device_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a GPU runs out of is the caching allocator's reserve, not what tensors hold at the moment."""
    from kubetune.train import dryrun

    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 30 * GiB)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 20 * GiB)
    assert dryrun.peak_memory_bytes(torch.device("cuda", 0)) == 30 * GiB


def test_the_trainer_plans_for_the_device_it_runs_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A spec written for GPUs (gpusPerNode defaults to 1) run on a CPU: no GPU headroom, fp32 everywhere."""
    from kubetune.train.memcheck import check_memory

    (tmp_path / "config.json").write_text(json.dumps(LLAMA_7B))
    monkeypatch.setenv("KUBETUNE_DEVICE_MEMORY", "64Gi")
    spec = _llama("lora", 1, 1, 1, 512, precision="fp32")
    cpu = check_memory(spec, tmp_path, torch.device("cpu"), "fp32")
    assert cpu.headroom == int(cpu.total * 0.10) and cpu.best == cpu.trainable * 4
    gpu = check_memory(spec, tmp_path, torch.device("cuda", 0), "fp32")
    assert gpu.headroom == int(gpu.total * 0.10 + 2 * GiB) and gpu.best == 0


def test_dpo_counts_both_answers_and_the_reference_it_keeps() -> None:
    """Issue 30: a pair is two rows (activations double); full weights keep a frozen reference copy unless it is
    precomputed; LoRA's reference is the same weights with the adapters off (no copy)."""
    def dpo(weights: str, precompute: bool = False) -> Any:
        return spec_of(causal_job(
            "big", "s3://models/llama/", "s3://data/x.jsonl", "s3://out/big/",
            method={"type": "dpo", "dpo": {"weights": weights, "precomputeReference": precompute}},
            data={"train": "s3://data/x.jsonl", "maxSeqLength": 1024},
            hyperparameters={"batchSize": 4, "precision": "bf16", "gradientCheckpointing": True},
            resources={"gpusPerNode": 1}))

    def estimate(spec: Any) -> Any:
        return plan(spec, world_size=1, device_bytes=None, config=LLAMA_7B)

    sft = estimate(_llama("full", 1, 1, 4, 1024, gradientCheckpointing=True))
    full, precomputed, lora = estimate(dpo("full")), estimate(dpo("full", True)), estimate(dpo("lora"))
    assert full.activations == precomputed.activations == 2 * sft.activations
    assert full.weights - precomputed.weights == full.parameters * 2  # the bf16 frozen copy
    assert precomputed.weights == sft.weights and lora.weights < sft.weights
    assert any("frozen copy" in n for n in full.notes) and any("adapters off" in n for n in lora.notes)


@pytest.mark.parametrize(("text", "size"), [("32Gi", 32 << 30), ("512Mi", 512 << 20), ("1G", 10**9), ("1e9", 10**9),
                                            ("1Pi", 1 << 50), ("1.5Gi", 3 << 29), ("1000000", 10**6),
                                            ("80GiB", None), ("lots", None)])
def test_memory_sizes_are_read_as_kubernetes_quantities(text: str, size: int | None) -> None:
    """Every quantity the spec model accepts for resources.memory has a size in the plan (1e9 and 1Pi had none,
    so a CPU job's fit was not checked); what is not a quantity has none (--device-memory says so)."""
    from kubetune.memory import parse_quantity

    assert parse_quantity(text) == size
