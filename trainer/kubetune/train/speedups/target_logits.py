"""Causal LM: the output layer runs only at positions that have a target.

Why: the loss reads the logits of completion tokens only (labels = -100 on prompts, padding and a packed
row's tail), yet a model's forward projects every position onto the whole vocabulary. That projection is the
largest matmul of a small LM (GPT-2 with n_embd 256: about 80% of the forward FLOPs, vocabulary 50257) and its
fp32 logits are the largest activation of a large one (8 rows × 2048 tokens × a 128k vocabulary = 8.6 GB, and
as much again for their gradient). Here a forward pre-hook on the output layer keeps the hidden states of the
target positions only, so the model returns logits of shape (targets, vocabulary), in the row-major order of
`labels[:, 1:]`'s targets, which `labels_for` hands to `evaluate.summed_loss`. The same matmuls run for the
kept rows, so the loss is the full-logits loss up to float rounding (tests/test_target_logits.py).

The hook sits on the module the model itself calls (`get_output_embeddings()`, through peft, DDP and FSDP
alike), so no wrapper's forward is bypassed. A model without one keeps its full logits.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import torch
from torch import nn

from kubetune.data.encode import IGNORE_INDEX
from kubetune.train.batching import to_device


class TargetLogits:
    """Within `with`: `model`'s causal-LM forward returns logits for the target positions of the batch only.

    `host_labels` are the collated batch's labels on the host (the positions are found there, so a GPU is never
    made to wait for a boolean selection, a host-device sync per micro-batch); `labels` the same on the device.
    Classification, or a model without an output layer to hook, keeps its full logits.
    """

    def __init__(self, model: nn.Module, task: str, host_labels: torch.Tensor, labels: torch.Tensor) -> None:
        self.labels = labels
        output_layer = getattr(model, "get_output_embeddings", None) if task == "causal-lm" else None
        head = output_layer() if callable(output_layer) else None  # transformers' models, through peft too
        self.head = head if isinstance(head, nn.Module) else None
        self.handle: Any = None
        if self.head is not None:
            following = host_labels[:, 1:]
            targets = following != IGNORE_INDEX
            # Position t predicts token t + 1: it is kept when labels[:, t + 1] is a target.
            keep = torch.cat([targets, torch.zeros((len(host_labels), 1), dtype=torch.bool)], dim=1)
            self.rows = to_device(keep.flatten().nonzero().squeeze(1), labels.device)
            self.targets = to_device(following[targets], labels.device)  # row-major, the order of `rows`
            self.width = host_labels.shape[1]

    def _select(self, _module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        hidden = args[0]
        if hidden.dim() != 3 or hidden.shape[1] != self.width:  # not the (batch, length) the labels describe
            return args
        return (hidden.flatten(0, 1).index_select(0, self.rows), *args[1:])

    def labels_for(self, logits: torch.Tensor) -> torch.Tensor:
        """What the loss pairs `logits` with: the targets for selected (2-D) causal-LM logits, else the labels."""
        return self.targets if self.head is not None and logits.dim() == 2 else self.labels

    def __enter__(self) -> TargetLogits:
        if self.head is not None:
            self.handle = self.head.register_forward_pre_hook(self._select)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
