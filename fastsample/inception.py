"""The FID Inception-v3: the 2015-12-05 TensorFlow graph the reference evaluator (and FID, sFID,
Inception Score everywhere) measures with, as a plain PyTorch module.

It loads the published PyTorch ports of that graph's weights (pytorch-fid's
`pt_inception-2015-12-05-6726825d.pth`, torch-fidelity's `weights-inception-2015-12-05-
6726825d.pth`: the same keys) and reproduces what the graph computes from uint8 images:

- TF1's bilinear resize to 299x299 (align_corners=False without half-pixel centres: source
  coordinate = destination * in / out, the last row and column repeated), then (x - 128) / 128;
- the stem and the eleven mixed blocks; the 35x35, 17x17 and first 8x8 blocks average-pool without
  counting padding, the last 8x8 block max-pools (as the TF graph does, unlike torchvision's
  ImageNet Inception);
- outputs: "pool" = pool_3 (2048, FID's features); "spatial" = the first 7 channels of
  `mixed_6/conv` (the 1x1 branch of Mixed_6d, 17x17x7 = 2023 values flattened height, width,
  channel as TensorFlow lays them out: sFID's features); "logits" = pool_3 times the final
  layer's weight without its bias (the reference's Inception Score logits, 1008 classes).

Batch norms are folded into their convolutions after loading (float32 rounding only).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError, InputError, MissingFileError

WEIGHTS_NAMES = (  # pytorch-fid's file, torch-fidelity's file (the same weights)
    "pt_inception-2015-12-05-6726825d.pth",
    "weights-inception-2015-12-05-6726825d.pth",
)
WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)
SIZE = 299
SPATIAL_CHANNELS = 7


class _Conv(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3), ReLU: the keys `conv.*`, `bn.*`."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def fold(self) -> None:
        """Fold the batch norm's inference affine map into the convolution."""
        scale = self.bn.weight / torch.sqrt(self.bn.running_var + self.bn.eps)
        folded = nn.Conv2d(
            self.conv.in_channels, self.conv.out_channels, self.conv.kernel_size,
            stride=self.conv.stride, padding=self.conv.padding, bias=True,
        )  # fmt: skip
        with torch.no_grad():
            folded.weight.copy_(self.conv.weight * scale[:, None, None, None])
            folded.bias.copy_(self.bn.bias - self.bn.running_mean * scale)
        self.conv, self.bn = folded, nn.Identity()

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class _Block35(nn.Module):  # Mixed_5b, 5c, 5d (TF: mixed, mixed_1, mixed_2)
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = _Conv(cin, 64, 1)
        self.branch5x5_1 = _Conv(cin, 48, 1)
        self.branch5x5_2 = _Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2 = _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, padding=1)
        self.branch_pool = _Conv(cin, pool_features, 1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg3(x))], 1)


class _Reduce35(nn.Module):  # Mixed_6a (TF: mixed_3): 35x35 -> 17x17
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = _Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2 = _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class _Block17(nn.Module):  # Mixed_6b..6e (TF: mixed_4..mixed_7), factorised 7x7 convolutions
    def __init__(self, cin: int, c7: int):
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.branch1x1 = _Conv(cin, 192, 1)
        self.branch7x7_1 = _Conv(cin, c7, 1)
        self.branch7x7_2 = _Conv(c7, c7, **row)
        self.branch7x7_3 = _Conv(c7, 192, **col)
        self.branch7x7dbl_1 = _Conv(cin, c7, 1)
        self.branch7x7dbl_2 = _Conv(c7, c7, **col)
        self.branch7x7dbl_3 = _Conv(c7, c7, **row)
        self.branch7x7dbl_4 = _Conv(c7, c7, **col)
        self.branch7x7dbl_5 = _Conv(c7, 192, **row)
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x):
        """(block output, the 1x1 branch's output: TF's `mixed_N/conv`)."""
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4):
            d = conv(d)
        d = self.branch7x7dbl_5(d)
        return torch.cat([b1, b7, d, self.branch_pool(_avg3(x))], 1), b1


