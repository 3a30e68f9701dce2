"""GroupNorm fused with ADM's scale-shift and SiLU, forward and backward, in Triton.

    y = GroupNorm(x) * weight + bias              statistics in float32 over each (sample, group)
    y = y * (1 + scale) + shift                   when scale/shift [N, C] are given
    y = y * sigmoid(y)                            when silu

One program normalises one (sample, group): a first pass accumulates the group's shifted sum and
sum of squares in float32 (shifted by the group's first element, which keeps the variance exact
for data far from zero), a second pass writes y. x and y are [N, C, *spatial], NCHW-contiguous or
channels-last; y keeps x's dtype and layout. The backward kernel recomputes the chain from x and
the saved statistics and returns the gradients of x, weight, bias, scale and shift (classifier
guidance differentiates through every GroupNorm of the classifier).

`group_norm_reference` is the plain-torch definition with ADM's numerics (GroupNorm32 in float32,
cast back, then scale-shift and SiLU in the working dtype), the CPU and export path.
"""

from __future__ import annotations

import torch

from ._triton import tl, triton
from .reference import group_norm_reference  # noqa: F401  (re-exported)

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _layout(x: torch.Tensor) -> tuple[int, int, int]:
    """(sample, channel, flattened-spatial) strides of a contiguous or channels-last tensor."""
    if x.ndim < 3:
        return x.stride(0), x.stride(1), 1
    return x.stride(0), x.stride(1), x.stride(-1)


def _spatial_ok(x: torch.Tensor) -> bool:
    """The flattened spatial index must map to memory with one stride: always so for one
    spatial dim (e.g. [N, C, T] tokens viewed from a channels-last map, as attention blocks
    normalise them)."""
    if x.ndim == 3 or x.is_contiguous():
        return True
    if x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return True
    return x.ndim == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)


def supports(x: torch.Tensor, num_groups: int) -> bool:
    """Whether the Triton kernels take this input (else use group_norm_reference)."""
    return (
        x.dtype in _DTYPES
        and x.ndim >= 3
        and x.shape[1] % num_groups == 0
        and x.numel() > 0
        and _spatial_ok(x)
    )


def check_inputs(x, num_groups, weight, bias, scale, shift) -> None:
    """One clear error for inputs the kernels cannot take."""
    if x.dtype not in _DTYPES:
        raise TypeError(f"group_norm: x has dtype {x.dtype}; expected float32, float16 or bfloat16")
    if x.ndim < 3:
        raise ValueError(f"group_norm: x of shape {tuple(x.shape)}; expected [N, C, *spatial]")
    c = x.shape[1]
    if num_groups < 1 or c % num_groups:
        raise ValueError(f"group_norm: {c} channels do not split into {num_groups} groups")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (c,):
            raise ValueError(f"group_norm: {name} of shape {tuple(t.shape)}; expected ({c},)")
    if (scale is None) != (shift is None):
        raise ValueError("group_norm: give scale and shift together")
    for name, t in (("scale", scale), ("shift", shift)):
        if t is not None and tuple(t.shape) != (x.shape[0], c):
            raise ValueError(
                f"group_norm: {name} of shape {tuple(t.shape)}; expected ({x.shape[0]}, {c})"
            )
    if not _spatial_ok(x):
        raise ValueError("group_norm: x must be contiguous or channels-last")


def _block(hw: int) -> int:
    return max(16, min(1024, triton.next_power_of_2(hw)))


@triton.jit
def _channel_affine(W, B, SCALE, SHIFT, n, ssn, ch, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                    HAS_SS: tl.constexpr):  # fmt: skip
    """Channel ch's weight, bias and (sample n's) 1 + scale and shift, in float32; the
    identity where absent."""
    w = 1.0
    b = 0.0
    sc = 1.0
    sh = 0.0
    if HAS_W:
        w = tl.load(W + ch).to(tl.float32)
    if HAS_B:
        b = tl.load(B + ch).to(tl.float32)
    if HAS_SS:
        sc = 1.0 + tl.load(SCALE + n * ssn + ch).to(tl.float32)
        sh = tl.load(SHIFT + n * ssn + ch).to(tl.float32)
    return w, b, sc, sh


