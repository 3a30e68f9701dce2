"""The first-use self-check of the fast paths (fastsample.selfcheck) through the code paths that
run off CUDA: the kernels interpreted on the CPU (compiled on a GPU), a stand-in for the CUDA
graph, broken components made by patching, and the on-disk cache of verdicts."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from conftest import KERNEL_DEVICE, rel_err
from fastsample import ops, selfcheck
from fastsample import verdicts as verdicts_module
from fastsample.catalog import DEMO_UNET, PRESETS
from fastsample.checkpoint import load_model
from fastsample.engine import FastEngine
from fastsample.errors import InputError
from fastsample.kernels import attention as attention_kernel
from fastsample.kernels import group_norm as group_norm_kernel
from fastsample.kernels import sampler_step as step_kernel
from fastsample.kernels.reference import attention_reference, group_norm_reference

pytestmark = pytest.mark.usefixtures("triton_kernels", "verdicts")
DEVICE = torch.device(KERNEL_DEVICE)


@pytest.fixture
def verdicts(tmp_path, monkeypatch):
    """A fresh cache folder and a process that has decided nothing yet."""
    monkeypatch.setenv("FASTSAMPLE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(selfcheck.FORCE_ENV, raising=False)
    selfcheck._forget()
    yield tmp_path / "cache"
    selfcheck._forget()


def _gn_inputs(n=2, c=16, hw=(4, 5), seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, c, *hw, generator=gen) * 2).to(dtype).to(DEVICE)
    x = x.contiguous(memory_format=torch.channels_last)
    w, b = (torch.randn(c, generator=gen).to(DEVICE) for _ in range(2))
    sc, sh = (torch.randn(n, c, generator=gen).to(DEVICE).to(dtype) for _ in range(2))
    return x, w, b, sc, sh


def _file(cache) -> dict:
    (path,) = (cache / "selfcheck").glob("*.json")
    return json.loads(path.read_text())


def test_group_norm_verdict_is_measured_once_then_cached_on_disk(verdicts, monkeypatch):
    x, w, b, sc, sh = _gn_inputs()
    rng = torch.get_rng_state()
    calls = []
    check = selfcheck._check_group_norm
    monkeypatch.setattr(selfcheck, "_check_group_norm", lambda *a: calls.append(1) or check(*a))
    got = ops.group_norm(x, 8, w, b, 1e-5, scale=sc, shift=sh, silu=True, kernels="triton",
                         checked=True)  # fmt: skip
    # Whichever implementation was picked, the result is the GroupNorm.
    assert rel_err(got, group_norm_reference(x, 8, w, b, 1e-5, sc, sh, True)) < 1e-5
    assert torch.equal(torch.get_rng_state(), rng)  # checking draws from its own generator
    (verdict,) = selfcheck.decisions(DEVICE)
    assert verdict.component == "group_norm" and verdict.status in ("ok", "slower")
    assert verdict.use == ("triton" if verdict.status == "ok" else "torch")
    assert set(verdict.ms) == {"triton", "torch"} and all(v > 0 for v in verdict.ms.values())
    assert verdict.err["triton"] < 1e-5  # float32 against float64
    assert "C16 G8 4x5 channels_last" in verdict.shape_class and not verdict.cached
    for _ in range(2):  # the same shape class again: no new check
        ops.group_norm(x, 8, w, b, 1e-5, scale=sc, shift=sh, silu=True, kernels="triton",
                       checked=True)  # fmt: skip
    assert len(calls) == 1
    # A new process reads the verdict from disk and measures nothing.
    selfcheck._forget()
    assert selfcheck.group_norm_choice(x, 8, w, b, 1e-5, sc, sh, True) == verdict.use
    assert len(calls) == 1
    (again,) = selfcheck.decisions(DEVICE)
    assert again.cached and again.to_json() == verdict.to_json()
    # Other shape classes are checked on their own: the grad mode, the batch, the dtype.
    with torch.enable_grad():
        selfcheck.group_norm_choice(x.requires_grad_(), 8, w, b, 1e-5, sc, sh, True)
    x16, w16, b16, sc16, sh16 = _gn_inputs(n=3, dtype=torch.float16)
    selfcheck.group_norm_choice(x16, 8, w16, b16, 1e-5, sc16, sh16, True)
    classes = [v.shape_class for v in selfcheck.decisions(DEVICE)]
    assert len(calls) == 3 and len(set(classes)) == 3
    assert any("fwd+bwd" in c for c in classes) and any(c.startswith("float16 N3") for c in classes)
    assert len(_file(verdicts)["checks"]) == 3


def _wrong(fn, factor=1.01):
    return lambda *a, **k: fn(*a, **k) * factor


def test_a_wrong_group_norm_kernel_is_disabled_with_one_warning(monkeypatch):
    monkeypatch.setattr(group_norm_kernel, "group_norm", _wrong(group_norm_kernel.group_norm))
    with pytest.warns(RuntimeWarning, match="group norm fast path failed its self-check") as w:
        for n in (1, 2):  # two shape classes, one warning
            x, wt, b, sc, sh = _gn_inputs(n=n)
            got = ops.group_norm(x, 8, wt, b, 1e-5, scale=sc, shift=sh, kernels="triton",
                                 checked=True)  # fmt: skip
            assert rel_err(got, group_norm_reference(x, 8, wt, b, 1e-5, sc, sh)) < 1e-6
    assert len([m for m in w if "self-check" in str(m.message)]) == 1
    verdicts = selfcheck.decisions(DEVICE)
    assert [v.status for v in verdicts] == ["FAILED", "FAILED"]
    assert all(v.use == "torch" and "triton: output off by" in v.error for v in verdicts), verdicts
    # The explicit kernels="triton" is not checked: it runs what it was asked to.
    x, wt, b, sc, sh = _gn_inputs()
    got = ops.group_norm(x, 8, wt, b, 1e-5, scale=sc, shift=sh, kernels="triton")
    assert rel_err(got, group_norm_reference(x, 8, wt, b, 1e-5, sc, sh)) > 5e-3


def test_a_cached_failure_warns_again_in_a_new_process(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(group_norm_kernel, "group_norm", broken)
    x, w, b, sc, sh = _gn_inputs()
    with pytest.warns(RuntimeWarning, match="no kernel image"):
        assert selfcheck.group_norm_choice(x, 8, w, b, 1e-5, sc, sh, False) == "torch"
    selfcheck._forget()
    with pytest.warns(RuntimeWarning, match="cached verdict"):
        assert selfcheck.group_norm_choice(x, 8, w, b, 1e-5, sc, sh, False) == "torch"


@pytest.mark.parametrize("broken", ["forward", "backward"])
def test_a_wrong_attention_kernel_is_disabled(monkeypatch, broken):
    class Wrong(torch.autograd.Function):
        """The kernel's forward, a backward off by 2%."""

        @staticmethod
        def forward(ctx, qkv, heads, order, queries):
            ctx.save_for_backward(qkv)
            ctx.args = heads, order, queries
            return attention_reference(qkv, heads, order, queries)

        @staticmethod
        def backward(ctx, dout):
            (qkv,) = ctx.saved_tensors
            with torch.enable_grad():
                q = qkv.detach().requires_grad_()
                (g,) = torch.autograd.grad(attention_reference(q, *ctx.args), q, dout)
            return g * 1.02, None, None, None

    if broken == "forward":
        monkeypatch.setattr(attention_kernel, "attention", _wrong(attention_kernel.attention))
    else:
        monkeypatch.setattr(attention_kernel, "attention", Wrong.apply)
    gen = torch.Generator().manual_seed(1)
    qkv = torch.randn(2, 3 * 2 * 16, 9, generator=gen).to(DEVICE)
    with torch.enable_grad(), pytest.warns(RuntimeWarning, match="attention fast path"):
        out = ops.qkv_attention(qkv.requires_grad_(), 2, "new", 1, kernels="triton", checked=True)
    assert rel_err(out, attention_reference(qkv, 2, "new", 1)) < 1e-5
    (verdict,) = selfcheck.decisions(DEVICE)
    assert verdict.status == "FAILED" and verdict.use in ("sdpa", "torch")
    assert "fwd+bwd" in verdict.shape_class and "queries 1" in verdict.shape_class
    what = "output" if broken == "forward" else "input gradient"
    assert f"triton: {what} off by" in verdict.error


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_attention_candidates_are_all_correct(dtype):
    gen = torch.Generator().manual_seed(2)
    qkv = torch.randn(1, 3 * 2 * 16, 12, generator=gen).to(dtype).to(DEVICE)
    use = selfcheck.attention_choice(qkv, 2, "legacy", None)
    (verdict,) = selfcheck.decisions(DEVICE)
    assert verdict.status in ("ok", "slower") and use == verdict.use
    assert set(verdict.ms) == {"triton", "sdpa", "torch"}
    # Each within the bar of the plain-torch path at the dtype.
    bar = selfcheck.FACTOR * verdict.err["torch"] + selfcheck.FLOOR[dtype]
    assert verdict.err["triton"] <= bar and verdict.err["sdpa"] <= bar
    sdpa, want = ops.sdpa_attention(qkv, 2, "legacy", 3), attention_reference(qkv, 2, "legacy", 3)
    assert rel_err(sdpa, want) < (1e-5 if dtype == torch.float32 else 2e-3)


