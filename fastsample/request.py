"""A `Pipeline.generate` request, checked and resolved before any network runs: the respaced
diffusion and the sampler (the preset's defaults), the guidance scale, the labels (each drawn
from its sample's seed), the upsampler's low-resolution inputs, where guidance is applied (the
guidance plan: `fastsample.guidance`), the feature-cache settings, and what the request costs
per image in network calls.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from numbers import Integral
from typing import Any

import numpy as np
import torch

from . import featcache
from .catalog import PRESETS
from .config import SuperResConfig
from .errors import InputError
from .guidance import GuidancePlan, check_guidance_budget, guidance_plan
from .sampler import get_solver
from .sampling import sample_seed
from .schedule import Diffusion


@dataclass(frozen=True)
class Request:
    """What generate() runs. plan: where the classifier's gradient is applied and computed
    (for an unguided request, scale 0, it is unused)."""

    diffusion: Diffusion
    sampler: str
    scale: float
    labels: np.ndarray | None
    low_res: torch.Tensor | None
    plan: GuidancePlan
    guidance_interval: tuple[float, float] | None = None
    guidance_every: int = 1
    stable_guidance: bool = True
    cache_interval: int = 1
    cache_depth: int | None = None
    recipe: Any = None  # the recipes.Recipe applied (None: the options alone)

    @property
    def guided(self) -> bool:
        return self.scale != 0

    @property
    def budget(self) -> dict[str, Any]:
        """sample()'s guidance-plan and feature-cache arguments."""
        return {
            "guidance_interval": self.guidance_interval,
            "guidance_every": self.guidance_every,
            "stable_guidance": self.stable_guidance,
            "cache_interval": self.cache_interval,
            "cache_depth": self.cache_depth,
        }

    @property
    def skipped(self) -> tuple[float, ...]:
        """The timesteps where stable guidance leaves out a gradient the reference applies."""
        return self.plan.unstable if self.guided and self.plan.stable else ()

    @property
    def calls(self) -> dict[str, int]:
        """Network calls per image: "unet" (one per step), "classifier" (gradients; 0
        unguided) and, with feature caching, "unet_full" and "unet_shallow" of the "unet"."""
        n = self.diffusion.num_steps
        calls = {"unet": n, "classifier": self.plan.classifier_calls if self.guided else 0}
        if self.cache_interval != 1:
            full = featcache.full_calls(n, self.cache_interval)
            calls.update(unet_full=full, unet_shallow=n - full)
        return calls


def knobs(pipe, recipe, **given) -> tuple[dict[str, Any], Any]:
    """The sampling knobs of a request: a recipe's (`fastsample.recipes`; None: the preset's
    default recipe where it has one other than its reference setting, and no knob is given),
    with every knob given (not None) in its place, and the defaults for the rest; and the
    recipe applied (a Recipe, or None)."""
    from . import recipes

    implicit = False
    if recipe is None and all(v is None for v in given.values()):
        if pipe.runtime == "eager":
            recipe = recipes.default_for(pipe.preset)
            implicit = recipe != "reference"
            recipe = recipe if implicit else None
        else:
            recipe = export_recipe(pipe)  # (an export made for a recipe runs it by default)
            implicit = recipe is not None
    rec = None
    if recipe is None:
        out = dict(given)
    else:
        rec = recipes.load(recipe, pipe.preset)
        if not implicit:  # (the default runs in the pipeline's precision, whatever it is)
            _check_recipe_dtype(pipe, rec)
        out = recipes.merge(rec, **given)
        out.pop("dtype")
    defaults = {"guidance_every": 1, "stable_guidance": True, "cache_interval": 1}
    return {k: defaults[k] if v is None and k in defaults else v for k, v in out.items()}, rec


def default_sampler(preset_name: str | None, steps, diffusion) -> str:
    """The sampler where none is named: the preset's own (README) setting where the steps are
    its own too, else ddim for a "ddimN" respacing and ddpm for the rest."""
    preset = PRESETS.get(preset_name or "")
    if steps is None and preset is not None:
        return preset.sampler
    return "ddim" if diffusion.timestep_respacing.startswith("ddim") else "ddpm"


def export_recipe(pipe):
    """The recipe an export directory was made for (`fastsample export --recipe`), as its
    schedule.json records it: its sampler and guidance budget on the export's own steps and
    scale; None for an export made without one, and for networks that are not an export."""
    from .recipes import Recipe

    graphs = getattr(pipe, "graphs", None)
    schedule = getattr(graphs, "schedule", None)
    if pipe.model is not None or not isinstance(schedule, dict):
        return None
    s = schedule.get("sampling") or {}
    if not s.get("recipe"):
        return None
    interval = s["guidance_interval"]
    return Recipe(s["sampler"], None, schedule=None,
                  guidance_interval=None if interval is None else tuple(interval),
                  guidance_every=s["guidance_every"], stable_guidance=s["stable_guidance"],
                  cache_interval=s.get("cache_interval", 1), cache_depth=s.get("cache_depth"),
                  name=s["recipe"], source="recorded by the export")  # fmt: skip