@triton.jit
def _forward_kernel(
    X, Y, W, B, SCALE, SHIFT, MEAN, RSTD,
    HW, G, CPG,
    sxn, sxc, sxh, syn, syc, syh, ssn,
    eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SS: tl.constexpr, SILU: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    n = pid // G
    g = pid % G
    offs = tl.arange(0, BLOCK)
    x_group = X + n * sxn + g * CPG * sxc
    pivot = tl.load(x_group).to(tl.float32)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK], dtype=tl.float32)
    for c in range(0, CPG):
        for start in range(0, HW, BLOCK):
            idx = start + offs
            mask = idx < HW
            v = tl.load(x_group + c * sxc + idx * sxh, mask=mask, other=0.0).to(tl.float32)
            d = tl.where(mask, v - pivot, 0.0)
            acc += d
            acc2 += d * d
    count = (CPG * HW).to(tl.float32)
    mean_shifted = tl.sum(acc, axis=0) / count
    var = tl.maximum(tl.sum(acc2, axis=0) / count - mean_shifted * mean_shifted, 0.0)
    mean = mean_shifted + pivot
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(MEAN + pid, mean)
    tl.store(RSTD + pid, rstd)
    y_group = Y + n * syn + g * CPG * syc
    for c in range(0, CPG):
        ch = g * CPG + c
        w, b, sc, sh = _channel_affine(W, B, SCALE, SHIFT, n, ssn, ch, HAS_W, HAS_B, HAS_SS)
        a = w * rstd
        a0 = b - mean * a
        for start in range(0, HW, BLOCK):
            idx = start + offs
            mask = idx < HW
            v = tl.load(x_group + c * sxc + idx * sxh, mask=mask, other=0.0).to(tl.float32)
            y = v * a + a0
            if HAS_SS:
                y = y * sc + sh
            if SILU:
                y = y * tl.sigmoid(y)
            tl.store(y_group + c * syc + idx * syh, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _backward_kernel(
    DY, X, W, B, SCALE, SHIFT, MEAN, RSTD,
    DX, DW, DB, DSCALE, DSHIFT,
    HW, G, CPG, C,
    sxn, sxc, sxh, sdn, sdc, sdh, ssn,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_SS: tl.constexpr, SILU: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    n = pid // G
    g = pid % G
    offs = tl.arange(0, BLOCK)
    mean = tl.load(MEAN + pid)
    rstd = tl.load(RSTD + pid)
    x_group = X + n * sxn + g * CPG * sxc
    dy_group = DY + n * sdn + g * CPG * sdc
    sum1 = tl.zeros([BLOCK], dtype=tl.float32)
    sum2 = tl.zeros([BLOCK], dtype=tl.float32)
    for c in range(0, CPG):
        ch = g * CPG + c
        w, b, sc, sh = _channel_affine(W, B, SCALE, SHIFT, n, ssn, ch, HAS_W, HAS_B, HAS_SS)
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        db = tl.zeros([BLOCK], dtype=tl.float32)
        dsc = tl.zeros([BLOCK], dtype=tl.float32)
        dsh = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, HW, BLOCK):
            idx = start + offs
            mask = idx < HW
            v = tl.load(x_group + c * sxc + idx * sxh, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_group + c * sdc + idx * sdh, mask=mask, other=0.0).to(tl.float32)
            xhat = (v - mean) * rstd
            a = xhat * w + b
            s = a * sc + sh  # sc = 1, sh = 0 without scale-shift
            ds = dy
            if SILU:
                sig = tl.sigmoid(s)
                ds = dy * sig * (1.0 + s * (1.0 - sig))
            da = ds * sc
            ds = tl.where(mask, ds, 0.0)
            da = tl.where(mask, da, 0.0)
            dsc += ds * a
            dsh += ds
            db += da
            dw += da * xhat
            dxhat = da * w
            sum1 += dxhat
            sum2 += dxhat * xhat
        if HAS_SS:
            tl.store(DSCALE + n * C + ch, tl.sum(dsc, axis=0))
            tl.store(DSHIFT + n * C + ch, tl.sum(dsh, axis=0))
        tl.store(DW + n * C + ch, tl.sum(dw, axis=0))
        tl.store(DB + n * C + ch, tl.sum(db, axis=0))
    count = (CPG * HW).to(tl.float32)
    mean1 = tl.sum(sum1, axis=0) / count
    mean2 = tl.sum(sum2, axis=0) / count
    dx_group = DX + n * sxn + g * CPG * sxc
    for c in range(0, CPG):
        ch = g * CPG + c
        w, b, sc, sh = _channel_affine(W, B, SCALE, SHIFT, n, ssn, ch, HAS_W, HAS_B, HAS_SS)
        for start in range(0, HW, BLOCK):
            idx = start + offs
            mask = idx < HW
            v = tl.load(x_group + c * sxc + idx * sxh, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_group + c * sdc + idx * sdh, mask=mask, other=0.0).to(tl.float32)
            xhat = (v - mean) * rstd
            a = xhat * w + b
            s = a * sc + sh  # sc = 1, sh = 0 without scale-shift
            ds = dy
            if SILU:
                sig = tl.sigmoid(s)
                ds = dy * sig * (1.0 + s * (1.0 - sig))
            da = ds * sc
            dx = rstd * (da * w - mean1 - xhat * mean2)
            tl.store(dx_group + c * sxc + idx * sxh, dx.to(DX.dtype.element_ty), mask=mask)


def _dummy(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(1, device=x.device, dtype=torch.float32)


def forward(x, num_groups, weight, bias, eps, scale, shift, silu):
    """-> (y, mean [N*G], rstd [N*G]) from the Triton kernel."""
    n, c = x.shape[:2]
    hw = x.numel() // (n * c)
    y = torch.empty_like(x)  # same layout as x
    mean = torch.empty(n * num_groups, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    has_ss = scale is not None
    sxn, sxc, sxh = _layout(x)
    syn, syc, syh = _layout(y)
    scale_c = scale.contiguous() if has_ss else _dummy(x)
    shift_c = shift.contiguous() if has_ss else _dummy(x)
    _forward_kernel[(n * num_groups,)](
        x, y,
        weight if weight is not None else _dummy(x),
        bias if bias is not None else _dummy(x),
        scale_c, shift_c, mean, rstd,
        hw, num_groups, c // num_groups,
        sxn, sxc, sxh, syn, syc, syh, c,
        eps,
        HAS_W=weight is not None, HAS_B=bias is not None, HAS_SS=has_ss, SILU=bool(silu),
        BLOCK=_block(hw),
    )  # fmt: skip
    return y, mean, rstd


def backward(dy, x, num_groups, weight, bias, scale, shift, silu, mean, rstd):
    """-> (dx, dweight, dbias, dscale, dshift); None where the input was None."""
    n, c = x.shape[:2]
    hw = x.numel() // (n * c)
    if not _spatial_ok(dy) or _layout(dy) != _layout(x):
        dy = dy.contiguous(memory_format=_memory_format(x))
    dx = torch.empty_like(x)
    has_ss = scale is not None
    f32 = dict(device=x.device, dtype=torch.float32)
    dw = torch.empty(n, c, **f32)
    db = torch.empty(n, c, **f32)
    dscale = torch.empty(n, c, **f32) if has_ss else _dummy(x)
    dshift = torch.empty(n, c, **f32) if has_ss else _dummy(x)
    sxn, sxc, sxh = _layout(x)
    sdn, sdc, sdh = _layout(dy)
    _backward_kernel[(n * num_groups,)](
        dy, x,
        weight if weight is not None else _dummy(x),
        bias if bias is not None else _dummy(x),
        scale.contiguous() if has_ss else _dummy(x),
        shift.contiguous() if has_ss else _dummy(x),
        mean, rstd, dx, dw, db, dscale, dshift,
        hw, num_groups, c // num_groups, c,
        sxn, sxc, sxh, sdn, sdc, sdh, c,
        HAS_W=weight is not None, HAS_B=bias is not None, HAS_SS=has_ss, SILU=bool(silu),
        BLOCK=_block(hw),
    )  # fmt: skip
    grads = [
        dx,
        dw.sum(0).to(weight.dtype) if weight is not None else None,
        db.sum(0).to(bias.dtype) if bias is not None else None,
        dscale.to(scale.dtype) if has_ss else None,
        dshift.to(shift.dtype) if has_ss else None,
    ]
    return tuple(grads)


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.ndim == 5 and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


# -- the custom op: traceable by torch.compile / torch.export, differentiable --------------------


@torch.library.custom_op("fastsample::group_norm", mutates_args=())
def _group_norm_op(
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    silu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return forward(x, num_groups, weight, bias, eps, scale, shift, silu)


@_group_norm_op.register_fake
def _(x, num_groups, weight, bias, eps, scale, shift, silu):
    stats = x.new_empty(x.shape[0] * num_groups, dtype=torch.float32)
    return torch.empty_like(x), stats, torch.empty_like(stats)


@torch.library.custom_op("fastsample::group_norm_backward", mutates_args=())
def _group_norm_backward_op(
    dy: torch.Tensor,
    x: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    silu: bool,
    mean: torch.Tensor,
    rstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = backward(dy, x, num_groups, weight, bias, scale, shift, silu, mean, rstd)
    return tuple(x.new_empty(0) if g is None else g for g in grads)  # outputs may not alias


@_group_norm_backward_op.register_fake
def _(dy, x, num_groups, weight, bias, scale, shift, silu, mean, rstd):
    def like(t):
        return x.new_empty(0) if t is None else torch.empty_like(t)

    return torch.empty_like(x), like(weight), like(bias), like(scale), like(shift)


def _setup_context(ctx, inputs, output):
    x, num_groups, weight, bias, eps, scale, shift, silu = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd)
    ctx.num_groups, ctx.silu = num_groups, silu


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, scale, shift, mean, rstd = ctx.saved_tensors
    dx, dw, db, dscale, dshift = _group_norm_backward_op(
        dy, x, ctx.num_groups, weight, bias, scale, shift, ctx.silu, mean, rstd
    )
    return (
        dx,
        None,
        dw if weight is not None else None,
        db if bias is not None else None,
        None,
        dscale if scale is not None else None,
        dshift if shift is not None else None,
        None,
    )


_group_norm_op.register_autograd(_backward, setup_context=_setup_context)


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
) -> torch.Tensor:
    """The fused op (see the module doc); scale and shift are [N, C]."""
    check_inputs(x, num_groups, weight, bias, scale, shift)
    y, _, _ = _group_norm_op(x, num_groups, weight, bias, float(eps), scale, shift, bool(silu))
    return y
