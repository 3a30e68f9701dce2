"""The attention kernel against ADM's arithmetic (fastsample.kernels.reference), forward and
backward, both qkv layouts: compiled on a GPU, interpreted on the CPU (tests/conftest.py)."""

import pytest
import torch

from conftest import KERNEL_DEVICE, assert_as_close_as_torch, rel_err
from fastsample.kernels.attention import attention, attention_reference

pytestmark = pytest.mark.usefixtures("triton_kernels")

CASES = [
    # (batch, heads, head dim, tokens, queries): T not a multiple of the blocks, batch 1 and 3,
    # head dims 16..64 and a non-power of two (48, like 192 at full size), the pool's 1 query
    (1, 2, 16, 37, None),
    (3, 1, 32, 70, None),
    (2, 2, 48, 19, None),
    (1, 1, 64, 65, None),
    (3, 2, 32, 17, 1),
]


def _forward_backward(fn, qkv, heads, order, queries, dy):
    """fn's output and its gradient with respect to qkv for the output gradient dy."""
    leaf = qkv.detach().clone().requires_grad_()
    out = fn(leaf, heads, order, queries)
    (grad,) = torch.autograd.grad(out, leaf, dy)
    return out.detach(), grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("order", ["legacy", "new"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_forward_and_backward_match_reference(dtype, order, case):
    b, h, d, t, queries = CASES[case]
    gen = torch.Generator().manual_seed(case)
    qkv = torch.randn(b, 3 * h * d, t, generator=gen).to(dtype).to(KERNEL_DEVICE)
    dy = torch.randn(b, h * d, queries or t, generator=gen).to(dtype).to(KERNEL_DEVICE)
    out, grad = _forward_backward(attention, qkv, h, order, queries, dy)
    assert out.shape == (b, h * d, queries or t) and out.dtype == dtype
    # The reference in float32 on the same (rounded) inputs: the exact answer to 1e-7.
    want, want_grad = _forward_backward(attention_reference, qkv.float(), h, order, queries,
                                        dy.float())  # fmt: skip
    if dtype == torch.float32:
        assert rel_err(out, want) < 1e-5
        assert rel_err(grad, want_grad) < 1e-5
    else:  # ADM's own ops at this dtype set the bar
        low, low_grad = _forward_backward(attention_reference, qkv, h, order, queries, dy)
        assert_as_close_as_torch(out, low, want, "output")
        assert_as_close_as_torch(grad, low_grad, want_grad, "gradient")
    if queries:  # rows of queries that were never computed get no gradient
        q_rows = (
            [hh * 3 * d + i for hh in range(h) for i in range(d)]
            if order == "legacy"
            else list(range(h * d))
        )
        assert grad[:, q_rows, queries:].abs().max() == 0


@pytest.mark.parametrize("d", [128, 256])
def test_large_head_dims(d):
    gen = torch.Generator().manual_seed(d)
    qkv = torch.randn(1, 3 * d, 20, generator=gen).to(KERNEL_DEVICE)
    assert rel_err(attention(qkv, 1, "new"), attention_reference(qkv, 1, "new")) < 1e-5


def test_custom_op_registration():
    qkv = torch.randn(2, 3 * 2 * 16, 10).to(KERNEL_DEVICE)
    torch.library.opcheck(torch.ops.fastsample.attention.default, (qkv, 2, "legacy", 0))
    torch.library.opcheck(torch.ops.fastsample.attention.default, (qkv, 2, "new", 1))
