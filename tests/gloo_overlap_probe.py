"""Run under `torchrun --nproc-per-node 2`: kubetune's FSDP on gloo (sharding.shard: all-reduce collectives,
async prefetch) against torch's own fully_shard on the same model and batches. Rank 0 prints one JSON object."""

from __future__ import annotations

import copy
import json
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from transformers import GPT2Config, GPT2LMHeadModel

from kubetune.train import sharding
from kubetune.train.precision import choose_precision
from kubetune.train.speedups import gloo_overlap

calls = {"all_gather": 0, "reduce_scatter": 0}


def counted(cls: Any, name: str) -> None:
    original = cls.__call__

    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls[name] += 1
        return original(self, *args, **kwargs)

    cls.__call__ = call


def train(model: torch.nn.Module, batches: list[torch.Tensor]) -> tuple[list[float], dict[str, torch.Tensor]]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for ids in batches:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model(input_ids=batches[0], labels=batches[0]).loss.backward()
    return losses, {n: p.grad.to_local().clone() for n, p in model.named_parameters()}  # type: ignore[union-attr]


def main() -> None:
    dist.init_process_group("gloo")
    counted(gloo_overlap.AllReduceAllGather, "all_gather")
    counted(gloo_overlap.AllReduceReduceScatter, "reduce_scatter")
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=64, n_embd=64, n_layer=3, n_head=4,
                                      resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))
    generator = torch.Generator().manual_seed(dist.get_rank())  # each rank its own data, as in training
    batches = [torch.randint(0, 300, (4, 64), generator=generator) for _ in range(4)]
    plain = copy.deepcopy(base)
    for block in plain.transformer.h:
        fully_shard(block)
    fully_shard(plain)
    ours = sharding.shard(copy.deepcopy(base), choose_precision("fp32", torch.device("cpu")), False)
    plain_losses, plain_grads = train(plain, batches)
    our_losses, our_grads = train(ours, batches)
    if dist.get_rank() == 0:
        print(json.dumps({"plain": plain_losses, "ours": our_losses, "calls": calls,
                          "identicalGradients": all(torch.equal(plain_grads[n], our_grads[n]) for n in plain_grads)}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
