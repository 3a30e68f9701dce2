"""The fast engine: same samples as the eager path for the same seeds. Its fused update kernel
runs interpreted on the CPU (the triton_kernels fixture) and compiled on a GPU; against the
reference's trajectories in tests/kernels/test_fast_engine.py; CUDA graphs and streams in the
GPU-marked tests, which bench/gpu_check.sh runs."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from conftest import KERNEL_DEVICE, rel_err
from fastsample import Pipeline, sample
from fastsample.catalog import DEMO_UNET, PRESETS
from fastsample.checkpoint import load_model
from fastsample.engine import FastEngine
from fastsample.unet import AttentionPool2d


def _demo(device="cpu"):
    model = load_model(DEMO_UNET, device=device)
    clf = load_model(PRESETS[DEMO_UNET].classifier, device=device)
    return model, clf, PRESETS[DEMO_UNET].diffusion.respaced("ddim8")


@pytest.mark.parametrize("cache", [{}, {"cache_interval": 2, "cache_depth": 2}])
def test_pipeline_fast_engine_matches_eager(triton_kernels, monkeypatch, cache):
    """Also with feature caching, which the engine runs on its static buffers."""
    import fastsample.kernels.sampler_step as fused

    launches = []
    kernel = fused.sampler_step

    def counted(*args, **kwargs):
        launches.append(args[0])
        return kernel(*args, **kwargs)

    monkeypatch.setattr(fused, "sampler_step", counted)
    model, clf, d = _demo(KERNEL_DEVICE)
    kwargs = dict(batch_size=3, classes=[1, 7], sampler="ddim", seed=3, progress=False, **cache)
    eager = Pipeline(model, d, clf, guidance_scale=2.0, engine="eager").generate(4, **kwargs)
    assert launches == []
    model2, clf2, _ = _demo(KERNEL_DEVICE)
    model2.requires_grad_(True)
    fast_pipe = Pipeline(model2, d, clf2, guidance_scale=2.0, engine="fast")
    fast = fast_pipe.generate(4, **kwargs)
    assert fast_pipe.engine == "fast"
    assert launches  # the fused update ran, not the eager one
    # The engine's own copy of the classifier pools with its first query only; the caller's
    # networks are left as they were (full pool, parameters still trainable).
    pools = [m for m in fast_pipe._engine.classifier.modules() if isinstance(m, AttentionPool2d)]
    assert pools and all(p.first_query_only for p in pools)
    assert not any(m.first_query_only for m in clf2.modules() if isinstance(m, AttentionPool2d))
    assert all(p.requires_grad for p in model2.parameters())
    assert np.array_equal(eager.labels, fast.labels)
    diff = np.abs(eager.images.astype(int) - fast.images.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.999


def test_first_query_pool_equals_full_pool():
    _, clf, _ = _demo()
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, 1, 32, 32, generator=gen), torch.tensor([5.0, 300.0, 900.0])
    with torch.no_grad():
        full = clf(x, t)
        for m in clf.modules():
            if isinstance(m, AttentionPool2d):
                m.first_query_only = True
        first = clf(x, t)
    assert rel_err(first, full) < 1e-5


def test_engine_default_and_errors():
    model, clf, d = _demo()
    assert Pipeline(model, d, clf).engine == "eager"  # on the CPU
    with pytest.raises(ValueError, match="engine 'turbo'"):
        Pipeline(model, d, clf, engine="turbo")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpm++2m"])
@pytest.mark.parametrize("graphs,streams", [(True, True), (True, False), (False, True)])
def test_cuda_graphs_and_streams_match_eager(sampler, graphs, streams):
    """Two batches of one shape (the second replays the first's captured step with its own
    labels and noise), then a batch of another size."""
    model, clf, d = _demo("cuda")
    model.set_kernels("torch")
    clf.set_kernels("torch")
    model2, clf2, _ = _demo("cuda")
    engine = FastEngine(model2, clf2, cuda_graphs=graphs, streams=streams)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for labels in ([0, 3, 7, 9], [5, 5, 1, 2], [4, 6]):
        y = torch.tensor(labels, device="cuda")
        shape = (len(labels), 1, 32, 32)
        noise = torch.randn(d.num_steps + 1, *shape, device="cuda", generator=gen)
        want = sample(model, d, shape, y=y, sampler=sampler, classifier=clf, guidance_scale=2.0,
                      noise=noise)  # fmt: skip
        steps: list[int] = []
        got = engine.sample(
            sampler, d, lambda k, n=noise: n[k], y=y, model_y=y, guidance_scale=2.0,
            callback=lambda k, x, x0, steps=steps: steps.append(k),
        )  # fmt: skip
        assert steps == list(range(1, d.num_steps + 1))
        # Triton kernels (fp32 statistics, one rounding) and TF32-capable cuDNN vs the torch ops.
        assert rel_err(got, want) < 1e-3, labels
    assert len(engine._static) == 2  # buffers (and graphs) per batch shape, reused


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m"])
def test_cuda_graphs_with_feature_cache_match_eager(sampler):
    """Feature caching on CUDA graphs: one graph for full steps (refreshing the static deep
    feature), one for shallow steps (reading it), replayed by a second batch."""
    model, clf, d = _demo("cuda")
    model.set_kernels("torch")
    clf.set_kernels("torch")
    model2, clf2, _ = _demo("cuda")
    engine = FastEngine(model2, clf2, self_check=False)  # graphs kept: compared here
    gen = torch.Generator(device="cuda").manual_seed(1)
    cache = {"cache_interval": 2, "cache_depth": 2}
    for labels in ([0, 3, 7, 9], [5, 5, 1, 2]):
        y = torch.tensor(labels, device="cuda")
        shape = (len(labels), 1, 32, 32)
        noise = torch.randn(d.num_steps + 1, *shape, device="cuda", generator=gen)
        want = sample(model, d, shape, y=y, sampler=sampler, classifier=clf, guidance_scale=2.0,
                      noise=noise, **cache)  # fmt: skip
        got = engine.sample(sampler, d, lambda k, n=noise: n[k], y=y, model_y=y,
                            guidance_scale=2.0, **cache)  # fmt: skip
        assert rel_err(got, want) < 1e-3, labels
    (st,) = engine._static.values()
    assert set(st.graphs) == {(True, True), (True, False)}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_default_kernels_check_themselves_on_cuda(tmp_path, monkeypatch):
    """The default ("auto") networks on the fast engine: the first run checks every fast path
    on the shape classes it runs and samples as the torch kernels do; a second process (the
    verdicts read from disk) measures nothing and samples the same."""
    from fastsample import selfcheck

    monkeypatch.setenv("FASTSAMPLE_CACHE", str(tmp_path))
    monkeypatch.delenv(selfcheck.FORCE_ENV, raising=False)
    selfcheck._forget()
    reference, ref_clf, d = _demo("cuda")
    reference.set_kernels("torch")
    ref_clf.set_kernels("torch")
    model, clf, _ = _demo("cuda")
    assert model.kernels == "auto" and model._kernels.checked(torch.device("cuda"))
    y = torch.tensor([1, 4, 9], device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    noise = torch.randn(d.num_steps + 1, 3, 1, 32, 32, device="cuda", generator=gen)
    want = sample(reference, d, (3, 1, 32, 32), y=y, sampler="ddim", classifier=ref_clf,
                  guidance_scale=2.0, noise=noise)  # fmt: skip
    results = []
    for _ in range(2):
        engine = FastEngine(model, clf)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results.append(engine.sample("ddim", d, lambda k: noise[k], y=y, model_y=y,
                                         guidance_scale=2.0))  # fmt: skip
        assert not [w for w in caught if "self-check" in str(w.message)]  # none failed
        verdicts = selfcheck.decisions("cuda:0")
        if not results[1:]:
            measured = verdicts
            assert {"group_norm", "attention", "fused_update", "cuda_graph"} <= {
                v.component for v in verdicts
            }
            assert not any(v.cached for v in verdicts)
            selfcheck._forget()  # as a new process
    assert [v.to_json() for v in verdicts] == [v.to_json() for v in measured]
    assert all(v.cached for v in verdicts)
    assert not [v for v in measured if v.status == "FAILED"]
    for got in results:
        assert rel_err(got, want) < 1e-3  # as test_cuda_graphs_and_streams_match_eager
