"""The kernel seam: every GroupNorm (with its scale-shift and SiLU) and every attention of the
networks goes through here, on one of two backends:

- "torch": plain torch with ADM's numerics, op for op as the reference computes them (the CPU
  path, the export path, and what the kernels are tested against);
- "triton": the fused kernels of `fastsample.kernels` (CUDA; on the CPU only under
  TRITON_INTERPRET=1, for tests).

A network picks its backend once, when it is built, loaded or moved ("auto": triton on CUDA
where Triton is installed, else torch); `model.set_backend(...)` switches it.
"""

from __future__ import annotations

import math
import os

import torch

from fastsample.kernels.reference import group_norm_reference, split_qkv

BACKENDS = ("torch", "triton")


def triton_available() -> bool:
    from fastsample.kernels import _triton

    return _triton.AVAILABLE


def resolve_backend(name: str, device: torch.device | str) -> str:
    """ "auto" -> "triton" on CUDA where Triton is installed, else "torch"; checks the others."""
    device = torch.device(device)
    if name == "auto":
        # (on the CPU without importing Triton at all)
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r}: expected 'auto', 'torch' or 'triton'")
    if name == "triton":
        if not triton_available():
            raise ValueError("backend 'triton' needs Triton: pip install 'fastsample[triton]'")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"backend 'triton' runs on CUDA devices (the network is on {device}); "
                "set TRITON_INTERPRET=1 to interpret the kernels on the CPU"
            )
    return name


def group_norm(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    *,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    silu: bool = False,
    backend: str = "torch",
) -> torch.Tensor:
    """ADM's GroupNorm32 (statistics and affine in float32, result in x's dtype), then
    `* (1 + scale) + shift` (scale, shift: [N, C]) and SiLU when asked."""
    if backend == "triton":
        from fastsample.kernels import group_norm as kernel

        if kernel.supports(x, num_groups):
            return kernel.group_norm(
                x, num_groups, weight, bias, eps, scale=scale, shift=shift, silu=silu
            )
    return group_norm_reference(x, num_groups, weight, bias, eps, scale, shift, silu)


def qkv_attention(
    qkv: torch.Tensor,
    heads: int,
    order: str = "legacy",
    queries: int | None = None,
    backend: str = "torch",
) -> torch.Tensor:
    """Multi-head attention on a fused [N, 3*H*D, T] projection -> [N, H*D, queries or T]
    (layouts: see fastsample.kernels.attention)."""
    if backend == "triton":
        from fastsample.kernels import attention as kernel

        if kernel.supports(qkv, heads):
            return kernel.attention(qkv, heads, order, queries)
    n, width, _ = qkv.shape
    ch = width // (3 * heads)
    q, k, v = split_qkv(qkv, heads, order)
    if queries is not None:
        q = q[..., :queries]
    out = attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
    return out.transpose(-1, -2).reshape(n, heads * ch, out.shape[-2])


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention as ADM computes it: q and k each scaled by head_dim**-0.25 before the
    product, softmax in float32, cast back to the working dtype.

    q: [..., Tq, D], k and v: [..., Tk, D] (any strides) -> [..., Tq, D].
    """
    scale = 1 / math.sqrt(math.sqrt(q.shape[-1]))
    weight = torch.matmul(q * scale, (k * scale).transpose(-1, -2))  # [..., Tq, Tk]
    weight = torch.softmax(weight.float(), dim=-1).to(weight.dtype)
    return torch.matmul(weight, v)


__all__ = ["BACKENDS", "attention", "group_norm", "qkv_attention", "resolve_backend"]