def test_checks_are_judged_against_float64_with_the_dtype_bar():
    ref = (torch.ones(4, dtype=torch.float64),)

    def off(eps):
        return lambda: (torch.ones(4) + eps,)

    verdict = selfcheck.judge(
        "group_norm", "a class", torch.float32, torch.device("cpu"), lambda: ref,
        {"fast": off(2e-5), "base": off(1e-6)}, baseline="base", fast=("fast",),
    )  # fmt: skip
    # 2e-5 > 3 * 1e-6 + 1e-5: off beyond float32's bar.
    assert (verdict.status, verdict.use) == ("FAILED", "base")
    assert "fast: output off" in verdict.error
    verdict = selfcheck.judge(
        "group_norm", "a class", torch.float32, torch.device("cpu"), lambda: ref,
        {"fast": off(1.2e-5), "base": off(1e-6)}, baseline="base", fast=("fast",),
    )  # fmt: skip
    assert verdict.status in ("ok", "slower")
    nan = selfcheck.judge(
        "group_norm", "a class", torch.float16, torch.device("cpu"), lambda: ref,
        {"fast": off(math.nan), "base": off(1e-3)}, baseline="base", fast=("fast",),
    )  # fmt: skip
    assert nan.status == "FAILED" and "fast" not in nan.err  # not finite: no figure stored


