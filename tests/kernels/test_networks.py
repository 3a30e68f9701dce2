"""Whole tiny networks on the Triton kernels against the reference's golden outputs (float32),
against their float32 selves (float16, three ways), and the guidance gradient."""

import pytest
import torch

from conftest import KERNEL_DEVICE, assert_as_close_as_torch, golden_labels, rel_err
from fastsample import Classifier, SuperResUNet, UNet
from fastsample.netfns import guidance_fn

pytestmark = pytest.mark.usefixtures("triton_kernels")


def _network(cls, config, state, kernels):
    net = cls(**config)
    net.load_state_dict(state)
    return net.to(KERNEL_DEVICE).eval().requires_grad_(False).set_kernels(kernels)


def _on_device(*tensors):
    return [t.to(KERNEL_DEVICE) if t is not None else None for t in tensors]


# unet_b differs from unet_a only in the qkv layout, which test_attention.py covers.
@pytest.mark.parametrize("name", ["unet_a", "sr"])
def test_unets_match_reference(golden, name):
    config, g = golden
    cls = SuperResUNet if name == "sr" else UNet
    net = _network(cls, config[name], g[f"{name}_state_dict"], "triton")
    x, t, low, y = _on_device(g["in_x"], g["in_t"], g["in_low_res"], golden_labels(config[name], g))
    with torch.no_grad():
        out = net(x, t, low_res=low, y=y) if name == "sr" else net(x, t, y)
    assert rel_err(out, g[f"out_{name}"]) < 1e-5


def test_unet_fp16_as_close_as_torch_fp16(golden):
    config, g = golden
    state = g["unet_a_state_dict"]
    x, t, y = _on_device(g["in_x"], g["in_t"], golden_labels(config["unet_a"], g))
    outputs = {}
    for kernels, dtype in [("torch", torch.float32), ("torch", torch.float16),
                           ("triton", torch.float16)]:  # fmt: skip
        net = _network(UNet, config["unet_a"], state, kernels).set_precision(dtype)
        with torch.no_grad():
            outputs[kernels, dtype] = net(x, t, y)
    assert_as_close_as_torch(
        outputs["triton", torch.float16],
        outputs["torch", torch.float16],
        outputs["torch", torch.float32],
        "fp16 torso",
    )


def test_classifier_and_guidance_gradient_match_reference(golden):
    config, g = golden
    clf = _network(Classifier, config["classifier"], g["classifier_state_dict"], "triton")
    x, t, y = _on_device(g["in_x"], g["in_t"], g["in_y"])
    with torch.no_grad():
        assert rel_err(clf(x, t), g["out_classifier"]) < 1e-5
    grad = guidance_fn(clf, y)(x, t) * config["cond_fn_scale"]
    assert rel_err(grad, g["out_cond_fn_grad"]) < 1e-5