def _check_recipe_dtype(pipe, rec) -> None:
    if rec.dtype is None:
        return
    if pipe.model is None:  # an export: its graphs' precision was fixed when it was made
        dtype = getattr(pipe.graphs, "manifest", {}).get("dtype", "fp32")
        if dtype != rec.dtype:
            warnings.warn(
                f"recipe {rec.name!r} runs the networks in {rec.dtype}; this export's graphs are "
                f"{dtype}, and the export's precision applies (export with --dtype {rec.dtype} "
                "for the recipe's)",
                stacklevel=2,  # (one place: shown once for check() and generate())
            )
        return
    import torch

    want = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[rec.dtype]
    have = pipe.model.dtype
    if have != want:
        raise InputError(
            f"recipe {rec.name!r} runs the networks in {rec.dtype}; this pipeline's are "
            f"{str(have).replace('torch.', '')} (load them with dtype={want})"
        )


def resolve(pipe, num_samples, batch_size, classes, seed, low_res, first_index, recipe=None,
            *, guidance_scale=None, sampler=None, steps=None, schedule=None,
            guidance_interval=None, guidance_every=None, stable_guidance=None,
            cache_interval=None, cache_depth=None) -> Request:  # fmt: skip
    """generate()'s arguments for the Pipeline `pipe`, checked (one InputError each). The
    sampling knobs (None: not given) are merged with the recipe's: see `knobs`."""
    k, rec = knobs(pipe, recipe, guidance_scale=guidance_scale, sampler=sampler, steps=steps,
              schedule=schedule, guidance_interval=guidance_interval,
              guidance_every=guidance_every, stable_guidance=stable_guidance,
              cache_interval=cache_interval, cache_depth=cache_depth)  # fmt: skip
    guidance_scale, sampler, steps, schedule = (k["guidance_scale"], k["sampler"], k["steps"],
                                                k["schedule"])  # fmt: skip
    guidance_interval, guidance_every = k["guidance_interval"], k["guidance_every"]
    stable_guidance, cache_interval, cache_depth = (k["stable_guidance"], k["cache_interval"],
                                                    k["cache_depth"])  # fmt: skip
    if not isinstance(num_samples, int) or num_samples < 1:
        raise InputError(f"num_samples={num_samples!r}: expected a positive integer")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size={batch_size!r}: expected a positive integer")
    if not isinstance(seed, int) or seed < 0:
        raise InputError(f"seed={seed!r}: expected a non-negative integer")
    if not isinstance(first_index, int) or first_index < 0:
        raise InputError(f"first_index={first_index!r}: expected a non-negative integer")
    diffusion = pipe.diffusion.respaced(steps, time_schedule=schedule)  # (None: as is)
    if sampler is None:
        sampler = default_sampler(pipe.preset, steps, diffusion)
    scale = pipe.guidance_scale if guidance_scale is None else float(guidance_scale)
    if scale != 0 and pipe.classifier_config is None:
        raise InputError(f"guidance_scale={scale} needs a classifier")
    interval, every = check_guidance_budget(guidance_interval, guidance_every)
    if interval is not None and interval[1] > diffusion.steps - 1:
        raise InputError(
            f"guidance_interval={guidance_interval!r}: expected 0 <= lo <= hi <= "
            f"{diffusion.steps - 1} (original timesteps of this {diffusion.steps}-step model)"
        )
    if not isinstance(stable_guidance, (bool, np.bool_)):
        raise InputError(f"stable_guidance={stable_guidance!r}: expected True or False")
    cache_interval, cache_depth = _check_cache(pipe, cache_interval, cache_depth)
    get_solver(sampler)
    plan = guidance_plan(sampler, diffusion, interval, every, bool(stable_guidance))
    if scale != 0 and interval is not None and not any(plan.use) and not plan.unstable:
        warnings.warn(
            f"guidance_interval={guidance_interval!r} holds none of the {diffusion.num_steps} "
            f"sampling timesteps ({_span(diffusion)}): these samples are not guided",
            stacklevel=3,
        )
    return Request(
        diffusion, sampler, scale, _labels(pipe, num_samples, classes, seed, first_index),
        _low_res(pipe, low_res, num_samples), plan, interval, every, bool(stable_guidance),
        cache_interval, cache_depth, rec,
    )  # fmt: skip


def _span(diffusion: Diffusion) -> str:
    tmap = diffusion.timestep_map
    return f"t = {float(tmap.min()):g} .. {float(tmap.max()):g}"


def _check_cache(pipe, interval, depth) -> tuple[int, int | None]:
    interval = featcache.check_interval(interval)
    if interval == 1 and depth is None:
        return 1, None
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, Integral)):
        raise InputError(f"cache_depth={depth!r}: expected a positive integer or None")
    if pipe.runtime == "tensorrt":
        raise InputError(
            f"cache_interval={interval}, cache_depth={depth!r}: feature caching runs on the "
            "eager, onnxruntime and aoti runtimes (TensorRT engines hold the whole UNet only)"
        )
    if pipe.model is None:  # an export: its caching graphs, at the depth it was made for
        pipe.graphs.cached_model_fn(interval=interval, depth=depth)
        return interval, depth
    return interval, None if depth is None else pipe.model.check_depth(depth)


def _labels(pipe, n: int, classes, seed: int, first: int) -> np.ndarray | None:
    if not pipe.needs_labels:
        if classes is not None:
            raise InputError(
                "classes were given, but the model is unconditional and has no classifier"
            )
        return None
    k = pipe.num_classes
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


def _low_res(pipe, low_res: Any, n: int) -> torch.Tensor | None:
    if not isinstance(pipe.config, SuperResConfig):
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
        raise InputError(f"low_res of shape {tuple(low_res.shape)}: expected at least {n} images")
    return low_res[:n]
