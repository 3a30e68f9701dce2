"""The kernel seam: every GroupNorm (with its scale-shift and SiLU), every attention and every
2-D convolution of the networks goes through here, on one of three kernel implementations
(`kernels=`):

- "torch": plain torch with ADM's numerics, op for op as the reference computes them (the export
  path, and what the Triton kernels and the onednn path are tested against);
- "triton": the fused kernels of `fastsample.kernels` (CUDA; on the CPU only under
  TRITON_INTERPRET=1, for tests);
- "onednn": the CPU path. Activations channels_last, convolutions on oneDNN with their weights
  reordered once into its blocked layout (and, for the guidance gradient, the input gradient as
  a second pre-packed convolution instead of autograd's convolution backward), attention as
  fused scaled-dot-product attention on [N, T, C] tokens. float32, and bfloat16 where oneDNN has
  it (AVX-512 cores): convolutions and projections in bf16 (fp32 accumulation), GroupNorm
  statistics and the attention logits and softmax in fp32. Anything else (other dtypes, trainable
  weights, grouped convolutions) runs the torch ops.

A network holds its choice in one `KernelChoice`, shared by its modules and resolved per device
when they run ("auto": triton on CUDA where Triton is installed, onednn on a CPU torch built with
it, else torch); `model.set_kernels(...)` changes it.
"""

from __future__ import annotations

import functools
import os
import weakref
from typing import Literal

import torch
import torch.nn.functional as F

from fastsample.kernels.reference import attention_reference, group_norm_reference, split_qkv

from . import selfcheck
from .errors import InputError

Kernels = Literal["auto", "torch", "triton", "onednn"]  # "auto": chosen per device
KERNELS = ("torch", "triton", "onednn")
BACKENDS = KERNELS  # the old name


def triton_available() -> bool:
    from fastsample.kernels import _triton

    return _triton.AVAILABLE


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(
        torch.ops.mkldnn, "_convolution_pointwise"
    )


def resolve_kernels(name: str, device: torch.device | str) -> str:
    """ "auto" -> "triton" on CUDA where Triton is installed (checked per shape class: see
    `KernelChoice.checked`), "onednn" on the CPU where torch has it, else "torch";
    FASTSAMPLE_KERNELS=torch makes it "torch" everywhere, =triton the unchecked Triton kernels
    on CUDA. Checks the others."""
    device = torch.device(device)
    if name == "auto":
        forced = selfcheck.forced()
        if forced == "torch":
            return "torch"
        # (on the CPU without importing Triton at all)
        if device.type == "cuda":
            if forced == "triton" and not triton_available():
                raise InputError(
                    f"{selfcheck.FORCE_ENV}=triton: Triton is not installed "
                    "(pip install 'fastsample[triton]')"
                )
            return "triton" if triton_available() else "torch"
        return "onednn" if device.type == "cpu" and onednn_available() else "torch"
    if name not in KERNELS:
        raise InputError(f"kernels {name!r}: expected 'auto', 'torch', 'triton' or 'onednn'")
    if name == "onednn":
        if device.type != "cpu":
            raise InputError(f"kernels 'onednn' run on the CPU (the network is on {device})")
        if not onednn_available():
            raise InputError("kernels 'onednn': this torch build has no oneDNN (mkldnn)")
    if name == "triton":
        if not triton_available():
            raise InputError("kernels 'triton' need Triton: pip install 'fastsample[triton]'")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise InputError(
                f"kernels 'triton' run on CUDA devices (the network is on {device}); "
                "set TRITON_INTERPRET=1 to interpret the kernels on the CPU"
            )
    return name


resolve_backend = resolve_kernels  # the old name


class KernelChoice:
    """One network's kernel choice: set once, read by each of its modules when they run, and
    resolved per device type ("auto" picks for the device the tensors are on)."""

    __slots__ = ("requested", "_resolved", "_checked")

    def __init__(self, requested: str = "torch"):
        self.requested = requested
        self._resolved: dict[str, str] = {}
        self._checked: dict[str, bool] = {}

    def set(self, name: str, device: torch.device | str) -> None:
        resolve_kernels(name, device)  # refuses what cannot run there
        self.requested = name
        self._resolved, self._checked = {}, {}

    def on(self, device: torch.device) -> str:
        resolved = self._resolved.get(device.type)
        if resolved is None:
            resolved = self.requested
            if resolved == "auto":
                resolved = resolve_kernels("auto", device)
            self._resolved[device.type] = resolved
        return resolved

    def checked(self, device: torch.device) -> bool:
        """Whether the Triton kernels run only where their first-use self-check passed
        (`fastsample.selfcheck`): "auto" on CUDA, unless FASTSAMPLE_KERNELS forces a choice.
        An explicit "triton" is never checked."""
        checked = self._checked.get(device.type)
        if checked is None:
            auto_triton = self.requested == "auto" and self.on(device) == "triton"
            checked = self._checked[device.type] = auto_triton and selfcheck.forced() is None
        return checked


