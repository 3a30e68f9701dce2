"""Exports made for a recipe (`fastsample export --recipe`): schedule.json records the recipe's
sampler and guidance budget with the plan tables fastsample-run follows, the export runs the
recipe by default in Python, a caching recipe's export holds the UNet split at its depth and
caches like the eager networks, and what an export cannot honour is said in one line.
(fastsample-run's own run of the demo's fast recipe is checked by ctest: native/check_native.py.)

float32 graphs differ from eager PyTorch only in summation order (~1e-6 of a call's output);
through a guided sampling loop that compounds to the 1e-4 of tests/test_export.py.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import rel_err
from fastsample import Diffusion, Pipeline, jobs, recipes, sample
from fastsample.catalog import DEMO_UNET
from fastsample.checkpoint import load_model
from fastsample.cli import main
from fastsample.errors import ExportError, InputError
from fastsample.export import export, load
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
        "guidance_interval": None, "stable_guidance": True, "cache_interval": 1,
        "cache_depth": None,
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
     ("guidance_interval", [5, 1], "guidance_interval"), ("cache_depth", 0, "cache_depth")],
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


# -- feature caching in exports ----------------------------------------------------------------


@pytest.fixture(scope="module")
def caching_export(tiny_checkpoints, tmp_path_factory):
    """The tiny golden UNet and classifier exported (ONNX) for a recipe that caches features."""
    root = tmp_path_factory.mktemp("caching")
    recipe = {"sampler": "ddim", "steps": "8", "guidance_scale": 1.5, "cache_interval": 3,
              "cache_depth": 2, "name": "cached"}  # fmt: skip
    (root / "cached.json").write_text(json.dumps(recipe))
    out = root / "export"
    request = jobs.ExportRequest(out, model=str(tiny_checkpoints["model"]),
                                 classifier=str(tiny_checkpoints["classifier"]),
                                 recipe=str(root / "cached.json"))  # fmt: skip
    jobs.export(request, log=lambda line: None)
    return out


def _tiny_run(tiny_checkpoints, graphs=None, runtime="eager", **kw):
    model = load_model(tiny_checkpoints["model"])
    classifier = load_model(tiny_checkpoints["classifier"])
    cfg = model.config
    shape = (3, cfg.in_channels, cfg.image_size, cfg.image_size)
    common = dict(y=torch.tensor([0, 3, 7]) % max(1, cfg.num_classes or 10), sampler="ddim",
                  guidance_scale=1.5, seed=[11, 12, 13], stable_guidance=True, **kw)  # fmt: skip
    diffusion = tiny_checkpoints["diffusion"].respaced("8")
    if graphs is not None:
        return sample(graphs, diffusion, shape, runtime=graphs.runtime, **common)
    return sample(model, diffusion, shape, classifier=classifier, runtime=runtime, **common)


def test_caching_export_holds_the_split_graphs_and_caches_like_eager(tiny_checkpoints,
                                                                      caching_export):  # fmt: skip
    manifest = json.loads((caching_export / "manifest.json").read_text())
    assert {"unet", "unet_split", "unet_shallow", "classifier_grad"} == set(manifest["graphs"])
    schedule = json.loads((caching_export / "schedule.json").read_text())
    assert schedule["sampling"]["cache_interval"] == 3 and schedule["sampling"]["cache_depth"] == 2
    graphs = load(caching_export)
    assert graphs.cache_depth == 2
    cached = _tiny_run(tiny_checkpoints, graphs, cache_interval=3, cache_depth=2)
    eager = _tiny_run(tiny_checkpoints, cache_interval=3, cache_depth=2)
    plain = _tiny_run(tiny_checkpoints)
    assert rel_err(cached, eager) < 1e-4
    assert rel_err(plain, eager) > 1e-3  # (caching changes the samples: the check can fail)
    # the shallow graph with the split graph's feature is the whole UNet, to float32 rounding
    split, shallow = graphs.graphs["unet_split"], graphs.graphs["unet_shallow"]
    x, t = torch.randn(2, *split.io.inputs[0][2][1:]), torch.tensor([3.0, 700.0])
    extra = [torch.tensor([1, 2])] if "y" in graphs.unet.io.input_names else []
    out, feature = split(x, t, *extra)
    assert rel_err(shallow(x, t, *extra, feature), graphs.unet(x, t, *extra)) < 1e-5
    assert rel_err(out, graphs.unet(x, t, *extra)) < 1e-5


def test_caching_export_runs_its_recipe_by_default(caching_export):
    pipe = Pipeline.from_export(caching_export)
    request = pipe.check(2, 2)
    assert request.recipe.name == "cached"
    assert request.calls == {"unet": 8, "classifier": 8, "unet_full": 3, "unet_shallow": 5}
    a = pipe.generate(2, batch_size=2, seed=1, progress=False)
    b = pipe.generate(2, batch_size=2, seed=1, progress=False, sampler="ddim", cache_interval=3)
    assert np.array_equal(a.images, b.images)
    with pytest.raises(InputError, match="at depth 2"):
        pipe.check(2, 2, cache_interval=3, cache_depth=1)


def test_eager_networks_on_onnxruntime_cache_through_their_cache_export(
    tiny_checkpoints, tmp_path, monkeypatch
):
    monkeypatch.setenv("FASTSAMPLE_CACHE", str(tmp_path))
    on_ort = _tiny_run(tiny_checkpoints, runtime="onnxruntime", cache_interval=2)
    eager = _tiny_run(tiny_checkpoints, cache_interval=2)
    assert rel_err(on_ort, eager) < 1e-4
    (manifest,) = tmp_path.glob("exports/*/manifest.json")
    assert "unet_split" in json.loads(manifest.read_text())["graphs"]


def test_an_export_without_caching_graphs_says_how_to_get_them(fast_export):
    pipe = Pipeline.from_export(fast_export)
    with pytest.raises(InputError, match="no feature-caching graphs") as caught:
        pipe.check(2, 2, cache_interval=2)
    assert "\n" not in str(caught.value) and "--recipe" in str(caught.value)
    result = CliRunner().invoke(main, ["sample", "--model", str(fast_export), "--cache-interval",
                                       "2", "--out", str(fast_export.parent / "c")])  # fmt: skip
    assert result.exit_code == 2 and "no feature-caching graphs" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (fast_export.parent / "c").exists()


def test_caching_graphs_are_not_made_for_tensorrt(tiny_checkpoints, tmp_path):
    model = load_model(tiny_checkpoints["model"])
    with pytest.raises(ExportError, match="not tensorrt"):
        export(model, tiny_checkpoints["diffusion"], tmp_path / "t", target="tensorrt",
               sampling={"cache_interval": 2, "cache_depth": 1})  # fmt: skip
    assert not (tmp_path / "t").exists()
    with pytest.raises(InputError, match="cache_depth"):
        export(model, tiny_checkpoints["diffusion"], tmp_path / "t",
               sampling={"cache_interval": 2, "cache_depth": 99})  # fmt: skip
    assert not (tmp_path / "t").exists()


def test_aoti_graph_of_two_outputs_returns_both(tmp_path):
    """What an AOTInductor split graph needs beyond an ONNX one: a package of two outputs
    called as a tuple (the caching logic above is the runtimes' shared code)."""
    from fastsample.export.aoti import AotiGraph, compile_package
    from fastsample.export.graphs import GraphIO

    class TwoOutputs(torch.nn.Module):
        def forward(self, x, t):
            return x * t[:, None, None, None], (x + 1).float()

    image = (None, 2, 4, 4)
    io = GraphIO((("x", "float32", image), ("t", "float32", (None,))),
                 (("out", "float32", image), ("feature", "float32", image)))  # fmt: skip
    compile_package(TwoOutputs(), io, tmp_path / "two.pt2", torch.device("cpu"))
    graph = AotiGraph(tmp_path / "two.pt2", io, "cpu")
    x, t = torch.randn(3, 2, 4, 4), torch.tensor([1.0, 2.0, 3.0])
    out, feature = graph(x, t)
    assert torch.equal(out, x * t[:, None, None, None]) and torch.equal(feature, x + 1)


def test_verify_checks_both_outputs_of_the_split_graph(caching_export, tiny_checkpoints):
    from fastsample.export.verify import verify

    checks = verify(caching_export, model=str(tiny_checkpoints["model"]),
                    classifier=str(tiny_checkpoints["classifier"]))  # fmt: skip
    seen = {(c.graph, c.output) for c in checks}
    assert {("unet_split", "out"), ("unet_split", "feature"), ("unet_shallow", "out")} <= seen
    assert all(c.ok for c in checks), [c.line() for c in checks if not c.ok]