def _demo(kernels="torch"):
    model = load_model(DEMO_UNET, device=DEVICE).set_kernels(kernels)
    clf = load_model(PRESETS[DEMO_UNET].classifier, device=DEVICE).set_kernels(kernels)
    return model, clf, PRESETS[DEMO_UNET].diffusion.respaced("ddim6")


def _run(engine, d, sampler="ddim", n=2, seed=0, eta=0.0):
    gen = torch.Generator().manual_seed(seed)
    shape = (n, 1, 32, 32)
    noise = torch.randn(d.num_steps + 1, *shape, generator=gen).to(DEVICE)
    y = torch.arange(n, device=DEVICE) % 10
    steps: list[int] = []
    x = engine.sample(sampler, d, lambda k: noise[k], y=y, model_y=y, guidance_scale=2.0,
                      eta=eta, callback=lambda k, *_: steps.append(k))  # fmt: skip
    assert steps == list(range(1, d.num_steps + 1))
    return x, noise, y


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddpm", 0.0), ("dpm++2m", 0.0),
                                         ("ddim", 0.5)])  # fmt: skip
def test_fused_update_checks_itself(sampler, eta, no_fma_contraction):
    model, clf, d = _demo()
    engine = FastEngine(model, clf, self_check=True)
    _run(engine, d, sampler, eta=eta)
    assert engine._static  # a correct fused update is used (graphs need it), even if slower
    (verdict,) = selfcheck.decisions(DEVICE)
    assert (verdict.component, verdict.status, verdict.use) == ("fused_update", "ok", "fused")
    assert set(verdict.ms) == {"fused", "eager"}
    assert verdict.shape_class.startswith(f"{sampler} 2x1x32x32 guided")
    assert ("noise" in verdict.shape_class) == (sampler == "ddpm" or eta > 0)
    assert verdict.err["fused"] <= 3 * verdict.err["eager"] + 1e-5


