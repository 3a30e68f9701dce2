"""ADM networks (Dhariwal & Nichol 2021, App. A): UNet, SuperResUNet and the noisy-image
Classifier, with guided-diffusion's module tree so that released state_dicts load strictly.

Precision: parameters are created in float32. The "torso" (input, middle and output blocks) runs
in `model.dtype`; `set_precision(torch.float16)` converts the torso's convolutions as the
reference's `convert_to_fp16()` does, leaving GroupNorm affine parameters, the timestep/label
embeddings, the ResBlocks' embedding Linears and the output head in float32. GroupNorm statistics
and the attention softmax always run in float32; the network output is float32.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from numbers import Integral
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .config import (
    ClassifierConfig,
    NetworkConfig,
    SuperResConfig,
    UNetConfig,
    classifier_config_from_flags,
    super_res_config_from_flags,
    unet_config_from_flags,
)
from .errors import InputError, InputTypeError
from .layers import (  # noqa: F401  (the layers are importable from here too)
    AttentionBlock,
    AttentionPool2d,
    Conv2d,
    Downsample,
    GroupNorm32,
    ResBlock,
    TimestepBlock,
    TimestepEmbedSequential,
    Upsample,
    _conv,
    _zero,
    timestep_embedding,
)

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class _Network(nn.Module):
    """Shared precision handling and construction from configs or flags."""

    config_class: type = UNetConfig
    _flag_parser = staticmethod(unet_config_from_flags)
    _torso = ("input_blocks", "middle_block", "output_blocks")

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__()
        if len(args) == 1 and not kwargs and isinstance(args[0], self.config_class):
            config = args[0]
        else:
            try:
                config = self.config_class(*args, **kwargs)
            except TypeError as e:
                fields = ", ".join(f.name for f in self.config_class.__dataclass_fields__.values())
                raise InputTypeError(
                    f"{type(self).__name__}: {e}; valid arguments: {fields}"
                ) from None
        self.config: NetworkConfig = config
        self.dtype: torch.dtype = torch.float16 if config.use_fp16 else torch.float32
        self.preset: str | None = None
        # The kernel choice of the whole network, held here once and shared by every module
        # that calls a kernel (linked when the network is built; see _share_kernels).
        self._kernels = ops.KernelChoice("torch")

    def _share_kernels(self) -> None:
        for m in self.modules():
            if isinstance(m, (GroupNorm32, AttentionBlock, AttentionPool2d, Conv2d)):
                m._kernels = self._kernels

    @property
    def kernels(self) -> str:
        """The requested kernel implementation ("auto", "torch", "triton" or "onednn")."""
        return self._kernels.requested

    def kernels_on(self, device: torch.device | str | None = None) -> str:
        """The implementation that runs on `device` (default: where the weights are)."""
        return self._kernels.on(torch.device(device) if device else next(self.parameters()).device)

    def set_kernels(self, kernels: str = "auto") -> _Network:
        """Run GroupNorm(+scale-shift+SiLU), attention and convolutions on "torch", "triton" or
        "onednn" kernels; "auto" picks per device when the network runs (triton on CUDA where
        Triton is installed, onednn on a CPU torch built with it, else torch). Returns self."""
        self._kernels.set(kernels, next(self.parameters()).device)
        return self

    def set_backend(self, backend: str = "auto") -> _Network:
        """The old name of set_kernels (kept for one release)."""
        warnings.warn("set_backend() is renamed set_kernels()", DeprecationWarning, stacklevel=2)
        return self.set_kernels(backend)

    @property
    def backend(self) -> str:
        """The old name of kernels_on(): what runs where the weights are."""
        return self.kernels_on()

    def _layout(self, h: torch.Tensor) -> torch.Tensor:
        """The torso's activation layout: channels_last on the onednn kernels."""
        if h.ndim == 4 and self._kernels.on(h.device) == "onednn":
            return h.contiguous(memory_format=torch.channels_last)
        return h

    @classmethod
    def from_flags(cls, flags: str | Mapping[str, Any]) -> _Network:
        """Build from the README's script flags (a string or a dict), defaults as the scripts."""
        return cls(cls._flag_parser(flags))

    def set_precision(self, dtype: torch.dtype) -> _Network:
        """Run the torso in `dtype` (float32, float16 or bfloat16), converting its convolutions
        the way the reference's convert_to_fp16() does. Returns self."""
        if dtype not in (torch.float32, *_LOW_PRECISION):
            raise InputError(
                f"dtype={dtype}: expected torch.float32, torch.float16 or torch.bfloat16"
            )
        for name in self._torso:
            for m in getattr(self, name, nn.Module()).modules():
                if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                    m.to(dtype)
        self.dtype = dtype
        return self

    def convert_to_fp16(self) -> _Network:
        return self.set_precision(torch.float16)

    def convert_to_fp32(self) -> _Network:
        return self.set_precision(torch.float32)

    def _check_torso_dtype(self) -> None:
        weight = self.input_blocks[0][0].weight
        if weight.dtype != self.dtype and weight.device.type != "meta":
            raise RuntimeError(
                f"{type(self).__name__} torso runs in {self.dtype} but its convolutions are "
                f"{weight.dtype}: call set_precision({self.dtype}) (or convert_to_fp16()) after "
                "loading weights, or use fastsample.load_model"
            )


