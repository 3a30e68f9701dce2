"""bfloat16 on the CPU (the onednn kernels): convolutions and projections in bf16 on oneDNN
(packed weights, channels_last), GroupNorm statistics and affine in fp32, the attention logits
and softmax in fp32, the timestep embedding in fp32; the network output, the guidance gradient
and the sampler's state in fp32.

Tolerances: bfloat16 keeps 8 significant bits, so storing a value rounds it by up to 2^-9 (2e-3)
relative, and an op that rounds its inputs and its output is off by about 1e-2 relative at
worst. A layer is checked against fp64 on the same bf16-rounded inputs and weights, within a
few roundings (named where asserted); a network against torch's own bf16 arithmetic (the torch
kernels: ADM's ops as the reference's fp16 mode orders them) with the three-way rule of the
kernel tests (`assert_as_close_as_torch`): no less accurate than torch's ops at bf16.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastsample
from conftest import assert_as_close_as_torch, rms_err
from fastsample import ops
from fastsample.catalog import DEMO_CLASSIFIER, DEMO_UNET, PRESETS
from fastsample.kernels.reference import attention_reference
from fastsample.layers import AttentionBlock, Conv2d, GroupNorm32
from fastsample.netfns import guidance_fn

BF16 = torch.bfloat16
ROUNDING = 2.0**-9  # one bf16 rounding, relative (half an ulp of 8 significant bits)

pytestmark = pytest.mark.skipif(
    not ops.onednn_dtype(BF16), reason="oneDNN has no bf16 kernels for this CPU (AVX-512)"
)


def _onednn(module: torch.nn.Module) -> torch.nn.Module:
    choice = ops.KernelChoice("onednn")
    for m in module.modules():
        if hasattr(m, "_kernels"):
            m._kernels = choice
    return module.eval().requires_grad_(False)


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(("kernel", "stride", "padding"), [(3, 1, 1), (1, 1, 0), (3, 2, 1)])
def test_bf16_convolution_runs_packed_and_matches_fp64(kernel, stride, padding):
    """Forward and input gradient (classifier guidance), against fp64 and torch's bf16 conv."""
    gen = torch.Generator().manual_seed(kernel * 10 + stride)
    conv = _onednn(Conv2d(32, 48, kernel, stride=stride, padding=padding).to(BF16))
    x = _channels_last(torch.randn(2, 32, 12, 10, generator=gen).to(BF16))
    grad_out = torch.randn(conv(x).shape, generator=gen).to(BF16)
    results = {}
    for name, (dtype, fn) in {
        "onednn": (BF16, conv),
        "torch": (BF16, lambda x: F.conv2d(x, conv.weight, conv.bias, stride, padding)),
        "fp64": (
            torch.float64,
            lambda x: F.conv2d(x, conv.weight.double(), conv.bias.double(), stride, padding),
        ),  # fmt: skip
    }.items():
        x_in = x.to(dtype).requires_grad_(True)
        out = fn(x_in)
        (grad,) = torch.autograd.grad(out, x_in, grad_out.to(dtype))
        results[name] = out.detach(), grad
    out, grad = results["onednn"]
    assert out.dtype == grad.dtype == BF16 and out.is_contiguous(memory_format=torch.channels_last)
    assert conv in ops._PACKED  # the packed oneDNN path ran, not torch's fallback
    for i, what in enumerate(("forward", "input gradient")):
        assert_as_close_as_torch(
            results["onednn"][i], results["torch"][i], results["fp64"][i], what
        )
        # fp32 accumulation: only the output's rounding (and the bias's) remain
        assert rms_err(results["onednn"][i], results["fp64"][i]) <= 2 * ROUNDING, what


def test_bf16_projection_runs_packed_and_matches_fp64():
    gen = torch.Generator().manual_seed(0)
    proj = _onednn(torch.nn.Conv1d(64, 96, 1).to(BF16))
    tokens = torch.randn(2, 40, 64, generator=gen).to(BF16)  # [N, T, C]
    out = ops.linear(proj, tokens, "onednn")
    expected = F.linear(tokens.double(), proj.weight.double().flatten(1), proj.bias.double())
    assert out.dtype == BF16 and proj in ops._PACKED
    assert_as_close_as_torch(out, F.linear(tokens, proj.weight.flatten(1), proj.bias), expected)
    assert rms_err(out, expected) <= 2 * ROUNDING


