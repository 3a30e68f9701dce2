"""Feature caching between sampling steps for ADM UNets: DeepCache (Ma et al. 2023, "DeepCache:
Accelerating Diffusion Models for Free", sec. 3.2-3.3).

Adjacent denoising steps change a UNet's deep features little. At skip depth d the network splits
into a shallow part, input_blocks[:d] + output_blocks[L - d:] + the output head (L = number of
output blocks), joined through skips d - 1 .. 0, and a deep part, everything in between. What is
cached is the deep part's output: the feature h entering output block L - d. `cached_model_fn`
runs the whole UNet at calls 0, n, 2n, ... (n = interval) and keeps that feature; at the calls in
between it runs only the shallow part, on the current x_t and t, with the last full call's
feature (the DeepCache approximation). n = 1 is the plain model function: exactly today's results.

Cost of a shallow step: the shallow part's share of a full forward's FLOPs, counted by
`shallow_flop_share` (convolutions and matmuls, torch's FlopCounterMode); a shallow step saves
the rest. Batch 1:

    depth                                 1       2       3
    ADM-64 (64x64_diffusion)           4.1%   10.5%   17.0%
    ADM-128 (128x128_diffusion)       10.3%   26.7%   43.1%
    ADM-256 (256x256_diffusion)       11.2%   29.3%   47.3%
    upsampler 64 -> 256               11.3%   29.3%   47.3%
    demo-mnist (32x32)                10.4%   30.3%   65.3%

so a run of N steps costs about full_calls(N, n) + share * (N - full_calls(N, n)) full calls.
A CachedModelFn counts the calls it made (`.full_calls`, `.shallow_calls`); the function
`full_calls(num_steps, interval)` predicts the first for a run.
"""

from __future__ import annotations

import math
from numbers import Integral

import torch

from . import netfns
from .config import UNetConfig
from .errors import InputError, InputTypeError
from .netfns import Layout

DEFAULT_DEPTH = 1  # DeepCache's shallowest skip: the cheapest shallow step


def check_interval(interval: int) -> int:
    """A valid cache interval: a positive integer (1: no caching)."""
    if isinstance(interval, bool) or not isinstance(interval, Integral) or interval < 1:
        raise InputError(
            f"cache_interval={interval!r}: expected a positive integer "
            "(1 runs the whole UNet at every step)"
        )
    return int(interval)


