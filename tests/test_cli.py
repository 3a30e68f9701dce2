"""The command line: summaries of presets and flag lines, one-line errors."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from conftest import load_manifest, manifest_stems

from fastsample.cli import main


@pytest.mark.parametrize("stem", ["256x256_diffusion", "64x64_classifier"])
def test_info_prints_parameters_flops_and_attention(stem):
    if stem not in manifest_stems():
        pytest.skip("checkpoint manifests not found")
    m = load_manifest(stem)
    result = CliRunner().invoke(main, ["info", stem])
    assert result.exit_code == 0, result.output
    assert f"{m['parameter_count']:,} parameters" in result.output
    assert f"{m['state_dict_num_keys']} state_dict keys" in result.output
    assert f"attention layers ({len(m['structure']['attention_layers'])})" in result.output
    for layer in m["structure"]["attention_layers"]:
        assert layer["module"] in result.output
    if m["kind"] == "UNetModel":
        assert f"{m['flops']['forward_batch1'] / 1e9:,.2f} GFLOPs" in result.output


def test_info_from_flags():
    flags = "--image_size 64 --num_channels 64 --attention_resolutions 16 --learn_sigma True"
    result = CliRunner().invoke(main, ["info", "--flags", flags])
    assert result.exit_code == 0, result.output
    assert "image 64x64, model_channels 64, channel_mult (1, 2, 3, 4)" in result.output
    assert "attention at ds (4,)" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["info", "nope"], "error: unknown preset 'nope'; valid presets: 64x64_diffusion"),
        (["info", "--flags", "--num_chanels 8"], "error: unknown flag(s) --num_chanels"),
        (["info"], "error: give a preset name"),
        (["info", "--network", "classifier", "--flags", "--classifier_pool max"], "pool='max'"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(args, message):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_presets_lists_all_fifteen():
    result = CliRunner().invoke(main, ["presets"])
    assert result.exit_code == 0
    assert len(result.output.strip().splitlines()) == 15
    assert (
        "256x256_diffusion_uncond   unet        guided by 256x256_classifier at scale 10.0"
        in result.output
    )
