"""fastsample: fast, exact sampling for OpenAI's ADM (guided-diffusion) checkpoints."""

from .checkpoint import CheckpointError, create_model, load_model, save_checkpoint
from .config import PRESETS as presets
from .config import ClassifierConfig, Preset, SuperResConfig, UNetConfig
from .pipeline import Generation, NonFiniteError, Pipeline, sample, sample_seed, to_uint8
from .schedule import Diffusion
from .unet import Classifier, SuperResUNet, UNet

__all__ = [
    "CheckpointError",
    "Classifier",
    "ClassifierConfig",
    "Diffusion",
    "Generation",
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
