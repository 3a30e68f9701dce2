"""Recipes: every sampling knob of a run in one named setting.

A recipe fixes the sampler, its steps and time schedule, the guidance scale and budget (interval,
every), feature caching and, optionally, the networks' precision. Three names exist per preset:

- `reference`: the preset's own setting (the reference README's sampler, respacing and scale;
  for the demo, 25 ancestral steps guided at scale 2): what a run does without options.
- `fast` and `balanced`: shipped per preset family in `recipes.json`, each with where it comes
  from: measured by `fastsample tune` (the demo, on a CPU), or provisional (the ImageNet models:
  chosen from published results until measured with real weights on a GPU).

A file (`fastsample tune`'s output, or a plain recipe object) is a fourth kind. Options given
beside a recipe win over its fields; the rest come from the recipe.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from importlib import resources
from numbers import Integral, Real
from pathlib import Path
from typing import Any

from .errors import InputError

NAMES = ("fast", "balanced", "reference")
DTYPES = ("fp32", "fp16", "bf16")
FORMAT = "fastsample-recipe/1"

# The recipe fields that are knobs of a run (the rest describe the recipe).
KNOBS = ("sampler", "steps", "schedule", "guidance_scale", "guidance_interval", "guidance_every",
         "stable_guidance", "cache_interval", "cache_depth", "dtype")  # fmt: skip


@dataclass(frozen=True)
class Recipe:
    """One setting of every knob. guidance_scale None: the pipeline's (the preset's README
    scale); dtype None: the pipeline's precision."""

    sampler: str | None  # None (the reference recipe): the pipeline's default
    steps: str | None
    schedule: str | None = "respace"  # None (the reference recipe): the pipeline's own
    guidance_scale: float | None = None
    guidance_interval: tuple[float, float] | None = None
    guidance_every: int = 1
    stable_guidance: bool = True
    cache_interval: int = 1
    cache_depth: int | None = None
    dtype: str | None = None
    name: str = "custom"
    source: str = ""  # where it comes from: measured (how, where) or provisional (why)
    figures: dict[str, Any] = field(default_factory=dict)  # what was measured, if anything

    def knobs(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in KNOBS}

    def generate_kwargs(self) -> dict[str, Any]:
        """Pipeline.generate's arguments for this recipe (dtype is the pipeline's: not one)."""
        kw = self.knobs()
        del kw["dtype"]
        return kw

    def describe(self) -> str:
        """One line: 'ddpm, 15 steps (respace), scale 2, classifier every 2nd step, cache 2'."""
        if self.sampler is None:
            parts = ["the preset's sampler, steps and scale"]
        else:
            parts = [f"{self.sampler}, steps {self.steps} ({self.schedule})"]
        if self.guidance_scale is not None:
            parts.append(f"scale {self.guidance_scale:g}")
        if self.guidance_interval is not None:
            parts.append(f"guided for t in [{self.guidance_interval[0]:g}, "
                         f"{self.guidance_interval[1]:g}]")  # fmt: skip
        if self.guidance_every != 1:
            parts.append(f"classifier every {self.guidance_every} steps")
        if self.cache_interval != 1:
            depth = "" if self.cache_depth is None else f" depth {self.cache_depth}"
            parts.append(f"cache interval {self.cache_interval}{depth}")
        if not self.stable_guidance:
            parts.append("reference guidance")
        if self.dtype is not None:
            parts.append(self.dtype)
        return ", ".join(parts)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        if self.guidance_interval is not None:
            out["guidance_interval"] = list(self.guidance_interval)
        return out


def _fail(where: str, name: str, value: Any, expected: str):
    raise InputError(f"{where}: {name} {value!r}: expected {expected}")