def _build_encoder(net: nn.Module, cfg: UNetConfig | ClassifierConfig, in_channels: int) -> list:
    """input_blocks and middle_block of the reference layout; returns the skip channel stack."""
    emb_dim, dims = cfg.time_embed_dim, cfg.dims
    ch = cfg.level_channels[0]
    net.input_blocks = nn.ModuleList(
        [TimestepEmbedSequential(_conv(dims, in_channels, ch, 3, padding=1))]
    )
    skip_channels, ds = [ch], 1
    for level, out_ch in enumerate(cfg.level_channels):
        for _ in range(cfg.num_res_blocks):
            layers: list[nn.Module] = [
                ResBlock(
                    ch,
                    emb_dim,
                    cfg.dropout,
                    out_ch,
                    dims=dims,
                    use_scale_shift_norm=cfg.use_scale_shift_norm,
                )
            ]
            ch = out_ch
            if ds in cfg.attention_resolutions:
                layers.append(AttentionBlock(ch, cfg.heads(ch), cfg.qkv_order))
            net.input_blocks.append(TimestepEmbedSequential(*layers))
            skip_channels.append(ch)
        if level != len(cfg.channel_mult) - 1:
            if cfg.resblock_updown:
                down = ResBlock(
                    ch,
                    emb_dim,
                    cfg.dropout,
                    ch,
                    dims=dims,
                    use_scale_shift_norm=cfg.use_scale_shift_norm,
                    down=True,
                )
            else:
                down = Downsample(ch, cfg.conv_resample, dims, ch)
            net.input_blocks.append(TimestepEmbedSequential(down))
            skip_channels.append(ch)
            ds *= 2
    net.middle_block = TimestepEmbedSequential(
        ResBlock(
            ch, emb_dim, cfg.dropout, dims=dims, use_scale_shift_norm=cfg.use_scale_shift_norm
        ),
        AttentionBlock(ch, cfg.heads(ch), cfg.qkv_order),
        ResBlock(
            ch, emb_dim, cfg.dropout, dims=dims, use_scale_shift_norm=cfg.use_scale_shift_norm
        ),
    )
    return skip_channels


def _time_mlp(cfg: UNetConfig | ClassifierConfig) -> nn.Sequential:
    e = cfg.time_embed_dim
    return nn.Sequential(nn.Linear(cfg.model_channels, e), nn.SiLU(), nn.Linear(e, e))


