"""The kernel seam: every GroupNorm and attention of the networks goes through here.

The functions below are the plain-torch definitions with ADM's numerics; they are the CPU path,
the export path and the reference that faster kernels are tested against.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """ADM's GroupNorm32: statistics and affine in float32, result cast back to x's dtype."""
    if weight is not None:
        weight = weight.float()
    if bias is not None:
        bias = bias.float()
    return F.group_norm(x.float(), num_groups, weight, bias, eps).to(x.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention as ADM computes it: q and k each scaled by head_dim**-0.25 before the
    product, softmax in float32, cast back to the working dtype.

    q: [..., Tq, D], k and v: [..., Tk, D] (any strides) -> [..., Tq, D].
    """
    scale = 1 / math.sqrt(math.sqrt(q.shape[-1]))
    weight = torch.matmul(q * scale, (k * scale).transpose(-1, -2))  # [..., Tq, Tk]
    weight = torch.softmax(weight.float(), dim=-1).to(weight.dtype)
    return torch.matmul(weight, v)
