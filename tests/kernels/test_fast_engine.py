"""The fast engine with its fused update kernel (interpreted on the CPU, compiled and captured in
CUDA graphs on a GPU) against the reference implementation's guided sampling runs, step by step.
The networks run on the torch kernels here (their Triton kernels: test_networks.py)."""

import contextlib
import warnings

import pytest
import torch

from conftest import KERNEL_DEVICE, rel_err, replay_reference_rng
from fastsample import Classifier, Diffusion, InputError, UNet, sample
from fastsample.engine import FastEngine, kernel_available

pytestmark = pytest.mark.usefixtures("triton_kernels", "no_fma_contraction")

GUIDED_RUNS = [
    "p_sample_linear_5_guided",
    "p_sample_cosine_5_guided",
    "ddim_linear_ddim5_eta0_guided",
    "ddim_cosine_4_eta0.5_guided",
]
# Step-by-step tolerances, relative to each step's scale. On the CPU (one thread, as the golden
# runs were made) the eager loop equals the reference exactly; the engine differs by the fused
# update's rounding and by its classifier pooling over the first query only (the same maths, a
# few ulps apart), which x0 = (x - sqrt(1 - abar) eps) / sqrt(abar) amplifies: measured 1.4e-5
# at most, except in the guided cosine DDIM run, whose first step (t = 999, the smallest abar)
# takes the classifier gradient into x0 (measured 2.4e-4). On a GPU cuDNN's convolutions sum in
# another order than the CPU's (~1e-6 of the network output), amplified the same way.
TOL = {"cpu": 3e-5, "cuda": 3e-4}[KERNEL_DEVICE]
TOL_COSINE_DDIM = {"cpu": 5e-4, "cuda": 3e-3}[KERNEL_DEVICE]


