"""The presets: the 15 released checkpoints, and the embedded demo, as data.

A preset is a network config (constructor names, see config.py), the diffusion settings and the
README's guidance for one checkpoint file stem. The README's model flags are resolved here to
constructor arguments once; tests check every released preset against the checkpoint manifests.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

from .config import (
    NUM_CLASSES,
    ClassifierConfig,
    NetworkConfig,
    SuperResConfig,
    UNetConfig,
    default_channel_mult,
    super_res_channel_mult,
)
from .errors import InputError
from .schedule import Diffusion


@dataclass(frozen=True)
class Preset:
    """One released checkpoint: its network, its diffusion settings and its README guidance."""

    name: str
    network: NetworkConfig
    diffusion: Diffusion | None = None  # None for classifiers
    classifier: str | None = None  # README classifier preset for guided sampling
    classifier_scale: float | None = None
    low_res_size: int | None = None  # upsamplers: side of the low-resolution input
    weights: str | None = None  # file shipped in fastsample/demo/weights (demo presets only)
    sampler: Literal["ddpm", "ddim", "dpm++2m"] = "ddpm"  # README: use_ddim False everywhere
    # What generate() runs without sampling options (`fastsample.recipes`): "reference" (the
    # sampler, respacing and scale above) or a shipped recipe's name.
    recipe: str = "reference"

    @property
    def kind(self) -> Literal["unet", "superres", "classifier"]:
        if isinstance(self.network, SuperResConfig):
            return "superres"
        if isinstance(self.network, ClassifierConfig):
            return "classifier"
        return "unet"


def _adm(size, channels, blocks, classes, fp16, heads_ch=64, heads=4, dropout=0.0, new=False):
    return UNetConfig(
        image_size=size,
        in_channels=3,
        model_channels=channels,
        out_channels=6,
        num_res_blocks=blocks,
        attention_resolutions=tuple(size // p for p in (32, 16, 8)),
        dropout=dropout,
        channel_mult=default_channel_mult(size),
        num_classes=NUM_CLASSES if classes else None,
        use_fp16=fp16,
        num_heads=heads,
        num_head_channels=heads_ch,
        use_scale_shift_norm=True,
        resblock_updown=True,
        use_new_attention_order=new,
    )


def _classifier(size, depth=2):
    return ClassifierConfig(
        image_size=size,
        in_channels=3,
        model_channels=128,
        out_channels=NUM_CLASSES,
        num_res_blocks=depth,
        attention_resolutions=tuple(size // p for p in (32, 16, 8)),
        channel_mult=default_channel_mult(size),
        num_head_channels=64,
        use_scale_shift_norm=True,
        resblock_updown=True,
        pool="attention",
    )


def _upsampler(large, pixels, heads_ch):
    return SuperResConfig(
        image_size=large,
        in_channels=3,
        model_channels=192,
        out_channels=6,
        num_res_blocks=2,
        attention_resolutions=tuple(large // p for p in pixels),
        channel_mult=super_res_channel_mult(large),
        num_classes=NUM_CLASSES,
        use_fp16=True,
        num_heads=4,
        num_head_channels=heads_ch,
        use_scale_shift_norm=True,
        resblock_updown=True,
    )


_D250 = Diffusion(noise_schedule="linear", timestep_respacing="250")
_D1000 = Diffusion(noise_schedule="linear", timestep_respacing="1000")
_LSUN = _adm(256, 256, 2, classes=False, fp16=True, dropout=0.1)

_PRESETS = [
    Preset(
        "64x64_diffusion",
        _adm(64, 192, 3, classes=True, fp16=True, dropout=0.1, new=True),
        Diffusion(noise_schedule="cosine", timestep_respacing="250"),
        classifier="64x64_classifier",
        classifier_scale=1.0,
    ),
    Preset(
        "128x128_diffusion",
        _adm(128, 256, 2, classes=True, fp16=True, heads_ch=-1),
        _D250,
        classifier="128x128_classifier",
        classifier_scale=0.5,
    ),
    Preset(
        "256x256_diffusion",
        _adm(256, 256, 2, classes=True, fp16=True),
        _D250,
        classifier="256x256_classifier",
        classifier_scale=1.0,
    ),
    Preset(
        "256x256_diffusion_uncond",
        _adm(256, 256, 2, classes=False, fp16=True),
        _D250,
        classifier="256x256_classifier",
        classifier_scale=10.0,
    ),
    Preset(
        "512x512_diffusion",
        _adm(512, 256, 2, classes=True, fp16=False),
        _D250,
        classifier="512x512_classifier",
        classifier_scale=4.0,
    ),
    Preset("64_256_upsampler", _upsampler(256, (32, 16, 8), -1), _D250, low_res_size=64),
    Preset("128_512_upsampler", _upsampler(512, (32, 16), 64), _D250, low_res_size=128),
    Preset("lsun_bedroom", _LSUN, _D1000),
    Preset("lsun_cat", _LSUN, _D1000),
    Preset("lsun_horse", _LSUN, _D1000),
    Preset("lsun_horse_nodropout", dataclasses.replace(_LSUN, dropout=0.0), _D1000),
    Preset("64x64_classifier", _classifier(64, depth=4)),
    Preset("128x128_classifier", _classifier(128)),
    Preset("256x256_classifier", _classifier(256)),
    Preset("512x512_classifier", _classifier(512)),
]

# The embedded demo (trained by `python -m fastsample.demo.train` on MNIST, 32x32 grey): the
# released architecture at small width.
DEMO_UNET, DEMO_CLASSIFIER = "demo-mnist", "demo-mnist-classifier"
_PRESETS += [
    Preset(
        DEMO_UNET,
        UNetConfig(
            image_size=32,
            in_channels=1,
            model_channels=32,
            out_channels=2,
            num_res_blocks=1,
            attention_resolutions=(4,),
            dropout=0.1,
            channel_mult=(1, 2, 2),
            num_classes=10,
            num_head_channels=32,
            use_scale_shift_norm=True,
            resblock_updown=True,
        ),
        # Ancestral 25 steps: measured best on the demo (docs/guidance.md); guided DDIM from
        # t = 999 on a cosine schedule is unstable, as in the reference.
        Diffusion(noise_schedule="cosine", timestep_respacing="25"),
        classifier=DEMO_CLASSIFIER,
        classifier_scale=2.0,
        weights=f"{DEMO_UNET}.safetensors",
        sampler="ddpm",
        # Without options the demo runs its `fast` recipe (fastsample/recipes.json: measured by
        # `fastsample tune`; docs/frontier.md): 0.25x the reference setting's time per image.
        recipe="fast",
    ),
    Preset(
        DEMO_CLASSIFIER,
        ClassifierConfig(
            image_size=32,
            in_channels=1,
            model_channels=32,
            out_channels=10,
            num_res_blocks=1,
            attention_resolutions=(4,),
            channel_mult=(1, 2, 2),
            num_head_channels=32,
            use_scale_shift_norm=True,
            resblock_updown=True,
            pool="attention",
        ),
        weights=f"{DEMO_CLASSIFIER}.safetensors",
    ),
]

PRESETS: Mapping[str, Preset] = MappingProxyType({p.name: p for p in _PRESETS})
RELEASED: tuple[str, ...] = tuple(p.name for p in _PRESETS if p.weights is None)


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise InputError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[name]
