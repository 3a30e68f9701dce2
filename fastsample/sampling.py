"""One batch: `sample` checks a request, builds the seam's model and guidance functions from
eager networks or exported graphs, and runs a solver (`fastsample.sampler.run`).

Randomness is an argument: explicit noise, per-sample seeds (a sample depends only on its seed,
never on its batch), or, with neither, torch's global generator drawn in the reference's order
(x_T with one randn, then one randn per step, also at the last step and for eta = 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from . import featcache, netfns
from . import sampler as solvers
from ._deprecation import _UNSET, renamed
from .config import SuperResConfig
from .errors import InputError, InputTypeError
from .schedule import Diffusion

Runtime = Literal["eager", "onnxruntime", "tensorrt", "aoti"]
RUNTIMES: tuple[str, ...] = ("eager", "onnxruntime", "tensorrt", "aoti")


def check_runtime(runtime: str) -> str:
    if runtime not in RUNTIMES:
        raise InputError(f"runtime {runtime!r}: expected one of {', '.join(RUNTIMES)}")
    return runtime


def sample_seed(seed: int, index: int, stream: int = 0) -> int:
    """The generator seed of sample `index` of a run seeded with `seed` (stream 1: its label)."""
    if seed < 0 or index < 0:
        raise InputError(f"seed={seed}, index={index}: expected non-negative integers")
    return int(np.random.SeedSequence([seed, index, stream]).generate_state(1, np.uint64)[0])


def noise_source(noise, seed, shape, steps: int, device) -> solvers.NoiseFn:
    """noise(k): x_T for k = 0, else step k's fresh noise, from explicit noise, seeds or the
    global generator."""
    if noise is not None and seed is not None:
        raise InputError("give noise or seed, not both")
    if noise is not None:
        expected = (steps + 1, *shape)
        if tuple(noise.shape) != expected:
            raise InputError(
                f"noise of shape {tuple(noise.shape)}: expected {expected} "
                "(x_T, then one draw per step)"
            )
        noise = noise.to(device=device, dtype=torch.float32)
        return lambda k: noise[k]
    if seed is not None:
        if isinstance(seed, (int, np.integer)):
            seeds = [sample_seed(int(seed), b) for b in range(shape[0])]
        else:
            seeds = list(seed)
        seeds = [int(s) for s in seeds]
        if len(seeds) != shape[0]:
            raise InputError(f"{len(seeds)} seeds for a batch of {shape[0]}: expected one each")
        generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]

        def draw(k: int) -> torch.Tensor:
            return torch.stack(
                [torch.randn(shape[1:], generator=g, device=device) for g in generators]
            )

        return draw
    return lambda k: torch.randn(shape, device=device)


def _check_labels(y: torch.Tensor, batch: int, classes: int, who: str) -> None:
    if y.shape != (batch,):
        raise InputError(f"y of shape {tuple(y.shape)}: expected ({batch},) class labels")
    if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise InputError(f"y has dtype {y.dtype}: expected integer class labels")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= classes):
        raise InputError(f"class labels {y.tolist()}: {who} takes labels in 0..{classes - 1}")


def check_classifier_fits(clf_cfg, channels: int, height: int, width: int) -> None:
    """The guidance classifier must read the images the model makes."""
    size = clf_cfg.image_size
    if (clf_cfg.in_channels, size, size) != (channels, height, width):
        raise InputError(
            f"the classifier reads {clf_cfg.in_channels}-channel {size}x{size} images but the "
            f"model makes {channels}-channel {height}x{width} ones: use the classifier trained "
            "at the model's resolution"
        )


def check_inputs(cfg, clf_cfg, shape, y, low_res, sampler, guidance_scale, device):
    """Validate a sampling request -> (labels, labels for the model, low_res on device)."""
    solvers.get_solver(sampler)
    if len(shape) != 4:
        raise InputError(f"shape {shape}: expected (batch, channels, height, width)")
    batch = shape[0]
    if shape[1] != cfg.in_channels:
        raise InputError(f"shape {shape}: the model makes {cfg.in_channels}-channel images")
    conditional = cfg.num_classes is not None
    guided = clf_cfg is not None and guidance_scale != 0
    if guidance_scale != 0 and clf_cfg is None:
        raise InputError(f"guidance_scale={guidance_scale} needs a classifier")
    if guided:
        check_classifier_fits(clf_cfg, shape[1], shape[2], shape[3])
    if y is None and (conditional or guided):
        raise InputError(
            "class labels y are needed: "
            + ("the model is class-conditional" if conditional else "classifier guidance")
        )
    if y is not None:
        if not (conditional or guided):
            raise InputError("y was given, but the model is unconditional and there is no guidance")
        y = torch.as_tensor(y, device=device)
        if conditional:
            _check_labels(y, batch, cfg.num_classes, "the model")
        if guided:
            _check_labels(y, batch, clf_cfg.out_channels, "the classifier")
        y = y.long()
    y_model = y if conditional else None
    if isinstance(cfg, SuperResConfig):
        if low_res is None:
            raise InputError("an upsampler needs low_res: [B, C, h, w] images in [-1, 1]")
        low_res = low_res.to(device=device, dtype=torch.float32)
        if low_res.shape[:2] != shape[:2]:
            raise InputError(
                f"low_res of shape {tuple(low_res.shape)}: expected ({batch}, {shape[1]}, h, w)"
            )
    elif low_res is not None:
        raise InputError("low_res is for upsamplers; this model is not one")
    return y, y_model, low_res


def _networks(model, classifier, runtime, diffusion, guidance_scale, cache):
    """-> (config, classifier config or None, device, model_fn factory, guidance_fn factory).
    cache: (interval, depth or None) of feature caching; the model_fn factory's function
    caches where interval > 1."""
    from .unet import UNet

    interval, depth = cache
    if runtime == "eager":
        if not isinstance(model, UNet):
            raise InputTypeError(
                "model: expected a UNet or SuperResUNet for the eager runtime, got "
                f"{type(model).__name__}"
            )
        settings = featcache.settings(model, interval, depth)

        def make_model(y, low_res):
            if settings is None:
                return netfns.model_fn(model, y, low_res)
            return featcache.cached_model_fn(model, y, low_res, interval=settings[0],
                                             depth=settings[1])  # fmt: skip

        return (
            model.config,
            classifier.config if classifier is not None else None,
            next(model.parameters()).device,
            make_model,
            lambda y: netfns.guidance_fn(classifier, y),
        )
    from fastsample.export.runtime import ExportedGraphs, graphs_for

    if isinstance(model, ExportedGraphs):
        if classifier is not None:
            raise InputError(
                "classifier: an export carries its own gradient graph; pass classifier=None"
            )
        graphs = model
        if graphs.runtime != runtime:
            raise InputError(f"these graphs run on {graphs.runtime!r}, not {runtime!r}")
    elif isinstance(model, UNet):
        # (caching: the cache export also holds the split graphs at the run's depth)
        graphs = graphs_for(model, classifier if guidance_scale != 0 else None, runtime, diffusion,
                            cache_depth=featcache.split_depth(model, interval, depth))  # fmt: skip
    else:
        raise InputTypeError(
            f"model: expected a UNet or ExportedGraphs, got {type(model).__name__}"
        )
    clf_cfg = graphs.classifier_config if graphs.classifier_grad is not None else None
    make_model = graphs.model_fn
    if interval != 1:
        graphs.cached_model_fn(interval=interval, depth=depth)  # (refused here, before any work)

        def make_model(y, low_res):
            return graphs.cached_model_fn(y, low_res, interval=interval, depth=depth)

    return graphs.config, clf_cfg, graphs.device, make_model, graphs.guidance_fn


def sample(
    model,
    diffusion: Diffusion,
    shape: Sequence[int],
    *,
    y: torch.Tensor | None = None,
    low_res: torch.Tensor | None = None,
    sampler: solvers.SamplerName = "ddpm",
    eta: float = 0.0,
    classifier=None,
    guidance_scale: float = 0.0,
    guidance_interval: tuple[float, float] | None = None,
    guidance_every: int = 1,
    stable_guidance: bool = False,
    clip_denoised: bool = True,
    noise: torch.Tensor | None = None,
    seed: int | Sequence[int] | None = None,
    progress: bool = False,
    return_trajectory: bool = False,
    callback: solvers.StepCallback | None = None,
    runtime: Runtime = "eager",
    cache_interval: int = 1,
    cache_depth: int | None = None,
    backend=_UNSET,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """Draw one batch of samples [B, C, H, W] (on the [-1, 1] scale, not clipped: see to_uint8).

    noise: [steps + 1, B, C, H, W]: x_T, then the fresh noise of each step, in the reference's
    order. seed: an int (sample b gets sample_seed(seed, b)) or one generator seed per sample.
    classifier + guidance_scale: classifier guidance with labels y (for an unconditional model,
    y goes to the classifier only). guidance_interval (lo, hi): guide only at steps whose
    original timestep lies in [lo, hi]; guidance_every k: compute the gradient at every k-th
    guided step and reuse it in between (`fastsample.guidance`). stable_guidance: skip guidance
    where alpha_bar < ~1e-6, where the eps-form guidance of every sampler but ddpm turns samples
    into noise (the pipeline's and CLI's default; here off, as the reference, with one warning).
    runtime: "eager" runs the torch modules; "onnxruntime", "tensorrt" and "aoti" run exported
    graphs of the model and of the guidance gradient. model may then be an ExportedGraphs
    (`fastsample.export.load(dir)`), whose own gradient graph guides; eager networks are
    exported once into the cache (FASTSAMPLE_CACHE, default ~/.cache/fastsample).
    cache_interval, cache_depth: DeepCache-style feature caching (`fastsample.featcache`): the
    whole UNet runs at every cache_interval-th step, in between only its shallow blocks, reusing
    the deep feature at skip depth cache_depth (None: featcache.DEFAULT_DEPTH = 1, the
    shallowest and cheapest). 1 (the default) is exactly the uncached sampler. Exported graphs
    cache through their split graphs (an export made for a caching recipe; eager networks on
    another runtime are exported with them), on ONNX Runtime and AOTInductor; the fast engine
    caches the same way on its static buffers.
    (backend= is the old name of runtime=.)
    """
    runtime = check_runtime(renamed("runtime", runtime, "backend", backend, "eager"))
    cache_interval = featcache.check_interval(cache_interval)
    shape = tuple(int(s) for s in shape)
    cfg, clf_cfg, device, make_model, make_guidance = _networks(
        model, classifier, runtime, diffusion, guidance_scale, (cache_interval, cache_depth)
    )
    y, y_model, low_res = check_inputs(
        cfg, clf_cfg if guidance_scale != 0 else None, shape, y, low_res, sampler,
        guidance_scale, device,
    )  # fmt: skip
    guided = clf_cfg is not None and guidance_scale != 0
    budget = {"guidance_interval": guidance_interval, "guidance_every": guidance_every,
              "stable_guidance": bool(stable_guidance)}  # fmt: skip
    solvers.check_guidance_budget(guidance_interval, guidance_every)
    model_fn = make_model(y_model, low_res)
    guidance = make_guidance(y) if guided else None
    draw = noise_source(noise, seed, shape, diffusion.num_steps, device)
    if runtime != "eager":
        return _run(sampler, model_fn, guidance, guidance_scale, diffusion, draw, eta,
                    clip_denoised, progress, return_trajectory, callback, budget)  # fmt: skip
    # Sampling always runs the networks in eval mode (dropout off); their mode is restored.
    modes = [(m, m.training) for m in (model, classifier) if m is not None]
    try:
        for m, _ in modes:
            m.eval()
        return _run(sampler, model_fn, guidance, guidance_scale, diffusion, draw, eta,
                    clip_denoised, progress, return_trajectory, callback, budget)  # fmt: skip
    finally:
        for m, training in modes:
            m.train(training)


def _run(sampler, model_fn, guidance, scale, diffusion, draw, eta, clip_denoised, progress,
         return_trajectory, callback, budget):  # fmt: skip
    trajectory: dict[str, list[torch.Tensor]] = {"samples": [], "pred_xstart": []}

    def record(k: int, x: torch.Tensor, x0: torch.Tensor) -> None:
        if return_trajectory:
            trajectory["samples"].append(x)
            trajectory["pred_xstart"].append(x0)
        if callback is not None:
            callback(k, x, x0)

    with torch.no_grad():
        final = solvers.run(
            sampler, model_fn, diffusion, draw, guidance=guidance, guidance_scale=scale, eta=eta,
            clip_denoised=clip_denoised, progress=progress, callback=record, **budget,
        )  # fmt: skip
    if not return_trajectory:
        return final
    return {
        "sample": final,
        "samples": torch.stack(trajectory["samples"]),
        "pred_xstart": torch.stack(trajectory["pred_xstart"]),
    }