def _as_batch(t: torch.Tensor | float | int, n: int, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(t, device=device)
    if t.ndim == 0:
        t = t.expand(n)
    if t.shape != (n,):
        raise InputError(f"timesteps of shape {tuple(t.shape)}: expected ({n},) or a scalar")
    return t


class UNet(_Network):
    """The ADM diffusion UNet (reference `UNetModel`).

    forward(x, timesteps, y=None) -> [N, out_channels, H, W] in x's dtype.
    """

    config_class = UNetConfig
    _flag_parser = staticmethod(unet_config_from_flags)
    takes_low_res = False

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        cfg = self.config
        in_channels = cfg.in_channels * (2 if isinstance(cfg, SuperResConfig) else 1)
        emb_dim, dims = cfg.time_embed_dim, cfg.dims
        self.time_embed = _time_mlp(cfg)
        if cfg.num_classes is not None:
            self.label_emb = nn.Embedding(cfg.num_classes, emb_dim)
        skips = _build_encoder(self, cfg, in_channels)
        ch, ds = cfg.level_channels[-1], 2 ** (len(cfg.channel_mult) - 1)
        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(cfg.channel_mult))):
            out_ch = cfg.level_channels[level]
            for i in range(cfg.num_res_blocks + 1):
                layers: list[nn.Module] = [
                    ResBlock(
                        ch + skips.pop(),
                        emb_dim,
                        cfg.dropout,
                        out_ch,
                        dims=dims,
                        use_scale_shift_norm=cfg.use_scale_shift_norm,
                    )
                ]
                ch = out_ch
                if ds in cfg.attention_resolutions:
                    layers.append(AttentionBlock(ch, cfg.heads(ch, upsample=True), cfg.qkv_order))
                if level and i == cfg.num_res_blocks:
                    if cfg.resblock_updown:
                        up = ResBlock(
                            ch,
                            emb_dim,
                            cfg.dropout,
                            ch,
                            dims=dims,
                            use_scale_shift_norm=cfg.use_scale_shift_norm,
                            up=True,
                        )
                    else:
                        up = Upsample(ch, cfg.conv_resample, dims, ch)
                    layers.append(up)
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(
            GroupNorm32(ch),
            nn.SiLU(),
            _zero(_conv(dims, cfg.level_channels[0], cfg.out_channels, 3, padding=1)),
        )
        self._share_kernels()

    def _embedding(self, x: torch.Tensor, timesteps, y: torch.Tensor | None) -> torch.Tensor:
        """The timestep (+ class) embedding [N, time_embed_dim], the labels and dtype checked."""
        n = x.shape[0]
        conditional = self.config.num_classes is not None
        if conditional and y is None:
            raise InputError(
                f"this model is class-conditional ({self.config.num_classes} classes): pass y"
            )
        if not conditional and y is not None:
            raise InputError("this model is unconditional: y must be None")
        self._check_torso_dtype()
        emb = self.time_embed(
            timestep_embedding(_as_batch(timesteps, n, x.device), self.config.model_channels)
        )
        if conditional:
            if y.shape != (n,):
                raise InputError(f"y of shape {tuple(y.shape)}: expected ({n},) class labels")
            emb = emb + self.label_emb(y)
        return emb

    def _head(self, h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # out = GroupNorm, SiLU, conv
        return self.out[2](self.out[0].fused(h.to(dtype), silu=True)).contiguous()

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self._full(x, timesteps, y, keep=-1)[0]

    def _full(self, x, timesteps, y, keep: int):
        """The whole network -> (output, the h entering output block `keep`, or None)."""
        emb = self._embedding(x, timesteps, y)
        skips = []
        h = self._layout(x.to(self.dtype))
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        feature = None
        for j, block in enumerate(self.output_blocks):
            if j == keep:
                feature = h
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self._head(h, x.dtype), feature

    # -- split at a skip depth (DeepCache, Ma et al. 2023; see fastsample.featcache) ----------
    # Output block j concatenates input block L - 1 - j's output, so at depth d the shallow part
    # is input_blocks[:d] and output_blocks[L - d:], joined through skips d - 1 .. 0.

    def check_depth(self, depth: int) -> int:
        """A valid skip depth for forward_split / forward_shallow: 1 <= depth < input blocks."""
        n = len(self.input_blocks)
        if isinstance(depth, bool) or not isinstance(depth, Integral) or not 1 <= depth < n:
            raise InputError(
                f"cache_depth={depth!r}: expected an integer in 1..{n - 1} "
                f"(this network has {n} input blocks)"
            )
        return int(depth)

    def forward_split(
        self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None, *,
        depth: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """(forward(x, timesteps, y), the deep feature at `depth`): the h entering output block
        L - depth, in the torso's dtype and layout, for forward_shallow at later steps."""
        return self._full(x, timesteps, y, keep=len(self.output_blocks) - self.check_depth(depth))

    def forward_shallow(
        self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None, *,
        feature: torch.Tensor, depth: int,
    ) -> torch.Tensor:  # fmt: skip
        """The output with the deep part replaced by `feature` (from forward_split at the same
        depth): input_blocks[:depth], output_blocks[L - depth:], the head. With the feature of
        the same (x, timesteps, y) it equals forward(x, timesteps, y) exactly."""
        depth = self.check_depth(depth)
        emb = self._embedding(x, timesteps, y)
        skips = []
        h = self._layout(x.to(self.dtype))
        for i in range(depth):
            h = self.input_blocks[i](h, emb)
            skips.append(h)
        first = len(self.output_blocks) - depth
        channels = self.output_blocks[first][0].in_layers[0].num_channels - h.shape[1]
        expected = (h.shape[0], channels, *h.shape[2:])
        if tuple(feature.shape) != expected:
            raise InputError(
                f"feature of shape {tuple(feature.shape)}: expected {expected} at depth {depth} "
                "(forward_split's feature for this batch and depth)"
            )
        h = feature
        for j in range(first, len(self.output_blocks)):
            h = self.output_blocks[j](torch.cat([h, skips.pop()], dim=1), emb)
        return self._head(h, x.dtype)


class SuperResUNet(UNet):
    """The ADM upsampler (reference `SuperResModel`): the UNet on [x, bilinear(low_res)]."""

    config_class = SuperResConfig
    _flag_parser = staticmethod(super_res_config_from_flags)
    takes_low_res = True  # (fastsample.netfns.call_model)

    def _with_low_res(self, x: torch.Tensor, low_res: torch.Tensor | None) -> torch.Tensor:
        if low_res is None:
            raise InputError("SuperResUNet needs low_res, the [N, 3, h, w] image to upsample")
        upsampled = F.interpolate(low_res, x.shape[2:], mode="bilinear")
        return torch.cat([x, upsampled], dim=1)

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        low_res: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return super().forward(self._with_low_res(x, low_res), timesteps, y)

    def forward_split(  # type: ignore[override]
        self, x: torch.Tensor, timesteps: torch.Tensor, low_res: torch.Tensor | None = None,
        y: torch.Tensor | None = None, *, depth: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        return super().forward_split(self._with_low_res(x, low_res), timesteps, y, depth=depth)

    def forward_shallow(  # type: ignore[override]
        self, x: torch.Tensor, timesteps: torch.Tensor, low_res: torch.Tensor | None = None,
        y: torch.Tensor | None = None, *, feature: torch.Tensor, depth: int,
    ) -> torch.Tensor:  # fmt: skip
        x = self._with_low_res(x, low_res)
        return super().forward_shallow(x, timesteps, y, feature=feature, depth=depth)


class Classifier(_Network):
    """The noisy-image classifier (reference `EncoderUNetModel`): forward(x, t) -> logits."""

    config_class = ClassifierConfig
    _flag_parser = staticmethod(classifier_config_from_flags)
    _torso = ("input_blocks", "middle_block")

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        cfg = self.config
        self.time_embed = _time_mlp(cfg)
        _build_encoder(self, cfg, cfg.in_channels)
        ch = cfg.level_channels[-1]
        if cfg.pool == "adaptive":
            self.out = nn.Sequential(
                GroupNorm32(ch),
                nn.SiLU(),
                nn.AdaptiveAvgPool2d((1, 1)),
                _zero(_conv(cfg.dims, ch, cfg.out_channels, 1)),
                nn.Flatten(),
            )
        elif cfg.pool == "attention":
            self.out = nn.Sequential(
                GroupNorm32(ch),
                nn.SiLU(),
                AttentionPool2d(
                    cfg.image_size // cfg.final_ds, ch, cfg.num_head_channels, cfg.out_channels
                ),
            )
        else:
            # Spatial pools read the mean of every input block and of the middle block.
            features = (
                cfg.level_channels[0]
                + sum(
                    cfg.level_channels[level]
                    * (cfg.num_res_blocks + (level < len(cfg.channel_mult) - 1))
                    for level in range(len(cfg.channel_mult))
                )
                + ch
            )
            if cfg.pool == "spatial":
                self.out = nn.Sequential(
                    nn.Linear(features, 2048), nn.ReLU(), nn.Linear(2048, cfg.out_channels)
                )
            else:
                self.out = nn.Sequential(
                    nn.Linear(features, 2048),
                    GroupNorm32(2048),
                    nn.SiLU(),
                    nn.Linear(2048, cfg.out_channels),
                )
        self._share_kernels()

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        self._check_torso_dtype()
        emb = self.time_embed(
            timestep_embedding(
                _as_batch(timesteps, x.shape[0], x.device), self.config.model_channels
            )
        )
        spatial = self.config.pool.startswith("spatial")
        means = []
        h = self._layout(x.to(self.dtype))
        for block in self.input_blocks:
            h = block(h, emb)
            if spatial:
                means.append(h.to(x.dtype).mean(dim=(2, 3)))
        h = self.middle_block(h, emb)
        if spatial:
            means.append(h.to(x.dtype).mean(dim=(2, 3)))
            return self.out(torch.cat(means, dim=-1))
        # adaptive / attention pools: GroupNorm, SiLU, then the pooling layers
        h = self.out[0].fused(h.to(x.dtype), silu=True)
        for layer in self.out[2:]:
            h = layer(h)
        return h


def network_class(config: NetworkConfig) -> type[_Network]:
    if isinstance(config, SuperResConfig):
        return SuperResUNet
    if isinstance(config, ClassifierConfig):
        return Classifier
    if isinstance(config, UNetConfig):
        return UNet
    raise InputTypeError(f"not a network config: {type(config).__name__}")
