"""The guidance budget and feature caching as users reach them: guidance_interval and
guidance_every against hand-run loops, the pipeline's stable-guidance default against the
reference mode, the network calls per image in the progress bar, run.json and the CLI's last line,
and the CLI's options (every sampler, bad values refused in one line)."""

from __future__ import annotations

import contextlib
import json
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fastsample import Classifier, Pipeline, UNet, netfns, sample, sample_seed, to_uint8
from fastsample import sampler as solvers
from fastsample.cli import main
from fastsample.cliopts import GUIDANCE_LINES
from fastsample.schedule import Diffusion

SCALE = 3.0


@pytest.fixture(scope="module")
def tiny(golden):
    """The golden tiny class-conditional UNet (16x16) and its classifier."""
    config, g = golden
    unet = UNet(**config["unet_a"])
    unet.load_state_dict(g["unet_a_state_dict"])
    classifier = Classifier(**config["classifier"])
    classifier.load_state_dict(g["classifier_state_dict"])
    return unet.eval(), classifier.eval()


def _noise(diffusion: Diffusion, batch: int = 2, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(diffusion.num_steps + 1, batch, 3, 16, 16, generator=gen)


def _hand_ddim(unet, classifier, diffusion, noise, y, interval=None, every=1):
    """Guided DDIM written out: the model and the guidance gradient called here, the solver's
    update per step; the gradient computed at every `every`-th step whose original timestep
    lies in `interval` (all steps: None) and reused in between. -> (x_0, steps computed at)."""
    solver = solvers.SOLVERS["ddim"]
    model, guidance = netfns.model_fn(unet, y), netfns.guidance_fn(classifier, y)
    tab = solver.tables(diffusion, noise.device, 0.0)
    spec = solvers.Spec(diffusion.learn_sigma, diffusion.predict_xstart, True)
    tmap = diffusion.timestep_map
    x, grad, guided, computed = noise[0], None, 0, []
    n = diffusion.num_steps
    with torch.no_grad():
        for k in range(1, n + 1):
            i = n - k
            t = tab["t_model"][i].expand(x.shape[0])
            out = model(x, t)
            inside = interval is None or interval[0] <= tmap[i] <= interval[1]
            if inside:
                if guided % every == 0:
                    grad = guidance(x, t)
                    computed.append(int(tmap[i]))
                guided += 1
            x, _ = solver.update(tab, i, x, out, grad if inside else None, SCALE, None, None,
                                 spec)  # fmt: skip
    return x, computed


@pytest.mark.parametrize("interval, every", [(None, 1), ((200, 700), 1), ((200, 700), 2),
                                             (None, 3)])  # fmt: skip
def test_guidance_interval_and_every_match_a_hand_run_loop(tiny, interval, every):
    unet, classifier = tiny
    d = Diffusion(noise_schedule="linear", timestep_respacing="ddim8")
    noise, y = _noise(d), torch.tensor([3, 8])
    expected, computed = _hand_ddim(unet, classifier, d, noise, y, interval, every)
    budget = {} if (interval, every) == (None, 1) else {"guidance_interval": interval,
                                                         "guidance_every": every}  # fmt: skip
    got = sample(unet, d, noise.shape[1:], y=y, sampler="ddim", classifier=classifier,
                 guidance_scale=SCALE, noise=noise, **budget)  # fmt: skip
    assert torch.equal(got, expected)  # bit for bit; (None, 1): today's guided DDIM
    plan = solvers.guidance_plan("ddim", d, interval, every)
    assert plan.classifier_calls == len(computed)
    tmap = d.timestep_map
    assert [int(tmap[i]) for i in range(d.num_steps - 1, -1, -1) if plan.compute[i]] == computed


@pytest.mark.parametrize("sampler", solvers.SAMPLERS)
def test_the_loop_calls_the_classifier_where_the_plan_says(sampler):
    """solvers.run with a recording guidance function, for every solver."""
    d = Diffusion(noise_schedule="cosine", timestep_respacing="10")
    tmap = d.timestep_map
    noise = _noise(d, batch=1)
    for interval, every, stable in [(None, 1, True), ((100, 800), 2, False), ((0, 999), 3, True)]:
        called = []

        def guidance(x, t, called=called):
            called.append(float(t[0]))
            return torch.zeros_like(x)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            solvers.run(sampler, lambda x, t: torch.zeros(x.shape[0], 6, 16, 16), d,
                        noise.__getitem__, guidance=guidance, guidance_scale=1.0,
                        guidance_interval=interval, guidance_every=every,
                        stable_guidance=stable)  # fmt: skip
        plan = solvers.guidance_plan(sampler, d, interval, every, stable)
        expected = [float(tmap[i]) for i in range(d.num_steps - 1, -1, -1) if plan.compute[i]]
        assert called == expected, (sampler, interval, every, stable)


class _Bar:
    """A caller's progress bar: update(n) and set_postfix(...)."""

    def __init__(self):
        self.steps, self.postfix = 0, None

    def update(self, n):
        self.steps += n

    def set_postfix(self, values, refresh=True):
        self.postfix = dict(values)


@contextlib.contextmanager
def _counted(classifier):
    """The images the classifier is called on (one gradient: one forward), while inside."""
    calls = []
    handle = classifier.register_forward_pre_hook(lambda m, args: calls.append(len(args[0])))
    try:
        yield calls
    finally:
        handle.remove()


def test_pipeline_guides_stably_by_default_and_as_the_reference_when_asked(tiny):
    unet, classifier = tiny
    cosine = Diffusion(noise_schedule="cosine", timestep_respacing="10")  # starts at t = 999
    pipe = Pipeline(unet, cosine, classifier, guidance_scale=SCALE)
    opts = dict(steps="10", sampler="ddim", seed=1, classes=[2, 5])
    bar = _Bar()
    with _counted(pipe.classifier) as calls, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stable = pipe.generate(2, progress=bar, **opts)
    lines = [str(w.message) for w in caught]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert lines[0].startswith("ddim: classifier guidance skipped at t = 999 (1 of 10 steps)")
    assert sum(calls) == 2 * 9 and bar.steps == 2 * 10
    assert bar.postfix == {"unet_calls": 10, "classifier_calls": 9}
    with _counted(pipe.classifier) as calls, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reference = pipe.generate(2, progress=False, stable_guidance=False, **opts)
    assert len(caught) == 1 and "applied as the reference does" in str(caught[0].message)
    assert sum(calls) == 2 * 10
    # Stable skips exactly t = 999: the reference mode guiding only up to t = 998.
    below = pipe.generate(2, progress=False, stable_guidance=False, guidance_interval=(0, 998),
                          **opts)  # fmt: skip
    assert np.array_equal(stable.images, below.images)
    assert not np.array_equal(stable.images, reference.images)
    # The ancestral sampler guides the mean by the posterior variance: nothing to skip.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert pipe.check(2, steps="10", sampler="ddpm").calls["classifier"] == 10
        pipe.generate(1, progress=False, steps="10", sampler="ddpm")
    assert not caught


def test_pipeline_passes_the_budget_and_the_cache_to_both_engines(tiny):
    unet, classifier = tiny
    d = Diffusion(noise_schedule="linear", timestep_respacing="ddim6")
    budget = dict(guidance_interval=(300, 999), guidance_every=2)
    opts = dict(sampler="ddim", seed=2, classes=[1, 4], progress=False, **budget)
    eager = Pipeline(unet, d, classifier, guidance_scale=SCALE, engine="eager")
    with _counted(eager.classifier) as calls:
        x = eager.generate(2, **opts).images
    # t = 835, 668, 501, 334 guided, every 2nd computed
    assert sum(calls) == 2 * eager.check(2, sampler="ddim", **budget).calls["classifier"] == 2 * 2
    seeds = [sample_seed(2, i) for i in range(2)]
    api = sample(unet, d, (2, 3, 16, 16), y=torch.tensor([1, 4]), sampler="ddim",
                 classifier=classifier, guidance_scale=SCALE, seed=seeds, **budget)  # fmt: skip
    assert np.array_equal(to_uint8(api).numpy(), x)
    fast = Pipeline(unet, d, classifier, guidance_scale=SCALE, engine="fast")
    assert np.abs(fast.generate(2, **opts).images.astype(int) - x.astype(int)).max() <= 1
    # Feature caching: the engine has none, so a cached request takes the eager loop.
    cached = {**opts, "cache_interval": 2, "cache_depth": 1}
    a, b = fast.generate(2, **cached).images, eager.generate(2, **cached).images
    assert np.array_equal(a, b) and not np.array_equal(a, x)
    assert eager.check(2, cache_interval=4).calls == {"unet": 6, "classifier": 6, "unet_full": 2,
                                                      "unet_shallow": 4}  # fmt: skip
    assert np.array_equal(eager.generate(2, **{**opts, "cache_interval": 1}).images, x)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"guidance_interval": (5, 1)}, r"guidance_interval=\(5, 1\): expected 0 <= lo <= hi"),
        ({"guidance_interval": (0, 1000)}, r"expected 0 <= lo <= hi <= 999"),
        ({"guidance_interval": 5}, r"guidance_interval=5: expected two timesteps"),
        ({"guidance_every": 0}, r"guidance_every=0: expected a positive integer"),
        ({"guidance_every": 1.5}, r"guidance_every=1.5: expected a positive integer"),
        ({"stable_guidance": "yes"}, r"stable_guidance='yes': expected True or False"),
        ({"cache_interval": 0}, r"cache_interval=0: expected a positive integer"),
        ({"cache_depth": 7}, r"cache_depth=7: expected an integer in 1\.\."),
        ({"cache_depth": "1"}, r"cache_depth='1': expected a positive integer"),
        ({"sampler": "euler"}, r"sampler 'euler': expected one of ddpm, ddim"),
    ],
)
def test_pipeline_refuses_bad_budget_values_before_sampling(tiny, kwargs, message):
    unet, classifier = tiny
    pipe = Pipeline(unet, Diffusion(timestep_respacing="ddim4"), classifier, guidance_scale=1.0)
    with pytest.raises(ValueError, match=message) as err:
        pipe.generate(1, progress=False, **kwargs)
    assert "\n" not in str(err.value)