@pytest.fixture
def engine(golden):
    config, g = golden
    unet = UNet(**config["unet_a"])
    unet.load_state_dict(g["unet_a_state_dict"])
    clf = Classifier(**config["classifier"])
    clf.load_state_dict(g["classifier_state_dict"])
    unet = unet.to(KERNEL_DEVICE).set_kernels("torch")
    clf = clf.to(KERNEL_DEVICE).set_kernels("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield FastEngine(unet, clf)
    torch.set_num_threads(threads)


@pytest.mark.parametrize("run", GUIDED_RUNS)
def test_engine_matches_reference_trajectory(golden, engine, run):
    config, g = golden
    spec = config["sampling_runs"][run]
    assert kernel_available(KERNEL_DEVICE)  # the fused update runs, not the eager fallback
    d = Diffusion(noise_schedule=spec["noise_schedule"],
                  timestep_respacing=spec["timestep_respacing"])  # fmt: skip
    y, noise = replay_reference_rng(spec["rng_calls"])
    y, noise = y.to(KERNEL_DEVICE), noise.to(KERNEL_DEVICE)
    steps = []
    engine.sample(
        {"p": "ddpm", "ddim": "ddim"}[spec["kind"]], d, lambda k: noise[k], y=y, model_y=y,
        eta=spec["eta"], guidance_scale=config["cond_fn_scale"],
        callback=lambda k, x, x0: steps.append((x.clone(), x0.clone())),
    )  # fmt: skip
    samples, pred_xstart = g[f"samp_{run}_samples"], g[f"samp_{run}_pred_xstart"]
    assert len(steps) == len(samples) == d.num_steps
    tol = TOL_COSINE_DDIM if run == "ddim_cosine_4_eta0.5_guided" else TOL
    for k, (x, x0) in enumerate(steps):
        assert rel_err(x, samples[k]) <= tol, ("x", k)
        assert rel_err(x0, pred_xstart[k]) <= tol, ("x0", k)


def test_engine_dpmpp_2m_matches_eager_sampler(golden, engine):
    """DPM-Solver++(2M) is not among the reference's runs: the eager solver is the reference."""
    config, g = golden
    d = Diffusion(timestep_respacing="ddim3")
    y = torch.tensor([2, 8]).to(KERNEL_DEVICE)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(d.num_steps + 1, 2, 3, 16, 16, generator=gen).to(KERNEL_DEVICE)
    unet, clf = engine.model, engine.classifier  # the engine's prepared copies, same weights
    want = sample(unet, d, (2, 3, 16, 16), y=y, sampler="dpm++2m", classifier=clf,
                  guidance_scale=1.5, noise=noise)  # fmt: skip
    got = engine.sample("dpm++2m", d, lambda k: noise[k], y=y, model_y=y, guidance_scale=1.5)
    assert rel_err(got, want) < TOL


@pytest.mark.parametrize(
    "sampler,budget",
    [
        ("dpm++3m", {}),
        ("dpm++2m-sde", {"guidance_every": 2}),
        ("unipc", {"guidance_interval": (0, 600)}),
        ("unipc3", {"guidance_interval": (100, 999), "guidance_every": 2}),
        ("ipndm", {"stable_guidance": True}),
    ],
)
def test_engine_new_solvers_and_guidance_plans_match_the_eager_loop(engine, sampler, budget):
    """Each new solver and guidance plan on the engine's static buffers (the gradient kept in
    a buffer, weighed by the plan's per-step guide table) against the eager loop."""
    from fastsample import sampler as solvers
    from fastsample.netfns import guidance_fn, model_fn

    d = Diffusion(noise_schedule="cosine", timestep_respacing="6")
    y = torch.tensor([2, 8]).to(KERNEL_DEVICE)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(d.num_steps + 1, 2, 3, 16, 16, generator=gen).to(KERNEL_DEVICE)
    # cosine "6" starts at t = 999: one line warns, unless the interval leaves it out
    lo, hi = budget.get("guidance_interval", (0, 999))

    def warns():
        return pytest.warns(UserWarning, match="t = 999") if hi >= 999 else _no_warning()

    with torch.no_grad(), warns():
        want = solvers.run(
            sampler, model_fn(engine.model, y), d, lambda k: noise[k],
            guidance=guidance_fn(engine.classifier, y), guidance_scale=1.5, **budget,
        )  # fmt: skip
    with warns():
        got = engine.sample(sampler, d, lambda k: noise[k], y=y, model_y=y, guidance_scale=1.5,
                            **budget)  # fmt: skip
    assert rel_err(got, want) < TOL


@contextlib.contextmanager
def _no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # but the few-steps advisory (6 guided steps here)
        warnings.filterwarnings("ignore", message=".*guided steps are too few")
        yield


def test_engine_reuses_its_static_buffers_across_batches(golden, engine, monkeypatch):
    """Later batches of one shape reuse the first batch's buffers (on CUDA: its captured graph)
    with their own labels and noise; another shape gets buffers of its own."""
    d = Diffusion(timestep_respacing="ddim3")
    unet, clf = engine.model, engine.classifier
    prepared = []
    real_prepare = engine._prepare
    monkeypatch.setattr(
        engine, "_prepare", lambda *a, **k: prepared.append(a[0]) or real_prepare(*a, **k)
    )
    gen = torch.Generator().manual_seed(4)
    batches = [torch.tensor(labels) for labels in ([2, 8], [5, 1], [7, 7], [3])]
    for sampler in ("ddim", "dpm++2m"):
        for y in batches:
            y = y.to(KERNEL_DEVICE)
            noise = torch.randn(d.num_steps + 1, len(y), 3, 16, 16, generator=gen)
            noise = noise.to(KERNEL_DEVICE)
            want = sample(unet, d, (len(y), 3, 16, 16), y=y, sampler=sampler, classifier=clf,
                          guidance_scale=1.5, noise=noise)  # fmt: skip
            got = engine.sample(sampler, d, lambda k, n=noise: n[k], y=y, model_y=y,
                                guidance_scale=1.5)  # fmt: skip
            assert rel_err(got, want) < TOL, (sampler, y.tolist())
    # one set of buffers per (shape, sampler): batch sizes 2 and 1, two samplers
    assert len(prepared) == 4 and len(engine._static) == 4


@pytest.mark.parametrize(
    "sampler,interval,depth,budget",
    [
        ("ddim", 2, 1, {}),
        ("dpm++2m", 3, 2, {"guidance_every": 2}),
        ("ddpm", 2, 2, {"guidance_interval": (0, 600)}),
    ],
)
def test_engine_feature_cache_matches_the_eager_cached_loop(engine, sampler, interval, depth,
                                                            budget):  # fmt: skip
    """Feature caching on the static buffers (full and shallow steps, the deep feature in a
    buffer) against sample()'s eager cached loop on the same networks, noise and plan; the
    cached and uncached runs differ (the shallow steps really reuse a stale feature)."""
    d = Diffusion(timestep_respacing="6")
    y = torch.tensor([2, 8]).to(KERNEL_DEVICE)
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(d.num_steps + 1, 2, 3, 16, 16, generator=gen).to(KERNEL_DEVICE)
    unet, clf = engine.model, engine.classifier
    common = dict(y=y, sampler=sampler, classifier=clf, guidance_scale=1.5, noise=noise, **budget)
    want = sample(unet, d, (2, 3, 16, 16), cache_interval=interval, cache_depth=depth, **common)
    uncached = sample(unet, d, (2, 3, 16, 16), **common)
    calls = []
    real_split = engine._split
    engine._split = lambda *a, **k: calls.append("full") or real_split(*a, **k)
    got = engine.sample(sampler, d, lambda k: noise[k], y=y, model_y=y, guidance_scale=1.5,
                        cache_interval=interval, cache_depth=depth, **budget)  # fmt: skip
    assert rel_err(got, want) < TOL
    assert rel_err(uncached, want) > 100 * TOL
    assert len(calls) == -(-d.num_steps // interval)  # the full steps: calls 0, n, 2n, ...
    # interval 1 is the uncached engine, whatever the depth
    again = engine.sample(sampler, d, lambda k: noise[k], y=y, model_y=y, guidance_scale=1.5,
                          cache_interval=1, cache_depth=depth, **budget)  # fmt: skip
    assert rel_err(again, uncached) < TOL


def test_engine_feature_cache_refuses_bad_settings_in_one_line(engine):
    d = Diffusion(timestep_respacing="3")
    noise = torch.randn(d.num_steps + 1, 1, 3, 16, 16).to(KERNEL_DEVICE)
    for interval, depth, match in [(0, None, "cache_interval=0"), (2.5, None, "cache_interval"),
                                   (2, 0, "cache_depth=0"), (2, 99, "cache_depth=99")]:  # fmt: skip
        with pytest.raises(InputError, match=match) as info:
            engine.sample("ddim", d, lambda k: noise[k], cache_interval=interval,
                          cache_depth=depth)  # fmt: skip
        assert "\n" not in str(info.value)
