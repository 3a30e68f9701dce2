"""The demo's judge: a plain digit classifier trained on clean images only, independent of the
guidance classifier. It scores samples (accuracy on the requested class) and is the default
feature extractor of `fastsample eval` for demo-sized images: pooled features (FID, precision,
recall), spatial features (sFID) and logits (Inception Score), in the roles the Inception network
plays in the reference evaluator. Numbers from different extractors are not comparable."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from .demo import WEIGHTS_DIR
from .errors import InputError


class Judge(nn.Module):
    """Five 3x3 convolutions with ReLU and two 2x2 max-pools on [N, 1, 32, 32] in [-1, 1]."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        self.block1 = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.block2 = nn.Sequential(
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.block3 = nn.Sequential(nn.Conv2d(64, 128, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(128, num_classes)

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"pool": [N, 128], "spatial": [N, 7 * 8 * 8], "logits": [N, classes]}."""
        h = self.block2(self.block1(x))  # [N, 64, 8, 8]
        spatial = h[:, :7].flatten(1)  # the first 7 channels, as the reference's sFID
        pool = self.block3(h).mean(dim=(2, 3))
        return {"pool": pool, "spatial": spatial, "logits": self.fc(pool)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)["logits"]


def load_judge() -> Judge:
    from safetensors.torch import load_file

    judge = Judge()
    judge.load_state_dict(load_file(str(WEIGHTS_DIR / "judge.safetensors")))
    return judge.eval().requires_grad_(False)


def images_to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC (1 or 3 channels) -> float [N, 1, H, W] in [-1, 1] (3 channels are averaged)."""
    if images.dtype != np.uint8 or images.ndim != 4:
        raise InputError(f"images: expected uint8 [N, H, W, C], got {images.dtype} {images.shape}")
    x = torch.from_numpy(images).float().permute(0, 3, 1, 2) / 127.5 - 1
    return x.mean(dim=1, keepdim=True) if x.shape[1] == 3 else x
