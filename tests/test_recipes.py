"""Recipes: the shipped ones name presets and knobs that run; a recipe gives exactly the images
of its knobs spelled out; options beside a recipe win; bad recipe files and names are refused in
one line naming the field (generated cases); the CLI's --recipe and `fastsample recipes`."""

from __future__ import annotations

import dataclasses
import json
from importlib import resources

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from fastsample import Pipeline, recipes
from fastsample.catalog import DEMO_UNET, PRESETS
from fastsample.cli import main
from fastsample.errors import InputError
from fastsample.guidance import guidance_plan
from fastsample.recipes import Recipe
from fastsample.sampler import SAMPLERS


def _shipped():
    data = json.loads((resources.files("fastsample") / "recipes.json").read_text())
    return data["families"]


@pytest.mark.parametrize("family", sorted(_shipped()))
def test_shipped_recipes_run_on_their_presets(family):
    """Every shipped fast/balanced recipe names a preset with a diffusion, says where it comes
    from, and resolves (respacing, sampler, guidance plan) on that preset's diffusion."""
    entry = _shipped()[family]
    assert entry["presets"], family
    for preset_name in entry["presets"]:
        preset = PRESETS[preset_name]
        assert preset.diffusion is not None and preset.classifier is not None
        for name in ("fast", "balanced"):
            rec = recipes.load(name, preset_name)
            assert rec.name == name and rec.source
            if family != "demo":
                assert rec.source.startswith("provisional"), (family, name)
            diffusion = preset.diffusion.respaced(rec.steps, time_schedule=rec.schedule)
            plan = guidance_plan(rec.sampler, diffusion, rec.guidance_interval,
                                 rec.guidance_every, rec.stable_guidance)  # fmt: skip
            assert 0 < plan.classifier_calls <= diffusion.num_steps < 250


def test_reference_recipe_is_what_runs_without_options():
    pipe = Pipeline.from_pretrained(DEMO_UNET, PRESETS[DEMO_UNET].classifier)
    ref = pipe.check(4, recipe="reference")
    assert ref.sampler == "ddpm" and ref.diffusion.timestep_respacing == "25"
    assert ref.scale == PRESETS[DEMO_UNET].classifier_scale
    plain = pipe.check(4, steps="25")  # an option given: no recipe
    assert plain.recipe is None and plain.diffusion.timestep_respacing == "25"
    # the demo's default is its preset's recipe
    default = pipe.check(4)
    assert default.recipe is not None and default.recipe.name == PRESETS[DEMO_UNET].recipe


@pytest.fixture(scope="module")
def demo_bf16():
    return Pipeline.from_pretrained(DEMO_UNET, PRESETS[DEMO_UNET].classifier,
                                    dtype=torch.bfloat16)  # fmt: skip


def test_a_recipe_gives_the_images_of_its_knobs(demo_bf16):
    fast = recipes.load("fast", DEMO_UNET)
    a = demo_bf16.generate(3, batch_size=3, seed=5, progress=False, recipe="fast")
    b = demo_bf16.generate(3, batch_size=3, seed=5, progress=False, **fast.generate_kwargs())
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)


def test_options_beside_a_recipe_win(demo_bf16):
    req = demo_bf16.check(2, recipe="fast", steps="4", guidance_every=1, cache_interval=1)
    fast = recipes.load("fast", DEMO_UNET)
    assert req.diffusion.num_steps == 4 and req.guidance_every == 1 and req.cache_interval == 1
    assert req.sampler == fast.sampler  # the fields not given are the recipe's


def test_a_recipe_in_another_precision_is_refused_in_one_line():
    bf16 = Recipe("ddpm", "4", dtype="bf16", name="r")
    pipe = Pipeline.from_pretrained(DEMO_UNET, PRESETS[DEMO_UNET].classifier, dtype=torch.float32)
    with pytest.raises(InputError, match=r"runs the networks in bf16") as e:
        pipe.check(2, recipe=bf16)
    assert "\n" not in str(e.value)


def test_no_shipped_recipe_for_a_family_says_how_to_get_one():
    with pytest.raises(InputError, match="fastsample tune"):
        recipes.load("fast", "lsun_bedroom")


GOOD = {"sampler": "ddpm", "steps": "10"}
BAD_VALUES = {
    "sampler": st.one_of(st.text(max_size=8).filter(lambda s: s not in SAMPLERS), st.integers()),
    "steps": st.one_of(st.just(""), st.booleans(), st.floats(), st.lists(st.integers())),
    "schedule": st.text(max_size=8).filter(lambda s: s not in ("respace", "time", "logsnr",
                                                               "karras")),  # fmt: skip
    "guidance_scale": st.one_of(st.floats(max_value=-1e-9), st.just(float("nan")),
                                st.just(float("inf")), st.text(max_size=3), st.booleans()),
    "guidance_interval": st.one_of(st.lists(st.floats(0, 999), min_size=3, max_size=4),
                                   st.tuples(st.floats(501, 999), st.floats(0, 500)).map(list),
                                   st.text(max_size=4)),  # fmt: skip
    "guidance_every": st.one_of(st.integers(max_value=0), st.floats(), st.booleans()),
    "cache_interval": st.one_of(st.integers(max_value=0), st.text(max_size=3)),
    "cache_depth": st.one_of(st.integers(max_value=0), st.floats()),
    "stable_guidance": st.one_of(st.integers(), st.text(max_size=3)),
    "dtype": st.text(max_size=6).filter(lambda s: s not in recipes.DTYPES),
}


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(sorted(BAD_VALUES)).flatmap(lambda k: st.tuples(st.just(k),
                                                                      BAD_VALUES[k])))  # fmt: skip
