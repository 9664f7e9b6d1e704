"""CPU linears with oneDNN-prepacked weights.

`F.linear` on CPU re-lays out the weight on every call; for the small, memory-bound GEMMs of
decode that costs more than the multiply (the tiny model's lm_head at batch 1: 1.2 ms -> 0.3 ms
in bf16, 6.4 ms -> 1.7 ms in fp32, 2 threads). The bf16 result is bit-identical to `F.linear`; the
fp32 one differs in the last bits (a different summation order, as any batch size change gives).
"""

from __future__ import annotations

import torch
from torch import nn


def prepacking_supported(dtype: torch.dtype) -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return dtype == torch.float32


class PackedLinear(nn.Module):
    """y = x @ weight.T + bias, with the weight held in oneDNN's blocked layout."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with torch.no_grad():
            # The batch-size hint only picks the initial layout; any number of rows works.
            self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 16)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, in_features] -> [T, out_features]
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_linears(model: nn.Module) -> int:
    """Replace every `nn.Linear` of a CPU model with a `PackedLinear`; returns how many."""
    swaps = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear and child.weight.device.type == "cpu"
        and prepacking_supported(child.weight.dtype)
    ]
    for parent, name, child in swaps:
        setattr(parent, name, PackedLinear(child))
    return len(swaps)
