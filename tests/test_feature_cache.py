"""DeepCache-style feature caching (fastsample.featcache): the split UNet forwards, the cached
model function's schedule of full and shallow calls, and sample(cache_interval=...)."""

from __future__ import annotations

import random

import pytest
import torch

from fastsample import Classifier, Diffusion, InputError, SuperResUNet, UNet, sample
from fastsample import sampler as samplers
from fastsample.featcache import cached_model_fn, full_calls, shallow_flop_share
from fastsample.netfns import model_fn

_BASE = dict(image_size=16, in_channels=3, model_channels=32, dropout=0.0, num_heads=2)
CONFIGS = {
    # learn_sigma, class-conditional, attention at 8x8, resampling ResBlocks (4 input blocks)
    "cond_learn_sigma": (UNet, dict(_BASE, out_channels=6, num_res_blocks=1, channel_mult=(1, 2),
                                    attention_resolutions=(2,), num_classes=10,
                                    use_scale_shift_norm=True, resblock_updown=True)),
    # unconditional eps model, attention at 8x8 and 4x4, conv resampling (9 input blocks)
    "uncond_eps": (UNet, dict(_BASE, out_channels=3, num_res_blocks=2, channel_mult=(1, 2, 2),
                              attention_resolutions=(2, 4), num_head_channels=16,
                              use_new_attention_order=True)),
    # the upsampler: [x, bilinear(low_res)] in, class-conditional, attention everywhere
    "upsampler": (SuperResUNet, dict(_BASE, out_channels=6, num_res_blocks=1,
                                     channel_mult=(1, 1), attention_resolutions=(1, 2),
                                     num_classes=10, num_head_channels=16)),
}  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny networks gain nothing from threads, and lose much to a busy machine's contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _random(name: str, seed: int = 0):
    """A tiny network with every weight random (no zero-initialized layer hides a difference)."""
    cls, kwargs = CONFIGS[name]
    torch.manual_seed(seed)
    model = cls(**kwargs).eval().requires_grad_(False)
    for p in model.parameters():
        p.normal_(0, 0.05)
    return model


def _inputs(model, batch: int = 2, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=g)
    inputs = {"y": torch.tensor([3, 7][:batch]) if cfg.num_classes is not None else None}
    if model.takes_low_res:
        inputs["low_res"] = torch.rand(batch, 3, 4, 4, generator=g) * 2 - 1
    return {"x": x, **inputs}


def _split(model, x, t, *, depth, **inputs):
    return model.forward_split(x, t, **inputs, depth=depth)


def _shallow(model, x, t, feature, *, depth, **inputs):
    return model.forward_shallow(x, t, **inputs, feature=feature, depth=depth)


# every config on the torch kernels; one also on onednn's (channels_last activations)
@pytest.mark.parametrize(
    ("name", "kernels"), [(name, "torch") for name in CONFIGS] + [("cond_learn_sigma", "onednn")]
)
def test_shallow_forward_with_its_own_feature_equals_full_forward_bit_for_bit(name, kernels):
    model = _random(name).set_kernels(kernels)
    inputs = _inputs(model)
    x, t = inputs.pop("x"), torch.tensor([900, 35])
    with torch.no_grad():
        expected = model(x, t, **inputs)
        assert expected.abs().max() > 0
        other_t = _split(model, x, torch.tensor([500, 500]), depth=1, **inputs)[1]
        for depth in range(1, len(model.input_blocks)):
            out, feature = _split(model, x, t, depth=depth, **inputs)
            assert torch.equal(out, expected), depth
            assert torch.equal(_shallow(model, x, t, feature, depth=depth, **inputs), expected)
            if depth == 1:  # the feature is used: another step's changes the output
                stale = _shallow(model, x, t, other_t, depth=1, **inputs)
                assert not torch.equal(stale, expected)


