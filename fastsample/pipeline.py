"""Generation: `sample` for one batch, `Pipeline` for many images with per-sample seeds.

Randomness is an argument: explicit noise, per-sample seeds (a sample depends only on its seed,
never on its batch), or, with neither, torch's global generator drawn in the reference's order
(x_T with one randn, then one randn per step, also at the last step and for eta = 0).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import sampler as samplers
from .checkpoint import atomic_write, create_model, load_model, read_diffusion
from .config import PRESETS, SuperResConfig
from .errors import InputError, InputTypeError, NonFiniteError, OutputExistsError
from .guidance import classifier_guide
from .schedule import Diffusion
from .unet import Classifier, SuperResUNet, UNet


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] in [-1, 1] -> [B, H, W, C] uint8, truncating as the reference does."""
    return ((x + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def sample_seed(seed: int, index: int, stream: int = 0) -> int:
    """The generator seed of sample `index` of a run seeded with `seed` (stream 1: its label)."""
    if seed < 0 or index < 0:
        raise InputError(f"seed={seed}, index={index}: expected non-negative integers")
    return int(np.random.SeedSequence([seed, index, stream]).generate_state(1, np.uint64)[0])


def _noise_source(noise, seed, shape, steps: int, device) -> samplers.NoiseFn:
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


def sample(
    model: UNet,
    diffusion: Diffusion,
    shape: Sequence[int],
    *,
    y: torch.Tensor | None = None,
    low_res: torch.Tensor | None = None,
    sampler: samplers.SamplerName = "ddpm",
    eta: float = 0.0,
    classifier: Classifier | None = None,
    guidance_scale: float = 0.0,
    clip_denoised: bool = True,
    noise: torch.Tensor | None = None,
    seed: int | Sequence[int] | None = None,
    progress: bool = False,
    return_trajectory: bool = False,
    callback: samplers.StepCallback | None = None,
    backend: str = "eager",
) -> torch.Tensor | dict[str, torch.Tensor]:
    """Draw one batch of samples [B, C, H, W] (on the [-1, 1] scale, not clipped: see to_uint8).

    noise: [steps + 1, B, C, H, W]: x_T, then the fresh noise of each step, in the reference's
    order. seed: an int (sample b gets sample_seed(seed, b)) or one generator seed per sample.
    classifier + guidance_scale: classifier guidance with labels y (for an unconditional model,
    y goes to the classifier only).
    backend: "eager" runs the torch modules; "onnxruntime", "tensorrt" and "aoti" run exported
    graphs of the UNet and of the guidance gradient. model may then be an ExportedGraphs
    (`fastsample.export.load(dir)`), whose own gradient graph guides; eager networks are
    exported once into the cache (FASTSAMPLE_CACHE, default ~/.cache/fastsample).
    """
    shape = tuple(int(s) for s in shape)
    if backend != "eager":
        return _sample_exported(
            model,
            diffusion,
            shape,
            backend,
            y=y,
            low_res=low_res,
            sampler=sampler,
            eta=eta,
            classifier=classifier,
            guidance_scale=guidance_scale,
            clip_denoised=clip_denoised,
            noise=noise,
            seed=seed,
            progress=progress,
            return_trajectory=return_trajectory,
            callback=callback,
        )
    if not isinstance(model, UNet):
        raise InputTypeError(
            f"model: expected a UNet or SuperResUNet for the eager backend, got "
            f"{type(model).__name__}"
        )
    device = next(model.parameters()).device
    y, y_model, low_res = _check_inputs(
        model.config,
        classifier.config if classifier is not None else None,
        shape,
        y,
        low_res,
        sampler,
        guidance_scale,
        device,
    )
    if isinstance(model, SuperResUNet):

        def net(x, t):
            return model(x, t, low_res=low_res, y=y_model)
    else:

        def net(x, t):
            return model(x, t, y_model)

    guided = classifier is not None and guidance_scale != 0
    guide = classifier_guide(classifier, y, guidance_scale) if guided else None
    draw = _noise_source(noise, seed, shape, diffusion.num_steps, device)
    # Sampling always runs the networks in eval mode (dropout off); their mode is restored.
    modes = [(m, m.training) for m in (model, classifier) if m is not None]
    try:
        for m, _ in modes:
            m.eval()
        return _run(
            sampler,
            net,
            guide,
            diffusion,
            draw,
            eta,
            clip_denoised,
            progress,
            return_trajectory,
            callback,
        )
    finally:
        for m, training in modes:
            m.train(training)


def check_classifier_fits(clf_cfg, channels: int, height: int, width: int) -> None:
    """The guidance classifier must read the images the model makes."""
    size = clf_cfg.image_size
    if (clf_cfg.in_channels, size, size) != (channels, height, width):
        raise InputError(
            f"the classifier reads {clf_cfg.in_channels}-channel {size}x{size} images but the "
            f"model makes {channels}-channel {height}x{width} ones: use the classifier trained "
            "at the model's resolution"
        )


def _check_inputs(cfg, clf_cfg, shape, y, low_res, sampler, guidance_scale, device):
    """Validate a sampling request -> (labels, labels for the model, low_res on device)."""
    if sampler not in samplers.SAMPLERS:
        raise InputError(f"sampler {sampler!r}: expected one of {', '.join(samplers.SAMPLERS)}")
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


def _run(
    sampler, net, guide, diffusion, draw, eta, clip_denoised, progress, return_trajectory, callback
):
    trajectory: dict[str, list[torch.Tensor]] = {"samples": [], "pred_xstart": []}

    def record(k: int, x: torch.Tensor, x0: torch.Tensor) -> None:
        if return_trajectory:
            trajectory["samples"].append(x)
            trajectory["pred_xstart"].append(x0)
        if callback is not None:
            callback(k, x, x0)

    with torch.no_grad():
        final = samplers.run(
            sampler,
            net,
            diffusion,
            draw,
            eta=eta,
            guide=guide,
            clip_denoised=clip_denoised,
            progress=progress,
            callback=record,
        )
    if not return_trajectory:
        return final
    return {
        "sample": final,
        "samples": torch.stack(trajectory["samples"]),
        "pred_xstart": torch.stack(trajectory["pred_xstart"]),
    }


def _sample_exported(
    model,
    diffusion,
    shape,
    backend,
    *,
    y,
    low_res,
    sampler,
    eta,
    classifier,
    guidance_scale,
    clip_denoised,
    noise,
    seed,
    progress,
    return_trajectory,
    callback,
):
    """sample() on exported graphs (see sample's doc)."""
    from fastsample.export.runtime import BACKENDS, ExportedGraphs, graphs_for

    if backend not in BACKENDS:
        raise InputError(f"backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if isinstance(model, ExportedGraphs):
        if classifier is not None:
            raise InputError(
                "classifier: an export carries its own gradient graph; pass classifier=None"
            )
        graphs = model
        if graphs.backend != backend:
            raise InputError(f"these graphs run on {graphs.backend!r}, not {backend!r}")
    elif isinstance(model, UNet):
        graphs = graphs_for(model, classifier if guidance_scale != 0 else None, backend, diffusion)
    else:
        raise InputTypeError(
            f"model: expected a UNet or ExportedGraphs, got {type(model).__name__}"
        )
    clf_cfg = graphs.classifier_config if graphs.classifier_grad is not None else None
    y, y_model, low_res = _check_inputs(
        graphs.config, clf_cfg, shape, y, low_res, sampler, guidance_scale, graphs.device
    )
    net = graphs.net_fn(y=y_model, low_res=low_res)
    guide = graphs.guide_fn(y, guidance_scale) if guidance_scale != 0 else None
    draw = _noise_source(noise, seed, shape, diffusion.num_steps, graphs.device)
    return _run(
        sampler,
        net,
        guide,
        diffusion,
        draw,
        eta,
        clip_denoised,
        progress,
        return_trajectory,
        callback,
    )


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
        atomic_write(paths["npz"], lambda f: np.savez(f, *arrays))
        grid = image_grid(self.images)
        atomic_write(paths["grid"], lambda f: grid.save(f, format="PNG"))
        return paths


def image_grid(images: np.ndarray):
    """A near-square PIL grid of NHWC uint8 images."""
    from PIL import Image

    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, cols)
        canvas[r * h : (r + 1) * h, col * w : (col + 1) * w] = img
    return Image.fromarray(canvas[..., 0] if c == 1 else canvas)


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

    backend "eager" runs the torch modules; "onnxruntime", "tensorrt" or "aoti" run their
    exported graphs (exported once into the cache; see `sample`). `Pipeline.from_export(dir)`
    runs an export directory without the eager networks."""

    def __init__(
        self,
        model: UNet,
        diffusion: Diffusion,
        classifier: Classifier | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        guidance_scale: float | None = None,
        backend: str = "eager",
        engine: str | None = None,
        compile: bool = False,
    ):
        from fastsample.export.runtime import BACKENDS, require_backend

        if engine not in (None, "fast", "eager"):
            raise InputError(f"engine {engine!r}: expected 'fast' or 'eager'")
        if backend not in BACKENDS:
            raise InputError(f"backend {backend!r}: expected one of {', '.join(BACKENDS)}")
        require_backend(backend)
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
        if dtype is not None:
            self.model.set_precision(dtype)
        self.diffusion = diffusion
        self.backend = backend
        self.graphs = None  # ExportedGraphs, made on first use for a non-eager backend
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
        cls, directory: str | os.PathLike, backend: str | None = None, device: str | None = None
    ) -> Pipeline:
        """Run an export directory (`fastsample export`) on its backend: ONNX Runtime for an
        onnx export (or TensorRT, building engines), AOTInductor, or its TensorRT engines."""
        from fastsample.export.runtime import ExportedGraphs

        graphs = ExportedGraphs(directory, backend=backend, device=device)
        self = cls.__new__(cls)
        self.model = self.classifier = None
        self.graphs = graphs
        self.backend = graphs.backend
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
        return self.engine == "fast" and self.backend == "eager"

    def _fast_sample(self, net, diffusion, shape, *, y, low_res, sampler, eta, classifier,
                     guidance_scale, clip_denoised, seed, callback, backend):  # fmt: skip
        """sample()'s job on the fast engine (same seeds, same noise order)."""
        from .engine import FastEngine

        if self._engine is None:
            self._engine = FastEngine(self.model, self.classifier, compile=self.compile)
        device = self.device
        y, y_model, low_res = _check_inputs(
            self.config, self.classifier_config if guidance_scale else None, tuple(shape), y,
            low_res, sampler, guidance_scale, device,
        )  # fmt: skip
        draw = _noise_source(None, seed, tuple(shape), diffusion.num_steps, device)
        return self._engine.sample(
            sampler, diffusion, draw, y=y, model_y=y_model, low_res=low_res, eta=eta,
            guidance_scale=guidance_scale, clip_denoised=clip_denoised, callback=callback,
        )  # fmt: skip

    def _networks(self, diffusion: Diffusion, guided: bool):
        """What sample() is given: the eager modules, or the loaded graphs."""
        if self.backend == "eager":
            return self.model, self.classifier if guided else None
        if self.graphs is None:
            from fastsample.export.runtime import graphs_for

            self.graphs = graphs_for(self.model, self.classifier, self.backend, diffusion)
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
        backend: str = "eager",
        engine: str | None = None,
        compile: bool = False,
    ) -> Pipeline:
        """From checkpoint files or preset names. Diffusion settings come from the preset (by the
        file name or its metadata), else the file's saved settings, else the defaults."""
        net = _load_network(model, device, dtype, "model")
        clf = _load_network(classifier, device, None, "classifier") if classifier else None
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
            backend=backend,
            engine=engine,
            compile=compile,
        )

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
        sampler: samplers.SamplerName | None = None,
        steps: str | int | None = None,
        eta: float = 0.0,
        seed: int = 0,
        progress: bool | Any = True,
        low_res: np.ndarray | torch.Tensor | None = None,
        clip_denoised: bool = True,
        first_index: int = 0,
    ) -> Generation:
        """Generate num_samples images; sample i uses seed (seed, first_index + i), whatever the
        batch size, so a run split into shards (first_index = shard start) gives the same images.

        classes: None draws a label per sample from its seed; an int gives every sample that
        class; a sequence is used in order (and repeated). steps: a respacing spec ("250",
        "ddim25", ...; default: the preset's). sampler: without steps, the preset's; else "ddim"
        for "ddimN" specs and "ddpm" otherwise. low_res (upsamplers): N low-resolution images,
        uint8 NHWC or float [N, C, h, w]. progress: True for a bar of this call, or a bar of the
        caller's (anything with update(n)) to advance by one per image and step.
        """
        diffusion, sampler, scale, labels, low = self._request(
            num_samples, batch_size, classes, guidance_scale, sampler, steps, seed, low_res,
            first_index,
        )  # fmt: skip
        cfg = self.config
        net, clf = self._networks(diffusion, scale != 0)
        images = []
        bar = None
        own_bar = progress is True
        if own_bar:
            from tqdm.auto import tqdm

            bar = tqdm(total=num_samples * diffusion.num_steps, desc="sampling", unit="step")
        elif progress is not False and progress is not None:
            bar = progress

        def tick(k: int, x: torch.Tensor, x0: torch.Tensor) -> None:
            bar.update(x.shape[0])  # one step of every image in the batch

        try:
            for start in range(0, num_samples, batch_size):
                idx = range(start, min(start + batch_size, num_samples))
                watch = _FiniteWatch(tick if bar is not None else None)
                kwargs = dict(
                    y=None if labels is None else torch.from_numpy(labels[start : idx.stop]),
                    low_res=None if low is None else low[start : idx.stop],
                    sampler=sampler,
                    eta=eta,
                    classifier=clf,
                    guidance_scale=scale,
                    clip_denoised=clip_denoised,
                    seed=[sample_seed(seed, first_index + i) for i in idx],
                )
                run = self._fast_sample if self._use_fast() else sample
                shape = (len(idx), cfg.in_channels, cfg.image_size, cfg.image_size)
                x = run(net, diffusion, shape, callback=watch, backend=self.backend, **kwargs)
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
        sampler: samplers.SamplerName | None = None,
        steps: str | int | None = None,
        seed: int = 0,
        low_res: np.ndarray | torch.Tensor | None = None,
    ) -> None:
        """Raise ValueError where generate() with these arguments would, without sampling."""
        self._request(num_samples, batch_size, classes, guidance_scale, sampler, steps, seed,
                      low_res, 0)  # fmt: skip

    def _request(self, num_samples, batch_size, classes, guidance_scale, sampler, steps, seed,
                 low_res, first_index):  # fmt: skip
        """generate()'s arguments checked and resolved: (diffusion, sampler, scale, labels,
        low_res)."""
        if not isinstance(num_samples, int) or num_samples < 1:
            raise InputError(f"num_samples={num_samples!r}: expected a positive integer")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size={batch_size!r}: expected a positive integer")
        if not isinstance(seed, int) or seed < 0:
            raise InputError(f"seed={seed!r}: expected a non-negative integer")
        if not isinstance(first_index, int) or first_index < 0:
            raise InputError(f"first_index={first_index!r}: expected a non-negative integer")
        diffusion = self.diffusion if steps is None else self.diffusion.respaced(str(steps))
        if sampler is None:
            preset = PRESETS.get(self.preset or "")
            if steps is None and preset is not None:
                sampler = preset.sampler  # the preset's own (README) setting
            else:
                sampler = "ddim" if diffusion.timestep_respacing.startswith("ddim") else "ddpm"
        scale = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        if scale != 0 and self.classifier_config is None:
            raise InputError(f"guidance_scale={scale} needs a classifier")
        labels = self._labels(num_samples, classes, seed, first_index)
        low = self._low_res(low_res, num_samples)
        return diffusion, sampler, scale, labels, low

    def _retry_in_fp32(self, diffusion, shape, kwargs, where: str, step: int) -> torch.Tensor:
        """A batch went NaN/inf (fp16 overflow): sample it again in float32, or say so."""
        n = diffusion.num_steps
        dtype = self.model.dtype if self.model is not None else None
        if dtype is None or dtype == torch.float32 or self.backend != "eager":
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
        self.model.set_precision(torch.float32)
        try:
            watch = _FiniteWatch(None)
            x = sample(self.model, diffusion, shape, callback=watch, **kwargs)
        finally:
            self.model.set_precision(dtype)
        again = watch.first_bad(x)
        if again is not None:
            raise NonFiniteError(
                f"{where}: sampling produced NaN/inf at step {again} of {n} even in float32; "
                "no image was written for them"
            )
        return x

    def _labels(self, n: int, classes, seed: int, first: int) -> np.ndarray | None:
        if not self.needs_labels:
            if classes is not None:
                raise InputError(
                    "classes were given, but the model is unconditional and has no classifier"
                )
            return None
        k = self.num_classes
        if classes is None:
            return np.array(
                [
                    np.random.default_rng(sample_seed(seed, first + i, stream=1)).integers(k)
                    for i in range(n)
                ],
                dtype=np.int64,
            )
        wanted = [classes] if isinstance(classes, (int, np.integer)) else list(classes)
        if not wanted:
            raise InputError("classes is empty")
        bad = [c for c in wanted if not isinstance(c, (int, np.integer)) or not 0 <= c < k]
        if bad:
            raise InputError(f"class labels {bad} out of range: expected integers in 0..{k - 1}")
        return np.array([wanted[(first + i) % len(wanted)] for i in range(n)], dtype=np.int64)

    def _low_res(self, low_res: Any, n: int) -> torch.Tensor | None:
        if not isinstance(self.config, SuperResConfig):
            if low_res is not None:
                raise InputError("low_res is for upsamplers; this model is not one")
            return None
        if low_res is None:
            raise InputError("an upsampler needs low_res images (e.g. a base model's samples.npz)")
        if isinstance(low_res, np.ndarray) and low_res.dtype == np.uint8:
            # The reference's super_res_sample: NHWC uint8 -> NCHW float in [-1, 1].
            low_res = torch.from_numpy(low_res).float() / 127.5 - 1
            low_res = low_res.permute(0, 3, 1, 2)
        low_res = torch.as_tensor(low_res, dtype=torch.float32)
        if low_res.ndim != 4 or len(low_res) < n:
            raise InputError(
                f"low_res of shape {tuple(low_res.shape)}: expected at least {n} images"
            )
        return low_res[:n]