def test_an_interval_holding_no_sampling_step_says_so(tiny):
    unet, classifier = tiny
    pipe = Pipeline(unet, Diffusion(timestep_respacing="ddim4"), classifier, guidance_scale=1.0)
    with pytest.warns(UserWarning, match=r"holds none of the 4 sampling timesteps .*not guided"):
        assert pipe.check(1, guidance_interval=(1, 2)).calls["classifier"] == 0


def test_the_help_lists_the_noise_level_of_each_timestep():
    rows = {line.split()[0]: line.split()[1:] for line in GUIDANCE_LINES.splitlines()
            if line.strip().startswith(("t ", "linear", "cosine"))}  # fmt: skip
    ts = [int(t) for t in rows["t"]]
    for schedule in ("linear", "cosine"):
        ac = Diffusion(noise_schedule=schedule).coefficients().alphas_cumprod
        assert rows[schedule] == [f"{np.sqrt(1 - ac[t]):.3f}" for t in ts]


# -- the CLI -----------------------------------------------------------------------------------


def test_cli_run_records_and_prints_the_calls_per_image(tmp_path):
    """The demo, guided dpm++2m from t = 999 (cosine): the stable default skips that step with
    one warning line (and one says 4 guided steps are too few); interval, reuse and caching cut
    the calls; run.json records them."""
    out = tmp_path / "run"
    args = ["sample", "--quiet", "--device", "cpu", "--num-samples", "2", "--batch-size", "1",
            "--steps", "4", "--sampler", "dpm++2m", "--guidance-interval", "0,900",
            "--guidance-every", "2", "--cache-interval", "2", "--out", str(out)]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("default")  # (as a fresh process: each warning once)
        result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    # steps 4: t = 999, 666, 333, 0; guided inside [0, 900]: 666, 333, 0; every 2nd computed
    calls = {"unet": 4, "classifier": 2, "unet_full": 2, "unet_shallow": 2}
    record = json.loads((out / "run.json").read_text())
    assert record["calls_per_image"] == calls
    assert record["settings"]["guidance_interval"] == [0.0, 900.0]
    assert record["settings"]["guidance_every"] == 2
    assert (record["settings"]["cache_interval"], record["settings"]["cache_depth"]) == (2, 1)
    assert "stable_guidance" not in record["settings"]  # t = 999 is outside the interval anyway
    assert result.stdout.strip().endswith(
        "per image: 4 UNet calls (2 full, 2 shallow), 2 classifier calls"
    )
    few = "warning: dpm++2m: 4 guided steps are too few for a multistep solver"
    assert [line[: len(few)] for line in result.stderr.splitlines()] == [few], result.stderr
    again = tmp_path / "stable"
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        result = CliRunner().invoke(main, [*args[:12], "--out", str(again)])
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert (
        len(lines) == 2
        and lines[0].startswith(
            "warning: dpm++2m: classifier guidance skipped at t = 999 (1 of 4 steps)"
        )
        and lines[1].startswith(few)
    ), result.stderr
    record = json.loads((again / "run.json").read_text())
    assert record["settings"]["stable_guidance"] is True
    assert record["calls_per_image"] == {"unet": 4, "classifier": 3}


