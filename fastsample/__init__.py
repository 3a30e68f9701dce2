"""fastsample: fast, exact sampling for OpenAI's ADM (guided-diffusion) checkpoints.

The names below load on first use, so `import fastsample.kernels.attention` (or any other
leaf) does not pull in the networks, checkpoints and pipeline.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .errors import FastsampleError

# public name -> (module, attribute)
_EXPORTS = {
    "CheckpointError": ("errors", "CheckpointError"),
    "InputError": ("errors", "InputError"),
    "NonFiniteError": ("errors", "NonFiniteError"),
    "Classifier": ("unet", "Classifier"),
    "SuperResUNet": ("unet", "SuperResUNet"),
    "UNet": ("unet", "UNet"),
    "ClassifierConfig": ("config", "ClassifierConfig"),
    "SuperResConfig": ("config", "SuperResConfig"),
    "UNetConfig": ("config", "UNetConfig"),
    "Preset": ("catalog", "Preset"),
    "presets": ("catalog", "PRESETS"),
    "create_model": ("checkpoint", "create_model"),
    "load_model": ("checkpoint", "load_model"),
    "save_checkpoint": ("checkpoint", "save_checkpoint"),
    "Diffusion": ("schedule", "Diffusion"),
    "Generation": ("pipeline", "Generation"),
    "Pipeline": ("pipeline", "Pipeline"),
    "sample": ("sampling", "sample"),
    "sample_seed": ("sampling", "sample_seed"),
    "to_uint8": ("image_io", "to_uint8"),
}

__all__ = [
    "CheckpointError",
    "Classifier",
    "ClassifierConfig",
    "Diffusion",
    "FastsampleError",
    "Generation",
    "InputError",
    "NonFiniteError",
    "Pipeline",
    "Preset",
    "SuperResConfig",
    "SuperResUNet",
    "UNet",
    "UNetConfig",
    "create_model",
    "load_model",
    "presets",
    "sample",
    "sample_seed",
    "save_checkpoint",
    "to_uint8",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    try:
        module, attr = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'fastsample' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f".{module}", __name__), attr)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:  # for type checkers and editors
    from .catalog import PRESETS as presets
    from .checkpoint import create_model, load_model, save_checkpoint
    from .config import ClassifierConfig, Preset, SuperResConfig, UNetConfig
    from .errors import CheckpointError, InputError, NonFiniteError
    from .image_io import to_uint8
    from .pipeline import Generation, Pipeline
    from .sampling import sample, sample_seed
    from .schedule import Diffusion
    from .unet import Classifier, SuperResUNet, UNet