def _ddim_by_hand(model, diffusion, noise, y, interval: int, depth: int):
    """DDIM (eta = 0, x0 clipped) written out, the full and shallow forwards called here."""
    tab = samplers.ddim_tables(diffusion, torch.device("cpu"), 0.0)
    x, n = noise[0], diffusion.num_steps
    for k in range(1, n + 1):
        i = n - k
        t = tab["t_model"][i].expand(x.shape[0])
        if (k - 1) % interval == 0:
            out, feature = model.forward_split(x, t, y, depth=depth)
        else:
            out = model.forward_shallow(x, t, y, feature=feature, depth=depth)
        eps = out[:, :3] if diffusion.learn_sigma else out
        x0 = (tab["sqrt_recip_ac"][i] * x - tab["sqrt_recipm1_ac"][i] * eps).clamp(-1, 1)
        eps = (tab["sqrt_recip_ac"][i] * x - x0) / tab["sqrt_recipm1_ac"][i]
        x = x0 * tab["sqrt_ac_prev"][i] + tab["dir_coef"][i] * eps
    return x


@pytest.mark.parametrize("depth", [1, 2])
def test_cached_ddim_equals_a_hand_run_loop(depth):
    model = _random("cond_learn_sigma")
    diffusion = Diffusion(noise_schedule="cosine", timestep_respacing="10")
    y, shape = torch.tensor([3, 7]), (2, 3, 16, 16)
    noise = torch.randn((11, *shape), generator=torch.Generator().manual_seed(5))
    opts = dict(y=y, sampler="ddim", noise=noise)
    with torch.no_grad():
        expected = _ddim_by_hand(model, diffusion, noise, y, interval=3, depth=depth)
    cached = sample(model, diffusion, shape, cache_interval=3, cache_depth=depth, **opts)
    assert torch.equal(cached, expected)
    # Caching changes the samples (so the comparison above could fail), but not by much.
    uncached = sample(model, diffusion, shape, **opts)
    assert not torch.equal(cached, uncached)
    assert (cached - uncached).abs().max() < 0.5 * uncached.abs().max()


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++2m"])
def test_interval_one_is_todays_sample_exactly(sampler):
    model = _random("cond_learn_sigma")
    diffusion = Diffusion(noise_schedule="linear", timestep_respacing="5")
    clf = Classifier(image_size=16, in_channels=3, model_channels=32, out_channels=10,
                     num_res_blocks=1, attention_resolutions=(2,), channel_mult=(1, 2),
                     num_head_channels=16, pool="attention")  # fmt: skip
    clf.eval().requires_grad_(False)
    for p in clf.parameters():
        p.normal_(0, 0.05)
    opts = dict(y=torch.tensor([1, 2]), sampler=sampler, seed=[4, 9], classifier=clf,
                guidance_scale=2.0)  # fmt: skip
    today = sample(model, diffusion, (2, 3, 16, 16), **opts)
    for depth in (None, 1, 3):
        out = sample(model, diffusion, (2, 3, 16, 16), cache_interval=1, cache_depth=depth, **opts)
        assert torch.equal(out, today), depth


def test_interval_one_model_fn_is_the_plain_one():
    model = _random("upsampler")
    inputs = _inputs(model)
    x, t = inputs.pop("x"), torch.tensor([999, 0])
    plain = model_fn(model, inputs["y"], inputs["low_res"])
    cached = cached_model_fn(model, inputs["y"], inputs["low_res"], interval=1, depth=2)
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(cached(x, t), plain(x, t))
    assert (cached.full_calls, cached.shallow_calls) == (3, 0)


def test_upsampler_samples_with_the_cache():
    model = _random("upsampler")
    inputs = _inputs(model)
    diffusion = Diffusion(noise_schedule="linear", timestep_respacing="ddim6")
    opts = dict(y=inputs["y"], low_res=inputs["low_res"], sampler="ddim", seed=[1, 2])
    cached = sample(model, diffusion, (2, 3, 16, 16), cache_interval=2, cache_depth=3, **opts)
    uncached = sample(model, diffusion, (2, 3, 16, 16), **opts)
    assert cached.shape == uncached.shape and bool(torch.isfinite(cached).all())
    assert not torch.equal(cached, uncached)


