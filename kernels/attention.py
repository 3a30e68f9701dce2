"""ADM's multi-head attention on a fused qkv projection, forward and backward, in Triton.

    attention(qkv [B, 3*H*D, T], heads, order, queries=None) -> [B, H*D, queries or T]

q, k and v are read in place from the projection in either checkpoint layout: "legacy" rows are
grouped per head (h*3D + p*D + d), "new" rows per component (p*H*D + h*D + d), p = 0, 1, 2 for
q, k, v. The output channel of head h, dimension d is h*D + d. Scores are (q . k) / sqrt(D) (ADM
scales q and k by D^-1/4 each), softmax in float32 with the online (flash-attention) update: no
[T, T] matrix is ever stored. `queries=n` computes only the first n queries (the classifier's
attention pool reads query 0 alone).

The backward (for classifier guidance) recomputes the probabilities from the saved row
log-sum-exps: one kernel accumulates dK and dV per key block, one dQ per query block, both written
straight into a [B, 3*H*D, T] gradient laid out like qkv.
"""

from __future__ import annotations

import math

import torch

from ._triton import tl, triton
from .reference import attention_reference  # noqa: F401  (re-exported)

ORDERS = ("legacy", "new")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _strides(order: str, heads: int, ch: int) -> tuple[int, int]:
    """(channel offset between heads, channel offset from q to k) in the qkv rows."""
    return (3 * ch, ch) if order == "legacy" else (ch, heads * ch)


def supports(qkv: torch.Tensor, heads: int) -> bool:
    if qkv.ndim != 3 or qkv.dtype not in _DTYPES or heads < 1:
        return False
    width = qkv.shape[1]
    return width % (3 * heads) == 0 and 16 <= width // (3 * heads) <= 256


def check_inputs(qkv, heads, order, queries) -> None:
    if qkv.ndim != 3:
        raise ValueError(f"attention: qkv of shape {tuple(qkv.shape)}; expected [B, 3*H*D, T]")
    if qkv.dtype not in _DTYPES:
        raise TypeError(f"attention: qkv has dtype {qkv.dtype}; expected float32/16 or bfloat16")
    if order not in ORDERS:
        raise ValueError(f"attention: order {order!r}; expected 'legacy' or 'new'")
    if heads < 1 or qkv.shape[1] % (3 * heads):
        raise ValueError(f"attention: {qkv.shape[1]} rows do not split into 3 x {heads} heads")
    ch = qkv.shape[1] // (3 * heads)
    if not 16 <= ch <= 256:
        raise ValueError(f"attention: head dim {ch}; the kernel takes 16 to 256")
    if queries is not None and not 1 <= queries <= qkv.shape[2]:
        raise ValueError(f"attention: queries={queries}; expected 1..{qkv.shape[2]}")


