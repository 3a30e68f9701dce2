"""The 15 presets against the checkpoint manifests built from the reference implementation, and
the README flag parser."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import fastsample
from conftest import load_manifest, manifest_stems
from fastsample import Classifier, SuperResUNet, UNet, create_model
from fastsample.catalog import RELEASED
from fastsample.config import (
    CLASSIFIER_SAMPLE_FLAGS,
    ClassifierConfig,
    UNetConfig,
    parse_flags,
    unet_config_from_flags,
)
from fastsample.summary import summarize

STEMS = manifest_stems()
KIND_CLASS = {"UNetModel": UNet, "SuperResModel": SuperResUNet, "EncoderUNetModel": Classifier}
ORDER = {"QKVAttentionLegacy": "legacy", "QKVAttention": "new"}


def test_every_manifest_has_a_preset_and_back():
    assert len(STEMS) == 15, "expected the 15 released checkpoint manifests (tests/data)"
    assert sorted(RELEASED) == STEMS
    assert set(fastsample.presets) - set(RELEASED) == {"demo-mnist", "demo-mnist-classifier"}


@pytest.mark.parametrize("stem", STEMS)
def test_preset_state_dict_matches_manifest(stem):
    m = load_manifest(stem)
    model = create_model(stem, device="meta")
    assert type(model) is KIND_CLASS[m["kind"]]
    layout = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    assert layout == [(k, v) for k, v in m["state_dict"].items()]  # same keys, order, shapes
    assert len(layout) == m["state_dict_num_keys"]
    assert sum(p.numel() for p in model.parameters()) == m["parameter_count"]


@pytest.mark.parametrize("stem", STEMS)
def test_readme_flags_build_the_preset_network(stem):
    m = load_manifest(stem)
    cls = KIND_CLASS[m["kind"]]
    flags = f"{m['readme_model_flags']} {m['readme_extra_flags']} {m['readme_sample_flags']}"
    with torch.device("meta"):
        model = cls.from_flags(flags)
    assert model.config == fastsample.presets[stem].network
    expected = [(k, v) for k, v in m["state_dict"].items()]
    assert [(k, list(v.shape)) for k, v in model.state_dict().items()] == expected


@pytest.mark.parametrize("stem", STEMS)
def test_preset_settings_match_readme(stem):
    m, preset = load_manifest(stem), fastsample.presets[stem]
    if m["kind"] == "EncoderUNetModel":
        assert preset.diffusion is None
        for use in m["readme_guidance"]:
            guided = fastsample.presets[use["model"].removesuffix(".pt")]
            assert guided.classifier == stem
            if use["timestep_respacing"] == guided.diffusion.timestep_respacing:
                assert guided.classifier_scale == use["classifier_scale"]
        return
    r = m["resolved_constructor_flags"]
    d = preset.diffusion
    assert d.steps == r["diffusion_steps"] and d.noise_schedule == r["noise_schedule"]
    assert d.learn_sigma == r["learn_sigma"] and d.timestep_respacing == r["timestep_respacing"]
    assert d.predict_xstart == r["predict_xstart"] and d.rescale_timesteps == r["rescale_timesteps"]
    assert preset.network.use_fp16 == m["readme_fp16_at_inference"]
    readme_classifier = m.get("readme_classifier_checkpoint")
    assert preset.classifier == (
        readme_classifier.removesuffix(".pt") if readme_classifier else None
    )
    assert preset.classifier_scale == m.get("readme_classifier_scale")
    if m["kind"] == "SuperResModel":
        assert preset.low_res_size == r["small_size"]


@pytest.mark.parametrize("stem", STEMS)
def test_attention_layout_matches_manifest(stem):
    m = load_manifest(stem)
    expected = [
        (a["module"], a["channels"], a["heads"], a["head_dim"], ORDER[a["order"]])
        for a in m["structure"]["attention_layers"]
    ]
    config = fastsample.presets[stem].network
    listed = [
        (a["module"], a["channels"], a["heads"], a["head_dim"], a["order"])
        for a in config.attention_layers()
    ]
    assert listed == expected
    model = create_model(stem, device="meta")  # the built modules agree with the listing
    for module, _, heads, _, order in expected:
        block = model.get_submodule(module)
        assert block.heads == heads
        assert getattr(block, "order", "new") == order


@pytest.mark.parametrize("stem", STEMS)
def test_precision_flow_matches_manifest(stem):
    m = load_manifest(stem)
    readme = create_model(stem, device="meta")  # dtype=None: the README's precision
    assert {k: str(v.dtype).removeprefix("torch.") for k, v in readme.state_dict().items()} == (
        m["inference_dtype_per_key"]
    )
    fp16 = create_model(stem, device="meta", dtype=torch.float16)
    converted = sorted(k for k, v in fp16.state_dict().items() if v.dtype == torch.float16)
    assert converted == sorted(m["fp16_keys_if_converted"])


@pytest.mark.parametrize("stem", STEMS)
def test_forward_flops_match_manifest(stem):
    assert summarize(stem).flops == load_manifest(stem)["flops"]["forward_batch1"]


def test_flag_parser_types_defaults_and_errors():
    f = parse_flags("--image_size=128 --class_cond yes --dropout 0.1", CLASSIFIER_SAMPLE_FLAGS)
    assert f["image_size"] == 128 and f["class_cond"] is True and f["dropout"] == 0.1
    assert f["num_heads"] == 4 and f["attention_resolutions"] == "16,8"  # script defaults
    assert parse_flags({"--use_fp16": "False"}, CLASSIFIER_SAMPLE_FLAGS)["use_fp16"] is False
    with pytest.raises(ValueError, match="unknown flag.*--num_chanels.*valid flags"):
        parse_flags("--num_chanels 256", CLASSIFIER_SAMPLE_FLAGS)
    with pytest.raises(ValueError, match="--class_cond 'maybe': expected a boolean"):
        parse_flags("--class_cond maybe", CLASSIFIER_SAMPLE_FLAGS)
    with pytest.raises(ValueError, match="--num_res_blocks 'two': expected a int"):
        parse_flags("--num_res_blocks two", CLASSIFIER_SAMPLE_FLAGS)
    with pytest.raises(ValueError, match="has no value"):
        parse_flags("--image_size", CLASSIFIER_SAMPLE_FLAGS)
    with pytest.raises(ValueError, match="--large_size"):  # not a flag of classifier_sample.py
        UNet.from_flags("--large_size 256")
    with pytest.raises(ValueError, match="--image_size"):  # not a flag of super_res_sample.py
        SuperResUNet.from_flags("--image_size 256")


def test_flag_conversions_follow_create_model():
    cfg = unet_config_from_flags("--image_size 64 --channel_mult 1,2,2 --attention_resolutions 16")
    assert cfg.channel_mult == (1, 2, 2) and cfg.attention_resolutions == (4,)
    assert cfg.model_channels == 128 and cfg.out_channels == 3 and cfg.num_classes is None
    with pytest.raises(ValueError, match="image_size=96 has no default channel_mult"):
        unet_config_from_flags("--image_size 96")
    with pytest.raises(ValueError, match="channel_mult '1,0.5'"):
        unet_config_from_flags("--channel_mult 1,0.5")


def test_configs_reject_bad_values():
    base = dict(
        image_size=64,
        in_channels=3,
        model_channels=64,
        out_channels=6,
        num_res_blocks=1,
        attention_resolutions=(2,),
    )
    with pytest.raises(ValueError, match="num_head_channels=48 does not divide"):
        UNetConfig(**base, num_head_channels=48)
    # Levels without attention may have any width, as in the reference.
    # (level 0: width 96 without attention; level 1 and the middle block: 192 = 3 x 64)
    UNetConfig(
        **{**base, "model_channels": 96, "attention_resolutions": (2,)},
        channel_mult=(1, 2),
        num_head_channels=64,
    )
    with pytest.raises(ValueError, match=r"widths \[48, 96\] must be multiples of 32"):
        UNetConfig(**{**base, "model_channels": 48}, channel_mult=(1, 2))
    with pytest.raises(ValueError, match="pool='max'"):
        ClassifierConfig(**base, pool="max")
    with pytest.raises(ValueError, match="dims=4"):
        UNetConfig(**base, dims=4)
    with pytest.raises(ValueError, match="unknown preset 'nope'; valid presets: 64x64_diffusion"):
        create_model("nope")
    assert dataclasses.replace(
        UNetConfig(**base), attention_resolutions=[2, 2]
    ).attention_resolutions == (2,)


@pytest.mark.parametrize("pool", ["adaptive", "spatial", "spatial_v2"])
def test_other_classifier_pools_run(pool):
    config = ClassifierConfig(
        image_size=16,
        in_channels=3,
        model_channels=32,
        out_channels=10,
        num_res_blocks=1,
        attention_resolutions=(2,),
        channel_mult=(1, 2),
        num_head_channels=16,
        use_scale_shift_norm=True,
        pool=pool,
    )
    model = Classifier(config).eval()
    with torch.no_grad():
        logits = model(torch.randn(3, 3, 16, 16), torch.tensor([0, 10, 999]))
    assert logits.shape == (3, 10) and torch.isfinite(logits).all()


def test_catalog_and_the_names_config_forwards_to_it():
    import subprocess
    import sys

    import fastsample
    from fastsample import catalog, config

    for name in ("PRESETS", "RELEASED", "DEMO_UNET", "DEMO_CLASSIFIER", "Preset", "get_preset"):
        assert getattr(config, name) is getattr(catalog, name)
    # `fastsample.presets` is the mapping, before and after the catalog module is imported
    assert fastsample.presets is catalog.PRESETS and len(fastsample.presets) == 17
    code = "import sys, fastsample.config; assert 'fastsample.catalog' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    code = "import fastsample.catalog, fastsample; assert 'demo-mnist' in fastsample.presets"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(
    "field,value",
    [("num_res_blocks", 10**30), ("model_channels", 10**9), ("image_size", 10**6),
     ("channel_mult", (1,) * 40), ("channel_mult", (1, 10**6)), ("num_classes", 10**12)],
)  # fmt: skip
def test_absurd_sizes_are_refused_before_anything_is_built(field, value):
    """A config read from an untrusted file must not take hours or terabytes to build."""
    base = dict(image_size=32, in_channels=3, model_channels=32, out_channels=3, num_res_blocks=1,
                attention_resolutions=(2,))  # fmt: skip
    with pytest.raises(ValueError, match=field):
        UNetConfig(**{**base, field: value})
