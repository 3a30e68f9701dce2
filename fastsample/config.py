"""Network configs and the README flag parser (the presets of the released files: catalog.py).

Two vocabularies name the same things, and this module is the one place that converts between them:
- config dataclasses use the reference *constructor* names (`model_channels`,
  `attention_resolutions` as downsample rates such as (8, 16, 32), `num_classes`, ...);
- the README's *script* flags (`--num_channels 256 --attention_resolutions 32,16,8`) give
  attention resolutions in pixels and take the sampling scripts' defaults for what is left out.
"""

from __future__ import annotations

import dataclasses
import importlib
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

from .errors import InputError, InputTypeError
from .schedule import Diffusion

NUM_CLASSES = 1000
PoolType = Literal["adaptive", "attention", "spatial", "spatial_v2"]
POOL_TYPES: tuple[str, ...] = get_args(PoolType)


def _as_tuple(values: Iterable[Any] | int | float) -> tuple:
    return (values,) if isinstance(values, (int, float)) else tuple(values)


@dataclass(frozen=True)
class UNetConfig:
    """Arguments of the reference `UNetModel` constructor, in its order and with its defaults.

    `attention_resolutions` holds downsample rates (ds = image_size // pixels), stored sorted and
    without repeats: the network only asks whether a rate is in the set.
    """

    image_size: int
    in_channels: int
    model_channels: int
    out_channels: int
    num_res_blocks: int
    attention_resolutions: tuple[int, ...]
    dropout: float = 0.0
    channel_mult: tuple[float, ...] = (1, 2, 4, 8)
    conv_resample: bool = True
    dims: int = 2
    num_classes: int | None = None
    use_checkpoint: bool = False
    use_fp16: bool = False
    num_heads: int = 1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_new_attention_order: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "attention_resolutions", tuple(sorted(set(_as_tuple(self.attention_resolutions))))
        )
        object.__setattr__(self, "channel_mult", _as_tuple(self.channel_mult))
        _check_common(self)
        if self.num_classes is not None and not 1 <= self.num_classes <= 10**6:
            raise InputError(f"num_classes={self.num_classes}: expected None or 1..1000000")

    # Derived values: properties, so that they cannot disagree with the fields.
    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    @property
    def level_channels(self) -> tuple[int, ...]:
        return tuple(int(m * self.model_channels) for m in self.channel_mult)

    @property
    def heads_upsample(self) -> int:
        return self.num_heads if self.num_heads_upsample == -1 else self.num_heads_upsample

    def heads(self, channels: int, upsample: bool = False) -> int:
        """Attention heads of a block with `channels` channels (output blocks: `upsample=True`)."""
        if self.num_head_channels == -1:
            return self.heads_upsample if upsample else self.num_heads
        return channels // self.num_head_channels

    @property
    def qkv_order(self) -> Literal["legacy", "new"]:
        return "new" if self.use_new_attention_order else "legacy"

    def attention_layers(self) -> list[dict]:
        """Every attention block: module path, channels, heads, head_dim, QKV order."""
        return _attention_layers(self, with_outputs=True)


@dataclass(frozen=True)
class SuperResConfig(UNetConfig):
    """Arguments of the reference `SuperResModel`: a UNet whose input is [x, upsampled low_res].

    `in_channels` counts the image channels, as in the reference; the first conv sees twice that.
    """