@pytest.mark.parametrize("fused", ["fused", "eager"])
def test_checking_draws_each_noise_once(monkeypatch, fused, no_fma_contraction):
    # Seeded noise sources are streams: x_T is drawn once, whichever loop the check picks.
    from fastsample.sampling import noise_source

    monkeypatch.setattr(selfcheck, "fused_update_choice", lambda *args: fused)
    model, clf, d = _demo()
    shape, y = (2, 1, 32, 32), torch.tensor([3, 5], device=DEVICE)
    eager, checked = (
        FastEngine(model, clf, self_check=False),
        FastEngine(model, clf, self_check=True),
    )
    eager.fused = False  # the eager loop: the reference
    runs = []
    for engine in (eager, checked):
        draw = noise_source(None, 7, shape, d.num_steps, DEVICE)
        runs.append(engine.sample("ddpm", d, draw, y=y, model_y=y, guidance_scale=2.0))
    assert bool(checked._static) == (fused == "fused")
    # (the fused update's rounding and the first-query pool: test_fast_engine.py's tolerance)
    assert rel_err(runs[1], runs[0]) < 3e-5


def test_a_wrong_fused_update_falls_back_to_the_eager_loop(monkeypatch, no_fma_contraction):
    model, clf, d = _demo()
    reference = FastEngine(model, clf, self_check=False, streams=False)
    reference.fused = False  # the eager loop
    want, _, _ = _run(reference, d)
    kernel = step_kernel.sampler_step

    def wrong(*args, **kwargs):
        x_next, x0 = kernel(*args, **kwargs)
        return x_next.mul_(1.01), x0

    monkeypatch.setattr(step_kernel, "sampler_step", wrong)
    engine = FastEngine(model, clf, self_check=True)
    with pytest.warns(RuntimeWarning, match="fused update fast path failed"):
        got, _, _ = _run(engine, d)
    assert not engine._static  # the static (fused) loop never ran
    assert rel_err(got, want) < 1e-6  # the same eager loop (equal on the CPU)
    (verdict,) = selfcheck.decisions(DEVICE)
    assert verdict.status == "FAILED" and verdict.use == "eager"


class _Replay:
    """Stands in for a captured CUDA graph off CUDA: replay runs the step body on the static
    buffers (corrupt: then scales x, as a wrongly captured graph might)."""

    def __init__(self, engine, st, compute, corrupt=False):
        self.engine, self.st, self.compute, self.corrupt = engine, st, compute, corrupt
        self.replays = 0

    def replay(self):
        self.replays += 1
        self.engine._step_body(self.st, self.st.x, self.compute)
        if self.corrupt:
            self.st.x.mul_(1.1)


def _fixed_times(monkeypatch, **ms):
    """The engine's stopwatch reading fixed times (ms per block name)."""

    class Stopwatch:
        def __init__(self, device, into, name):
            self.into, self.name = into, name

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.into[self.name] = ms[self.name]
            return False

    monkeypatch.setattr(selfcheck, "stopwatch", Stopwatch)  # (the engine's; not time_ms's)


def _graph_engine(model, clf, monkeypatch, corrupt=False, replay_ms=1.0):
    _fixed_times(monkeypatch, eager=3.0, capture=5.0, graph=replay_ms)
    engine = FastEngine(model, clf, self_check=True, streams=False)
    engine.cuda_graphs = True  # off CUDA: the stand-in below
    # The fused update on the static buffers (interpreted, it is slower than the eager one).
    monkeypatch.setattr(selfcheck, "fused_update_choice", lambda *args: "fused")
    captured = []

    def capture(st, compute):
        captured.append(_Replay(engine, st, compute, corrupt))
        return captured[-1]

    monkeypatch.setattr(engine, "_capture", capture)
    return engine, captured


