"""The onednn backend (the default on the CPU): pre-packed convolutions and projections,
Winograd F(2x2, 3x3), token attention, channels_last. Checked against the reference's golden
outputs and against the torch backend (the reference's ops) within fp32 tolerance.

The oneDNN kernels and the Winograd transform sum in another order than the reference's
convolutions: a few ulps per layer, so 1e-5 of the output scale holds (as for the golden tests).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import fastsample
from conftest import golden_labels, rel_err
from fastsample import Classifier, SuperResUNet, UNet, ops
from fastsample.netfns import guidance_fn, scaled
from fastsample.unet import Conv2d

FP32_TOL = 1e-5

pytestmark = pytest.mark.skipif(
    not ops.onednn_available(), reason="this torch build has no oneDNN (mkldnn)"
)


def _golden(cls, config, state_dict, backend="onednn"):
    net = cls(**config)
    net.load_state_dict(state_dict)
    return net.eval().requires_grad_(False).set_kernels(backend)


def test_auto_backend_is_onednn_on_the_cpu():
    assert ops.resolve_kernels("auto", "cpu") == "onednn"
    net = fastsample.create_model("demo-mnist")
    assert net.backend == "onednn"
    cpu = torch.device("cpu")
    assert all(m._kernels.on(cpu) == "onednn" for m in net.modules() if isinstance(m, Conv2d))
    with pytest.raises(ValueError, match="kernels 'onednn' run on the CPU.*meta"):
        ops.resolve_kernels("onednn", "meta")
    with pytest.raises(ValueError, match="'auto', 'torch', 'triton' or 'onednn'"):
        ops.resolve_kernels("mkl", "cpu")


def test_golden_networks_on_onednn(golden):
    config, g = golden
    unet = _golden(UNet, config["unet_a"], g["unet_a_state_dict"])
    sr = _golden(SuperResUNet, config["sr"], g["sr_state_dict"])
    classifier = _golden(Classifier, config["classifier"], g["classifier_state_dict"])
    with torch.no_grad():
        out = unet(g["in_x"], g["in_t"], golden_labels(config["unet_a"], g))
        out_sr = sr(g["in_x"], g["in_t"], low_res=g["in_low_res"],
                    y=golden_labels(config["sr"], g))  # fmt: skip
        logits = classifier(g["in_x"], g["in_t"])
    assert out.is_contiguous() and out.shape == g["out_unet_a"].shape
    assert rel_err(out, g["out_unet_a"]) <= FP32_TOL
    assert rel_err(out_sr, g["out_sr"]) <= FP32_TOL
    assert rel_err(logits, g["out_classifier"]) <= FP32_TOL
    # The packed path ran (not the torch fallback): every torso conv has its packed weights.
    assert all(m in ops._PACKED for m in unet.modules() if isinstance(m, Conv2d))


def test_guidance_gradient_on_onednn(golden):
    config, g = golden
    classifier = _golden(Classifier, config["classifier"], g["classifier_state_dict"])
    guide = scaled(guidance_fn(classifier, g["in_y"]), config["cond_fn_scale"])
    grad = guide(g["in_x"], g["in_t"])
    assert rel_err(grad, g["out_cond_fn_grad"]) <= FP32_TOL
    assert not any(p.grad is not None for p in classifier.parameters())


def test_new_attention_order_and_other_pools_match_torch(golden):
    config, g = golden
    x, t = g["in_x"], g["in_t"]
    cfg = dict(config["unet_a"], use_new_attention_order=True, num_head_channels=16)
    torch.manual_seed(0)
    unet = UNet(**cfg).eval().requires_grad_(False)
    for p in unet.parameters():
        p.normal_(0, 0.1)  # no zero-initialized layer hides an error
    y = golden_labels(cfg, g)
    with torch.no_grad():
        expected = unet(x, t, y)
        assert rel_err(unet.set_kernels("onednn")(x, t, y), expected) <= FP32_TOL
    for pool in ("adaptive", "spatial", "spatial_v2"):
        torch.manual_seed(1)
        clf = Classifier(**dict(config["classifier"], pool=pool)).eval().requires_grad_(False)
        for p in clf.parameters():
            p.normal_(0, 0.1)
        y = torch.tensor([1, 7])
        grad_torch = guidance_fn(clf.set_kernels("torch"), y)(x, t)
        grad_onednn = guidance_fn(clf.set_kernels("onednn"), y)(x, t)
        assert rel_err(grad_onednn, grad_torch) <= FP32_TOL, pool


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    ("n", "c_in", "c_out", "size"), [(1, 5, 7, 6), (2, 16, 3, 10), (3, 8, 8, 2)]
)
def test_winograd_conv_equals_conv2d(n, c_in, c_out, size, channels_last):
    torch.manual_seed(n * 100 + c_in)
    x = torch.randn(n, c_in, size, size + 2)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(c_out, c_in, 3, 3), torch.randn(c_out)
    out = ops.winograd_conv3x3(x, ops.winograd_weight(weight), bias)
    expected = F.conv2d(x, weight, bias, padding=1)
    assert out.shape == expected.shape
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(out, expected) <= FP32_TOL
    assert rel_err(ops.winograd_conv3x3(x, ops.winograd_weight(weight), None),
                   expected - bias[:, None, None]) <= FP32_TOL  # fmt: skip


def test_wide_network_takes_winograd_and_matches_torch():
    """A UNet wide enough for the Winograd rule (384 channels on 32x32 maps): forward and the
    classifier's input gradient equal the torch backend's."""
    torch.manual_seed(0)
    unet = UNet(image_size=32, in_channels=3, model_channels=384, out_channels=3,
                num_res_blocks=1, attention_resolutions=(2,), channel_mult=(1, 1),
                num_head_channels=64, use_scale_shift_norm=True)  # fmt: skip
    unet.eval().requires_grad_(False)
    for p in unet.parameters():
        p.normal_(0, 0.02)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10, 900])
    with torch.no_grad():
        expected = unet(x, t)
        out = unet.set_kernels("onednn")(x, t)
    assert rel_err(out, expected) <= FP32_TOL
    packed = [ops._PACKED[m] for m in unet.modules() if isinstance(m, Conv2d)]
    assert any(p._winograd is not None for p in packed)  # the rule fired...
    assert any(p._weight is not None for p in packed)  # ...and not everywhere


@pytest.mark.parametrize(("kernel", "stride", "padding"), [(3, 1, 1), (1, 1, 0), (3, 2, 1)])
def test_packed_conv_input_gradient(kernel, stride, padding):
    torch.manual_seed(kernel + stride)
    conv = Conv2d(6, 10, kernel, stride=stride, padding=padding).requires_grad_(False)
    x = torch.randn(2, 6, 9, 8).contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn(conv(x).shape)
    grads = {}
    for backend in ("torch", "onednn"):
        conv._kernels = ops.KernelChoice(backend)
        x_in = x.clone().requires_grad_(True)
        out = conv(x_in)
        (grads[backend],) = torch.autograd.grad(out, x_in, grad_out)
        grads[backend + "_out"] = out.detach()
    assert rel_err(grads["onednn_out"], grads["torch_out"]) <= FP32_TOL
    assert rel_err(grads["onednn"], grads["torch"]) <= FP32_TOL


def test_packed_weights_follow_weight_changes_and_training():
    torch.manual_seed(0)
    net = UNet(image_size=8, in_channels=3, model_channels=32, out_channels=3, num_res_blocks=1,
               attention_resolutions=(1,), channel_mult=(1,), num_heads=2).eval()  # fmt: skip
    for p in net.parameters():
        p.data.normal_(0, 0.1)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 700])
    net.requires_grad_(False).set_kernels("onednn")
    with torch.no_grad():
        before = net(x, t)
        # new weights in place (what load_state_dict does): the packed copies are remade
        state = {k: v * 1.5 if v.is_floating_point() else v for k, v in net.state_dict().items()}
        net.load_state_dict(state)
        after = net(x, t)
        assert rel_err(after, net.set_kernels("torch")(x, t)) <= FP32_TOL
    assert rel_err(after, before) > 1e-2
    # Trainable weights: autograd gets the weight gradients (the torch ops run).
    net.set_kernels("onednn").requires_grad_(True)
    net(x, t).square().mean().backward()
    onednn_grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    net.set_kernels("torch")(x, t).square().mean().backward()
    expected = [p.grad for p in net.parameters()]
    # relative to the largest gradient: some parameters' gradients are ~1e-10 of it
    scale = max(e.abs().max() for e in expected)
    for name, ours, theirs in zip(
        dict(net.named_parameters()), onednn_grads, expected, strict=True
    ):
        assert (ours - theirs).abs().max() <= 1e-5 * scale, name
    # A network that ran packed still deep-copies (the packed forms live outside it).
    clone = copy.deepcopy(net)
    assert rel_err(clone(x, t).detach(), net(x, t).detach()) == 0.0


def test_token_attention_equals_qkv_attention():
    torch.manual_seed(0)
    n, heads, d, t = 2, 3, 16, 11
    qkv = torch.randn(n, 3 * heads * d, t)
    for order in ("legacy", "new"):
        expected = ops.qkv_attention(qkv, heads, order)  # [N, H*D, T]
        out = ops.token_attention(qkv.transpose(1, 2).contiguous(), heads, order)  # [N, T, H*D]
        assert rel_err(out.transpose(1, 2), expected) <= FP32_TOL, order


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_fold_matches_reference(batch, affine):
    """Batch 1 folds the scale-shift into the norm's affine; larger batches use one addcmul;
    SiLU runs in place only where autograd does not record."""
    torch.manual_seed(batch)
    x = torch.randn(batch, 64, 5, 6).contiguous(memory_format=torch.channels_last)
    weight, bias = (torch.randn(64), torch.randn(64)) if affine else (None, None)
    scale, shift = torch.randn(batch, 64), torch.randn(batch, 64)
    for kwargs in ({}, {"silu": True}, {"scale": scale, "shift": shift, "silu": True}):
        expected = ops.group_norm(x, 32, weight, bias, **kwargs, kernels="torch")
        out = ops.group_norm(x, 32, weight, bias, **kwargs, kernels="onednn")
        assert rel_err(out, expected) <= FP32_TOL, kwargs
        x_in = x.clone().requires_grad_(True)
        grad_out = torch.randn(expected.shape)
        grads = [
            torch.autograd.grad(ops.group_norm(x_in, 32, weight, bias, **kwargs, kernels=b),
                                x_in, grad_out)[0]
            for b in ("torch", "onednn")
        ]  # fmt: skip
        assert rel_err(grads[1], grads[0]) <= FP32_TOL, kwargs