def _affine_silu(y, weight, bias, scale, shift):
    """The rest of GroupNorm32.fused after the normalisation, in fp64."""
    y = y * weight.double()[:, None, None] + bias.double()[:, None, None]
    return F.silu(y * (1 + scale.double()[:, :, None, None]) + shift.double()[:, :, None, None])


def _group_norm_fp64(x, weight, bias, scale, shift):
    return _affine_silu(F.group_norm(x.double(), 32), weight, bias, scale, shift)


def _group_norm_flawed(x, weight, bias, scale, shift, statistics):
    """The same from flawed statistics: "bf16" stores each group's mean and variance in bf16;
    "one-pass" takes the variance as E[x^2] - E[x]^2 in fp32."""
    groups = x.reshape(x.shape[0], 32, -1).float()
    mean = groups.mean(-1, keepdim=True)
    if statistics == "bf16":
        mean = mean.to(BF16).float()
        var = (groups - mean).square().mean(-1, keepdim=True).to(BF16)
    else:
        var = groups.square().mean(-1, keepdim=True) - mean.square()
    y = (groups.double() - mean.double()) / torch.sqrt(var.double().clamp_min(0) + 1e-5)
    return _affine_silu(y.reshape(x.shape), weight, bias, scale, shift)


# (mean, std) of the inputs "far from zero": 1000 / 1 in fp32; in bf16, whose 8 significant bits
# hold no finer spread there (a step of 4), 1002 / 8: a mean halfway between two bf16 values.
FAR = {torch.float32: (1000.0, 1.0), BF16: (1002.0, 8.0)}
# Up to three bf16 roundings: the normalised value (scale-shift folded in at n = 1), the
# scale-shift (n > 1), the SiLU. fp32: a few ulps.
GROUP_NORM_TOL = {torch.float32: 1e-6, BF16: 3 * ROUNDING}


# 64 channels: two per group, where bf16 maps are normalised as fp32 copies; 192: six, on
# torch's mixed-precision kernel
CHANNELS = pytest.mark.parametrize("channels", [64, 192])


