"""Whole tiny networks on backend "triton" against backend "torch", guidance included."""

import pytest
import torch
from _helpers import DEVICE, golden, rel_err

from fastsample import Classifier, SuperResUNet, UNet
from fastsample.guidance import classifier_guide

_golden = golden


def _pair(cls, config, state):
    a, b = cls(**config), cls(**config)
    a.load_state_dict(state)
    b.load_state_dict(state)
    a, b = a.to(DEVICE).eval(), b.to(DEVICE).eval()
    return a.set_backend("torch"), b.set_backend("triton")


# unet_b differs from unet_a only in the qkv layout, which check_attention covers.
@pytest.mark.parametrize("name", ["unet_a", "sr"])
def test_unets(name):
    config, g = _golden()
    cls = SuperResUNet if name == "sr" else UNet
    state = g["unet_a_state_dict"] if name == "unet_b" else g[f"{name}_state_dict"]  # same keys
    eager, fused = _pair(cls, config[name], state)
    gen = torch.Generator().manual_seed(0)
    n, size = 2, config[name]["image_size"]
    x = torch.randn(n, 3, size, size, generator=gen).to(DEVICE)
    t = torch.tensor([1.0, 999.0]).to(DEVICE)
    y = torch.tensor([0, 9]).to(DEVICE)
    with torch.no_grad():
        if name == "sr":
            low = torch.randn(n, 3, size // 2, size // 2, generator=gen).to(DEVICE)
            want, got = eager(x, t, low_res=low, y=y), fused(x, t, low_res=low, y=y)
        else:
            want, got = eager(x, t, y), fused(x, t, y)
    assert rel_err(got, want) < 1e-5


def test_unet_fp16():
    config, g = _golden()
    eager, fused = _pair(UNet, config["unet_a"], g["unet_a_state_dict"])
    eager.set_precision(torch.float16)
    fused.set_precision(torch.float16)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 16, 16, generator=gen).to(DEVICE)
    t, y = torch.tensor([10.0, 700.0]).to(DEVICE), torch.tensor([2, 3]).to(DEVICE)
    with torch.no_grad():
        want, got = eager(x, t, y), fused(x, t, y)
    # float16 torsos both ways; the kernels round once where the reference rounds per op.
    assert rel_err(got, want) < 1e-2


def test_classifier_and_guidance_gradient():
    config, g = _golden()
    eager, fused = _pair(Classifier, config["classifier"], g["classifier_state_dict"])
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 16, 16, generator=gen).to(DEVICE)
    t = torch.tensor([0.0, 999.0]).to(DEVICE)
    y = torch.tensor([1, 8]).to(DEVICE)
    with torch.no_grad():
        assert rel_err(fused(x, t), eager(x, t)) < 1e-5
    want = classifier_guide(eager, y, 1.0)(x, t)
    got = classifier_guide(fused, y, 1.0)(x, t)
    assert rel_err(got, want) < 1e-5
