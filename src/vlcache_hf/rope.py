"""Re-rotating cached keys to new positions.

Keys are cached after RoPE: k_cached = R(p_old) k. RoPE rotations compose, R(a) R(b) = R(a + b), so the key
the model would compute at p_new is R(p_new - p_old) k_cached. With M-RoPE each frequency pair follows one
position axis, so the same holds per axis with a per-axis delta; moving a whole image shifts every axis by
the same delta. The cos/sin of the delta come from the model's own rotary module (through the adapter), so
any frequency layout (sections, interleaving, scaling) is honoured.
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The (-x2, x1) half rotation used by Llama-style RoPE (Qwen, LLaVA's LLMs)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotation(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `keys` [..., n, head_dim] by cos/sin [1, n, head_dim] (broadcast over leading dims).

    Computed in float32 and cast back, so bf16 caches lose no more than one rounding.
    """
    k = keys.float()
    out = k * cos.float() + rotate_half(k) * sin.float()
    return out.to(keys.dtype)


def position_delta(new_positions: torch.Tensor, old_positions: torch.Tensor) -> torch.Tensor:
    """Per-axis, per-token delta [num_axes, n] between where tokens sit now and where they were cached."""
    if new_positions.shape != old_positions.shape:
        raise ValueError(f"position shapes differ: {tuple(new_positions.shape)} vs {tuple(old_positions.shape)}")
    return new_positions.to(torch.long) - old_positions.to(device=new_positions.device, dtype=torch.long)
