"""The attention kernel against the reference, forward and backward, both qkv layouts."""

import pytest
import torch
from _helpers import DEVICE, TOL, rel_err
from fastsample.kernels.attention import attention, attention_reference

CASES = [
    # (batch, heads, head dim, tokens, queries): T not a multiple of the blocks, batch 1 and 3,
    # head dims 16..64 and a non-power of two (48, like 192 at full size), the pool's 1 query
    (1, 2, 16, 37, None),
    (3, 1, 32, 70, None),
    (2, 2, 48, 19, None),
    (1, 1, 64, 65, None),
    (3, 2, 32, 17, 1),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("order", ["legacy", "new"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_forward_and_backward(dtype, order, case):
    b, h, d, t, queries = CASES[case]
    gen = torch.Generator().manual_seed(case)
    qkv = torch.randn(b, 3 * h * d, t, generator=gen).to(dtype).to(DEVICE).requires_grad_()
    out = attention(qkv, h, order, queries)
    assert out.shape == (b, h * d, queries or t) and out.dtype == dtype
    ref_in = qkv.detach().float().requires_grad_()
    want = attention_reference(ref_in, h, order, queries)
    assert rel_err(out, want) < TOL[dtype]
    dy = torch.randn(want.shape, generator=gen).to(DEVICE)
    (got,) = torch.autograd.grad(out, qkv, dy.to(dtype))
    (ref,) = torch.autograd.grad(want, ref_in, dy)
    assert rel_err(got, ref) < 4 * TOL[dtype]
    if queries:  # rows of queries that were never computed get no gradient
        q_rows = (
            [hh * 3 * d + i for hh in range(h) for i in range(d)]
            if order == "legacy"
            else list(range(h * d))
        )
        assert got[:, q_rows, queries:].abs().max() == 0


@pytest.mark.parametrize("d", [128, 256])
def test_large_head_dims(d):
    gen = torch.Generator().manual_seed(d)
    qkv = torch.randn(1, 3 * d, 20, generator=gen).to(DEVICE)
    assert rel_err(attention(qkv, 1, "new"), attention_reference(qkv, 1, "new")) < 1e-5


def test_custom_op_registration():
    qkv = torch.randn(2, 3 * 2 * 16, 10).to(DEVICE)
    torch.library.opcheck(torch.ops.fastsample.attention.default, (qkv, 2, "legacy", 0))
    torch.library.opcheck(torch.ops.fastsample.attention.default, (qkv, 2, "new", 1))