def test_graph_replay_is_checked_then_trusted(monkeypatch, no_fma_contraction):
    model, clf, d = _demo()
    eager = FastEngine(model, clf, self_check=False)
    want, _, _ = _run(eager, d)
    engine, captured = _graph_engine(model, clf, monkeypatch)
    got, _, _ = _run(engine, d)
    assert rel_err(got, want) < 1e-6
    # Captured at step 3 after two eager steps; replayed for steps 3 to 6.
    assert len(captured) == 1 and captured[0].replays == d.num_steps - engine.WARMUP_STEPS
    graph = [v for v in selfcheck.decisions(DEVICE) if v.component == "cuda_graph"]
    assert len(graph) == 1 and (graph[0].status, graph[0].use) == ("ok", "graph")
    assert graph[0].ms == {"eager": 3.0, "capture": 5.0, "graph": 1.0}
    # A second batch of the shape replays from its first step; no new capture or check.
    got, _, _ = _run(engine, d)
    assert len(captured) == 1 and captured[0].replays == 2 * d.num_steps - engine.WARMUP_STEPS
    assert rel_err(got, want) < 1e-6
    # A new engine (another run) trusts the cached verdict: captures, checks nothing.
    engine2, captured2 = _graph_engine(model, clf, monkeypatch)
    engine2._eager_step = lambda st, compute: pytest.fail("an eager step after the cached verdict")
    monkeypatch.setattr(engine2, "WARMUP_STEPS", 0)
    got, _, _ = _run(engine2, d)
    assert len(captured2) == 1 and rel_err(got, want) < 1e-6


def test_a_wrong_graph_is_dropped_and_the_eager_step_kept(monkeypatch, no_fma_contraction):
    model, clf, d = _demo()
    want, _, _ = _run(FastEngine(model, clf, self_check=False), d)
    engine, captured = _graph_engine(model, clf, monkeypatch, corrupt=True)
    with pytest.warns(RuntimeWarning, match="cuda graph fast path failed"):
        got, _, _ = _run(engine, d)
    assert rel_err(got, want) < 1e-6  # the corrupt replay's step was replaced by the eager one
    assert captured[0].replays == 1
    (verdict,) = [v for v in selfcheck.decisions(DEVICE) if v.component == "cuda_graph"]
    assert verdict.status == "FAILED" and "off by" in verdict.error
    # The cached failure: no capture in the next run (one warning, from the cache).
    selfcheck._forget()
    engine2, captured2 = _graph_engine(model, clf, monkeypatch)
    with pytest.warns(RuntimeWarning, match="cached verdict"):
        got, _, _ = _run(engine2, d)
    assert captured2 == [] and rel_err(got, want) < 1e-6


def test_a_graph_slower_than_eager_steps_is_dropped(monkeypatch, no_fma_contraction):
    model, clf, d = _demo()
    want, _, _ = _run(FastEngine(model, clf, self_check=False), d)
    engine, captured = _graph_engine(model, clf, monkeypatch, replay_ms=4.0)
    got, _, _ = _run(engine, d)
    assert captured[0].replays == 1 and rel_err(got, want) < 1e-6
    (verdict,) = [v for v in selfcheck.decisions(DEVICE) if v.component == "cuda_graph"]
    assert (verdict.status, verdict.use) == ("slower", "eager")
    engine._static.clear()
    _run(engine, d)
    assert len(captured) == 1  # the cached verdict: not captured again