TORCH = KernelChoice("torch")  # modules outside a network: the plain torch ops


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
    kernels: str = "torch",
    checked: bool = False,
) -> torch.Tensor:
    """ADM's GroupNorm32 (statistics and affine in float32, result in x's dtype), then
    `* (1 + scale) + shift` (scale, shift: [N, C]) and SiLU when asked. checked (with the
    triton kernels): the kernel only where its first-use self-check found it correct and
    faster for this shape class (`fastsample.selfcheck`)."""
    if kernels == "triton":
        from fastsample.kernels import group_norm as kernel

        if kernel.supports(x, num_groups) and (
            not checked
            or selfcheck.group_norm_choice(x, num_groups, weight, bias, eps, scale, shift, silu)
            == "triton"
        ):
            return kernel.group_norm(
                x, num_groups, weight, bias, eps, scale=scale, shift=shift, silu=silu
            )
    if kernels == "onednn" and onednn_dtype(x.dtype) and x.device.type == "cpu":
        return _group_norm_cpu(x, num_groups, weight, bias, eps, scale, shift, silu)
    return group_norm_reference(x, num_groups, weight, bias, eps, scale, shift, silu)


# Above this |mean| / std of a group, torch's one-pass variance loses more than a few fp32 ulps
# (8192-element groups: 3.5e-6 relative at 4, 2e-3 at 100); the demo's activations reach 4.3.
_CENTRE_ABOVE = 4.0


def _group_norm_cpu(x, num_groups, weight, bias, eps, scale, shift, silu):
    """The same function in fewer passes over x. The statistics and the affine run in fp32 for
    fp32 and bf16 x alike (torch's mixed-precision GroupNorm), rounded once to x's dtype; with
    one sample the scale-shift folds into that affine, otherwise it is one addcmul in x's dtype
    (as the reference); then SiLU, in place where autograd does not record. With one or two
    channels per group torch's bf16 kernels are slower than its fp32 ones (2x forward, 3x
    backward on the demo): there a bf16 x is normalised as an fp32 copy.

    torch's CPU GroupNorm sums x and x*x in one pass on channels_last maps, which loses the
    variance of a group far from zero (1e-2 relative error at |mean| / std = 1000, where the
    two-pass statistics of contiguous maps are exact): where a group's |mean| / std exceeds
    _CENTRE_ABOVE, the map is normalised again in fp32 after subtracting each group's first
    element (GroupNorm ignores a per-group shift; the Triton kernel shifts the same way)."""
    n, c = x.shape[:2]
    if x.dtype != torch.float32 and c <= 2 * num_groups:  # (see above)
        y = _group_norm_cpu(x.float(), num_groups, weight, bias, eps, scale, shift, silu)
        return y.to(x.dtype)
    if scale is not None and n == 1:
        factor = 1 + scale[0].float()
        weight = factor if weight is None else weight.float() * factor
        bias = shift[0].float() if bias is None else torch.addcmul(shift[0].float(), bias, factor)
        scale = None
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    x = x if channels_last else x.contiguous()
    spatial = x[0, 0].numel()
    y, mean, rstd = torch.native_group_norm(x, weight, bias, n, c, spatial, num_groups, eps)
    if channels_last and (mean.abs() * rstd).amax() > _CENTRE_ABOVE:
        pivot = x.detach()[:, :: c // num_groups, :1, :1].float()  # [N, G, 1, 1]
        centred = x.float() - pivot.repeat_interleave(c // num_groups, dim=1)
        y = F.group_norm(centred, num_groups, weight, bias, eps).to(x.dtype)
    if scale is not None:
        shape = (*scale.shape, *([1] * (x.ndim - 2)))
        scale, shift = (1 + scale.reshape(shape)).to(y.dtype), shift.reshape(shape).to(y.dtype)
        y = torch.addcmul(shift, y, scale)
    if silu:
        y = F.silu(y, inplace=not (torch.is_grad_enabled() and y.requires_grad))
    return y


def qkv_attention(
    qkv: torch.Tensor,
    heads: int,
    order: str = "legacy",
    queries: int | None = None,
    kernels: str = "torch",
    checked: bool = False,
) -> torch.Tensor:
    """Multi-head attention on a fused [N, 3*H*D, T] projection -> [N, H*D, queries or T]
    (layouts: see fastsample.kernels.attention). checked (with the triton kernels): per shape
    class, the Triton kernel or SDPA, whichever the first-use self-check found correct and
    fastest (`fastsample.selfcheck`)."""
    if kernels == "triton":
        from fastsample.kernels import attention as kernel

        if kernel.supports(qkv, heads):
            use = selfcheck.attention_choice(qkv, heads, order, queries) if checked else "triton"
            if use == "triton":
                return kernel.attention(qkv, heads, order, queries)
            if use == "sdpa":
                return sdpa_attention(qkv, heads, order, queries)
    return attention_reference(qkv, heads, order, queries)


def sdpa_attention(
    qkv: torch.Tensor, heads: int, order: str = "legacy", queries: int | None = None
) -> torch.Tensor:
    """qkv_attention through PyTorch's fused scaled-dot-product attention (flash or
    memory-efficient kernels on CUDA). Its scale 1/sqrt(D) is ADM's D**-0.25 on q and on k;
    the softmax runs in the kernel's own precision (float32 accumulation)."""
    b, width, length = qkv.shape
    ch = width // (3 * heads)
    q, k, v = (p.transpose(-1, -2) for p in split_qkv(qkv, heads, order))  # [B, H, T, D]
    if queries is not None:
        q = q[..., :queries, :]
    out = F.scaled_dot_product_attention(q, k, v)  # [B, H, Tq, D]
    return out.transpose(-1, -2).reshape(b, heads * ch, out.shape[-2])


def token_attention(qkv: torch.Tensor, heads: int, order: str = "legacy") -> torch.Tensor:
    """qkv_attention on tokens: [N, T, 3*H*D] -> [N, T, H*D] (channel h*D + d, as the reference
    lays out its output), one fused scaled-dot-product attention. Its scale 1/sqrt(D) is ADM's
    D**-0.25 on q and on k."""
    n, t, width = qkv.shape
    d = width // (3 * heads)
    if order == "legacy":  # per head: q, k, v
        parts = qkv.view(n, t, heads, 3, d).unbind(3)
    else:  # q of every head, then k, then v
        parts = qkv.view(n, t, 3, heads, d).unbind(2)
    q, k, v = (p.transpose(1, 2) for p in parts)  # [N, H, T, D] views
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(n, t, heads * d)


def onednn_dtype(dtype: torch.dtype) -> bool:
    """Whether the onednn kernels run this dtype: float32, and bfloat16 where oneDNN has bf16
    kernels for this CPU (AVX-512; else torch's bf16 ops run, slowly)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and _onednn_bf16())


@functools.cache
def _onednn_bf16() -> bool:
    return onednn_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def onednn_eligible(x: torch.Tensor) -> bool:
    """Whether the onednn kernels' fast path takes this activation (else the torch ops)."""
    return x.device.type == "cpu" and onednn_dtype(x.dtype) and x.ndim == 4


class _PackedConv:
    """A Conv2d's weights made ready for the CPU, each form on first use: oneDNN's blocked
    layout for the forward convolution; the Winograd F(2x2, 3x3) transform for 3x3 convolutions
    on large-channel 16x16 to 32x32 maps (see `winograd_suits`); and the input gradient as a
    convolution of the output gradient with the channel-swapped, flipped kernel (stride 1)."""

    def __init__(self, conv: torch.nn.Conv2d):
        self.key = _pack_key(conv)
        self.conv = weakref.ref(conv)
        self.padding, self.stride = list(conv.padding), list(conv.stride)
        self.dilation = list(conv.dilation)
        self.kernel = list(conv.kernel_size)
        self.bias = conv.bias.detach() if conv.bias is not None else None
        self._weight = self._winograd = self._grad_weight = None

    @property
    def has_input_grad(self) -> bool:
        return self.stride == [1, 1] and self.dilation == [1, 1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._winograd is not None or winograd_suits(self, x):
            if self._winograd is None:
                self._winograd = winograd_weight(self.conv().weight.detach())
            return winograd_conv3x3(x, self._winograd, self.bias)
        if self._weight is None:
            self._weight = _reorder(self.conv().weight.detach(), self.padding, self.stride,
                                    self.dilation, x)  # fmt: skip
        return torch.ops.mkldnn._convolution_pointwise(
            x, self._weight, self.bias, self.padding, self.stride, self.dilation, 1, "none", [], ""
        )

    def input_grad(self, grad_out: torch.Tensor) -> torch.Tensor:
        padding = [k - 1 - p for k, p in zip(self.kernel, self.padding, strict=True)]
        if self._grad_weight is None:
            flipped = self.conv().weight.detach().transpose(0, 1).flip(2, 3)
            self._grad_weight = _reorder(flipped, padding, [1, 1], [1, 1], grad_out)
        return torch.ops.mkldnn._convolution_pointwise(
            grad_out, self._grad_weight, None, padding, [1, 1], [1, 1], 1, "none", [], ""
        )


def _reorder(weight, padding, stride, dilation, x) -> torch.Tensor:
    weight = weight.contiguous(memory_format=torch.channels_last)
    return torch.ops.mkldnn._reorder_convolution_weight(
        weight, padding, stride, dilation, 1, list(x.shape)
    )


# Winograd F(2x2, 3x3) (Lavin & Gray 2016): a 2x2 output tile from a 4x4 input tile with 16
# products per channel pair instead of 36. Y = A^T [(G g G^T) * (B^T d B)] A.
_WINOGRAD_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def winograd_suits(packed: _PackedConv, x: torch.Tensor) -> bool:
    """Where F(2x2, 3x3) beats oneDNN's direct convolution on a 2-thread AVX-512 CPU at batch 1
    (bench: winograd vs packed per layer): 3x3, stride 1, padding 1, even 16x16 to 32x32 maps
    with wide channels. A fixed rule, so a run's arithmetic never depends on timing."""
    if packed.kernel != [3, 3] or packed.padding != [1, 1] or not packed.has_input_grad:
        return False
    if x.dtype != torch.float32:  # oneDNN's bf16 convolutions are faster (bench.cpu_bf16)
        return False
    _, c_in, height, width = x.shape
    c_out = packed.conv().out_channels
    area = height * width
    if height % 2 or width % 2 or not 256 <= area <= 1024:
        return False
    return min(c_in, c_out) >= (384 if area > 512 else 576)


def winograd_weight(weight: torch.Tensor) -> torch.Tensor:
    """[C_out, C_in, 3, 3] -> U = G g G^T as [16, C_in, C_out] (tile position major)."""
    g = torch.tensor(_WINOGRAD_G, dtype=weight.dtype, device=weight.device)
    u = g @ weight @ g.t()  # [C_out, C_in, 4, 4]
    return u.permute(2, 3, 1, 0).reshape(16, weight.shape[1], weight.shape[0]).contiguous()


def winograd_conv3x3(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """conv2d(x, g, bias, padding=1) for even H, W with U = winograd_weight(g); x in any
    layout, the result channels_last. B^T d B and A^T m A are sums and differences of strided
    views; the 16 tile positions are one batched matmul."""
    n, c, h, w = x.shape
    ty, tx = h // 2, w // 2
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))  # [N, H+2, W+2, C]
    s = xp.stride()
    # d[n, y, x, i, j, c] = xp[n, 2y + i, 2x + j, c]: the overlapping 4x4 input tiles
    d = xp.as_strided((n, ty, tx, 4, 4, c), (s[0], 2 * s[1], 2 * s[2], s[1], s[2], s[3]))
    rows = x.new_empty(4, n, ty, tx, 4, c)  # B^T d, over i
    torch.sub(d[:, :, :, 0], d[:, :, :, 2], out=rows[0])
    torch.add(d[:, :, :, 1], d[:, :, :, 2], out=rows[1])
    torch.sub(d[:, :, :, 2], d[:, :, :, 1], out=rows[2])
    torch.sub(d[:, :, :, 1], d[:, :, :, 3], out=rows[3])
    v = x.new_empty(4, 4, n, ty, tx, c)  # (B^T d) B, over j
    torch.sub(rows[..., 0, :], rows[..., 2, :], out=v[:, 0])
    torch.add(rows[..., 1, :], rows[..., 2, :], out=v[:, 1])
    torch.sub(rows[..., 2, :], rows[..., 1, :], out=v[:, 2])
    torch.sub(rows[..., 1, :], rows[..., 3, :], out=v[:, 3])
    m = torch.bmm(v.view(16, n * ty * tx, c), u).view(4, 4, n, ty, tx, -1)
    c_out = m.shape[-1]
    out = x.new_empty(n, ty, 2, tx, 2, c_out)  # = [N, H, W, C_out]
    for i, r in enumerate((m[0] + m[1] + m[2], m[1] - m[2] - m[3])):  # A^T m, over the rows
        torch.add(r[0] + r[1], r[2], out=out[:, :, i, :, 0])  # then times A, over the columns
        torch.sub(r[1] - r[2], r[3], out=out[:, :, i, :, 1])
    if bias is not None:
        out += bias
    return out.view(n, h, w, c_out).permute(0, 3, 1, 2)


class _InputGrad(torch.autograd.Function):
    """A packed convolution or linear whose backward gives the input gradient only (frozen
    weights)."""

    @staticmethod
    def forward(ctx, x, packed):
        ctx.packed = packed
        return packed(x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        layout = torch.channels_last if grad_out.ndim == 4 else torch.contiguous_format
        return ctx.packed.input_grad(grad_out.contiguous(memory_format=layout)), None


_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _pack_key(conv: torch.nn.Conv2d) -> tuple:
    # Any in-place change of the weights (load_state_dict, an optimizer step) or a move
    # changes this key and re-packs.
    w, b = conv.weight, conv.bias
    return (w.data_ptr(), w._version, None if b is None else (b.data_ptr(), b._version))


def conv2d(conv: torch.nn.Conv2d, x: torch.Tensor, kernels: str = "torch") -> torch.Tensor:
    """conv(x); on the onednn kernels with pre-packed weights where it applies (fp32 or bf16 on
    the CPU, groups 1, zero padding, weights frozen where autograd records)."""
    args = (conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    if (
        kernels != "onednn"
        or not onednn_eligible(x)
        or conv.weight.dtype != x.dtype
        or conv.groups != 1
        or conv.padding_mode != "zeros"
        or isinstance(conv.padding, str)
    ):
        return F.conv2d(x, *args)
    return _packed_apply(conv, x, lambda: _PackedConv(conv), F.conv2d, *args)


class _PackedLinear:
    """A 1x1 projection's weight [O, I, 1] (Conv1d) or [O, I] as oneDNN linear weights: the
    forward, and (on first use) the input gradient, a linear with the transposed weight."""

    def __init__(self, module: torch.nn.Module, x: torch.Tensor):
        self.key = _pack_key(module)
        self.module = weakref.ref(module)
        weight = module.weight.detach().flatten(1)
        rows = x.numel() // x.shape[-1]
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, rows)
        self.bias = module.bias.detach() if module.bias is not None else None
        self._grad_weight = None
        self.has_input_grad = True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    def input_grad(self, grad_out: torch.Tensor) -> torch.Tensor:
        if self._grad_weight is None:
            weight_t = self.module().weight.detach().flatten(1).t().contiguous()
            rows = grad_out.numel() // grad_out.shape[-1]
            self._grad_weight = torch.ops.mkldnn._reorder_linear_weight(weight_t, rows)
        return torch.ops.mkldnn._linear_pointwise(grad_out, self._grad_weight, None, "none", [],
                                                  "")  # fmt: skip


def linear(module: torch.nn.Module, x: torch.Tensor, kernels: str = "torch") -> torch.Tensor:
    """A 1x1 projection (an nn.Conv1d with kernel 1, or an nn.Linear) applied to tokens
    [..., I] -> [..., O]; pre-packed oneDNN weights on the onednn kernels (fp32 or bf16 on the
    CPU, frozen weights where autograd records)."""
    weight = module.weight.flatten(1)
    if (
        kernels != "onednn"
        or x.device.type != "cpu"
        or not onednn_dtype(x.dtype)
        or weight.dtype != x.dtype
        or not x.is_contiguous()
    ):
        return F.linear(x, weight, module.bias)
    return _packed_apply(module, x, lambda: _PackedLinear(module, x), F.linear, weight, module.bias)


def _packed_apply(module, x, pack, fallback, *args):
    """module(x) through its cached packed form (made by pack()), with autograd taking the
    input gradient only; trainable weights under autograd run fallback(x, *args)."""
    recording = torch.is_grad_enabled()
    if recording and any(p.requires_grad for p in module.parameters(recurse=False)):
        return fallback(x, *args)
    packed = _PACKED.get(module)
    if packed is None or packed.key != _pack_key(module):
        packed = _PACKED[module] = pack()
    if recording and x.requires_grad:
        if not packed.has_input_grad:
            return fallback(x, *args)
        return _InputGrad.apply(x, packed)
    return packed(x)


__all__ = [
    "BACKENDS",
    "KERNELS",
    "KernelChoice",
    "conv2d",
    "group_norm",
    "linear",
    "onednn_available",
    "qkv_attention",
    "resolve_backend",
    "sdpa_attention",
    "resolve_kernels",
    "token_attention",
]
