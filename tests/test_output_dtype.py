"""merged/ in the base model's dtype, QLoRA computing in the run's precision, and the QLoRA model card's note
(issue 25, items 7 and 8)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from kubetune import contract
from kubetune.jobfile import parse_job
from kubetune.train import model as model_module
from kubetune.train.model import build_model, stored_dtype
from kubetune.train.outputs import model_card, save_model
from kubetune.train.precision import Precision
from tests.fixtures_models import causal_job


@pytest.fixture(scope="module")
def bf16_gpt2(tiny_gpt2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny GPT-2 stored in bf16, as most published checkpoints are."""
    folder = tmp_path_factory.mktemp("bf16-gpt2")
    AutoModelForCausalLM.from_pretrained(tiny_gpt2, dtype=torch.bfloat16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_gpt2).save_pretrained(folder)
    return folder


def _weights(folder: Path) -> dict[str, str]:
    with safe_open(folder / "model.safetensors", "pt") as weights:
        return {key: weights.get_slice(key).get_dtype() for key in weights.keys()}  # noqa: SIM118


@pytest.mark.parametrize("method", [{"type": "full"}, {"type": "partial", "partial": {"trainLastLayers": 1}},
                                    {"type": "lora"}])
def test_merged_is_written_in_the_dtype_the_base_was_stored_in(method: dict[str, Any], bf16_gpt2: Path,
                                                               tmp_path: Path) -> None:
    """Training holds fp32 master weights; merged/ used to be written from them: twice the base's size."""
    assert stored_dtype(bf16_gpt2) is torch.bfloat16
    spec = parse_job(causal_job("dtype", bf16_gpt2, "unused.jsonl", tmp_path / "out", method=method)).spec
    tokenizer = AutoTokenizer.from_pretrained(bf16_gpt2)
    model = build_model(spec, bf16_gpt2, tokenizer.pad_token_id)[0]
    assert all(p.dtype == torch.float32 for p in model.parameters())  # what training updates
    save_model(model, tokenizer, method["type"], True, tmp_path, base_dir=bf16_gpt2)
    merged = tmp_path / contract.MERGED_DIR
    assert set(_weights(merged).values()) == {"BF16"}
    assert json.loads((merged / "config.json").read_text())["dtype"] == "bfloat16"
    size = (merged / "model.safetensors").stat().st_size
    assert size <= 1.05 * (bf16_gpt2 / "model.safetensors").stat().st_size
    assert AutoModelForCausalLM.from_pretrained(merged, dtype="auto").dtype == torch.bfloat16  # serving's default


def test_an_fp32_base_keeps_an_fp32_merged(tiny_gpt2: Path, tmp_path: Path) -> None:
    spec = parse_job(causal_job("dtype", tiny_gpt2, "unused.jsonl", tmp_path / "out", method={"type": "full"})).spec
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    save_model(build_model(spec, tiny_gpt2, tokenizer.pad_token_id)[0], tokenizer, "full", True, tmp_path,
               base_dir=tiny_gpt2)
    assert set(_weights(tmp_path / contract.MERGED_DIR).values()) == {"F32"}


@pytest.mark.parametrize(("precision", "compute"), [
    (Precision("fp16", "cuda", torch.float16), torch.float16),  # pre-Ampere: autocast runs fp16
    (Precision("bf16", "cuda", torch.bfloat16), torch.bfloat16),
    (Precision("fp32", "cuda", None), torch.float32),
])
def test_qlora_computes_in_the_run_precision(precision: Precision, compute: torch.dtype, tiny_gpt2: Path,
                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The 4-bit load itself needs CUDA and bitsandbytes: what it is asked for is checked here (the config)."""
    asked: dict[str, Any] = {}

    def load(spec: Any, model_dir: Path, pad: Any, loading: dict[str, Any]) -> torch.nn.Module:
        asked.update(loading)
        return torch.nn.Linear(2, 2)

    monkeypatch.setattr(model_module, "load_base_model", load)
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.ModuleType("bitsandbytes"))  # only imported there
    monkeypatch.setattr("peft.prepare_model_for_kbit_training", lambda model, **_: model)
    spec = parse_job(causal_job("q", tiny_gpt2, "unused.jsonl", tmp_path / "out", method={"type": "qlora"})).spec
    model_module.load_quantized_base(spec, tiny_gpt2, None, precision)
    assert asked["quantization_config"].bnb_4bit_compute_dtype == compute
    assert asked["dtype"] == compute


def test_the_qlora_card_says_merged_is_not_the_tested_model() -> None:
    job = {"metadata": {"name": "q"}, "spec": {"model": {"uri": "s3://m/", "task": "causal-lm"},
                                               "method": {"type": "qlora"}, "evaluation": {"metric": "eval_loss"},
                                               "hyperparameters": {"seed": 1}}}
    metrics = {"trainableParameters": 1, "totalParameters": 2, "test": {"loss": 1.0}}
    run = {"data": {}, "hardware": {}}
    note = "4-bit (NF4) base with the adapter"
    assert note in model_card(job, metrics, run, [contract.ADAPTER_DIR, contract.MERGED_DIR])
    assert note not in model_card(job, metrics, run, [contract.ADAPTER_DIR])  # no merged/: nothing to warn about
    job["spec"]["method"]["type"] = "lora"
    assert note not in model_card(job, metrics, run, [contract.ADAPTER_DIR, contract.MERGED_DIR])