def from_json(data: Any, where: str = "recipe") -> Recipe:
    """A Recipe from its JSON object, every field checked (one InputError naming it)."""
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a JSON object with sampler and steps, got "
                         f"{type(data).__name__}")  # fmt: skip
    known = {f.name for f in fields(Recipe)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InputError(f"{where}: unknown field {unknown[0]!r}; expected some of "
                         f"{', '.join(sorted(known))}")  # fmt: skip
    for required in ("sampler", "steps"):
        if required not in data:
            raise InputError(f"{where}: no {required!r}; a recipe names at least sampler and steps")
    from .sampler import SAMPLERS
    from .schedule import TIME_SCHEDULES

    d = dict(data)
    if d["sampler"] not in SAMPLERS:
        _fail(where, "sampler", d["sampler"], f"one of {', '.join(SAMPLERS)}")
    steps = d["steps"]
    if isinstance(steps, bool) or not isinstance(steps, (str, Integral)) or str(steps) == "":
        _fail(where, "steps", steps, "a respacing such as '25' or 'ddim25', or a step count")
    d["steps"] = str(steps)
    if d.get("schedule", "respace") not in TIME_SCHEDULES:
        _fail(where, "schedule", d["schedule"], f"one of {', '.join(TIME_SCHEDULES)}")
    scale = d.get("guidance_scale")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, Real) or not math.isfinite(scale) \
                or scale < 0:  # fmt: skip
            _fail(where, "guidance_scale", scale, "a finite number >= 0, or null")
        d["guidance_scale"] = float(scale)
    interval = d.get("guidance_interval")
    if interval is not None:
        ok = isinstance(interval, (list, tuple)) and len(interval) == 2 and all(
            isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v) for v in interval
        ) and 0 <= interval[0] <= interval[1]  # fmt: skip
        if not ok:
            _fail(where, "guidance_interval", interval, "[lo, hi] timesteps, 0 <= lo <= hi")
        d["guidance_interval"] = (float(interval[0]), float(interval[1]))
    for name in ("guidance_every", "cache_interval"):
        value = d.get(name, 1)
        if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
            _fail(where, name, value, "a positive integer")
    depth = d.get("cache_depth")
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, Integral)
                              or depth < 1):  # fmt: skip
        _fail(where, "cache_depth", depth, "a positive integer or null")
    if not isinstance(d.get("stable_guidance", True), bool):
        _fail(where, "stable_guidance", d["stable_guidance"], "true or false")
    if d.get("dtype") is not None and d["dtype"] not in DTYPES:
        _fail(where, "dtype", d["dtype"], f"one of {', '.join(DTYPES)}, or null")
    for name in ("name", "source"):
        if not isinstance(d.get(name, ""), str):
            _fail(where, name, d[name], "a string")
    if not isinstance(d.get("figures", {}), dict):
        _fail(where, "figures", d["figures"], "an object")
    return Recipe(**d)


def reference(preset_name: str | None) -> Recipe:
    """What a run does without options: the pipeline's own diffusion (the preset's respacing),
    the preset's sampler and the pipeline's scale (the preset's README scale unless set).
    sampler and steps are None: the pipeline's."""
    from .catalog import PRESETS

    preset = PRESETS.get(preset_name or "")
    where = f"the {preset.name} preset's" if preset is not None else "the model's"
    return Recipe(None, None, schedule=None, name="reference",
                  source=f"{where} own setting (the reference README's)")  # fmt: skip


@functools.cache
def _shipped() -> dict[str, Any]:  # (read once: generate() resolves the demo's default each call)
    text = resources.files("fastsample").joinpath("recipes.json").read_text()
    return json.loads(text)["families"]


def family_of(preset_name: str | None) -> str | None:
    """The shipped recipe family a preset belongs to (None: none ships for it)."""
    for family, entry in _shipped().items():
        if preset_name in entry["presets"]:
            return family
    return None


def shipped(name: str, preset_name: str | None) -> Recipe:
    """The shipped `fast` or `balanced` recipe of a preset's family."""
    family = family_of(preset_name)
    if family is None:
        families = ", ".join(sorted(_shipped()))
        raise InputError(
            f"recipe {name!r}: none ships for model {preset_name or '(no preset)'} (families: "
            f"{families}); measure one with `fastsample tune` and pass the file"
        )
    entry = _shipped()[family]
    recipe = from_json(entry[name], f"shipped recipe {family}/{name}")
    return replace(recipe, name=name)


def load(spec: str | Path | Recipe, preset_name: str | None) -> Recipe:
    """fast | balanced | reference | a JSON file (a recipe, or `fastsample tune`'s output)."""
    if isinstance(spec, Recipe):
        return spec
    if spec == "reference":
        return reference(preset_name)
    if spec in ("fast", "balanced"):
        return shipped(str(spec), preset_name)
    path = Path(spec)
    if not path.is_file():
        raise InputError(f"recipe {str(spec)!r}: expected fast, balanced, reference or a JSON "
                         "file (no such file)")  # fmt: skip
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"recipe {str(spec)!r}: not a readable JSON file ({e})") from None
    if isinstance(data, dict) and data.get("format") == FORMAT:
        if data.get("recipe") is None:
            raise InputError(f"recipe {str(spec)!r}: this tune found no recipe that meets its "
                             "target (see its points)")  # fmt: skip
        data = data["recipe"]
    return from_json(data, f"recipe {str(spec)!r}")


def merge(recipe: Recipe, **given: Any) -> dict[str, Any]:
    """The recipe's knobs, with every option given (not None) in place of its field."""
    knobs = recipe.knobs()
    for key, value in given.items():
        if key not in knobs:
            raise KeyError(key)
        if value is not None:
            knobs[key] = value
    return knobs


def supported(dtype: str | None, device) -> bool:
    """Whether a recipe's precision runs natively on a device: fp16 and bf16 on CUDA, bf16 on
    a CPU with oneDNN's bf16 instructions (elsewhere it would be emulated, slowly)."""
    import torch

    if dtype in (None, "fp32"):
        return True
    if torch.device(device).type == "cuda":
        return True
    return (dtype == "bf16" and torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())  # fmt: skip


def default_for(preset_name: str | None) -> str:
    """The recipe a preset runs without sampling options ("reference" for all but the demo)."""
    from .catalog import PRESETS

    preset = PRESETS.get(preset_name or "")
    return preset.recipe if preset is not None else "reference"
