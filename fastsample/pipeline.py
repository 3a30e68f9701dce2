"""Batched generation: `Pipeline.generate` draws many images with per-sample seeds and labels,
in batches, retrying a batch in float32 where low precision overflowed; `Generation` holds and
saves the result.

A Pipeline runs one of three ways: the eager networks (`fastsample.sampling.sample`), the fast
engine (`fastsample.engine`, the default on CUDA), or exported graphs on another runtime
(`runtime=`, or `Pipeline.from_export(dir)`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from . import sampler as solvers
from ._deprecation import _UNSET, renamed
from .catalog import PRESETS
from .checkpoint import create_model, load_model, read_diffusion
from .errors import InputError, InputTypeError, NonFiniteError, OutputExistsError
from .featcache import split_depth
from .image_io import atomic_write, image_grid, to_uint8, write_npz
from .ops import Kernels
from .recipes import Recipe
from .request import Request, resolve
from .sampling import (
    Runtime,
    check_classifier_fits,
    check_inputs,
    check_runtime,
    noise_source,
    sample,
    sample_seed,
)
from .schedule import Diffusion, TimeSchedule
from .unet import Classifier, UNet

Engine = Literal["fast", "eager"]


class _FiniteWatch:
    """A step callback that notes, on the device and without synchronizing, the first step
    whose x_t is not finite; first_bad(final) then answers with one synchronization."""

    def __init__(self, then):
        self.then = then
        self.first = None  # device tensor: the first bad step, or -1

    def __call__(self, k: int, x: torch.Tensor, x0: torch.Tensor) -> None:
        bad = ~torch.isfinite(x).all()
        if self.first is None:
            self.first = torch.full((), -1, dtype=torch.int64, device=x.device)
        self.first = torch.where(bad & (self.first < 0), k, self.first)
        if self.then is not None:
            self.then(k, x, x0)

    def first_bad(self, final: torch.Tensor) -> int | None:
        first = -1 if self.first is None else int(self.first)
        if first < 0 and not bool(torch.isfinite(final).all()):
            first = 0  # (no callback ran)
        return first if first >= 0 else None


@dataclass
class Generation:
    """Images (uint8 NHWC) and their class labels (None when no labels were used)."""

    images: np.ndarray
    labels: np.ndarray | None

    def save(self, out_dir: str | os.PathLike, overwrite: bool = False) -> dict[str, Path]:
        """Write out_dir/samples.npz (arr_0 images, arr_1 labels: the reference evaluator's
        format) and out_dir/grid.png. Files appear complete or not at all."""
        out = Path(out_dir)
        paths = {"npz": out / "samples.npz", "grid": out / "grid.png"}
        if not overwrite:
            for p in paths.values():
                if p.exists():
                    raise OutputExistsError(f"{p} exists; choose another directory or overwrite")
        out.mkdir(parents=True, exist_ok=True)
        arrays = [self.images] + ([self.labels] if self.labels is not None else [])
        atomic_write(paths["npz"], lambda f: write_npz(f, arrays))
        grid = image_grid(self.images)
        atomic_write(paths["grid"], lambda f: grid.save(f, format="PNG"))
        return paths


def _load_network(spec: str | os.PathLike | torch.nn.Module, device, dtype, role: str):
    if isinstance(spec, torch.nn.Module):
        return spec
    spec = str(spec)
    if os.path.exists(spec) or (spec in PRESETS and PRESETS[spec].weights):
        return load_model(spec, device=device, dtype=dtype)
    if spec in PRESETS:
        warnings.warn(
            f"{role} {spec!r}: no weights file given, using RANDOM weights of that preset "
            "(pass a checkpoint file for real samples)",
            stacklevel=3,
        )
        return create_model(spec, device=device, dtype=dtype)
    raise InputError(
        f"{role} {spec!r} is neither an existing checkpoint file nor a preset "
        f"(presets: {', '.join(PRESETS)})"
    )


class Pipeline:
    """Batched generation with a diffusion model and an optional guidance classifier.

    runtime "eager" runs the torch modules; "onnxruntime", "tensorrt" or "aoti" run their
    exported graphs (exported once into the cache; see `sample`). `Pipeline.from_export(dir)`
    runs an export directory without the eager networks. kernels: the networks' kernel
    implementation (`UNet.set_kernels`); None keeps what they were built with. engine: "fast"
    (the default on CUDA) or "eager". The pipeline moves the networks to `device` and sets
    their precision to `dtype`; the fast engine samples with its own prepared copies."""

    def __init__(
        self,
        model: UNet,
        diffusion: Diffusion,
        classifier: Classifier | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        guidance_scale: float | None = None,
        runtime: Runtime = "eager",
        engine: Engine | None = None,
        compile: bool = False,
        kernels: Kernels | None = None,
        backend=_UNSET,
    ):
        from fastsample.export.runtime import require_runtime

        runtime = check_runtime(renamed("runtime", runtime, "backend", backend, "eager"))
        if engine not in (None, "fast", "eager"):
            raise InputError(f"engine {engine!r}: expected 'fast' or 'eager'")
        require_runtime(runtime)
        if not isinstance(model, UNet):
            raise InputTypeError(
                f"model: expected a UNet or SuperResUNet, got {type(model).__name__}"
            )
        if classifier is not None and not isinstance(classifier, Classifier):
            raise InputTypeError(
                f"classifier: expected a Classifier, got {type(classifier).__name__}"
            )
        self.device = (
            torch.device(device) if device is not None else next(model.parameters()).device
        )
        self.model = model.to(self.device).eval()
        self.classifier = classifier.to(self.device).eval() if classifier is not None else None
        if kernels is not None:
            for net in (self.model, self.classifier):
                if net is not None:
                    net.set_kernels(kernels)
        if dtype is not None:  # an explicit precision is both networks'
            for net in (self.model, self.classifier):
                if net is not None:
                    net.set_precision(dtype)
        self.diffusion = diffusion
        self.runtime = runtime
        self.graphs = None  # ExportedGraphs, made on first use for another runtime
        # The fast engine (CUDA graphs, two streams, fused updates) is the default on CUDA.
        self.engine = engine or ("fast" if self.device.type == "cuda" else "eager")
        self.compile = bool(compile)
        self._engine = None
        self.config = model.config
        self.classifier_config = classifier.config if classifier is not None else None
        if classifier is not None:
            size = model.config.image_size
            check_classifier_fits(classifier.config, model.config.in_channels, size, size)
        self.preset = model.preset
        if classifier is None and guidance_scale:
            raise InputError(f"guidance_scale={float(guidance_scale)} needs a classifier")
        if guidance_scale is None:
            preset = PRESETS.get(model.preset or "")
            guidance_scale = preset.classifier_scale if preset and preset.classifier_scale else 1.0
        self.guidance_scale = float(guidance_scale) if classifier is not None else 0.0

    @classmethod
    def from_export(
        cls,
        directory: str | os.PathLike,
        runtime: Runtime | None = None,
        device: str | None = None,
        backend=_UNSET,
    ) -> Pipeline:
        """Run an export directory (`fastsample export`) on a runtime (default: the one its
        target is for): ONNX Runtime for an onnx export (or TensorRT, building engines),
        AOTInductor, or its TensorRT engines."""
        from fastsample.export.runtime import ExportedGraphs

        runtime = renamed("runtime", runtime, "backend", backend, None)
        graphs = ExportedGraphs(directory, runtime=runtime, device=device)
        self = cls.__new__(cls)
        self.model = self.classifier = None
        self.graphs = graphs
        self.runtime = graphs.runtime
        self.device = graphs.device
        self.diffusion = graphs.diffusion
        self.config = graphs.config
        self.classifier_config = (
            graphs.classifier_config if graphs.classifier_grad is not None else None
        )
        self.preset = graphs.preset
        self.guidance_scale = graphs.guidance_scale if self.classifier_config else 0.0
        self.engine, self.compile, self._engine = "eager", False, None
        return self

    def _use_fast(self) -> bool:
        return self.engine == "fast" and self.runtime == "eager"

    def _fast_sample(self, net, diffusion, shape, *, y, low_res, sampler, eta, classifier,
                     guidance_scale, clip_denoised, seed, callback, runtime, cache_interval,
                     cache_depth, **budget):  # fmt: skip
        """sample()'s job on the fast engine (same seeds, same noise order, the same guidance
        plan and feature cache)."""
        from .engine import FastEngine

        if self._engine is None:
            self._engine = FastEngine(self.model, self.classifier, compile=self.compile)
        device = self.device
        y, y_model, low_res = check_inputs(
            self.config, self.classifier_config if guidance_scale else None, tuple(shape), y,
            low_res, sampler, guidance_scale, device,
        )  # fmt: skip
        draw = noise_source(None, seed, tuple(shape), diffusion.num_steps, device)
        return self._engine.sample(
            sampler, diffusion, draw, y=y, model_y=y_model, low_res=low_res, eta=eta,
            guidance_scale=guidance_scale, clip_denoised=clip_denoised, callback=callback,
            cache_interval=cache_interval, cache_depth=cache_depth, **budget,
        )  # fmt: skip

    def _networks(self, diffusion: Diffusion, guided: bool, cache_interval: int = 1,
                  cache_depth: int | None = None):  # fmt: skip
        """What sample() is given: the eager modules, or the loaded graphs (eager networks on
        another runtime: exported into the cache, with the caching graphs where it caches)."""
        if self.runtime == "eager":
            return self.model, self.classifier if guided else None
        if self.model is not None:
            from fastsample.export.runtime import graphs_for

            self.graphs = graphs_for(self.model, self.classifier, self.runtime, diffusion,
                                     cache_depth=split_depth(self.model, cache_interval,
                                                             cache_depth))  # fmt: skip
        return self.graphs, None

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike,
        classifier: str | os.PathLike | None = None,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        guidance_scale: float | None = None,
        diffusion: Diffusion | None = None,
        runtime: Runtime = "eager",
        engine: Engine | None = None,
        compile: bool = False,
        kernels: Kernels | None = None,
        backend=_UNSET,
    ) -> Pipeline:
        """From checkpoint files or preset names. Diffusion settings come from the preset (by the
        file name or its metadata), else the file's saved settings, else the defaults."""
        runtime = renamed("runtime", runtime, "backend", backend, "eager")
        net = _load_network(model, device, dtype, "model")
        clf = _load_network(classifier, device, dtype, "classifier") if classifier else None
        if not isinstance(net, UNet):
            raise InputError(
                f"model {str(model)!r} is a {type(net).__name__}, not a diffusion UNet"
            )
        if clf is not None and not isinstance(clf, Classifier):
            raise InputError(
                f"classifier {str(classifier)!r} is a {type(clf).__name__}, not a Classifier"
            )
        if diffusion is None:
            preset = PRESETS.get(net.preset or "")
            if preset is not None and preset.diffusion is not None:
                diffusion = preset.diffusion
            elif os.path.isfile(str(model)):
                diffusion = read_diffusion(model)
            if diffusion is None:
                diffusion = Diffusion(
                    learn_sigma=net.config.out_channels == 2 * net.config.in_channels
                )
        return cls(
            net,
            diffusion,
            clf,
            device=device,
            guidance_scale=guidance_scale,
            runtime=runtime,
            engine=engine,
            compile=compile,
            kernels=kernels,
        )

    @property
    def backend(self) -> str:
        """The old name of `runtime` (kept for one release)."""
        return self.runtime

    @property
    def needs_labels(self) -> bool:
        return self.config.num_classes is not None or self.classifier_config is not None

    @property
    def num_classes(self) -> int | None:
        if self.config.num_classes is not None:
            return self.config.num_classes
        return self.classifier_config.out_channels if self.classifier_config else None

    def generate(
        self,
        num_samples: int,
        batch_size: int = 16,
        classes: int | Sequence[int] | None = None,
        guidance_scale: float | None = None,
        sampler: solvers.SamplerName | None = None,
        steps: str | int | None = None,
        eta: float = 0.0,
        seed: int = 0,
        progress: bool | Any = True,
        low_res: np.ndarray | torch.Tensor | None = None,
        clip_denoised: bool = True,
        first_index: int = 0,
        schedule: TimeSchedule | None = None,
        guidance_interval: tuple[float, float] | None = None,
        guidance_every: int | None = None,
        stable_guidance: bool | None = None,
        cache_interval: int | None = None,
        cache_depth: int | None = None,
        recipe: str | os.PathLike | Recipe | None = None,
    ) -> Generation:
        """Generate num_samples images; sample i uses seed (seed, first_index + i), whatever the
        batch size, so a run split into shards (first_index = shard start) gives the same images.

        classes: None draws a label per sample from its seed; an int gives every sample that
        class; a sequence is used in order (and repeated). steps: a respacing spec ("250",
        "ddim25", ...; default: the preset's). schedule (default: the diffusion's, "respace"):
        "respace" samples at the timesteps the spec keeps (the reference); "time" uniformly in
        t, "logsnr" in log-SNR, "karras" at Karras et al.'s rho = 7 noise levels, at fractional
        timesteps, taking a step count as steps (default: the preset's number of steps).
        sampler: without steps, the preset's; else "ddim" for "ddimN" specs and "ddpm"
        otherwise. low_res (upsamplers): N low-resolution images, uint8 NHWC or float
        [N, C, h, w]. progress: True for a bar of this call, or a bar of the caller's (anything
        with update(n)) to advance by one per image and step; its postfix shows the network
        calls per image (`calls`).

        Guidance budget (`fastsample.guidance`): guidance_interval (lo, hi) computes the
        classifier gradient only at steps whose original timestep t lies in [lo, hi] (0 <= lo
        <= hi <= T - 1; noise level sigma = sqrt(1 - alpha_bar(t))); guidance_every k computes
        it at every k-th guided step and reuses it in between. stable_guidance (the default
        here, unlike `sample`'s reference behaviour) skips guidance where alpha_bar < ~1e-6
        (the cosine schedule's last timesteps), because the eps-form guidance of every sampler
        but ddpm multiplies the gradient there by over 1000 and turns samples into noise; a
        one-line warning names the skipped steps. cache_interval n, cache_depth d: DeepCache
        feature caching (`fastsample.featcache`; 1: none, exactly the uncached results; on
        exported graphs, through the split graphs of an export made for a caching recipe, or
        of the cache export of eager networks; not on TensorRT).

        recipe: every sampling knob at once (`fastsample.recipes`): "fast", "balanced",
        "reference" (the preset's own setting), a `fastsample tune` file or a Recipe; the
        knobs given here (not None) win over its fields. A recipe that names a precision
        needs networks in it (from_pretrained(dtype=...)). Without a recipe and without any
        sampling knob, the preset's default recipe runs (the demo's: "fast", in the
        pipeline's precision; every released checkpoint's: "reference").
        """
        req = resolve(
            self, num_samples, batch_size, classes, seed, low_res, first_index, recipe,
            guidance_scale=guidance_scale, sampler=sampler, steps=steps, schedule=schedule,
            guidance_interval=guidance_interval, guidance_every=guidance_every,
            stable_guidance=stable_guidance, cache_interval=cache_interval,
            cache_depth=cache_depth,
        )  # fmt: skip
        labels, low, diffusion = req.labels, req.low_res, req.diffusion
        cfg = self.config
        net, clf = self._networks(diffusion, req.guided, req.cache_interval, req.cache_depth)
        images = []
        bar = None
        own_bar = progress is True
        if own_bar:
            from tqdm.auto import tqdm

            bar = tqdm(total=num_samples * diffusion.num_steps, desc="sampling", unit="step")
        elif progress is not False and progress is not None:
            bar = progress
        if hasattr(bar, "set_postfix"):
            bar.set_postfix({f"{k}_calls": v for k, v in req.calls.items()}, refresh=False)

        def tick(k: int, x: torch.Tensor, x0: torch.Tensor) -> None:
            bar.update(x.shape[0])  # one step of every image in the batch

        run = self._fast_sample if self._use_fast() else sample
        try:
            for start in range(0, num_samples, batch_size):
                idx = range(start, min(start + batch_size, num_samples))
                watch = _FiniteWatch(tick if bar is not None else None)
                kwargs = dict(
                    y=None if labels is None else torch.from_numpy(labels[start : idx.stop]),
                    low_res=None if low is None else low[start : idx.stop],
                    sampler=req.sampler,
                    eta=eta,
                    classifier=clf,
                    guidance_scale=req.scale,
                    clip_denoised=clip_denoised,
                    seed=[sample_seed(seed, first_index + i) for i in idx],
                    **req.budget,
                )
                shape = (len(idx), cfg.in_channels, cfg.image_size, cfg.image_size)
                x = run(net, diffusion, shape, callback=watch, runtime=self.runtime, **kwargs)
                step = watch.first_bad(x)
                if step is not None:
                    where = f"samples {first_index + start}..{first_index + idx.stop - 1}"
                    x = self._retry_in_fp32(diffusion, shape, kwargs, where, step)
                images.append(to_uint8(x).cpu().numpy())
        finally:
            if own_bar:
                bar.close()
        return Generation(np.concatenate(images), labels)

    def check(
        self,
        num_samples: int,
        batch_size: int = 16,
        classes: int | Sequence[int] | None = None,
        guidance_scale: float | None = None,
        sampler: solvers.SamplerName | None = None,
        steps: str | int | None = None,
        seed: int = 0,
        low_res: np.ndarray | torch.Tensor | None = None,
        schedule: TimeSchedule | None = None,
        guidance_interval: tuple[float, float] | None = None,
        guidance_every: int | None = None,
        stable_guidance: bool | None = None,
        cache_interval: int | None = None,
        cache_depth: int | None = None,
        recipe: str | os.PathLike | Recipe | None = None,
    ) -> Request:
        """Raise ValueError where generate() with these arguments would, without sampling;
        else return the resolved request (its `calls`: the network calls per image)."""
        return resolve(
            self, num_samples, batch_size, classes, seed, low_res, 0, recipe,
            guidance_scale=guidance_scale, sampler=sampler, steps=steps, schedule=schedule,
            guidance_interval=guidance_interval, guidance_every=guidance_every,
            stable_guidance=stable_guidance, cache_interval=cache_interval,
            cache_depth=cache_depth,
        )  # fmt: skip

    def _request(self, num_samples, batch_size, classes, guidance_scale, sampler, steps, seed,
                 low_res, first_index, schedule=None):  # fmt: skip
        """(diffusion, sampler, scale, labels, low_res): the tuple this used to return, for
        the callers that unpack it (tests/test_time_schedules.py); `check` returns all of it."""
        r = resolve(self, num_samples, batch_size, classes, seed, low_res, first_index,
                    "reference" if steps is None and sampler is None else None,
                    guidance_scale=guidance_scale, sampler=sampler, steps=steps,
                    schedule=schedule)  # fmt: skip
        return r.diffusion, r.sampler, r.scale, r.labels, r.low_res

    def _retry_in_fp32(self, diffusion, shape, kwargs, where: str, step: int) -> torch.Tensor:
        """A batch went NaN/inf (fp16 overflow): sample it again in float32 arithmetic (on the
        weights as they were rounded to the low precision: no float32 copy is kept), or say
        so."""
        n = diffusion.num_steps
        dtype = self.model.dtype if self.model is not None else None
        if dtype is None or dtype == torch.float32 or self.runtime != "eager":
            precision = str(dtype or "the exported graphs' precision").replace("torch.", "")
            raise NonFiniteError(
                f"{where}: sampling produced NaN/inf at step {step} of {n} in {precision}; "
                "no image was written for them"
                + ("" if dtype == torch.float32 else " (export in bf16 or fp32 instead)")
            )
        name = str(dtype).replace("torch.", "")
        warnings.warn(
            f"{where}: NaN/inf at step {step} of {n} in {name} (overflow); sampling this batch "
            "again in float32 (use --dtype bf16 or fp32 to avoid it)",
            stacklevel=3,
        )
        self._engine = None  # its captured graphs hold the low-precision weights
        nets = [(net, net.dtype) for net in (self.model, self.classifier) if net is not None]
        for net, _ in nets:
            net.set_precision(torch.float32)
        try:
            watch = _FiniteWatch(None)
            x = sample(self.model, diffusion, shape, callback=watch, **kwargs)
        finally:
            for net, net_dtype in nets:
                net.set_precision(net_dtype)
        again = watch.first_bad(x)
        if again is not None:
            raise NonFiniteError(
                f"{where}: sampling produced NaN/inf at step {again} of {n} even in float32; "
                "no image was written for them"
            )
        return x