def full_calls(num_steps: int, interval: int) -> int:
    """How many full UNet calls a run of num_steps model calls makes (calls 0, n, 2n, ...)."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, Integral) or num_steps < 0:
        raise InputError(f"num_steps {num_steps!r}: expected a non-negative integer")
    return math.ceil(num_steps / check_interval(interval))


class CachedModelFn:
    """model(x_t, t) -> out with DeepCache feature reuse (see the module doc).

    Stateful: call k of a trajectory is full where k % interval == 0, shallow otherwise. reset()
    starts a new trajectory (the next call is full); full_calls and shallow_calls count every
    call since the function was made, across resets."""

    def __init__(self, model, y, low_res, interval: int, depth: int, layout: Layout | None,
                 split=None, shallow=None):  # fmt: skip
        self.interval, self.depth = interval, depth
        self.plain = netfns.model_fn(model, y, low_res, layout)
        self.split, self.shallow = split_fns(model, y, low_res, depth, layout, split, shallow)
        self.full_calls = self.shallow_calls = 0
        self.feature: torch.Tensor | None = None
        self._k = 0  # the call's index in the trajectory

    @classmethod
    def of_functions(cls, plain, full, part, interval: int, depth: int) -> CachedModelFn:
        """A cached model function over other implementations of the three calls: plain(x, t),
        full(x, t) -> (output, feature) and part(x, t, feature) -> output (exported graphs)."""
        self = cls.__new__(cls)
        self.interval, self.depth = check_interval(interval), depth
        self.plain, self.split, self.shallow = plain, full, part
        self.full_calls = self.shallow_calls = 0
        self.feature, self._k = None, 0
        return self

    def reset(self) -> None:
        self.feature, self._k = None, 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.interval == 1:
            self.full_calls += 1
            return self.plain(x, t)
        full = is_full(self._k, self.interval)
        self._k += 1
        if full:
            out, self.feature = self.split(x, t)
            self.full_calls += 1
            return out
        if self.feature.shape[0] != x.shape[0]:
            raise InputError(
                f"a batch of {x.shape[0]} after one of {self.feature.shape[0]}: call reset() "
                "(or make a new cached_model_fn) for each batch"
            )
        self.shallow_calls += 1
        return self.shallow(x, t, self.feature)


def is_full(k: int, interval: int) -> bool:
    """Whether model call k (0-based) of a trajectory runs the whole UNet."""
    return k % interval == 0


def split_fns(model, y, low_res, depth: int, layout: Layout | None = None, split=None,
              shallow=None):  # fmt: skip
    """The two halves of a cached model function, labels and low_res bound as in
    netfns.model_fn: full(x, t) -> (output, deep feature) and part(x, t, feature) -> output.
    split / shallow replace model.forward_split / forward_shallow (compiled versions, say)."""
    inputs = {"low_res": low_res} if model.takes_low_res else {}

    def prepare(x: torch.Tensor) -> torch.Tensor:
        return x if layout is None else layout(x)

    def full(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fn = model.forward_split if split is None else split  # looked up at each call
        return fn(prepare(x), t, y=y, **inputs, depth=depth)

    def part(x: torch.Tensor, t: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        fn = model.forward_shallow if shallow is None else shallow
        return fn(prepare(x), t, y=y, **inputs, feature=feature, depth=depth)

    return full, part


def cached_model_fn(
    model, y: torch.Tensor | None = None, low_res: torch.Tensor | None = None, *,
    interval: int, depth: int, layout: Layout | None = None, split=None, shallow=None,
) -> CachedModelFn:  # fmt: skip
    """netfns.model_fn(model, y, low_res, layout) with the deep feature at skip `depth` reused
    for interval - 1 calls after each full call. model: an eager UNet or SuperResUNet.
    interval = 1 calls the plain model function (exactly netfns.model_fn's results). split /
    shallow: replacements for model.forward_split / forward_shallow (see split_fns)."""
    _check_model(model)
    return CachedModelFn(model, y, low_res, check_interval(interval), model.check_depth(depth),
                         layout, split, shallow)  # fmt: skip


def settings(model, interval: int, depth: int | None) -> tuple[int, int] | None:
    """A run's checked (interval, depth) for `model` (depth None: DEFAULT_DEPTH); None where
    interval is 1, which does not cache (a depth given with it is still checked)."""
    interval = check_interval(interval)
    if interval == 1 and depth is None:
        return None
    _check_model(model)
    depth = model.check_depth(DEFAULT_DEPTH if depth is None else depth)
    return None if interval == 1 else (interval, depth)


def split_depth(model, interval: int, depth: int | None) -> int | None:
    """The skip depth whose split graphs a run on exported graphs needs (None: it does not
    cache); checked as `settings` checks it."""
    found = settings(model, interval, depth)
    return None if found is None else found[1]


def _check_model(model) -> None:
    from .unet import UNet

    if not isinstance(model, UNet):
        raise InputTypeError(
            f"model: feature caching needs a UNet or SuperResUNet, got {type(model).__name__}"
        )


def shallow_flop_share(config: UNetConfig, depth: int) -> float:
    """The shallow part's share of one forward's FLOPs (convolutions and matmuls, batch 1), for a
    UNet or SuperResUNet config: the cost of a shallow step relative to a full one."""
    from torch.utils.flop_counter import FlopCounterMode

    from .unet import network_class

    with torch.device("meta"):
        model = network_class(config)(config).set_precision(torch.float32)
        size, channels = config.image_size, config.in_channels
        x, t = torch.zeros(1, channels, size, size), torch.zeros(1, dtype=torch.long)
        inputs = {"low_res": torch.zeros(1, channels, size // 4, size // 4)}
        if not model.takes_low_res:
            inputs = {}
        y = torch.zeros(1, dtype=torch.long) if config.num_classes is not None else None
        with FlopCounterMode(display=False) as full:
            _, feature = model.forward_split(x, t, y=y, **inputs, depth=depth)
        with FlopCounterMode(display=False) as shallow:
            model.forward_shallow(x, t, y=y, **inputs, feature=feature, depth=depth)
    return shallow.get_total_flops() / full.get_total_flops()
