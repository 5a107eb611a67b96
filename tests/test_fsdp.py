"""FSDP (fully_shard) with 2 processes against DDP with 2 processes: same losses, a fraction of the memory.

Tiny GPT-2, fp32, gloo. Loss tolerance rel 1e-5: both strategies average the same per-rank gradients (a sum of two
fp32 numbers is exact in either order), but FSDP computes the clipping norm from per-shard partial sums, so the
clip factor can differ in the last bits; observed differences are ~1e-7 relative.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from kubetune.contract import EXIT_OK, MERGED_DIR
from kubetune.jobfile import write_job
from kubetune.storage import Storage
from tests.trainer_runs import Trainer, gpt2_job, losses, read_output, split_instructions

BATCH, EPOCHS = 8, 1  # 2 x 8 per step, 7 steps
REL = 1e-5
MEMORY_RATIO = 0.6  # the target for weights + optimizer state per rank


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return split_instructions(tmp_path_factory.mktemp("data"))


def run_two(root: Path, model: Path, data: dict[str, Path], strategy: str, method: dict[str, Any] | None = None,
            max_steps: int | None = None) -> dict[str, Any]:
    doc = gpt2_job(strategy, model, data, str(root / "out"), batch_size=BATCH, epochs=EPOCHS, every_steps=100)
    doc["spec"]["hyperparameters"].update(strategy=strategy, maxSteps=max_steps)
    doc["spec"]["method"] = method or {"type": "full"}
    code, out = Trainer(write_job(doc, root / "job.yaml"), root / "state", nproc=2).run()
    assert code == EXIT_OK, out
    storage = Storage()
    return {"metrics": read_output(storage, str(root / "out"), "metrics.json", root / "fetched"),
            "run": read_output(storage, str(root / "out"), "run.json", root / "fetched"), "out": root / "out"}


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory: pytest.TempPathFactory, tiny_gpt2: Path, data: dict[str, Path]) -> dict[str, Any]:
    return {s: run_two(tmp_path_factory.mktemp(s), tiny_gpt2, data, s) for s in ("ddp", "fsdp")}


def test_fsdp_full_fine_tuning_matches_ddp_losses(full_runs: dict[str, Any]) -> None:
    ddp, fsdp = full_runs["ddp"]["metrics"], full_runs["fsdp"]["metrics"]
    assert full_runs["fsdp"]["run"]["strategy"] == "fsdp" and full_runs["ddp"]["run"]["strategy"] == "ddp"
    assert [s for s, _ in losses(fsdp)] == [s for s, _ in losses(ddp)] and len(losses(ddp)) == 7
    assert [v for _, v in losses(fsdp)] == pytest.approx([v for _, v in losses(ddp)], rel=REL)
    assert fsdp["test"]["loss"] == pytest.approx(ddp["test"]["loss"], rel=REL)
    assert fsdp["test"]["loss"] < fsdp["baseTest"]["loss"] - 0.2  # it learned: the comparison means something


def test_fsdp_holds_at_most_60_percent_of_ddp_state_per_rank(full_runs: dict[str, Any]) -> None:
    """Measured by the trainer at the end of training: bytes of the local parameter shards and optimizer state."""
    per_rank = {s: {r["rank"]: r for r in full_runs[s]["run"]["memoryPerRank"]} for s in ("ddp", "fsdp")}
    for rank in (0, 1):
        ddp, fsdp = per_rank["ddp"][rank], per_rank["fsdp"][rank]
        assert ddp["optimizerBytes"] >= 2 * ddp["parameterBytes"]  # AdamW: two moments per weight
        state = {s: r["parameterBytes"] + r["optimizerBytes"] for s, r in (("ddp", ddp), ("fsdp", fsdp))}
        assert state["fsdp"] <= MEMORY_RATIO * state["ddp"], (rank, state)


def test_only_rank_0_reads_the_weights(full_runs: dict[str, Any]) -> None:
    """Ranks other than 0 build the model on the meta device and receive their shard (or replica) from rank 0."""
    for strategy in ("ddp", "fsdp"):
        loaded = {r["rank"]: r["loadedWeights"] for r in full_runs[strategy]["run"]["memoryPerRank"]}
        assert loaded == {0: True, 1: False}, strategy


def test_fsdp_outputs_are_the_full_model(full_runs: dict[str, Any]) -> None:
    """merged/ is gathered from the shards: every tensor at full shape, the same as DDP's within the loss tolerance."""
    ddp = load_file(full_runs["ddp"]["out"] / MERGED_DIR / "model.safetensors")
    fsdp = load_file(full_runs["fsdp"]["out"] / MERGED_DIR / "model.safetensors")
    assert sorted(fsdp) == sorted(ddp)
    for name, tensor in ddp.items():
        assert fsdp[name].shape == tensor.shape, name
        assert (fsdp[name] - tensor).abs().max() < 1e-4, name


# partial mixes frozen and trainable parameters in the shards as lora does: lora stands for both in the default run
@pytest.mark.parametrize("method", [{"type": "lora"},
                                    pytest.param({"type": "partial", "partial": {"trainLastLayers": 1}},
                                                 marks=pytest.mark.slow)])
def test_fsdp_trains_lora_and_partial_like_ddp(method: dict[str, Any], tmp_path: Path, tiny_gpt2: Path,
                                               data: dict[str, Path]) -> None:
    runs = {s: run_two(tmp_path / s, tiny_gpt2, data, s, method, max_steps=4) for s in ("ddp", "fsdp")}
    ddp, fsdp = runs["ddp"]["metrics"], runs["fsdp"]["metrics"]
    assert [v for _, v in losses(fsdp)] == pytest.approx([v for _, v in losses(ddp)], rel=REL)
    assert fsdp["test"]["loss"] == pytest.approx(ddp["test"]["loss"], rel=REL)
    assert fsdp["trainableParameters"] == ddp["trainableParameters"] < fsdp["totalParameters"]
    outputs = sorted(p.name for p in runs["fsdp"]["out"].iterdir())
    assert outputs == sorted(p.name for p in runs["ddp"]["out"].iterdir())
