"""Run under `torchrun --nproc-per-node 2 -m tests.resume_probe ENDPOINT BUCKET OUT_DIR`: two ranks that play
two nodes (each its own local rank 0 and work dir) save an FSDP checkpoint to S3, then each fetches what it needs
to resume and loads it into a fresh model. Each rank writes OUT_DIR/rank-<R>.json (tests/test_sharded_resume.py)."""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from kubetune.spec import StorageSpec
from kubetune.storage import Storage
from kubetune.train import checkpoint, distributed, sharded_checkpoint, sharding
from kubetune.train.model import trainable_state
from kubetune.train.precision import choose_precision

FP32 = choose_precision("fp32", torch.device("cpu"))


def sharded_gpt2() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """As the trainer loads it: rank 0 holds the weights, rank 1 an empty model; both get their shards."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=300, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    if distributed.is_main():
        model = GPT2LMHeadModel(config)
        full: dict[str, torch.Tensor] | None = model.state_dict()
    else:
        with torch.device("meta"):
            model = GPT2LMHeadModel(config)
        full = None
    model = sharding.wrap(model, full, "fsdp", torch.device("cpu"), FP32, False)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def run(storage: Storage, root: str, work: Path) -> dict[str, Any]:
    model, optimizer = sharded_gpt2()
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(distributed.rank()))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    best = trainable_state(model)
    state = {"step": 1, "identity": {"probe": True}, "rng": [checkpoint.rng_state()]}
    sharded_checkpoint.save(storage, root, model, optimizer, best, state, work / "staging", keep_last=2)

    fresh, fresh_optimizer = sharded_gpt2()

    def needs(path: Path) -> list[str]:  # as the recipe's _shards_to_read
        saved = checkpoint.load(path)
        return sharded_checkpoint.needed_files(path, fresh, fresh_optimizer, saved["hasBest"])

    found = checkpoint.find_latest(storage, root, work / "resume", needs=needs)
    assert found is not None, "no checkpoint found"
    _, folder = found
    fetched = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    restored = sharded_checkpoint.load(folder, fresh, fresh_optimizer, checkpoint.load(folder))
    same_weights = all(torch.equal(a.to_local(), b.to_local())  # type: ignore[attr-defined]
                       for a, b in zip(model.parameters(), fresh.parameters(), strict=True))
    moments = [(optimizer.state[a], fresh_optimizer.state[b])
               for a, b in zip(model.parameters(), fresh.parameters(), strict=True)]
    same_optimizer = all(torch.equal(x["exp_avg"].to_local(), y["exp_avg"].to_local())
                         and float(x["step"]) == float(y["step"]) for x, y in moments)
    same_best = restored is not None and all(torch.equal(restored[n].to_local(), t.to_local())  # type: ignore
                                             for n, t in best.items())
    return {"fetched": fetched, "weights": same_weights, "optimizer": same_optimizer, "best": same_best}


def main(endpoint: str, bucket: str, out: Path) -> None:
    os.environ.update(LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")  # one process per "node" (kubetune reads them late)
    distributed.init()
    work = out / f"node-{distributed.rank()}"
    try:
        result = run(Storage(StorageSpec(endpoint=endpoint)), f"s3://{bucket}/checkpoints", work)
    except Exception as exc:
        result = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
    (out / f"rank-{distributed.rank()}.json").write_text(json.dumps(result))
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
