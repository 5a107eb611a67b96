"""QLoRA: bad input without CUDA (exit 2 naming method.type, no traceback) and the merge onto a bf16 base.

The 4-bit training itself needs a CUDA GPU and bitsandbytes, which this machine has neither of.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from kubetune import contract
from kubetune.jobfile import write_job
from kubetune.train.outputs import save_model
from tests.fixtures_models import causal_job
from tests.trainer_runs import KUBETUNE, split_instructions

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")


def _job(tmp_path: Path, model: Path, gpus: int) -> Path:
    data = split_instructions(tmp_path / "data")
    doc = causal_job("qlora", model, data["train"], tmp_path / "out", method={"type": "qlora"},
                     resources={"gpusPerNode": gpus})
    return write_job(doc, tmp_path / "job.yaml")


def _kubetune(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", contract.ENV_STATE_DIR: str(tmp_path / "state"),
           contract.ENV_WORK_DIR: str(tmp_path / "work"), contract.ENV_TERMINATION_LOG: str(tmp_path / "term")}
    return subprocess.run([*KUBETUNE, *args], capture_output=True, text=True, env=env, timeout=300)


def _refused(result: subprocess.CompletedProcess[str]) -> None:
    out = result.stdout + result.stderr
    assert result.returncode == 2, out
    assert "spec.method.type" in out and "qlora" in out and "Traceback" not in out


@pytest.mark.parametrize("deep", [False, True])
def test_validate_refuses_qlora_on_a_cpu_job(deep: bool, tiny_gpt2: Path, tmp_path: Path) -> None:
    result = _kubetune("validate", *(["--deep"] if deep else []), str(_job(tmp_path, tiny_gpt2, 0)), tmp_path=tmp_path)
    _refused(result)
    assert "resources.gpusPerNode" in result.stderr


@no_cuda
@pytest.mark.parametrize("command", ["run", "trainer"])
def test_qlora_without_cuda_is_bad_input(command: str, tiny_gpt2: Path, tmp_path: Path) -> None:
    """A GPU job started on a machine without CUDA: kubetune run and the trainer pod's entrypoint exit 2."""
    job = _job(tmp_path, tiny_gpt2, 1)
    assert _kubetune("validate", str(job), tmp_path=tmp_path).returncode == 0  # the spec itself is fine
    result = _kubetune(*(["run", str(job)] if command == "run" else ["trainer", "--spec", str(job)]),
                       tmp_path=tmp_path)
    _refused(result)
    assert not (tmp_path / "out").exists()


def test_qlora_merged_output_folds_the_adapter_into_a_bf16_base(tiny_gpt2: Path, tmp_path: Path) -> None:
    """merged/ of a qlora job: the base reloaded in the bf16 it is stored in (never the 4-bit weights) plus the
    adapter's delta.

    A LoRA model stands in for the 4-bit one (the merge reads only the adapter and the base folder)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stored = tmp_path / "bf16-base"
    AutoModelForCausalLM.from_pretrained(tiny_gpt2, dtype=torch.bfloat16).save_pretrained(stored)
    AutoTokenizer.from_pretrained(tiny_gpt2).save_pretrained(stored)
    tiny_gpt2 = stored
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2, dtype=torch.float32)
    model: Any = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False))
    expected = {k: v.detach().clone() for k, v in model.merge_and_unload(safe_merge=True).state_dict().items()}
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False))
    out = tmp_path / "out"
    written = save_model(model, AutoTokenizer.from_pretrained(tiny_gpt2), "qlora", True, out, base_dir=tiny_gpt2)
    assert written == [contract.ADAPTER_DIR, contract.MERGED_DIR]
    merged = AutoModelForCausalLM.from_pretrained(out / contract.MERGED_DIR, dtype="auto")
    assert merged.dtype == torch.bfloat16 and not hasattr(merged.config, "quantization_config")
    weight = "transformer.h.0.attn.c_attn.weight"
    state = merged.state_dict()
    delta = expected[weight] - AutoModelForCausalLM.from_pretrained(tiny_gpt2).state_dict()[weight]
    assert delta.abs().max() > 1e-3  # the adapter changed the weight: the check below can tell
    assert torch.allclose(state[weight].float(), expected[weight], atol=2e-2, rtol=1e-2)