@pytest.mark.parametrize(("steps", "interval"), [(10, 3), (25, 2), (7, 1), (4, 5), (9, 3)])
def test_full_and_shallow_calls_are_counted_and_predicted(steps, interval):
    model = _random("uncond_eps")
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([10])
    fn = cached_model_fn(model, interval=interval, depth=4)
    calls = [model.forward_split, model.forward_shallow]
    seen = []
    model.forward_split = lambda *a, **k: seen.append("full") or calls[0](*a, **k)
    model.forward_shallow = lambda *a, **k: seen.append("shallow") or calls[1](*a, **k)
    with torch.no_grad():
        for _ in range(steps):
            fn(x, t)
        full = full_calls(steps, interval)
        assert (fn.full_calls, fn.shallow_calls) == (full, steps - full)
        if interval > 1:
            assert seen == ["full" if k % interval == 0 else "shallow" for k in range(steps)]
        fn.reset()  # a new trajectory starts with a full call; the counts go on
        fn(torch.randn(2, 3, 16, 16), torch.tensor([5, 5]))
    assert fn.full_calls == full + 1
    assert full_calls(0, 4) == 0 and full_calls(25, 1) == 25 and full_calls(25, 3) == 9


def test_a_new_batch_without_reset_is_refused():
    model = _random("uncond_eps")
    fn = cached_model_fn(model, interval=2, depth=1)
    with torch.no_grad():
        fn(torch.randn(2, 3, 16, 16), torch.tensor([9, 9]))
        with pytest.raises(InputError, match="call reset"):
            fn(torch.randn(3, 3, 16, 16), torch.tensor([8, 8, 8]))


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_bad_intervals_and_depths_are_refused_in_one_line():
    rng = random.Random(0)
    model = _random("cond_learn_sigma")  # 4 input blocks: depths 1..3
    diffusion = Diffusion(timestep_respacing="ddim4")
    opts = dict(y=torch.tensor([1]), sampler="ddim", seed=[0])
    bad_intervals = [0, -1, True, 2.0, "3", None, rng.randint(-(10**6), 0), rng.random() + 1]
    for interval in bad_intervals:
        with pytest.raises(InputError) as e:
            sample(model, diffusion, (1, 3, 16, 16), cache_interval=interval, **opts)
        assert _one_line(e).startswith(f"cache_interval={interval!r}: expected a positive int")
        with pytest.raises(InputError):
            cached_model_fn(model, interval=interval, depth=1)
    bad_depths = [0, -1, 4, 5, True, 1.5, "1", rng.randint(4, 10**6), rng.randint(-(10**6), 0)]
    for depth in bad_depths:
        for interval in (1, 2):
            with pytest.raises(InputError) as e:
                sample(model, diffusion, (1, 3, 16, 16), cache_interval=interval,
                       cache_depth=depth, **opts)  # fmt: skip
            assert _one_line(e).startswith(f"cache_depth={depth!r}: expected an integer in 1..3")
        with pytest.raises(InputError):
            model.forward_split(torch.zeros(1, 3, 16, 16), 5, torch.tensor([1]), depth=depth)
    # another runtime checks the depth before exporting anything (the caching graphs: see
    # tests/test_export_recipe.py)
    with pytest.raises(InputError) as e:
        sample(model, diffusion, (1, 3, 16, 16), cache_interval=2, cache_depth=9,
               runtime="onnxruntime", **opts)  # fmt: skip
    assert _one_line(e).startswith("cache_depth=9: expected an integer in 1..3")


def test_a_feature_of_the_wrong_shape_is_refused():
    model = _random("cond_learn_sigma")
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([1, 1]), torch.tensor([0, 1])
    with torch.no_grad():
        _, feature = model.forward_split(x, t, y, depth=2)
        with pytest.raises(InputError, match="feature of shape"):
            model.forward_shallow(x, t, y, feature=feature, depth=1)


def test_shallow_flop_share_grows_with_depth():
    cls, kwargs = CONFIGS["uncond_eps"]
    shares = [shallow_flop_share(cls.config_class(**kwargs), d) for d in range(1, 9)]
    assert 0 < shares[0] < 1 and 0 < shares[-1] < 1
    assert shares == sorted(set(shares))  # strictly growing
