"""Plain-torch references of the kernels: the reference implementation's arithmetic, op for op.

They are the "torch" backend of fastsample.ops (the CPU and export path) and what the Triton
kernels are tested against. This module imports no Triton.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def group_norm_reference(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    silu: bool = False,
) -> torch.Tensor:
    """ADM's ops, unfused: GroupNorm32, then `h * (1 + scale) + shift`, then SiLU."""
    y = F.group_norm(
        x.float(),
        num_groups,
        None if weight is None else weight.float(),
        None if bias is None else bias.float(),
        eps,
    ).to(x.dtype)
    if scale is not None or shift is not None:
        shape = (*scale.shape, *([1] * (x.ndim - 2)))
        y = y * (1 + scale.reshape(shape).to(y.dtype)) + shift.reshape(shape).to(y.dtype)
    if silu:
        y = F.silu(y)
    return y


def split_qkv(qkv: torch.Tensor, heads: int, order: str):
    """Views q, k, v [B, H, D, T] of a [B, 3*H*D, T] projection: "legacy" rows are grouped per
    head (h*3D + p*D + d), "new" rows per component (p*H*D + h*D + d)."""
    b, width, length = qkv.shape
    ch = width // (3 * heads)
    if order == "legacy":
        return qkv.reshape(b, heads, 3, ch, length).unbind(2)
    return qkv.reshape(b, 3, heads, ch, length).unbind(1)


def attention_reference(
    qkv: torch.Tensor, heads: int, order: str = "legacy", queries: int | None = None
) -> torch.Tensor:
    """ADM's attention (QKVAttentionLegacy / QKVAttention): q and k each scaled by
    head_dim**-0.25 before the product, softmax in float32, cast back to the working dtype.
    Products as matmuls on [B, H, T, D] views (einsum in the reference; the same sums), which
    every exporter lowers in every dtype. [B, 3*H*D, T] -> [B, H*D, queries or T]."""
    b, width, length = qkv.shape
    ch = width // (3 * heads)
    q, k, v = (p.transpose(-1, -2) for p in split_qkv(qkv, heads, order))  # [B, H, T, D]
    if queries is not None:
        q = q[..., :queries, :]
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.matmul(q * scale, (k * scale).transpose(-1, -2))  # [B, H, Tq, Tk]
    weight = torch.softmax(weight.float(), dim=-1).to(weight.dtype)
    out = torch.matmul(weight, v)  # [B, H, Tq, D]
    return out.transpose(-1, -2).reshape(b, heads * ch, out.shape[-2])