@pytest.mark.parametrize("dtype", [torch.float32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("far", [False, True], ids=["near", "far"])
@CHANNELS
def test_group_norm_statistics_in_fp32(dtype, n, far, channels):
    """GroupNorm + scale-shift + SiLU of a channels_last map, against fp64 on the same values.
    Far from zero the variance survives only in fp32 statistics of centred data: bf16
    statistics, and in fp32 a one-pass variance (torch's own channels_last GroupNorm sums x and
    x*x in one pass), are off by 10x the tolerance and more."""
    gen = torch.Generator().manual_seed(n)
    norm = _onednn(GroupNorm32(channels))
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(channels, generator=gen))
        norm.bias.copy_(0.1 * torch.randn(channels, generator=gen))
    mean, std = FAR[dtype] if far else (0.0, 1.0)
    x = _channels_last((mean + std * torch.randn(n, channels, 12, 12, generator=gen)).to(dtype))
    scale, shift = (0.2 * torch.randn(2, n, channels, generator=gen)).to(dtype)
    out = norm.fused(x, scale=scale, shift=shift, silu=True)
    expected = _group_norm_fp64(x, norm.weight, norm.bias, scale, shift)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    assert rms_err(out, expected) <= GROUP_NORM_TOL[dtype], rms_err(out, expected)
    if far:
        flawed = "bf16" if dtype == BF16 else "one-pass"
        wrong = _group_norm_flawed(x, norm.weight, norm.bias, scale, shift, flawed)
        assert rms_err(wrong, expected) > 10 * GROUP_NORM_TOL[dtype]


@CHANNELS
def test_bf16_group_norm_gradient_matches_fp64(channels):
    """The guidance gradient through a GroupNorm (+ scale-shift, SiLU) of a bf16 map."""
    gen = torch.Generator().manual_seed(3)
    norm = _onednn(GroupNorm32(channels))
    x = _channels_last((5 + torch.randn(2, channels, 8, 8, generator=gen)).to(BF16))
    scale, shift = (0.2 * torch.randn(2, 2, channels, generator=gen)).to(BF16)
    grad_out = torch.randn(x.shape, generator=gen)
    x_bf16, x_fp64 = x.clone().requires_grad_(True), x.double().requires_grad_(True)
    out = norm.fused(x_bf16, scale=scale, shift=shift, silu=True)
    (grad,) = torch.autograd.grad(out, x_bf16, grad_out.to(BF16))
    out64 = _group_norm_fp64(x_fp64, norm.weight, norm.bias, scale, shift)
    (expected,) = torch.autograd.grad(out64, x_fp64, grad_out.double())
    assert grad.dtype == BF16
    assert rms_err(grad, expected) <= 4 * ROUNDING  # the forward's roundings, the gradient's


def test_bf16_attention_logits_and_softmax_in_fp32():
    """Attention with large logits (std about 16): rounding the logits to bf16 before the
    softmax (ADM's own arithmetic at low precision) is off by about 2e-2; the onednn kernels
    keep the logits and the softmax in fp32, so only the probabilities' and the output's
    roundings remain (measured 1.3e-3)."""
    gen = torch.Generator().manual_seed(0)
    heads, d, t = 2, 32, 64
    qkv = torch.randn(1, 3 * heads * d, t, generator=gen)
    qkv[:, : 2 * heads * d] *= 4  # "new" order: q of every head, then k, then v
    qkv = qkv.to(BF16)
    expected = attention_reference(qkv.double(), heads, "new")
    logits_bf16 = attention_reference(qkv, heads, "new")
    tokens = ops.token_attention(qkv.transpose(1, 2).contiguous(), heads, "new").transpose(1, 2)
    assert tokens.dtype == BF16
    assert rms_err(tokens, expected) <= 3 * ROUNDING
    assert rms_err(logits_bf16, expected) > 3 * rms_err(tokens, expected)


def test_bf16_attention_block_takes_the_token_path(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    block = AttentionBlock(64, 2, "legacy")
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    expected_block = copy.deepcopy(block).double()
    for m in (block.qkv, block.proj_out):
        m.to(BF16)  # as set_precision converts the torso's convolutions
    _onednn(block)
    calls, token_attention = [], ops.token_attention
    monkeypatch.setattr(ops, "token_attention", lambda *a: calls.append(a) or token_attention(*a))
    x = _channels_last(torch.randn(2, 64, 8, 8, generator=gen).to(BF16))
    out = block(x)
    expected = expected_block(x.double())
    assert calls and out.dtype == BF16 and out.is_contiguous(memory_format=torch.channels_last)
    # each weight, the norm's output, q k v, the attention output and the sum: ~6 roundings
    assert rms_err(out, expected) <= 6 * ROUNDING


@pytest.fixture(scope="module")
def demo_networks():
    """The demo UNet and classifier: fp32, bf16 on the onednn kernels, bf16 on the torch ops."""
    return {
        name: (fastsample.load_model(DEMO_UNET, dtype=dtype, kernels=kernels),
               fastsample.load_model(DEMO_CLASSIFIER, dtype=dtype, kernels=kernels))
        for name, dtype, kernels in (("fp32", torch.float32, "torch"), ("onednn", BF16, "auto"),
                                     ("torch", BF16, "torch"))
    }  # fmt: skip


def test_bf16_demo_networks_are_close_to_fp32(demo_networks):
    """Output and guidance gradient in fp32, as close to fp32's as torch's own bf16 ops are;
    every torso convolution ran in bf16 on a channels_last map; GroupNorm parameters, the
    timestep embedding and the ResBlocks' embedding projections stay fp32."""
    unet, classifier = demo_networks["onednn"]
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.append((m, a[0])))
             for m in unet.modules() if isinstance(m, Conv2d)]  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 1, 32, 32, generator=gen)
    t = torch.tensor([10, 50, 200, 300, 500, 700, 900, 990])
    y = torch.arange(8)
    outputs = {}
    for name, (net, clf) in demo_networks.items():
        with torch.no_grad():
            out = net(x, t, y)
        outputs[name] = out, guidance_fn(clf, y)(x, t)
    for hook in hooks:
        hook.remove()
    out, grad = outputs["onednn"]
    assert out.dtype == grad.dtype == torch.float32 and out.is_contiguous()
    for i, what in enumerate(("UNet output", "guidance gradient")):
        assert_as_close_as_torch(outputs["onednn"][i], outputs["torch"][i], outputs["fp32"][i],
                                 what)  # fmt: skip
        assert rms_err(outputs["onednn"][i], outputs["fp32"][i]) <= 5e-2, what
    head = unet.out[2]
    torso = [(m, h) for m, h in seen if m is not head]
    assert torso and all(h.dtype == BF16 for _, h in torso)
    assert all(h.is_contiguous(memory_format=torch.channels_last) for _, h in torso)
    assert all(m in ops._PACKED for m, _ in torso)
    for net in (unet, classifier):
        fp32 = [net.time_embed[0]] + [
            m.emb_layers[1] for m in net.modules() if hasattr(m, "emb_layers")
        ]
        fp32 += [m for m in net.modules() if isinstance(m, GroupNorm32)]
        assert all(p.dtype == torch.float32 for m in fp32 for p in m.parameters())