class _Reduce17(nn.Module):  # Mixed_7a (TF: mixed_8): 17x17 -> 8x8
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = _Conv(cin, 192, 1)
        self.branch3x3_2 = _Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _Conv(cin, 192, 1)
        self.branch7x7x3_2 = _Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _Conv(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = conv(b7)
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class _Block8(nn.Module):  # Mixed_7b (average pool), Mixed_7c (max pool); TF: mixed_9, mixed_10
    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
        self.max_pool = max_pool
        self.branch1x1 = _Conv(cin, 320, 1)
        self.branch3x3_1 = _Conv(cin, 384, 1)
        self.branch3x3_2a = _Conv(384, 384, **row)
        self.branch3x3_2b = _Conv(384, 384, **col)
        self.branch3x3dbl_1 = _Conv(cin, 448, 1)
        self.branch3x3dbl_2 = _Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _Conv(384, 384, **row)
        self.branch3x3dbl_3b = _Conv(384, 384, **col)
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x):
        s = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(s), self.branch3x3_2b(s)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


def tf1_resize_bilinear(x: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """TensorFlow 1's ResizeBilinear (align_corners=False, no half-pixel centres) of NCHW float:
    output pixel i reads source coordinate i * in / out, interpolating towards the next row or
    column, the last one repeated."""

    def axis(n_in: int):
        src = torch.arange(size, dtype=torch.float32, device=x.device) * (n_in / size)
        lo = src.floor().long().clamp_max(n_in - 1)
        return lo, (lo + 1).clamp_max(n_in - 1), src - lo.float()

    (y0, y1, fy), (x0, x1, fx) = axis(x.shape[2]), axis(x.shape[3])
    top, bottom = x[:, :, y0], x[:, :, y1]
    top = top[..., x0] + (top[..., x1] - top[..., x0]) * fx
    bottom = bottom[..., x0] + (bottom[..., x1] - bottom[..., x0]) * fx
    return top + (bottom - top) * fy[:, None]


class FIDInception(nn.Module):
    """uint8-valued NCHW RGB (any size) -> {"pool" [N, 2048], "spatial" [N, 2023],
    "logits" [N, 1008]}; `mixed_6_conv` keeps all 192 channels of that layer when asked."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = _Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = _Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = _Conv(80, 192, 3)
        self.Mixed_5b = _Block35(192, 32)
        self.Mixed_5c = _Block35(256, 64)
        self.Mixed_5d = _Block35(288, 64)
        self.Mixed_6a = _Reduce35(288)
        self.Mixed_6b = _Block17(768, 128)
        self.Mixed_6c = _Block17(768, 160)
        self.Mixed_6d = _Block17(768, 160)
        self.Mixed_6e = _Block17(768, 192)
        self.Mixed_7a = _Reduce17(768)
        self.Mixed_7b = _Block8(1280, max_pool=False)
        self.Mixed_7c = _Block8(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def fold(self) -> FIDInception:
        for m in self.modules():
            if isinstance(m, _Conv) and isinstance(m.bn, nn.BatchNorm2d):
                m.fold()
        return self.eval()

    def forward(self, images: torch.Tensor, all_spatial: bool = False) -> dict[str, torch.Tensor]:
        x = (tf1_resize_bilinear(images.float()) - 128) / 128
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, stride=2)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))
        x, _ = self.Mixed_6b(x)
        x, _ = self.Mixed_6c(x)
        x, mixed_6_conv = self.Mixed_6d(x)
        x, _ = self.Mixed_6e(x)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        pool = x.mean(dim=(2, 3))
        spatial = mixed_6_conv if all_spatial else mixed_6_conv[:, :SPATIAL_CHANNELS]
        return {
            "pool": pool,
            "spatial": spatial if all_spatial else spatial.permute(0, 2, 3, 1).flatten(1),
            "logits": pool @ self.fc.weight.T,
        }


def cache_dirs() -> list[Path]:
    """Where pytorch-fid and torch-fidelity keep the weights: torch.hub's checkpoints folder
    ($TORCH_HOME/hub/checkpoints, default ~/.cache/torch/hub/checkpoints)."""
    return [Path(torch.hub.get_dir()) / "checkpoints"]


def find_weights() -> Path | None:
    for folder in cache_dirs():
        for name in WEIGHTS_NAMES:
            if (folder / name).is_file():
                return folder / name
    return None


def fetch_weights(url: str | None = None, timeout: float = 30.0) -> Path:
    """Download the weights into the cache (whole file or nothing); one line on failure."""
    import urllib.request

    url = url or WEIGHTS_URL
    target = cache_dirs()[0] / WEIGHTS_NAMES[0]
    partial = target.with_name(target.name + f".{os.getpid()}.part")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)
        os.replace(partial, target)
    except (OSError, ValueError) as e:
        partial.unlink(missing_ok=True)
        raise MissingFileError(
            f"the FID Inception weights are not here and could not be downloaded ({e}): fetch "
            f"{WEIGHTS_NAMES[0]} ({url}) into {target.parent}/ or pass --inception-weights FILE"
        ) from None
    return target


def load_inception(weights: str | os.PathLike | None = None, download: bool = True) -> tuple[
    FIDInception, str]:  # fmt: skip
    """(the folded network in eval mode, the weights file's sha256). weights None: the cache
    (downloading the published file there if absent and `download`)."""
    path = Path(weights) if weights is not None else find_weights()
    if path is None:
        if not download:
            raise MissingFileError(
                f"the FID Inception weights are not here: fetch {WEIGHTS_NAMES[0]} "
                f"({WEIGHTS_URL}) into {cache_dirs()[0]}/ or pass --inception-weights FILE"
            )
        path = fetch_weights()
    if not path.is_file():
        raise MissingFileError(f"{path}: no such file (the FID Inception weights)")
    from .checkpoint import _read_torch, _untrusted
    from .image_io import file_sha256

    digest = file_sha256(path)
    with _untrusted(path):  # weights_only=True; code-carrying pickles refused in one line
        state, _ = _read_torch(path)
    net = FIDInception()
    expected = net.state_dict()
    if set(state) != set(expected):
        got = set(state)
        missing, extra = sorted(set(expected) - got), sorted(got - set(expected))
        raise CheckpointError(
            f"{path}: not the FID Inception-v3 weights ({len(missing)} keys missing, e.g. "
            f"{missing[:2]}; {len(extra)} unexpected, e.g. {extra[:2]})"
        )
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise CheckpointError(
                f"{path}: {key} is {tuple(value.shape)}, expected {tuple(expected[key].shape)}"
            )
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return net.fold(), digest


@contextlib.contextmanager
def _exact_fp32():
    """Plain fp32 arithmetic on CUDA too (no TF32 in convolutions or matmuls)."""
    conv, mm = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, mm


class InceptionExtractor:
    """uint8 NHWC RGB images -> {"pool", "spatial", "logits"} as float32 numpy, in batches;
    `name` and `weights_sha256` record where the features came from."""

    name = "inception"

    def __init__(self, weights=None, device=None, batch_size: int | None = None,
                 download: bool = True):  # fmt: skip
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        net, self.weights_sha256 = load_inception(weights, download=download)
        self.net = net.to(self.device)
        if self.device.type == "cpu":
            self.net = self.net.to(memory_format=torch.channels_last)
        self.batch_size = batch_size or (200 if self.device.type == "cuda" else 32)

    def batches(self, images: np.ndarray) -> Iterator[dict[str, np.ndarray]]:
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise InputError(
                f"the Inception extractor takes uint8 NHWC RGB images, got {images.dtype} "
                f"{tuple(images.shape)}"
            )
        for i in range(0, len(images), self.batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[i : i + self.batch_size]))
            x = x.to(self.device).permute(0, 3, 1, 2)
            if self.device.type == "cpu":
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.no_grad(), _exact_fp32():
                out = self.net(x)
            yield {k: v.float().cpu().numpy() for k, v in out.items()}

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        parts = list(self.batches(images))
        if not parts:
            return {"pool": np.zeros((0, 2048), np.float32),
                    "spatial": np.zeros((0, 17 * 17 * SPATIAL_CHANNELS), np.float32),
                    "logits": np.zeros((0, 1008), np.float32)}  # fmt: skip
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