def launch_config(
    ch: int, queries: int, ieee: bool = False, backward: bool = False
) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps) for head dim ch: tiles shrink as D grows so that
    the tiles of q, k, v, the accumulators and a score tile fit registers and shared memory
    (fastsample.kernels.compile_check compiles each for sm_90 and reads the resources).
    float32 (ieee) dots run without tensor cores: small tiles."""
    block_d = max(16, triton.next_power_of_2(ch))
    if ieee:
        block_m = block_n = 32 if block_d <= 64 else 16
        warps = 4
    elif backward:
        block_m, block_n = (64, 64) if block_d <= 64 else (32, 32) if block_d <= 128 else (16, 32)
        warps = 4 if block_d <= 64 else 8
    elif block_d <= 64:
        block_m, block_n, warps = 128, 64, 4
    elif block_d <= 128:
        block_m, block_n, warps = 64, 32, 4
    else:
        block_m, block_n, warps = 64, 32, 8
    block_m = min(block_m, max(16, triton.next_power_of_2(queries)))
    return block_m, block_n, block_d, warps


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """a @ b accumulated in float32: in true float32 (no TF32) where IEEE, else with a cast to
    b's dtype (the tensor cores' input)."""
    if IEEE:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a.to(b.dtype), b)
    return out


@triton.jit
def _forward_kernel(
    QKV, OUT, LSE,
    H, T, TQ, D,
    s_b, s_c, s_t, o_b, o_c, o_t,
    HEAD_STRIDE, KV_OFFSET, sm_scale,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < TQ
    mask_d = offs_d < D
    q_base = QKV + b * s_b + h * HEAD_STRIDE * s_c
    k_base = q_base + KV_OFFSET * s_c
    v_base = k_base + KV_OFFSET * s_c
    q = tl.load(
        q_base + offs_d[None, :] * s_c + offs_m[:, None] * s_t,
        mask=mask_m[:, None] & mask_d[None, :],
        other=0.0,
    )
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(0, T, BLOCK_N):
        cols = start + offs_n
        mask_n = cols < T
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_base + offs_d[None, :] * s_c + cols[:, None] * s_t, mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), IEEE)
        s = tl.where(mask_n[None, :], s * sm_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + offs_d[None, :] * s_c + cols[:, None] * s_t, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + _dot(p, v, IEEE)
        m_i = m_new
    out = acc / l_i[:, None]
    o_base = OUT + b * o_b + h * D * o_c
    tl.store(
        o_base + offs_d[None, :] * o_c + offs_m[:, None] * o_t,
        out.to(OUT.dtype.element_ty),
        mask=mask_m[:, None] & mask_d[None, :],
    )
    tl.store(LSE + bh * TQ + offs_m, m_i + tl.log(l_i), mask=mask_m)


@triton.jit
def _delta_kernel(OUT, DOUT, DELTA, H, TQ, D, o_b, o_c, o_t, BLOCK_M: tl.constexpr,
                  BLOCK_D: tl.constexpr):  # fmt: skip
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < TQ)[:, None] & (offs_d < D)[None, :]
    ptr = b * o_b + h * D * o_c + offs_d[None, :] * o_c + offs_m[:, None] * o_t
    o = tl.load(OUT + ptr, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DOUT + ptr, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + bh * TQ + offs_m, tl.sum(o * do, axis=1), mask=offs_m < TQ)


@triton.jit
def _dkdv_kernel(
    QKV, DOUT, LSE, DELTA, DQKV,
    H, T, TQ, D,
    s_b, s_c, s_t, o_b, o_c, o_t, g_b, g_c, g_t,
    HEAD_STRIDE, KV_OFFSET, sm_scale,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < T
    mask_d = offs_d < D
    kv_mask = mask_n[:, None] & mask_d[None, :]
    q_base = QKV + b * s_b + h * HEAD_STRIDE * s_c
    k_base = q_base + KV_OFFSET * s_c
    v_base = k_base + KV_OFFSET * s_c
    k = tl.load(k_base + offs_d[None, :] * s_c + offs_n[:, None] * s_t, mask=kv_mask, other=0.0)
    v = tl.load(v_base + offs_d[None, :] * s_c + offs_n[:, None] * s_t, mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    do_base = DOUT + b * o_b + h * D * o_c
    for start in range(0, TQ, BLOCK_M):
        rows = start + offs_m
        mask_m = rows < TQ
        q_mask = mask_m[:, None] & mask_d[None, :]
        q = tl.load(q_base + offs_d[None, :] * s_c + rows[:, None] * s_t, mask=q_mask, other=0.0)
        do = tl.load(do_base + offs_d[None, :] * o_c + rows[:, None] * o_t, mask=q_mask, other=0.0)
        lse = tl.load(LSE + bh * TQ + rows, mask=mask_m, other=0.0)
        delta = tl.load(DELTA + bh * TQ + rows, mask=mask_m, other=0.0)
        s = _dot(q, tl.trans(k), IEEE) * sm_scale
        p = tl.exp(s - lse[:, None])
        p = tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)
        dv += _dot(tl.trans(p), do, IEEE)
        dp = _dot(do, tl.trans(v), IEEE)
        ds = p * (dp - delta[:, None]) * sm_scale
        dk += _dot(tl.trans(ds), q, IEEE)
    gk = DQKV + b * g_b + (h * HEAD_STRIDE + KV_OFFSET) * g_c
    gv = gk + KV_OFFSET * g_c
    ty = DQKV.dtype.element_ty
    tl.store(gk + offs_d[None, :] * g_c + offs_n[:, None] * g_t, dk.to(ty), mask=kv_mask)
    tl.store(gv + offs_d[None, :] * g_c + offs_n[:, None] * g_t, dv.to(ty), mask=kv_mask)


@triton.jit
def _dq_kernel(
    QKV, DOUT, LSE, DELTA, DQKV,
    H, T, TQ, D,
    s_b, s_c, s_t, o_b, o_c, o_t, g_b, g_c, g_t,
    HEAD_STRIDE, KV_OFFSET, sm_scale,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < TQ
    mask_d = offs_d < D
    q_mask = mask_m[:, None] & mask_d[None, :]
    q_base = QKV + b * s_b + h * HEAD_STRIDE * s_c
    k_base = q_base + KV_OFFSET * s_c
    v_base = k_base + KV_OFFSET * s_c
    q = tl.load(q_base + offs_d[None, :] * s_c + offs_m[:, None] * s_t, mask=q_mask, other=0.0)
    do_base = DOUT + b * o_b + h * D * o_c
    do = tl.load(do_base + offs_d[None, :] * o_c + offs_m[:, None] * o_t, mask=q_mask, other=0.0)
    lse = tl.load(LSE + bh * TQ + offs_m, mask=mask_m, other=0.0)
    delta = tl.load(DELTA + bh * TQ + offs_m, mask=mask_m, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(0, T, BLOCK_N):
        cols = start + offs_n
        mask_n = cols < T
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_base + offs_d[None, :] * s_c + cols[:, None] * s_t, mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_d[None, :] * s_c + cols[:, None] * s_t, mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), IEEE) * sm_scale
        dp = _dot(do, tl.trans(v), IEEE)
        p = tl.exp(s - lse[:, None])
        p = tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)
        ds = p * (dp - delta[:, None]) * sm_scale
        dq += _dot(ds, k, IEEE)
    gq = DQKV + b * g_b + h * HEAD_STRIDE * g_c
    tl.store(
        gq + offs_d[None, :] * g_c + offs_m[:, None] * g_t,
        dq.to(DQKV.dtype.element_ty),
        mask=q_mask,
    )


def _ieee(qkv: torch.Tensor) -> bool:
    # float32 in float32 (no TF32); the CPU interpreter also takes this path for bfloat16, whose
    # dots it cannot compute.
    return qkv.dtype == torch.float32 or (qkv.device.type == "cpu" and qkv.dtype == torch.bfloat16)


def forward(qkv, heads, order, queries):
    """-> (out [B, H*D, TQ], lse [B*H, TQ] float32)."""
    b, width, t = qkv.shape
    ch = width // (3 * heads)
    tq = t if queries is None else queries
    out = torch.empty(b, heads * ch, tq, device=qkv.device, dtype=qkv.dtype)
    lse = torch.empty(b * heads, tq, device=qkv.device, dtype=torch.float32)
    head_stride, kv_offset = _strides(order, heads, ch)
    block_m, block_n, block_d, warps = launch_config(ch, tq, _ieee(qkv))
    _forward_kernel[(triton.cdiv(tq, block_m), b * heads)](
        qkv, out, lse,
        heads, t, tq, ch,
        *qkv.stride(), *out.stride(),
        head_stride, kv_offset, 1.0 / math.sqrt(ch),
        IEEE=_ieee(qkv), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps,
    )  # fmt: skip
    return out, lse


def backward(dout, qkv, out, lse, heads, order, queries):
    """-> dqkv [B, 3*H*D, T] in qkv's layout (zero for queries that were not computed)."""
    b, width, t = qkv.shape
    ch = width // (3 * heads)
    tq = out.shape[-1]
    dout = dout.contiguous()
    out = out.contiguous()
    dqkv = (torch.zeros_like if tq < t else torch.empty_like)(
        qkv, memory_format=torch.contiguous_format
    )
    delta = torch.empty(b * heads, tq, device=qkv.device, dtype=torch.float32)
    head_stride, kv_offset = _strides(order, heads, ch)
    block_m, block_n, block_d, warps = launch_config(ch, tq, _ieee(qkv), backward=True)
    _delta_kernel[(triton.cdiv(tq, block_m), b * heads)](
        out, dout, delta, heads, tq, ch, *out.stride(), BLOCK_M=block_m, BLOCK_D=block_d
    )
    common = (
        heads, t, tq, ch, *qkv.stride(), *dout.stride(), *dqkv.stride(),
        head_stride, kv_offset, 1.0 / math.sqrt(ch),
    )  # fmt: skip
    meta = dict(IEEE=_ieee(qkv), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps)
    _dkdv_kernel[(triton.cdiv(t, block_n), b * heads)](qkv, dout, lse, delta, dqkv, *common, **meta)
    _dq_kernel[(triton.cdiv(tq, block_m), b * heads)](qkv, dout, lse, delta, dqkv, *common, **meta)
    return dqkv


