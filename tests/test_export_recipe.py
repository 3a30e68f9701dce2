"""Exports made for a recipe (`fastsample export --recipe`): schedule.json records the recipe's
sampler and guidance budget with the plan tables fastsample-run follows, the export runs the
recipe by default in Python, and what an export cannot honour is said in one line.
(fastsample-run's own run of the demo's fast recipe is checked by ctest: native/check_native.py.)
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastsample import Diffusion, Pipeline, jobs, recipes
from fastsample.catalog import DEMO_UNET
from fastsample.cli import main
from fastsample.errors import InputError
from fastsample.export.bundle import schedule_json
from fastsample.guidance import guidance_plan


@pytest.fixture(scope="module")
def fast_export(tmp_path_factory):
    """The demo's fast recipe exported as fp32 ONNX graphs (--dtype wins over its bf16)."""
    out = tmp_path_factory.mktemp("exports") / "fast"
    jobs.export(jobs.ExportRequest(out, recipe="fast", dtype="fp32"), log=lambda line: None)
    return out


def test_export_records_the_recipe_and_the_plans_of_both_runner_samplers(fast_export):
    rec = recipes.load("fast", DEMO_UNET)
    manifest = json.loads((fast_export / "manifest.json").read_text())
    schedule = json.loads((fast_export / "schedule.json").read_text())
    assert manifest["dtype"] == "fp32"  # the option given wins over the recipe's bf16
    assert manifest["guidance_scale"] == rec.guidance_scale
    assert schedule["sampling"] == {
        "recipe": "fast", "sampler": rec.sampler, "guidance_every": rec.guidance_every,
        "guidance_interval": None, "stable_guidance": True,
    }  # fmt: skip
    diffusion = Diffusion(**schedule["diffusion"])
    assert diffusion.timestep_respacing == rec.steps and schedule["num_steps"] == int(rec.steps)
    for sampler in ("ddim", "ddpm"):
        plan = guidance_plan(sampler, diffusion, None, rec.guidance_every, True)
        assert schedule["tables"][f"{sampler}_use"] == [float(u) for u in plan.use]
        assert schedule["tables"][f"{sampler}_compute"] == [float(c) for c in plan.compute]
    # 12 steps, the gradient at every 3rd: computed at 4 of them, applied at all 12
    assert sum(schedule["tables"]["ddpm_compute"]) == 4 and all(schedule["tables"]["ddpm_use"])


def test_export_runs_its_recipe_by_default(fast_export):
    pipe = Pipeline.from_export(fast_export)
    default = pipe.generate(3, batch_size=3, seed=4, progress=False)
    rec = recipes.load("fast", DEMO_UNET)
    spelled = pipe.generate(3, batch_size=3, seed=4, progress=False, sampler=rec.sampler,
                            guidance_every=rec.guidance_every)  # fmt: skip
    assert np.array_equal(default.images, spelled.images)
    assert np.array_equal(default.labels, spelled.labels)
    request = pipe.check(3, 3)
    assert request.recipe.name == "fast" and request.calls == {"unet": 12, "classifier": 4}
    every_step = pipe.check(3, 3, guidance_every=1)
    assert every_step.recipe is None and every_step.calls["classifier"] == 12


def test_a_recipe_in_another_precision_than_the_export_says_so_in_one_line(fast_export):
    pipe = Pipeline.from_export(fast_export)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        request = pipe.check(2, 2, recipe="fast")
    lines = [str(w.message) for w in caught if "precision" in str(w.message)]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "bf16" in lines[0] and "fp32" in lines[0] and "export's precision applies" in lines[0]
    assert request.recipe.name == "fast"
    result = CliRunner().invoke(main, ["sample", "--model", str(fast_export), "--recipe", "fast",
                                       "--num-samples", "1", "--quiet", "--out",
                                       str(fast_export.parent / "s")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert sum("export's precision applies" in line for line in result.output.splitlines()) == 1


def test_schedule_without_a_recipe_keeps_guided_ddim_every_step():
    schedule = schedule_json(Diffusion(noise_schedule="cosine", timestep_respacing="10"))
    assert schedule["sampling"]["recipe"] is None and schedule["sampling"]["sampler"] == "ddim"
    assert schedule["tables"]["ddim_use"] == schedule["tables"]["guide"]
    assert schedule["tables"]["ddim_compute"] == schedule["tables"]["guide"]
    assert all(schedule["tables"]["ddpm_use"])  # (no gain rule for the ancestral mean shift)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(every=st.integers(1, 7), lo=st.integers(0, 999), width=st.integers(0, 999),
       steps=st.sampled_from(["10", "25", "ddim7", "4"]))  # fmt: skip
def test_plan_tables_match_the_guidance_plan(every, lo, width, steps):
    diffusion = Diffusion(noise_schedule="cosine", timestep_respacing=steps)
    interval = [lo, min(999, lo + width)]
    schedule = schedule_json(diffusion, sampling={"sampler": "ddpm", "guidance_every": every,
                                                  "guidance_interval": interval})  # fmt: skip
    for sampler in ("ddim", "ddpm"):
        plan = guidance_plan(sampler, diffusion, interval, every, True)
        assert schedule["tables"][f"{sampler}_compute"] == [float(c) for c in plan.compute]
        assert schedule["tables"][f"{sampler}_use"] == [float(u) for u in plan.use]


@pytest.mark.parametrize(
    "field, value, needle",
    [("sampler", "euler", "sampler 'euler'"), ("guidance_every", 0, "guidance_every 0"),
     ("guidance_interval", [5, 1], "guidance_interval"), ("cache_interval", 2, "caches features")],
)  # fmt: skip
def test_export_refuses_what_it_cannot_record_in_one_line(tmp_path, field, value, needle):
    recipe = {"sampler": "ddpm", "steps": "12", field: value}
    (tmp_path / "r.json").write_text(json.dumps(recipe))
    out = tmp_path / "e"
    result = CliRunner().invoke(main, ["export", "--recipe", str(tmp_path / "r.json"),
                                       "--out", str(out)])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert needle in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()


def test_export_recipe_names_are_checked_before_any_work(tmp_path, tiny_checkpoints):
    for argv, needle in [
        (["--recipe", "fastest"], "recipe 'fastest'"),
        (["--recipe", "fast", "--model", str(tiny_checkpoints["model"])], "none ships"),
    ]:
        result = CliRunner().invoke(main, ["export", *argv, "--out", str(tmp_path / "e")])
        assert result.exit_code == 2 and needle in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "e").exists()
    with pytest.raises(InputError, match="guidance_every"):
        schedule_json(Diffusion(timestep_respacing="10"), sampling={"guidance_every": -1})