def test_bf16_guided_samples_are_finite_and_close_to_fp32(demo_networks):
    """Guided DDIM on the demo from the same seeds: no NaN/inf (the pipeline would warn and
    retry in fp32), the images within a few grey levels of fp32's, and the judge reading
    the same digits."""
    from fastsample.judge import images_to_input, load_judge

    diffusion = PRESETS[DEMO_UNET].diffusion
    images, predicted = {}, {}
    judge = load_judge()
    for name in ("fp32", "onednn"):
        unet, classifier = (copy.deepcopy(n).set_kernels("auto") for n in demo_networks[name])
        pipe = fastsample.Pipeline(unet, diffusion, classifier, guidance_scale=2.0)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # (the fp32 retry warns; the start advisory is known)
            warnings.filterwarnings("ignore", message="steps 'ddim10' start at t = 900")
            result = pipe.generate(10, batch_size=10, classes=list(range(10)), steps="ddim10",
                                   seed=0, progress=False)  # fmt: skip
        images[name] = result.images.astype(np.int16)
        with torch.no_grad():
            predicted[name] = judge(images_to_input(result.images)).argmax(1).numpy()
    # The sampler's state stays fp32: the bf16 networks take fp32 x_t and return fp32.
    unet, classifier = demo_networks["onednn"]
    states = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="steps 'ddim10' start at t = 900")
        fastsample.sample(unet, diffusion.respaced("ddim10"), (2, 1, 32, 32),
                          y=torch.tensor([3, 8]), sampler="ddim", classifier=classifier,
                          guidance_scale=2.0, seed=0,
                          callback=lambda k, x, x0: states.append((x, x0)))  # fmt: skip
    assert len(states) == 10
    assert all(t.dtype == torch.float32 and t.isfinite().all() for s in states for t in s)
    diff = np.abs(images["onednn"] - images["fp32"])
    assert diff.mean() < 1.0 and diff.max() <= 64, (diff.mean(), diff.max())
    assert (predicted["onednn"] == predicted["fp32"]).mean() >= 0.9


def test_dtype_errors_are_clear(monkeypatch, tmp_path):
    valid = r"torch.float32, torch.float16, torch.bfloat16 or None \(auto\)"
    with pytest.raises(ValueError, match=rf"dtype=torch.float64: expected {valid}"):
        fastsample.create_model(DEMO_UNET, dtype=torch.float64)
    with pytest.raises(TypeError, match=rf"dtype='bf16': expected a torch.dtype: {valid}"):
        fastsample.create_model(DEMO_UNET, dtype="bf16")
    # before the file is even looked at
    with pytest.raises(ValueError, match="dtype=torch.int8"):
        fastsample.load_model(tmp_path / "missing.pt", dtype=torch.int8)
    monkeypatch.setattr(ops, "_onednn_bf16", lambda: False)
    with pytest.warns(UserWarning, match="no bfloat16 kernels for this CPU.*slower than float32"):
        net = fastsample.create_model(DEMO_UNET, dtype=BF16)
    assert net.dtype == BF16 and not ops.onednn_eligible(torch.zeros(1, 1, 1, 1, dtype=BF16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastsample.create_model(DEMO_UNET, dtype=BF16, device="meta")
