"""The layers of ADM's networks (guided-diffusion's module tree and state_dict keys): the
timestep embedding, convolutions and GroupNorm32 through the kernel seam (`fastsample.ops`),
the residual and attention blocks, and the classifier's attention pool.

Modules that call a kernel read their network's shared `ops.KernelChoice` (`_kernels`), linked
when the network is built; on their own they run the plain torch ops.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .errors import InputError


def timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding [N, dim] of (possibly fractional) timesteps: cos half first, then sin.

    Evaluated in float32 in the reference's operation order so that it matches bit for bit.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=t.device) / half
    )
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class Conv2d(nn.Conv2d):
    """nn.Conv2d (same parameters and state_dict keys) through the ops seam: pre-packed oneDNN
    weights on the onednn kernels, plain F.conv2d otherwise."""

    _kernels = ops.TORCH  # the owning network's choice (_Network._share_kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.conv2d(self, x, self._kernels.on(x.device))


def _conv(dims: int, *args: Any, **kwargs: Any) -> nn.Module:
    return (nn.Conv1d, Conv2d, nn.Conv3d)[dims - 1](*args, **kwargs)


def _avg_pool(dims: int, *args: Any, **kwargs: Any) -> nn.Module:
    return (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)[dims - 1](*args, **kwargs)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class GroupNorm32(nn.GroupNorm):
    """32-group GroupNorm computed in float32 (see ops.group_norm)."""

    _kernels = ops.TORCH  # the owning network's choice (_Network._share_kernels)

    def __init__(self, channels: int):
        super().__init__(32, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused(x)

    def fused(
        self,
        x: torch.Tensor,
        scale: torch.Tensor | None = None,
        shift: torch.Tensor | None = None,
        silu: bool = False,
    ) -> torch.Tensor:
        """This norm, then `* (1 + scale) + shift` ([N, C]) and SiLU: one kernel on triton."""
        return ops.group_norm(
            x,
            self.num_groups,
            self.weight,
            self.bias,
            self.eps,
            scale=scale,
            shift=shift,
            silu=silu,
            kernels=self._kernels.on(x.device),
            checked=self._kernels.checked(x.device),
        )


class TimestepBlock(nn.Module):
    """A block whose forward also takes the timestep embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest x2 (inner two dims for 3-D), then an optional 3x3 conv (key `conv`)."""

    def __init__(
        self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None
    ):
        super().__init__()
        self.channels, self.dims = channels, dims
        self.use_conv = use_conv
        if use_conv:
            self.conv = _conv(dims, channels, out_channels or channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """Stride-2 3x3 conv, or 2x2 average pool (inner two dims for 3-D); key `op`."""

    def __init__(
        self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None
    ):
        super().__init__()
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = _conv(dims, channels, out_channels or channels, 3, stride=stride, padding=1)
        else:
            self.op = _avg_pool(dims, kernel_size=stride, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding; optionally resamples (up/down)."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        dims: int = 2,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            GroupNorm32(channels), nn.SiLU(), _conv(dims, channels, out_channels, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = (
                Upsample(channels, False, dims),
                Upsample(channels, False, dims),
            )
        elif down:
            self.h_upd = Downsample(channels, False, dims)
            self.x_upd = Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels),
        )
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            _zero(_conv(dims, out_channels, out_channels, 3, padding=1)),
        )
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = _conv(dims, channels, out_channels, 3, padding=1)
        else:
            self.skip_connection = _conv(dims, channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # in_layers = GroupNorm, SiLU, conv; out_layers = GroupNorm, SiLU, dropout, conv. Each
        # GroupNorm + (scale-shift) + SiLU is one fused op on the triton kernels.
        h = self.in_layers[0].fused(x, silu=True)
        if self.updown:
            # Normalise and activate at the input size, resample, then convolve.
            h = self.h_upd(h)
            x = self.x_upd(x)
        h = self.in_layers[2](h)
        e = self.emb_layers(emb).to(h.dtype)
        if self.use_scale_shift_norm:
            scale, shift = torch.chunk(e, 2, dim=1)  # [N, C] each
            h = self.out_layers[0].fused(h, scale=scale, shift=shift, silu=True)
        else:
            e = e.reshape(*e.shape, *([1] * (h.ndim - e.ndim)))  # [N, C, 1, 1]
            h = self.out_layers[0].fused(h + e, silu=True)
        h = self.out_layers[3](self.out_layers[2](h))
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over all spatial positions, with a residual connection."""

    _kernels = ops.TORCH  # the owning network's choice (_Network._share_kernels)

    def __init__(self, channels: int, heads: int, order: str = "legacy"):
        super().__init__()
        if channels % heads:
            raise InputError(f"attention: {channels} channels do not split into {heads} heads")
        self.heads, self.order = heads, order
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, *spatial = x.shape
        kernels = self._kernels.on(x.device)
        if kernels == "onednn" and ops.onednn_eligible(x):
            return self._tokens(x)
        x = x.reshape(n, c, -1)  # [N, C, T]
        h = ops.qkv_attention(self.qkv(self.norm(x)), self.heads, self.order, kernels=kernels,
                              checked=self._kernels.checked(x.device))  # fmt: skip
        return (x + self.proj_out(h)).reshape(n, c, *spatial)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The same block on [N, T, C] tokens (views of channels_last x): the 1x1 projections
        as matmuls, fused attention; returns channels_last."""
        n, c, height, width = x.shape
        tokens = x.permute(0, 2, 3, 1).reshape(n, height * width, c)
        h = self.norm(x).permute(0, 2, 3, 1).reshape(n, height * width, c)
        qkv = ops.linear(self.qkv, h, "onednn")
        h = ops.token_attention(qkv, self.heads, self.order)
        out = ops.linear(self.proj_out, h, "onednn")
        out = out + tokens if out.requires_grad else out.add_(tokens)
        return out.reshape(n, height, width, c).permute(0, 3, 1, 2)


class AttentionPool2d(nn.Module):
    """The classifier's attention-pooling head (CLIP-style): token 0 is the spatial mean.

    Only token 0's output is used. The torch kernels compute every query, as the reference does
    (keeping guidance bit-exact with it), unless first_query_only is set (the fast engine sets
    it); the triton kernels compute query 0 alone."""

    _kernels = ops.TORCH  # the owning network's choice (_Network._share_kernels)
    first_query_only = False

    def __init__(self, spacial_dim: int, embed_dim: int, head_channels: int, output_dim: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(
            torch.randn(embed_dim, spacial_dim**2 + 1) / embed_dim**0.5
        )
        self.qkv_proj = nn.Conv1d(embed_dim, 3 * embed_dim, 1)
        self.c_proj = nn.Conv1d(embed_dim, output_dim, 1)
        self.heads = embed_dim // head_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        x = x.reshape(n, c, -1)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1)  # [N, C, 1 + T]
        x = x + self.positional_embedding[None].to(x.dtype)
        qkv = self.qkv_proj(x)
        kernels = self._kernels.on(x.device)
        queries = 1 if kernels == "triton" or self.first_query_only else None
        out = ops.qkv_attention(qkv, self.heads, "new", queries=queries, kernels=kernels,
                                checked=self._kernels.checked(x.device))  # fmt: skip
        return self.c_proj(out)[:, :, 0]