def test_a_later_smaller_batch_is_captured_only_where_it_pays(monkeypatch, no_fma_contraction):
    model, clf, d = _demo()
    engine, captured = _graph_engine(model, clf, monkeypatch)
    _run(engine, d, n=2)  # the run's batch: checked and captured
    assert len(captured) == 1
    cls = selfcheck.graph_class("ddim", (1, 1, 32, 32), torch.float32, engine._params, True)
    # Measured before (a cached verdict): a replay saves 1 ms a step over 4 steps, capturing
    # costs 10 ms: the last batch of 1 runs uncaptured.
    slow = selfcheck.Check("cuda_graph", cls, "graph", "ok", ms={"eager": 3.0, "graph": 2.0,
                                                                  "capture": 10.0})  # fmt: skip
    selfcheck.record(slow, DEVICE)
    _run(engine, d, n=1)
    assert len(captured) == 1
    # Where capturing pays (or as the first shape of an engine) it is captured.
    cheap = selfcheck.Check("cuda_graph", cls, "graph", "ok", ms={"eager": 3.0, "graph": 0.5,
                                                                   "capture": 2.0})  # fmt: skip
    selfcheck.record(cheap, DEVICE)
    engine._static.clear()
    _run(engine, d, n=2)
    _run(engine, d, n=1)
    assert len(captured) == 3


def test_forced_kernels(monkeypatch):
    cuda = torch.device("cuda")  # resolution reads the device type only
    monkeypatch.setattr(ops, "triton_available", lambda: True)
    choice = ops.KernelChoice("auto")
    assert choice.on(cuda) == "triton" and choice.checked(cuda)
    assert not ops.KernelChoice("triton").checked(cuda)
    for value, kernels, checked in (("torch", "torch", False), ("triton", "triton", False)):
        monkeypatch.setenv(selfcheck.FORCE_ENV, value)
        choice = ops.KernelChoice("auto")
        assert (choice.on(cuda), choice.checked(cuda)) == (kernels, checked)
    monkeypatch.setenv(selfcheck.FORCE_ENV, "torch")
    assert ops.resolve_kernels("auto", "cpu") == "torch"
    monkeypatch.setenv(selfcheck.FORCE_ENV, "triton")
    monkeypatch.setattr(ops, "triton_available", lambda: False)
    with pytest.raises(InputError, match="FASTSAMPLE_KERNELS=triton: Triton is not installed"):
        ops.resolve_kernels("auto", cuda)
    monkeypatch.setenv(selfcheck.FORCE_ENV, "cuda")
    with pytest.raises(InputError, match="FASTSAMPLE_KERNELS='cuda': expected 'torch' or 'triton'"):
        ops.resolve_kernels("auto", "cpu")
    # Forced off, the engine runs the eager update and checks nothing.
    monkeypatch.setenv(selfcheck.FORCE_ENV, "torch")
    model, clf, d = _demo()
    engine = FastEngine(model, clf)
    assert not engine.fused and not engine.self_check
    _run(engine, d)
    assert not engine._static and selfcheck.decisions(DEVICE) == []


def test_the_cache_is_keyed_by_the_environment_and_survives_damage(verdicts, monkeypatch):
    x, w, b, sc, sh = _gn_inputs()
    selfcheck.group_norm_choice(x, 8, w, b, 1e-5, sc, sh, True)
    path = selfcheck.cache_path(DEVICE)
    assert path.parent == verdicts / "selfcheck" and path.is_file()
    assert _file(verdicts)["environment"] == selfcheck.environment(DEVICE)
    # Another torch (or driver, GPU, triton, fastsample): another file, checked again.
    env = selfcheck.environment(DEVICE)
    with monkeypatch.context() as m:
        m.setattr(verdicts_module, "environment", lambda device: {**env, "torch": "9.9"})
        selfcheck._forget()
        assert selfcheck.cache_path(DEVICE) != path and selfcheck.decisions(DEVICE) == []
    # A damaged file is ignored, checked again and rewritten.
    for damage in (b"{not json", b'{"environment": 1}', json.dumps(
            {"environment": env, "checks": [{"component": "group_norm"}]}).encode()):  # fmt: skip
        path.write_bytes(damage)
        selfcheck._forget()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            selfcheck.group_norm_choice(x, 8, w, b, 1e-5, sc, sh, True)
        assert len(_file(verdicts)["checks"]) == 1
    selfcheck.reset(DEVICE)
    assert not path.exists() and selfcheck.decisions(DEVICE) == []
