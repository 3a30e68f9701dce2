"""The kernels' plain-torch references, input checks and backend selection; the Triton kernels
themselves run in tests/kernels/ (interpreted on the CPU, compiled on a GPU) and are compiled for
sm_90 here to catch code generation failures without a GPU."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton  # the [test] extra installs it: a missing install fails, no skip

from fastsample import create_model, load_model, ops
from fastsample.kernels.attention import attention_reference
from fastsample.kernels.attention import check_inputs as attention_checks
from fastsample.kernels.group_norm import check_inputs as group_norm_checks
from fastsample.kernels.group_norm import group_norm_reference
from fastsample.unet import AttentionBlock, GroupNorm32

ROOT = Path(__file__).resolve().parents[1]


def test_group_norm_reference_against_float64_formula():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 5, 3, generator=gen, dtype=torch.float64)
    w, b = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    sc, sh = torch.randn(2, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    groups = x.reshape(2, 3, -1)
    mean = groups.mean(-1, keepdim=True)
    var = groups.var(-1, unbiased=False, keepdim=True)
    xhat = ((groups - mean) / torch.sqrt(var + 1e-5)).reshape_as(x)
    y = xhat * w[:, None, None] + b[:, None, None]
    y = y * (1 + sc[:, :, None, None]) + sh[:, :, None, None]
    y = y * torch.sigmoid(y)
    got = group_norm_reference(
        x.float(), 3, w.float(), b.float(), 1e-5, sc.float(), sh.float(), True
    )
    assert ((got.double() - y).abs().max() / y.abs().max()).item() < 1e-6


def test_attention_reference_against_explicit_softmax():
    gen = torch.Generator().manual_seed(1)
    heads, d, t = 2, 8, 5
    qkv = torch.randn(1, 3 * heads * d, t, generator=gen, dtype=torch.float64)
    for order in ("legacy", "new"):
        out = attention_reference(qkv.float(), heads, order)
        for h in range(heads):
            if order == "legacy":
                q, k, v = (qkv[0, h * 3 * d + p * d : h * 3 * d + (p + 1) * d] for p in range(3))
            else:
                q, k, v = (
                    qkv[0, p * heads * d + h * d : p * heads * d + (h + 1) * d] for p in range(3)
                )
            w = torch.softmax(q.T @ k / math.sqrt(d), dim=-1)  # [T, T]
            want = (w @ v.T).T  # [d, T]
            got = out[0, h * d : (h + 1) * d].double()
            assert (got - want).abs().max().item() < 1e-5
    first = attention_reference(qkv.float(), heads, "new", queries=1)
    assert torch.equal(first, attention_reference(qkv.float(), heads, "new")[..., :1])


def test_input_checks_name_the_problem():
    x = torch.randn(2, 6, 4, 4)
    cases = [
        (lambda: group_norm_checks(x.long(), 3, None, None, None, None), "dtype torch.int64"),
        (lambda: group_norm_checks(x, 4, None, None, None, None), "6 channels do not split"),
        (lambda: group_norm_checks(x, 3, torch.ones(5), None, None, None), "weight of shape (5,)"),
        (lambda: group_norm_checks(x, 3, None, None, torch.ones(2, 6), None), "together"),
        (lambda: group_norm_checks(x, 3, None, None, torch.ones(6), torch.ones(6)), "(2, 6)"),
        (lambda: group_norm_checks(x[..., ::2], 3, None, None, None, None), "contiguous"),
        (lambda: attention_checks(torch.randn(1, 96, 4), 2, "sideways", None), "'sideways'"),
        (lambda: attention_checks(torch.randn(1, 96, 4), 5, "new", None), "3 x 5 heads"),
        (lambda: attention_checks(torch.randn(1, 24, 4), 1, "new", None), "head dim 8"),
        (lambda: attention_checks(torch.randn(1, 96, 4), 2, "new", 5), "queries=5"),
    ]
    for call, needle in cases:
        with pytest.raises((ValueError, TypeError)) as info:
            call()
        assert needle in str(info.value), (needle, str(info.value))


def test_backend_selection():
    assert ops.resolve_kernels("auto", "cpu") == ("onednn" if ops.onednn_available() else "torch")
    assert ops.resolve_kernels("auto", "meta") == "torch"
    with pytest.raises(ValueError, match="'cuda'"):
        ops.resolve_kernels("cuda", "cpu")
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            ops.resolve_kernels("triton", "cpu")
    model = create_model("demo-mnist").set_kernels("torch")
    assert model.kernels == "torch" and model.kernels_on("cpu") == "torch"
    # One choice, held by the network and shared by every module that calls a kernel.
    norms = [m for m in model.modules() if isinstance(m, (GroupNorm32, AttentionBlock))]
    assert norms and all(m._kernels is model._kernels for m in norms)
    cpu = "onednn" if ops.onednn_available() else "torch"
    model = load_model("demo-mnist")  # "auto": resolved for the device the tensors are on
    assert model.kernels == "auto" and model.kernels_on() == cpu
    assert model.kernels_on("meta") == "torch"
    model.set_kernels("torch").set_kernels("auto")
    assert model.kernels_on() == cpu
    with pytest.raises(ValueError, match="kernels 'onednn' run on the CPU"):
        model.set_kernels("onednn").to("meta").set_kernels("onednn")


def test_torch_backend_is_the_reference_arithmetic():
    # The torch backend must stay op-for-op the reference's (golden tests rely on it).
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 64, 4, 4, generator=gen).half()
    w, b = torch.randn(64), torch.randn(64)
    sc, sh = torch.randn(2, 64).half(), torch.randn(2, 64).half()
    got = ops.group_norm(x, 32, w, b, scale=sc, shift=sh, silu=True)
    h = torch.nn.functional.group_norm(x.float(), 32, w, b, 1e-5).half()
    want = torch.nn.functional.silu(h * (1 + sc[:, :, None, None]) + sh[:, :, None, None])
    assert torch.equal(got, want)


def _cuobjdump() -> bool:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return tool.is_file()


# In a process of its own: this session's kernel modules may be interpreted (tests/conftest.py).
_COMPILE_ALL = """
import dataclasses, json
from fastsample.kernels.compile_check import compile_all
print(json.dumps([dataclasses.asdict(r) for r in compile_all(90)]))
"""


@pytest.mark.skipif(not _cuobjdump(), reason="needs Triton's NVIDIA backend (cuobjdump)")
def test_every_kernel_configuration_compiles_for_sm90():
    from fastsample.kernels.compile_check import Compiled

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # production launches keep Triton's default
    run = subprocess.run([sys.executable, "-c", _COMPILE_ALL], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    results = [Compiled(**r) for r in json.loads(run.stdout.strip().splitlines()[-1])]
    assert len(results) >= 40
    assert [r for r in results if r.problems(90)] == []  # every one can launch on an H100
    # The sampling fast path (GroupNorm, half-precision attention forward) keeps to registers.
    fast = [r for r in results if r.kernel.startswith("gn_") or
            (r.kernel == "attn_forward" and not r.config.startswith("float32"))]  # fmt: skip
    assert fast and [r.line() for r in fast if r.spills] == []