@dataclass(frozen=True)
class ClassifierConfig:
    """Arguments of the reference `EncoderUNetModel` (the noisy-image classifier)."""

    image_size: int
    in_channels: int
    model_channels: int
    out_channels: int
    num_res_blocks: int
    attention_resolutions: tuple[int, ...]
    dropout: float = 0.0
    channel_mult: tuple[float, ...] = (1, 2, 4, 8)
    conv_resample: bool = True
    dims: int = 2
    use_checkpoint: bool = False
    use_fp16: bool = False
    num_heads: int = 1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    pool: PoolType = "adaptive"

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "attention_resolutions", tuple(sorted(set(_as_tuple(self.attention_resolutions))))
        )
        object.__setattr__(self, "channel_mult", _as_tuple(self.channel_mult))
        _check_common(self)
        if self.pool not in POOL_TYPES:
            raise InputError(f"pool={self.pool!r}: expected one of {', '.join(POOL_TYPES)}")
        if self.pool == "attention" and self.num_head_channels == -1:
            raise InputError("pool='attention' needs num_head_channels (got -1)")

    time_embed_dim = UNetConfig.time_embed_dim
    level_channels = UNetConfig.level_channels
    qkv_order = UNetConfig.qkv_order

    def heads(self, channels: int, upsample: bool = False) -> int:
        return (
            channels // self.num_head_channels if self.num_head_channels != -1 else self.num_heads
        )

    @property
    def final_ds(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    def attention_layers(self) -> list[dict]:
        layers = _attention_layers(self, with_outputs=False)
        if self.pool == "attention":
            ch = self.level_channels[-1]
            layers.append(_layer("out.2", ch, ch // self.num_head_channels, "new"))
        return layers


NetworkConfig = UNetConfig | SuperResConfig | ClassifierConfig


# Far above every released network (512 px, 256 channels, 7 levels), far below what would take
# hours or terabytes to build: a config read from an untrusted file is refused, not built.
_LIMITS = {"image_size": 8192, "in_channels": 1024, "model_channels": 8192,
           "out_channels": 1024, "num_res_blocks": 64}  # fmt: skip


def _check_common(cfg: UNetConfig | ClassifierConfig) -> None:
    for name, limit in _LIMITS.items():
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
            raise InputError(f"{name}={value!r}: expected an integer in 1..{limit}")
    if cfg.dims not in (1, 2, 3):
        raise InputError(f"dims={cfg.dims!r}: expected 1, 2 or 3")
    mult = cfg.channel_mult
    if not 1 <= len(mult) <= 16 or any(not 0 < m <= 64 for m in mult):
        raise InputError(f"channel_mult={mult!r}: expected 1..16 multipliers in (0, 64]")
    if any(not isinstance(r, int) or r < 1 for r in cfg.attention_resolutions):
        raise InputError(
            f"attention_resolutions={cfg.attention_resolutions!r}: expected positive integer "
            "downsample rates (image_size // pixels)"
        )
    widths = sorted({cfg.model_channels, *cfg.level_channels})
    if any(w % 32 for w in widths):
        raise InputError(f"model_channels={cfg.model_channels}, channel_mult={mult}: widths "
                         f"{widths} must be multiples of 32 (GroupNorm32)")  # fmt: skip
    if cfg.num_head_channels == -1 and cfg.num_heads < 1:
        raise InputError(f"num_heads={cfg.num_heads!r}: expected >= 1 when num_head_channels=-1")
    if cfg.num_head_channels != -1:
        if cfg.num_head_channels < 1:
            raise InputError(f"num_head_channels={cfg.num_head_channels}: expected -1 or >= 1")
        # Only levels that hold attention blocks (and the middle block, at the last level).
        last = len(cfg.channel_mult) - 1
        for level, ch in enumerate(cfg.level_channels):
            if 2**level not in cfg.attention_resolutions and level != last:
                continue
            if ch % cfg.num_head_channels:
                raise InputError(
                    f"num_head_channels={cfg.num_head_channels} does not divide the level "
                    f"width {ch} (channel_mult={cfg.channel_mult}, "
                    f"model_channels={cfg.model_channels})"
                )


def _layer(module: str, channels: int, heads: int, order: str) -> dict:
    head_dim = channels // heads
    return dict(module=module, channels=channels, heads=heads, head_dim=head_dim, order=order)


def _attention_layers(cfg: UNetConfig | ClassifierConfig, with_outputs: bool) -> list[dict]:
    """Walk the reference block layout and list the attention blocks (§2.3 of the reference)."""
    layers, ds, block = [], 1, 1
    n_levels, r = len(cfg.channel_mult), cfg.num_res_blocks
    for level, ch in enumerate(cfg.level_channels):
        for _ in range(r):
            if ds in cfg.attention_resolutions:
                layers.append(_layer(f"input_blocks.{block}.1", ch, cfg.heads(ch), cfg.qkv_order))
            block += 1
        if level != n_levels - 1:
            ds *= 2
            block += 1
    ch = cfg.level_channels[-1]
    layers.append(_layer("middle_block.1", ch, cfg.heads(ch), cfg.qkv_order))
    if with_outputs:
        block = 0
        for level in reversed(range(n_levels)):
            ch = cfg.level_channels[level]
            for i in range(r + 1):
                if ds in cfg.attention_resolutions:
                    heads = cfg.heads(ch, upsample=True)
                    layers.append(_layer(f"output_blocks.{block}.1", ch, heads, cfg.qkv_order))
                if level and i == r:
                    ds //= 2
                block += 1
    return layers


# --------------------------------------------------------------------------------------------
# Script flags: the sampling scripts' argparse defaults, and the conversions of their create_*
# functions from flags to constructor arguments.

MODEL_FLAG_DEFAULTS: dict[str, Any] = dict(
    image_size=64, num_channels=128, num_res_blocks=2, num_heads=4, num_heads_upsample=-1,
    num_head_channels=-1, attention_resolutions="16,8", channel_mult="", dropout=0.0,
    class_cond=False, use_checkpoint=False, use_scale_shift_norm=True, resblock_updown=False,
    use_fp16=False, use_new_attention_order=False,
)  # fmt: skip
DIFFUSION_FLAG_DEFAULTS: dict[str, Any] = dict(
    learn_sigma=False, diffusion_steps=1000, noise_schedule="linear", timestep_respacing="",
    use_kl=False, predict_xstart=False, rescale_timesteps=False, rescale_learned_sigmas=False,
)  # fmt: skip
CLASSIFIER_FLAG_DEFAULTS: dict[str, Any] = dict(
    image_size=64, classifier_use_fp16=False, classifier_width=128, classifier_depth=2,
    classifier_attention_resolutions="32,16,8", classifier_use_scale_shift_norm=True,
    classifier_resblock_updown=True, classifier_pool="attention",
)  # fmt: skip
SAMPLE_FLAG_DEFAULTS: dict[str, Any] = dict(
    clip_denoised=True, num_samples=10000, batch_size=16, use_ddim=False, model_path=""
)
# classifier_sample.py: model + diffusion + classifier + sampling flags (image_sample.py's are a
# subset). super_res_sample.py: the upsampler's own set, which has no image_size, channel_mult or
# use_new_attention_order.
CLASSIFIER_SAMPLE_FLAGS: dict[str, Any] = {
    **SAMPLE_FLAG_DEFAULTS,
    "classifier_path": "",
    "classifier_scale": 1.0,
    **MODEL_FLAG_DEFAULTS,
    **DIFFUSION_FLAG_DEFAULTS,
    **CLASSIFIER_FLAG_DEFAULTS,
}
SUPER_RES_SAMPLE_FLAGS: dict[str, Any] = {
    **SAMPLE_FLAG_DEFAULTS,
    "base_samples": "",
    **{
        k: v
        for k, v in MODEL_FLAG_DEFAULTS.items()
        if k not in ("image_size", "channel_mult", "use_new_attention_order")
    },
    **DIFFUSION_FLAG_DEFAULTS,
    "large_size": 256,
    "small_size": 64,
}

_TRUE = ("yes", "true", "t", "y", "1")
_FALSE = ("no", "false", "f", "n", "0")


def _convert_flag(name: str, value: Any, default: Any) -> Any:
    """Type a flag value the way the scripts' argparse does (bool via yes/true/1 ...)."""
    kind = type(default)
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise ValueError
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind is float:
            return float(value)
        return str(value)
    except ValueError:
        expected = "a boolean (true/false)" if kind is bool else f"a {kind.__name__}"
        raise InputError(f"--{name} {value!r}: expected {expected}") from None


def parse_flags(flags: str | Mapping[str, Any], known: Mapping[str, Any]) -> dict[str, Any]:
    """Parse script flags (a string such as "--image_size 256 --class_cond True", or a dict)
    against `known` (flag -> default); returns every known flag, defaults filled in."""
    if isinstance(flags, str):
        try:
            tokens = shlex.split(flags)
        except ValueError as e:  # (an unclosed quote)
            raise InputError(f"flag string {flags!r}: {e}") from None
        given: dict[str, Any] = {}
        i = 0
        while i < len(tokens):
            token = tokens[i]
            if not token.startswith("--"):
                raise InputError(f"flag string: expected '--name value', got {token!r}")
            if "=" in token:
                name, value = token[2:].split("=", 1)
                i += 1
            else:
                if i + 1 >= len(tokens):
                    raise InputError(f"flag {token} has no value")
                name, value = token[2:], tokens[i + 1]
                i += 2
            given[name] = value
    elif isinstance(flags, Mapping):
        given = {str(k).removeprefix("--"): v for k, v in flags.items()}
    else:
        raise InputTypeError(f"flags: expected a string or a dict, got {type(flags).__name__}")
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise InputError(
            f"unknown flag(s) {', '.join('--' + u for u in unknown)}; "
            f"valid flags: {', '.join('--' + k for k in sorted(known))}"
        )
    resolved = dict(known)
    for name, value in given.items():
        resolved[name] = _convert_flag(name, value, known[name])
    return resolved


def default_channel_mult(image_size: int) -> tuple[float, ...]:
    """The create_model / create_classifier channel_mult table, keyed by image size."""
    table = {
        512: (0.5, 1, 1, 2, 2, 4, 4),
        256: (1, 1, 2, 2, 4, 4),
        128: (1, 1, 2, 3, 4),
        64: (1, 2, 3, 4),
    }
    if image_size not in table:
        raise InputError(
            f"image_size={image_size} has no default channel_mult: expected one of "
            f"{sorted(table)}, or pass --channel_mult"
        )
    return table[image_size]


def super_res_channel_mult(large_size: int) -> tuple[float, ...]:
    """The upsamplers' channel_mult table, keyed by large_size (512 is NOT the base-512 table)."""
    table = {512: (1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4)}
    if large_size not in table:
        raise InputError(f"large_size={large_size}: expected one of {sorted(table)}")
    return table[large_size]


def _pixels_to_ds(resolutions: str, image_size: int, flag: str) -> tuple[int, ...]:
    try:
        pixels = [int(r) for r in resolutions.split(",")]
    except ValueError:
        raise InputError(
            f"--{flag} {resolutions!r}: expected comma-separated pixel sizes such as 32,16,8"
        ) from None
    if any(p < 1 or image_size // p < 1 for p in pixels):
        raise InputError(f"--{flag} {resolutions!r}: each size must be in 1..{image_size}")
    return tuple(image_size // p for p in pixels)


# Flags that are constructor arguments under the same name.
_SAME_NAME = ("num_res_blocks", "dropout", "use_checkpoint", "use_fp16", "num_heads",
              "num_head_channels", "num_heads_upsample", "use_scale_shift_norm",
              "resblock_updown")  # fmt: skip


def _unet_arguments(f: Mapping[str, Any], size: int, channel_mult: tuple) -> dict[str, Any]:
    """create_model's and sr_create_model's conversion of parsed flags to UNetModel arguments."""
    return {
        "image_size": size,
        "in_channels": 3,
        "model_channels": f["num_channels"],
        "out_channels": 6 if f["learn_sigma"] else 3,
        "attention_resolutions": _pixels_to_ds(
            f["attention_resolutions"], size, "attention_resolutions"
        ),
        "channel_mult": channel_mult,
        "num_classes": NUM_CLASSES if f["class_cond"] else None,
        **{name: f[name] for name in _SAME_NAME},
    }


def unet_config_from_flags(flags: str | Mapping[str, Any]) -> UNetConfig:
    """README flags of classifier_sample.py / image_sample.py -> the diffusion UNet's config."""
    f = parse_flags(flags, CLASSIFIER_SAMPLE_FLAGS)
    size = f["image_size"]
    if f["channel_mult"] == "":
        channel_mult = default_channel_mult(size)
    else:
        try:
            channel_mult = tuple(int(m) for m in f["channel_mult"].split(","))
        except ValueError:
            raise InputError(
                f"--channel_mult {f['channel_mult']!r}: expected comma-separated integers"
            ) from None
    return UNetConfig(
        **_unet_arguments(f, size, channel_mult),
        use_new_attention_order=f["use_new_attention_order"],
    )


def super_res_config_from_flags(flags: str | Mapping[str, Any]) -> SuperResConfig:
    """README flags of super_res_sample.py -> the upsampler's config."""
    f = parse_flags(flags, SUPER_RES_SAMPLE_FLAGS)
    size = f["large_size"]
    return SuperResConfig(**_unet_arguments(f, size, super_res_channel_mult(size)))


def classifier_config_from_flags(flags: str | Mapping[str, Any]) -> ClassifierConfig:
    """README flags of classifier_sample.py -> the classifier's config (classifier_* flags and
    image_size; the create_classifier constants: 3 in, 1000 out, 64-channel heads)."""
    f = parse_flags(flags, CLASSIFIER_SAMPLE_FLAGS)
    size = f["image_size"]
    return ClassifierConfig(
        image_size=size,
        in_channels=3,
        model_channels=f["classifier_width"],
        out_channels=NUM_CLASSES,
        num_res_blocks=f["classifier_depth"],
        attention_resolutions=_pixels_to_ds(
            f["classifier_attention_resolutions"], size, "classifier_attention_resolutions"
        ),
        channel_mult=default_channel_mult(size),
        use_fp16=f["classifier_use_fp16"],
        num_head_channels=64,
        use_scale_shift_norm=f["classifier_use_scale_shift_norm"],
        resblock_updown=f["classifier_resblock_updown"],
        pool=f["classifier_pool"],
    )


def diffusion_from_flags(flags: str | Mapping[str, Any], super_res: bool = False) -> Diffusion:
    """README flags -> the diffusion settings (reference create_gaussian_diffusion arguments)."""
    f = parse_flags(flags, SUPER_RES_SAMPLE_FLAGS if super_res else CLASSIFIER_SAMPLE_FLAGS)
    return Diffusion(
        steps=f["diffusion_steps"],
        noise_schedule=f["noise_schedule"],
        learn_sigma=f["learn_sigma"],
        timestep_respacing=f["timestep_respacing"],
        predict_xstart=f["predict_xstart"],
        rescale_timesteps=f["rescale_timesteps"],
    )


# --------------------------------------------------------------------------------------------
# Serialisation (checkpoint metadata): {"kind": ..., "config": {...}}.

_KINDS: dict[str, type] = {"unet": UNetConfig, "superres": SuperResConfig,
                           "classifier": ClassifierConfig}  # fmt: skip


def config_to_dict(config: NetworkConfig) -> dict[str, Any]:
    kind = next((k for k, cls in _KINDS.items() if type(config) is cls), None)
    if kind is None:
        raise InputTypeError(f"not a network config: {type(config).__name__}")
    return {"kind": kind, "config": dataclasses.asdict(config)}


def config_from_dict(data: Mapping[str, Any]) -> NetworkConfig:
    kind = data.get("kind")
    if kind not in _KINDS:
        raise InputError(f"config kind {kind!r}: expected one of {', '.join(_KINDS)}")
    return _KINDS[kind](**data["config"])


def __getattr__(name: str) -> Any:
    """The names that moved to catalog.py, still importable from here for one release."""
    if name in ("DEMO_CLASSIFIER", "DEMO_UNET", "PRESETS", "RELEASED", "Preset", "get_preset"):
        return getattr(importlib.import_module(f"{__package__}.catalog"), name)  # (it imports us)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
