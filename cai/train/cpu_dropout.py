"""LoRA dropout on a CPU that draws one random number per *dropped* element, not one per element.

    from cai.train import cpu_dropout; cpu_dropout.replace_lora_dropout(trainer.model)  # done by cai's trainers

Why cai owns this. peft applies `nn.Dropout` to the input of every LoRA module (210 of them
for the builtin model with `all-linear`), and torch draws a Bernoulli variable per element on
the CPU at ~5 ns each: 0.43 s of a 2.8 s SFT step on the quickstart's batches (profiled), and
the same share of every reward-model and DPO step.

`GapDropout` draws the same thing differently: in a sequence of independent Bernoulli(p)
trials the gaps between successive successes are independent Geometric(p) variables, so
drawing the gaps and accumulating them gives the dropped positions exactly, with about p·n
draws instead of n (p = 0.05: 1/20 of the random numbers). Kept elements are scaled by
1/(1-p) as in `nn.Dropout`, and in eval mode (or at p = 0) it is the identity. No mask tensor
is built: forward and backward scale the whole tensor and zero the dropped positions, and only
those positions (~p·n indices) are kept for backward (`_ScaleAndDrop`), which is one full-size
write less per LoRA module than `x * mask` and the same numbers bit for bit. The random stream
differs from torch's, so a run's losses differ from the `nn.Dropout` ones in the way two seeds
differ. GPUs draw fast and keep `nn.Dropout`.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def dropped_positions(n: int, p: float, draws: int | None = None) -> torch.Tensor:
    """Flat indices in [0, n) each dropped independently with probability p (gap sampling), drawn
    `draws` gaps at a time (default: enough to pass n but ~1e-15 of the time; then more are drawn)."""
    if n == 0 or p <= 0:
        return torch.empty(0, dtype=torch.long)
    mean = n * p
    draws = draws or int(mean + 8 * math.sqrt(mean) + 16)
    positions = torch.empty(0, dtype=torch.long)
    last = -1
    while last < n - 1:
        gaps = torch.empty(draws, dtype=torch.float64).geometric_(p)
        more = gaps.cumsum_(0).add_(last).long()  # gaps >= 1: the next dropped index after `last`
        positions = torch.cat([positions, more])
        last = int(more[-1])
    return positions[positions < n]


class _ScaleAndDrop(torch.autograd.Function):
    """x * mask for the mask that is `scale` everywhere and 0 at `positions` (flat indices of a
    contiguous tensor), without materialising the mask."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, positions: torch.Tensor, scale: float) -> torch.Tensor:
        out = x.contiguous() * scale
        out.view(-1)[positions] = 0
        ctx.save_for_backward(positions)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (positions,) = ctx.saved_tensors
        grad_x = grad.contiguous() * ctx.scale
        grad_x.view(-1)[positions] = 0
        return grad_x, None, None


class GapDropout(nn.Module):
    """`nn.Dropout(p)` in distribution, with gap-sampled masks (see the module docstring)."""

    def __init__(self, p: float):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return _ScaleAndDrop.apply(x, dropped_positions(x.numel(), self.p), 1 / (1 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def replace_lora_dropout(model: nn.Module) -> int:
    """Swap the `nn.Dropout` of every LoRA layer of `model` on a CPU for `GapDropout` of the same p;
    returns how many were swapped (0 on another device or without LoRA dropout)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return 0
    swapped = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for name, dropout in list(module.lora_dropout.items()):
            weight = module.lora_A[name].weight if name in module.lora_A else None
            if type(dropout) is nn.Dropout and dropout.p > 0 and weight is not None and weight.device.type == "cpu":
                module.lora_dropout[name] = GapDropout(dropout.p)
                swapped += 1
    return swapped
