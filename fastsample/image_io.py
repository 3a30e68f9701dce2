"""Files fastsample writes: images as uint8, grids, the npz format of the reference evaluator
(deterministic bytes), atomic writes and sha256.

Everything written goes through `atomic_write`: a reader sees the old file or the complete new
one, never a partial one, and the bytes are on disk before the name points at them.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] in [-1, 1] -> [B, H, W, C] uint8, truncating as the reference does."""
    return ((x + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def image_grid(images: np.ndarray):
    """A near-square PIL grid of NHWC uint8 images."""
    from PIL import Image

    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, cols)
        canvas[r * h : (r + 1) * h, col * w : (col + 1) * w] = img
    return Image.fromarray(canvas[..., 0] if c == 1 else canvas)


def write_npz(f, arrays: Sequence[np.ndarray]) -> None:
    """np.savez's format (arr_0, arr_1, ...) with fixed zip timestamps, so that equal arrays
    give equal bytes."""
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
        for i, array in enumerate(arrays):
            info = zipfile.ZipInfo(f"arr_{i}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with z.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call write(file) on a temporary file beside `path`, then rename it into place: readers
    see the old file or the complete new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual file mode
        os.replace(tmp, path)
        _fsync_dir(path.parent)  # and the rename itself survives a crash
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # (platforms without directory handles)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
