"""Gradient checkpointing: on and off as the spec and the memory plan say, and the same losses either way."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from kubetune.jobfile import write_job
from kubetune.memory import plan
from kubetune.spec import FineTuneJob
from kubetune.train.evaluate import summed_loss
from kubetune.train.model import build_model
from tests.fixtures_models import causal_job
from tests.trainer_runs import Trainer, losses, split_instructions

# Recomputation replays the same ops with the same dropout masks (the RNG state is restored), so only the order
# of float additions in backward may differ: far below this over a few fp32 steps.
TOLERANCE = 1e-5


def _spec(model: Path, method: str, checkpointing: bool | None) -> Any:
    doc = causal_job("ckpt", model, "unused.jsonl", "/tmp/unused", method={"type": method},
                     hyperparameters={"batchSize": 4, "precision": "fp32", "gradientCheckpointing": checkpointing})
    return FineTuneJob.model_validate(doc).spec


def _train(model: Path, method: str, checkpointing: bool, steps: int = 3) -> tuple[list[float], bool]:
    torch.manual_seed(0)
    net, _ = build_model(_spec(model, method, checkpointing), model, gradient_checkpointing=checkpointing)
    net.train()
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 500, (4, 64), generator=generator)
    history = []
    torch.manual_seed(2)  # dropout masks: the same sequence in both runs
    for _ in range(steps):
        loss = summed_loss(net(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, ids, "causal-lm")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history.append(loss.item())
    base = net.get_base_model() if hasattr(net, "get_base_model") else net
    on = getattr(base, "is_activation_checkpointing", None)
    return history, bool(base.is_gradient_checkpointing if on is None else on)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_checkpointing_switches_and_keeps_the_losses(method: str, tiny_gpt2: Path) -> None:
    plain, plain_on = _train(tiny_gpt2, method, False)
    checkpointed, checkpointed_on = _train(tiny_gpt2, method, True)
    assert (plain_on, checkpointed_on) == (False, True)
    assert plain[-1] < plain[0]  # it trains: the comparison is not between two frozen models
    assert checkpointed == pytest.approx(plain, rel=TOLERANCE)


def _run_json(trainer: Trainer, output: Path) -> dict[str, Any]:
    code, out = trainer.run()
    assert code == 0, out
    loaded: dict[str, Any] = json.loads((output / "run.json").read_text())
    loaded["metrics"] = json.loads((output / "metrics.json").read_text())
    return loaded


def test_the_plan_turns_checkpointing_on_in_a_run(tiny_gpt2: Path, tmp_path: Path) -> None:
    """null + a device that holds the job only with checkpointing: the trainer checkpoints and says so in
    run.json; the losses equal a run with checkpointing off."""
    data = split_instructions(tmp_path / "data")

    def job(name: str, checkpointing: bool | None) -> dict[str, Any]:
        return causal_job(name, tiny_gpt2, data["train"], tmp_path / name, method={"type": "full"},
                          data={"validation": str(data["validation"]), "test": str(data["test"]), "maxSeqLength": 128},
                          hyperparameters={"learningRate": 2e-3, "batchSize": 8, "epochs": 1, "maxSteps": 4,
                                           "precision": "fp32", "gradientCheckpointing": checkpointing},
                          resources={"gpusPerNode": 0, "memory": "64Gi"})

    auto = job("auto", None)
    spec = FineTuneJob.model_validate(auto).spec
    with_checkpointing = plan(spec.model_copy(update={"hyperparameters": spec.hyperparameters.model_copy(
        update={"gradient_checkpointing": True})}), world_size=1, device_bytes=None)
    without = plan(spec, world_size=1, device_bytes=None)
    assert with_checkpointing.needed < without.needed
    device = (with_checkpointing.needed + without.needed) // 2

    trainer = Trainer(write_job(auto, tmp_path / "auto.yaml"), tmp_path / "state-auto")
    env = trainer.env
    trainer.env = lambda: {**env(), "KUBETUNE_DEVICE_MEMORY": str(device)}  # type: ignore[method-assign]
    checkpointed = _run_json(trainer, tmp_path / "auto")
    assert checkpointed["memory"]["gradient_checkpointing"] is True
    assert checkpointed["memory"]["device_bytes"] == device and checkpointed["memory"]["fits"]

    plain = _run_json(Trainer(write_job(job("off", False), tmp_path / "off.yaml"), tmp_path / "state-off"),
                      tmp_path / "off")
    assert plain["memory"]["gradient_checkpointing"] is False
    assert [s for s, _ in losses(checkpointed["metrics"])] == [s for s, _ in losses(plain["metrics"])]
    assert [v for _, v in losses(checkpointed["metrics"])] == pytest.approx(
        [v for _, v in losses(plain["metrics"])], rel=TOLERANCE)
