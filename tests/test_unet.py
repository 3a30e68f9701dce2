"""Forward parity with the reference implementation's golden outputs (tiny random-weight models).

Driven by the golden set's config.json, so another golden set in the same format runs unchanged.
"""

from __future__ import annotations

import pytest
import torch

from conftest import golden_labels, rel_err
from fastsample import Classifier, SuperResUNet, UNet
from fastsample.unet import AttentionBlock

# float32: the same operations in the same order as the reference, except that the attention
# products run as matmul rather than einsum, so only accumulation order differs: a few ulps
# (2**-24 ~ 6e-8) per op through ~20 layers stays well inside 1e-5 of the output scale.
FP32_TOL = 1e-5


def _build(cls, kwargs, state_dict, **overrides):
    model = cls(**{**kwargs, **overrides})
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def legacy_to_new_qkv(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """The layout rule of the reference, written out index by index:
    new_row[p*C + h*ch + c] = legacy_row[h*3*ch + p*ch + c]."""
    channels = rows.shape[0] // 3
    ch = channels // heads
    out = torch.empty_like(rows)
    for p in range(3):
        for h in range(heads):
            for c in range(ch):
                out[p * channels + h * ch + c] = rows[h * 3 * ch + p * ch + c]
    return out


def test_unet_matches_reference_integer_and_fractional_t(golden):
    config, g = golden
    model = _build(UNet, config["unet_a"], g["unet_a_state_dict"])
    y = golden_labels(config["unet_a"], g)
    with torch.no_grad():
        out = model(g["in_x"], g["in_t"], y)
        out_float_t = model(g["in_x"], g["in_t_float"], y)
    assert out.shape == g["out_unet_a"].shape and out.dtype == torch.float32
    assert rel_err(out, g["out_unet_a"]) <= FP32_TOL
    assert rel_err(out_float_t, g["out_unet_a_float_t"]) <= FP32_TOL
    # The fractional timesteps must actually change the output (the test would be void if not).
    assert rel_err(g["out_unet_a_float_t"], g["out_unet_a"]) > 100 * FP32_TOL


def test_new_qkv_order_unet_matches_reference(golden):
    config, g = golden
    legacy = UNet(**config["unet_a"])
    state = dict(g["unet_a_state_dict"])
    for name, module in legacy.named_modules():
        if isinstance(module, AttentionBlock):
            for key in (f"{name}.qkv.weight", f"{name}.qkv.bias"):
                state[key] = legacy_to_new_qkv(state[key], module.heads)
    model = _build(UNet, config["unet_b"], state)
    assert config["unet_b"]["use_new_attention_order"] and model.config.qkv_order == "new"
    y = golden_labels(config["unet_b"], g)
    with torch.no_grad():
        out = model(g["in_x"], g["in_t"], y)
        # Same permuted weights read with the legacy layout: must be far off, or the
        # comparison above could not tell the two layouts apart.
        wrong = _build(UNet, config["unet_a"], state)(g["in_x"], g["in_t"], y)
    # The reference's unet_b output equals its unet_a output (config: max diff 0.0).
    assert config["unet_b_max_abs_diff_vs_unet_a"] == 0.0
    assert rel_err(out, g["out_unet_a"]) <= FP32_TOL
    assert rel_err(wrong, g["out_unet_a"]) > 1e-2


def test_super_res_unet_matches_reference(golden):
    config, g = golden
    model = _build(SuperResUNet, config["sr"], g["sr_state_dict"])
    assert model.input_blocks[0][0].in_channels == 2 * config["sr"]["in_channels"]
    with torch.no_grad():
        y = golden_labels(config["sr"], g)
        out = model(g["in_x"], g["in_t"], low_res=g["in_low_res"], y=y)
    assert rel_err(out, g["out_sr"]) <= FP32_TOL
    upsampled = torch.nn.functional.interpolate(
        g["in_low_res"], g["in_x"].shape[2:], mode="bilinear"
    )
    assert rel_err(upsampled, g["sr_bilinear_upsampled_low_res"]) <= FP32_TOL


def test_classifier_matches_reference(golden):
    config, g = golden
    model = _build(Classifier, config["classifier"], g["classifier_state_dict"])
    with torch.no_grad():
        logits = model(g["in_x"], g["in_t"])
    assert logits.shape == g["out_classifier"].shape
    assert rel_err(logits, g["out_classifier"]) <= FP32_TOL


def test_fp16_torso_matches_reference_convert_to_fp16(golden):
    config, g = golden
    model = _build(UNet, config["unet_a"], g["unet_a_state_dict"], use_fp16=True)
    model.convert_to_fp16()
    with torch.no_grad():
        out = model(g["in_x"], g["in_t"], golden_labels(config["unet_a"], g))
    assert out.dtype == torch.float32  # the head runs in float32, as in the reference
    # fp16 ops in the reference's order on the same CPU kernels: allow a couple of float16 ulps
    # at the output scale (unit roundoff 2**-11 ~ 4.9e-4), far tighter than the fp16-vs-fp32 gap.
    assert rel_err(out, g["out_unet_a_fp16_torso_cpu"]) <= 1e-3
    assert rel_err(g["out_unet_a_fp16_torso_cpu"], g["out_unet_a"]) > 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_torso_close_to_fp32(golden, dtype):
    config, g = golden
    model = _build(UNet, config["unet_a"], g["unet_a_state_dict"]).set_precision(dtype)
    assert model.dtype == dtype
    assert model.input_blocks[1][0].in_layers[0].weight.dtype == torch.float32  # GN stays fp32
    with torch.no_grad():
        out = model(g["in_x"], g["in_t"], golden_labels(config["unet_a"], g))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    # bf16 keeps 8 mantissa bits (unit roundoff 2**-9 ~ 2e-3); through the network the error
    # grows to a few times that. Half of a percent would be a broken dtype flow for fp16.
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-2
    assert rel_err(out, g["out_unet_a"]) <= tol


def test_unconverted_fp16_model_says_what_to_do(golden):
    config, g = golden
    model = UNet(**{**config["unet_a"], "use_fp16": True})
    with pytest.raises(RuntimeError, match="set_precision"):
        model(g["in_x"], g["in_t"], golden_labels(config["unet_a"], g))


def test_label_and_timestep_inputs_are_checked(golden):
    config, g = golden
    model = UNet(**{**config["unet_a"], "num_classes": 10}).eval()
    x, y = g["in_x"], torch.arange(g["in_x"].shape[0]) % 10
    with pytest.raises(ValueError, match="class-conditional"):
        model(x, g["in_t"])
    with pytest.raises(ValueError, match="timesteps of shape"):
        model(x, torch.zeros(x.shape[0] + 1), y)
    with pytest.raises(ValueError, match="unconditional: y must be None"):
        UNet(**{**config["unet_a"], "num_classes": None})(x, g["in_t"], y)
    with torch.no_grad():  # a scalar timestep is broadcast over the batch
        scalar = model(x, 500, y)
        batched = model(x, torch.full((x.shape[0],), 500), y)
    assert torch.equal(scalar, batched)


def test_unknown_constructor_argument_names_the_valid_ones():
    with pytest.raises(TypeError, match="valid arguments: image_size"):
        UNet(
            image_size=16,
            in_channels=3,
            model_channels=32,
            out_channels=6,
            num_res_blocks=1,
            attention_resolutions=(2,),
            bogus=1,
        )