def test_cli_default_run_records_no_new_settings(tiny_checkpoints, tmp_path):
    """Runs made before these options keep their ids: defaults add no settings."""
    out = tmp_path / "run"
    args = ["sample", "--quiet", "--model", str(tiny_checkpoints["model"]), "--classifier",
            str(tiny_checkpoints["classifier"]), "--num-samples", "1"]  # fmt: skip
    result = CliRunner().invoke(main, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "run.json").read_text())
    new = {"guidance_interval", "guidance_every", "stable_guidance", "cache_interval",
           "cache_depth"}  # fmt: skip
    assert not new & set(record["settings"])
    assert record["calls_per_image"] == {"unet": 4, "classifier": 4}


@pytest.mark.parametrize("sampler", solvers.SAMPLERS)
def test_cli_accepts_every_sampler(tiny_checkpoints, tmp_path, sampler):
    out = tmp_path / "run"
    args = ["sample", "--quiet", "--model", str(tiny_checkpoints["model"]), "--classifier",
            str(tiny_checkpoints["classifier"]), "--scale", "1", "--num-samples", "1",
            "--steps", "3", "--sampler", sampler, "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "run.json").read_text())["settings"]["sampler"] == sampler


_number = st.integers(-20, 1500).map(str) | st.sampled_from(["1.5", "-0", "nan", "inf", "1e9"])
_bad_interval = st.one_of(
    _number,  # one value
    st.tuples(_number, _number, _number).map(",".join),  # three
    st.tuples(st.integers(1, 999), st.integers(0, 998))
    .filter(lambda p: p[0] > p[1])
    .map(lambda p: f"{p[0]},{p[1]}"),  # reversed
    st.tuples(st.integers(-999, -1), st.integers(0, 999)).map(lambda p: f"{p[0]},{p[1]}"),
    st.tuples(st.text("abx ;.-", min_size=1, max_size=3), _number).map(",".join),
    st.just(""),
)
_bad_count = st.integers(-5, 0).map(str) | st.sampled_from(["x", "", "1.5", "2x", "one"])


@settings(max_examples=40, deadline=None)
@given(
    st.one_of(
        _bad_interval.map(lambda v: ["--guidance-interval=" + v]),
        _bad_count.map(lambda v: ["--guidance-every=" + v]),
        _bad_count.map(lambda v: ["--cache-interval=" + v]),
        _bad_count.map(lambda v: ["--cache-depth=" + v]),
    )
)
@example(["--guidance-interval=5"])
@example(["--guidance-interval=a,b"])
@example(["--guidance-interval=9,1"])
@example(["--guidance-interval=-1,5"])
@example(["--guidance-interval=1,2,3"])
@example(["--guidance-interval=0,1000"])  # (past the model's T - 1: found once it is loaded)
@example(["--guidance-every=0"])
@example(["--guidance-every=-1"])
@example(["--guidance-every=x"])
@example(["--cache-interval=0"])
@example(["--cache-depth=9"])
def test_cli_refuses_bad_budget_values_in_one_line(tmp_path_factory, option):
    out = tmp_path_factory.mktemp("bad") / "run"
    args = ["sample", "--quiet", "--num-samples", "1", "--steps", "3", "--out", str(out)]
    result = CliRunner().invoke(main, [*args, *option])
    assert result.exit_code == 2, (option, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), (option, result.stderr)
    assert option[0].split("=")[0][2:].replace("-", "_") in lines[0].replace("-", "_")
    assert not out.exists()
