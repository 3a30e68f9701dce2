"""The fused GroupNorm kernel against the float32/float64 reference, forward and backward."""

import pytest
import torch
from _helpers import DEVICE, TOL, rel_err
from fastsample.kernels.group_norm import group_norm, group_norm_reference

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case,layout", LAYOUTS)
@pytest.mark.parametrize("scale_shift,silu", [(True, True), (False, True), (False, False)])
def test_forward_and_backward(dtype, case, layout, scale_shift, silu):
    shape, groups = SHAPES[case]
    x, w, b, sc, sh = _inputs(shape, groups, dtype, layout, scale_shift, seed=case)
    leaves = [
        t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b, sc, sh)
    ]
    y = group_norm(
        leaves[0], groups, leaves[1], leaves[2], scale=leaves[3], shift=leaves[4], silu=silu
    )
    assert y.dtype == dtype and y.shape == x.shape
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    refs = [
        t.detach().float().clone().requires_grad_() if t is not None else None
        for t in (x, w, b, sc, sh)
    ]
    want = group_norm_reference(refs[0], groups, refs[1], refs[2], 1e-5, refs[3], refs[4], silu)
    assert rel_err(y, want) < TOL[dtype]
    dy = torch.randn(want.shape, generator=torch.Generator().manual_seed(99)).to(DEVICE)
    used = [i for i, t in enumerate(leaves) if t is not None]
    got = torch.autograd.grad(y, [leaves[i] for i in used], dy.to(dtype))
    ref = torch.autograd.grad(want, [refs[i] for i in used], dy)
    for i, g, r in zip(used, got, ref, strict=True):
        assert g.shape == r.shape, i
        assert rel_err(g, r) < 4 * TOL[dtype], ("x", "weight", "bias", "scale", "shift")[i]


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
