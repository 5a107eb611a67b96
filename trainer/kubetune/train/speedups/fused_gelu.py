"""GPT-2's tanh-approximated GELU as torch's fused kernel instead of seven element-wise operations.

Why: transformers' `gelu_new` and `gelu_fast` (GPT-2, GPT-J, CodeGen, Phi and others) spell the tanh
approximation out in Python — pow, three muls, two adds and a tanh, each a pass over the MLP's widest
activation, forward and backward. `F.gelu(x, approximate="tanh")` computes the same function in one pass:
3× faster forward + backward on an 8 × 256 × 1024 tensor (2-core EPYC, fp32), outputs within 2.4e-7 and
gradients within 7.2e-7 of the spelled-out form (tests/test_fused_gelu.py). Only the activation modules
are swapped; weights, config and saved model are untouched (config.json still says `gelu_new`).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import FastGELUActivation, NewGELUActivation

_SPELLED_OUT = (NewGELUActivation, FastGELUActivation)


class TanhGELU(nn.Module):
    # Not transformers' GELUTanh: that class may swap in a kernel from the Hugging Face Hub when `kernels` is
    # installed, and the trainer loads nothing from a hub.
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(input, approximate="tanh")


def fuse_tanh_gelu(model: nn.Module) -> int:
    """Swap every spelled-out tanh GELU module for the fused one; returns how many were swapped."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in _SPELLED_OUT:
                setattr(parent, name, TanhGELU())
                swapped += 1
    return swapped