def test_a_bad_field_is_refused_in_one_line_naming_it(case):
    field, value = case
    with pytest.raises(InputError) as e:
        recipes.from_json({**GOOD, field: value}, "recipe r.json")
    message = str(e.value)
    assert field in message and "\n" not in message and message.startswith("recipe r.json")


@settings(max_examples=30, deadline=None)
@given(st.text(min_size=1, max_size=12).filter(
    lambda k: k not in {f.name for f in dataclasses.fields(Recipe)}))  # fmt: skip
def test_an_unknown_field_is_named(field):
    with pytest.raises(InputError, match="unknown field"):
        recipes.from_json({**GOOD, field: 1})


def test_a_recipe_round_trips_through_json():
    rec = Recipe("dpm++2m-sde", "12", "logsnr", 2.5, (100.0, 999.0), 2, True, 2, 1, "bf16",
                 name="x", source="y", figures={"fid": 1.0})  # fmt: skip
    assert recipes.from_json(json.loads(json.dumps(rec.to_json()))) == rec


def _sample(args, tmp_path):
    out = tmp_path / "out"
    return out, CliRunner().invoke(main, ["sample", "--num-samples", "2", "--batch-size", "2",
                                          "--quiet", "--out", str(out), *args])  # fmt: skip


def test_cli_sample_with_a_recipe_file_records_it_and_options_win(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"sampler": "ddim", "steps": "ddim5", "guidance_every": 2}))
    out, result = _sample(["--recipe", str(path), "--steps", "ddim4"], tmp_path)
    assert result.exit_code == 0, result.output
    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["recipe"]["sampler"] == "ddim"
    assert run["settings"]["guidance_every"] == 2
    assert "4 UNet calls, 2 classifier calls" in result.output


@pytest.mark.parametrize(
    "recipe, message",
    [("nope", "expected fast, balanced, reference or a JSON file"),
     ("{bad json", "not a readable JSON file"),
     ('{"sampler": "ddpm"}', "no 'steps'"),
     ('{"sampler": "euler", "steps": "5"}', "sampler 'euler'"),
     ('[1, 2]', "expected a JSON object")],
)  # fmt: skip
def test_cli_bad_recipe_is_one_line_and_writes_nothing(tmp_path, recipe, message):
    if recipe != "nope":
        (tmp_path / "r.json").write_text(recipe)
        recipe = str(tmp_path / "r.json")
    out, result = _sample(["--recipe", recipe], tmp_path)
    assert result.exit_code == 2
    assert message in result.output and result.output.count("\n") == 1
    assert not out.exists()


def test_cli_recipes_lists_the_three_names():
    result = CliRunner().invoke(main, ["recipes", "--model", "256x256_diffusion"])
    assert result.exit_code == 0, result.output
    for name in recipes.NAMES:
        assert f"{name}" in result.output
    assert "provisional" in result.output and "FID 5.44" in result.output


def test_frontier_predicts_the_headline_at_the_flop_floor():
    """bench.frontier's ADM table: the paper's headline (ADM-256, ddim25, guided every step)
    costs 25 x (UNet forward + classifier forward and input gradient); ENGINEERING_NOTES.md
    counts 63.6 TFLOP per image, 64 ms at 989 TFLOP/s. A recipe with caching and classifier
    reuse costs what its calls say."""
    from bench.frontier import adm_flops, calls_of, predicted_ms

    f = adm_flops("256x256_diffusion", "256x256_classifier")
    assert f["unet"] / 1e12 == pytest.approx(2.240, rel=1e-3)
    headline = calls_of(Recipe("ddim", "ddim25", guidance_scale=2.5), "256x256_diffusion")
    assert headline == {"unet": 25, "unet_full": 25, "unet_shallow": 0, "classifier": 25}
    assert predicted_ms(headline, f) == pytest.approx(64.0, rel=0.02)
    lean = calls_of(Recipe("ddpm", "12", guidance_scale=2.0, guidance_every=3, cache_interval=2),
                    "256x256_diffusion")  # fmt: skip
    assert lean == {"unet": 12, "unet_full": 6, "unet_shallow": 6, "classifier": 4}
    expected = (6 + 6 * f["shallow_share"]) * f["unet"] + 4 * f["classifier"]
    assert predicted_ms(lean, f) == pytest.approx(expected / 989e12 * 1e3, rel=1e-12)