# -- the custom op -----------------------------------------------------------------------------


@torch.library.custom_op("fastsample::attention", mutates_args=())
def _attention_op(
    qkv: torch.Tensor, heads: int, order: str, queries: int
) -> tuple[torch.Tensor, torch.Tensor]:
    return forward(qkv, heads, order, queries if queries > 0 else None)


@_attention_op.register_fake
def _(qkv, heads, order, queries):
    b, width, t = qkv.shape
    tq = queries if queries > 0 else t
    out = qkv.new_empty(b, width // 3, tq)
    return out, qkv.new_empty(b * heads, tq, dtype=torch.float32)


@torch.library.custom_op("fastsample::attention_backward", mutates_args=())
def _attention_backward_op(
    dout: torch.Tensor,
    qkv: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    heads: int,
    order: str,
    queries: int,
) -> torch.Tensor:
    return backward(dout, qkv, out, lse, heads, order, queries if queries > 0 else None)


@_attention_backward_op.register_fake
def _(dout, qkv, out, lse, heads, order, queries):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    qkv, heads, order, queries = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse)
    ctx.heads, ctx.order, ctx.queries = heads, order, queries


def _backward(ctx, dout, _dlse):
    qkv, out, lse = ctx.saved_tensors
    dqkv = _attention_backward_op(dout, qkv, out, lse, ctx.heads, ctx.order, ctx.queries)
    return dqkv, None, None, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)


def attention(
    qkv: torch.Tensor, heads: int, order: str = "legacy", queries: int | None = None
) -> torch.Tensor:
    """The fused op (see the module doc)."""
    check_inputs(qkv, heads, order, queries)
    out, _ = _attention_op(qkv, int(heads), order, int(queries or 0))
    return out
