"""fastsample: fast, exact sampling for OpenAI's ADM (guided-diffusion) checkpoints."""

from .checkpoint import CheckpointError, create_model, load_model, save_checkpoint
from .config import (
    PRESETS as presets,
)
from .config import (
    ClassifierConfig,
    DiffusionConfig,
    Preset,
    SuperResConfig,
    UNetConfig,
)
from .unet import Classifier, SuperResUNet, UNet

__all__ = [
    "CheckpointError",
    "Classifier",
    "ClassifierConfig",
    "DiffusionConfig",
    "Preset",
    "SuperResConfig",
    "SuperResUNet",
    "UNet",
    "UNetConfig",
    "create_model",
    "load_model",
    "presets",
    "save_checkpoint",
]
__version__ = "0.1.0"
