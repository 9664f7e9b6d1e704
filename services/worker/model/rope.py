"""Rotary position embeddings (non-interleaved, as in Hugging Face Llama), incl. llama3 scaling."""

from __future__ import annotations

import math

import torch


def inv_frequencies(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    # Computed on the CPU even under a meta-device context (the loader's), whose reference ops
    # would import torch._dynamo: ~0.9 s of a worker's start.
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / float(scaling["factor"])
    # llama3: long wavelengths divided by `factor`, short ones kept, smooth in between.
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(torch.nn.Module):
    """cos/sin tables for every position, computed once in fp32 and cast to the model dtype."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None, dtype):
        super().__init__()
        inv_freq = inv_frequencies(head_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32, device="cpu"), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_positions, head_dim]
        self.register_buffer("cos", emb.cos().to(dtype), persistent=False)
        # sin with its first half negated: rotate_half(x) * sin == roll(x, D/2) * signed_sin bit
        # for bit (negation is exact), one roll instead of slice, negate and concatenate.
        sin = emb.sin().to(dtype)
        sin[:, : head_dim // 2].neg_()
        self.register_buffer("signed_sin", sin, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T] -> (cos, signed_sin) [T, 1, head_dim], shared by every layer of a forward pass."""
        return self.cos[positions].unsqueeze(1), self.signed_sin[positions].unsqueeze(1)


def apply_rotary(x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x: [T, heads, D] (q and k heads side by side) -> rotated copy, as Hugging Face's
    `x * cos + rotate_half(x) * sin`, where rotate_half(x) = cat(-x[D/2:], x[:D/2])."""
    cos, signed_sin = rotary  # [T, 1, D]
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin
