"""The fused GroupNorm kernel against ADM's arithmetic (fastsample.kernels.reference), forward
and backward: compiled on a GPU, interpreted on the CPU (tests/conftest.py)."""

import pytest
import torch

from conftest import KERNEL_DEVICE, assert_as_close_as_torch, rel_err
from fastsample.kernels.group_norm import group_norm, group_norm_reference

pytestmark = pytest.mark.usefixtures("triton_kernels")
DEVICE = KERNEL_DEVICE

SHAPES = [
    # (N, C, spatial, groups): channels per group 3 (not a power of two), 2, 1; odd spatial sizes
    ((1, 12, (5, 7)), 4),
    ((3, 64, (4, 4)), 32),
    ((2, 6, (33,)), 3),
    ((3, 32, (9, 11)), 32),
]


def _inputs(shape, groups, dtype, layout, scale_shift, seed):
    gen = torch.Generator().manual_seed(seed)
    n, c, spatial = shape
    x = (torch.randn(n, c, *spatial, generator=gen) * 2 + 0.5).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(c, generator=gen)
    b = torch.randn(c, generator=gen)
    sc = torch.randn(n, c, generator=gen) * 0.5 if scale_shift else None
    sh = torch.randn(n, c, generator=gen) if scale_shift else None
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return to(x), to(w), to(b), to(sc), to(sh)


# channels_last is a 4-D layout: only the cases with two spatial dims take it.
LAYOUTS = [
    (case, layout)
    for case, (shape, _) in enumerate(SHAPES)
    for layout in (["contiguous", "channels_last"] if len(shape[2]) == 2 else ["contiguous"])
]


def _forward_backward(fn, inputs, groups, silu, dy):
    """fn's output and its gradients with respect to the given inputs (x, weight, bias, scale,
    shift; None where absent) for the output gradient dy."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    x, w, b, sc, sh = leaves
    y = fn(x, groups, w, b, 1e-5, sc, sh, silu)
    grads = torch.autograd.grad(y, [t for t in leaves if t is not None], dy)
    return y.detach(), grads


NAMES = ("x", "weight", "bias", "scale", "shift")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case,layout", LAYOUTS)
@pytest.mark.parametrize("scale_shift,silu", [(True, True), (False, True), (False, False)])
def test_forward_and_backward_match_reference(dtype, case, layout, scale_shift, silu):
    shape, groups = SHAPES[case]
    inputs = _inputs(shape, groups, dtype, layout, scale_shift, seed=case)
    gen = torch.Generator().manual_seed(99)
    dy = torch.randn(inputs[0].shape, generator=gen).to(dtype).to(DEVICE)

    def kernel(x, groups, w, b, eps, sc, sh, silu):
        return group_norm(x, groups, w, b, eps=eps, scale=sc, shift=sh, silu=silu)

    y, grads = _forward_backward(kernel, inputs, groups, silu, dy)
    assert y.dtype == dtype and y.shape == inputs[0].shape
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    # The reference in float32 on the same (rounded) inputs.
    as_float = [t.float() if t is not None else None for t in inputs]
    want, want_grads = _forward_backward(group_norm_reference, as_float, groups, silu, dy.float())
    names = [n for n, t in zip(NAMES, inputs, strict=True) if t is not None]
    for name, g, r in zip(names, grads, want_grads, strict=True):
        assert g.shape == r.shape, name
    if dtype == torch.float32:
        assert rel_err(y, want) < 1e-5
        for name, g, r in zip(names, grads, want_grads, strict=True):
            assert rel_err(g, r) < 1e-5, name
        return
    # ADM's own ops at this dtype (GroupNorm32 in float32, cast back, the rest in the dtype).
    low, low_grads = _forward_backward(group_norm_reference, inputs, groups, silu, dy)
    assert_as_close_as_torch(y, low, want, "output")
    for name, g, lg, r in zip(names, grads, low_grads, want_grads, strict=True):
        assert_as_close_as_torch(g, lg, r, name)


def test_statistics_far_from_zero():
    # Mean 1000, spread 1: a plain sum of squares in float32 would lose the variance.
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 8, 16, 16, generator=gen, dtype=torch.float64) + 1000).float().to(DEVICE)
    y = group_norm(x, 4, None, None)
    want = group_norm_reference(x.double().cpu(), 4, None, None)
    assert rel_err(y.cpu(), want) < 1e-4  # float32 inputs near 1000 carry 6e-5 absolute error


def test_no_affine_and_plain_group_norm():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 10, 7, generator=gen).to(DEVICE)
    assert rel_err(group_norm(x, 5, None, None), group_norm_reference(x, 5, None, None)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_token_view_of_a_channels_last_map(dtype):
    # An attention block normalises x.reshape(N, C, H*W) of a channels-last map: strides
    # (HWC, 1, C), one stride per dim. The kernel takes it as it is, forward and backward.
    gen = torch.Generator().manual_seed(3)
    x4 = (torch.randn(2, 16, 5, 6, generator=gen) * 2 + 0.5).to(dtype)
    x4 = x4.to(DEVICE).contiguous(memory_format=torch.channels_last)
    x = x4.reshape(2, 16, 30)
    assert not x.is_contiguous()
    w, b = (torch.randn(16, generator=gen).to(DEVICE) for _ in range(2))
    inputs = (x, w, b, None, None)
    dy = torch.randn(x.shape, generator=gen).to(dtype).to(DEVICE)

    def kernel(x, groups, w, b, eps, sc, sh, silu):
        return group_norm(x, groups, w, b, eps=eps, silu=silu)

    y, grads = _forward_backward(kernel, inputs, 8, True, dy)
    assert y.stride() == x.stride()  # written in x's layout, not copied to another
    as_float = [t.float() if t is not None else None for t in inputs]
    want, want_grads = _forward_backward(group_norm_reference, as_float, 8, True, dy.float())
    if dtype == torch.float32:
        assert rel_err(y, want) < 1e-5
        for g, r in zip(grads, want_grads, strict=True):
            assert rel_err(g, r) < 1e-5
        return
    low, low_grads = _forward_backward(group_norm_reference, inputs, 8, True, dy)
    assert_as_close_as_torch(y, low, want, "output")
    for name, g, lg, r in zip(("x", "weight", "bias"), grads, low_grads, want_grads, strict=True):
        assert_as_close_as_torch(g, lg, r, name)


def test_custom_op_registration():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 8, 4, 4, generator=gen).to(DEVICE)
    w, b = torch.randn(8).to(DEVICE), torch.randn(8).to(DEVICE)
    sc, sh = torch.randn(2, 8).to(DEVICE), torch.randn(2, 8).to(DEVICE)
    torch.library.opcheck(torch.ops.fastsample.group_norm.default, (x, 4, w, b, 1e-5, sc, sh, True))

    class Block(torch.nn.Module):
        def forward(self, x, w, b):
            return group_norm(x, 4, w, b, silu=True)

    program = torch.export.export(Block(), (x, w, b))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "fastsample.group_norm.default" in targets
    assert rel_err(program.module()(x, w, b), group_norm_reference(x, 4, w, b, silu=True)) < 1e-5
