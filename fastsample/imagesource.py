"""Image batches read lazily from the evaluator's files, so that evaluation memory does not grow
with the image count.

- A `.npz` in the reference evaluator's batch format: `arr_0` uint8 NHWC images (optional
  `arr_1` labels; a reference batch's `mu`, `sigma`, `mu_s`, `sigma_s`; files fastsample writes
  also name the `extractor` of those statistics and may hold the reference's `pool` features).
  An uncompressed `arr_0` (np.savez) is memory-mapped where it lies in the zip and the pages of
  each batch are released once read; a compressed one (np.savez_compressed) is decompressed
  batch by batch.
- A folder of PNG / JPEG files (sorted by name), converted to RGB, all of one size.
"""

from __future__ import annotations

import mmap
import struct
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .errors import InputError, MissingFileError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
# What a damaged zip or .npy raises while it is read (zipfile, zlib, numpy's header parser).
_DAMAGE = (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError, KeyError,
           NotImplementedError, RuntimeError, struct.error, SyntaxError)  # fmt: skip
_SMALL = ("arr_1", *STAT_KEYS, "pool", "extractor", "inception_weights_sha256")


class ImageSource:
    """uint8 NHWC images of one file or folder: `shape` (N, H, W, C), `batches(size)`, and what
    else the file holds (`labels`, `stats`, `extractor`, `pool`)."""

    path: Path
    shape: tuple[int, int, int, int]
    labels: np.ndarray | None = None
    stats: dict
    extractor: str | None = None  # the extractor the stored statistics / features came from
    weights_sha256: str | None = None
    pool: np.ndarray | None = None  # stored pool features (files fastsample writes)

    def __len__(self) -> int:
        return self.shape[0]

    def batches(self, size: int) -> Iterator[np.ndarray]:
        raise NotImplementedError

    def read_all(self) -> np.ndarray:
        if self.shape[0] == 0:
            return np.zeros(self.shape, np.uint8)
        return np.concatenate(list(self.batches(max(1, self.shape[0]))))

    def close(self) -> None:
        """Release the open file, if any (the metadata read stays usable)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_images(path) -> ImageSource:
    """The ImageSource of an .npz file, an image folder or a uint8 NHWC array; one clear line
    when it is none of these."""
    if isinstance(path, ImageSource):
        return path
    if isinstance(path, np.ndarray):
        return ArraySource(path)
    path = Path(path)
    if path.is_dir():
        return FolderSource(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: no such file or folder")
    return NpzSource(path)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _read_npy_header(f):
    """(shape, fortran_order, dtype) of the .npy stream f, leaving f at the array's first byte."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f"npy format version {version[0]}.{version[1]} is not supported")


class ArraySource(ImageSource):
    """Images already in memory (the Python API's arrays)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None = None):
        if images.dtype != np.uint8 or images.ndim != 4:
            raise InputError(f"images are {images.dtype} {images.shape}, expected uint8 NHWC")
        self.path, self.images, self.labels, self.stats = Path("<array>"), images, labels, {}
        self.shape = tuple(images.shape)

    def batches(self, size: int) -> Iterator[np.ndarray]:
        for i in range(0, len(self.images), size):
            yield self.images[i : i + size]


class NpzSource(ImageSource):
    def __init__(self, path: Path):
        self.path = path
        self._zip = None
        try:
            self._open(path)
        except BaseException:
            self.close()  # a refused file is not left open
            raise

    def _open(self, path: Path) -> None:
        try:
            self._zip = zipfile.ZipFile(path)
            names = set(self._zip.namelist())
            small = {k: self._read_member(k) for k in _SMALL if f"{k}.npy" in names}
        except _DAMAGE as e:
            raise InputError(f"{path}: not a readable .npz ({_one_line(e)})") from None
        self.labels = small.get("arr_1")
        self.stats = {k: small[k] for k in STAT_KEYS if k in small}
        self.pool = small.get("pool")
        if "extractor" in small:
            self.extractor = str(small["extractor"])
            sha = small.get("inception_weights_sha256")
            self.weights_sha256 = None if sha is None else str(sha)
        elif self.stats:
            self.extractor = "inception"  # the reference batches: the evaluator's Inception
        if "arr_0.npy" in names:
            self._info = self._zip.getinfo("arr_0.npy")
            try:
                with self._zip.open(self._info) as f:
                    shape, fortran, dtype = _read_npy_header(f)
                    self._header_len = f.tell()
            except _DAMAGE as e:
                raise InputError(f"{path}: arr_0 is not a readable .npy ({_one_line(e)})") from None
            if dtype != np.uint8 or len(shape) != 4 or fortran:
                order = ", Fortran order" if fortran else ""
                raise InputError(
                    f"{path}: arr_0 is {dtype} {tuple(shape)}{order}, expected uint8 NHWC"
                )
            self.shape = tuple(int(s) for s in shape)
        elif self.pool is not None and self.extractor is not None:
            self._info = None
            self.shape = (len(self.pool), 0, 0, 0)  # features only: no images to read
        else:
            raise InputError(f"{path}: expected arr_0 (uint8 NHWC images)")
        if self.labels is not None and len(self.labels) != self.shape[0]:
            raise InputError(
                f"{path}: arr_1 has {len(self.labels)} labels for {self.shape[0]} images"
            )

    @property
    def has_images(self) -> bool:
        return self._info is not None

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()

    def _read_member(self, key: str) -> np.ndarray:
        with self._zip.open(f"{key}.npy") as f:
            return np.lib.format.read_array(f, allow_pickle=False)

    def batches(self, size: int) -> Iterator[np.ndarray]:
        if self._info is None:
            raise InputError(f"{self.path}: holds features only, no images (arr_0)")
        n, h, w, c = self.shape
        if self._info.compress_type == zipfile.ZIP_STORED:
            yield from self._mapped(size)
            return
        image_bytes = h * w * c
        with self._zip.open(self._info) as f:
            f.read(self._header_len)
            for i in range(0, n, size):
                count = min(size, n - i)
                try:
                    data = f.read(count * image_bytes)
                except _DAMAGE as e:
                    raise InputError(
                        f"{self.path}: arr_0 cannot be read past image {i} ({_one_line(e)})"
                    ) from None
                if len(data) != count * image_bytes:
                    raise InputError(f"{self.path}: arr_0 ends after {i} of {n} images")
                yield np.frombuffer(bytearray(data), np.uint8).reshape(count, h, w, c)

    def _mapped(self, size: int) -> Iterator[np.ndarray]:
        """Batches copied out of a read-only map of the stored member; the pages read are
        released after each batch, so the map does not accumulate in the resident set."""
        n, h, w, c = self.shape
        image_bytes = h * w * c
        with open(self.path, "rb") as f:
            f.seek(self._info.header_offset)
            local = f.read(30)
            if len(local) != 30 or local[:4] != b"PK\x03\x04":
                raise InputError(f"{self.path}: arr_0's zip entry has no local header")
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            start = self._info.header_offset + 30 + name_len + extra_len + self._header_len
            end = start + n * image_bytes
            f.seek(0, 2)
            if f.tell() < end:
                raise InputError(f"{self.path}: arr_0 is cut short (the file ends early)")
            if n == 0:
                return
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            released = 0
            for i in range(0, n, size):
                count = min(size, n - i)
                lo = start + i * image_bytes
                view = np.frombuffer(mapped, np.uint8, count * image_bytes, lo)
                batch = view.reshape(count, h, w, c).copy()
                del view
                yield batch
                done = (lo + count * image_bytes) // mmap.PAGESIZE * mmap.PAGESIZE
                if hasattr(mapped, "madvise") and done > released:
                    mapped.madvise(mmap.MADV_DONTNEED, released, done - released)
                    released = done
        finally:
            mapped.close()


class FolderSource(ImageSource):
    def __init__(self, path: Path):
        self.path = path
        self.stats = {}
        self.files = sorted(
            p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        )
        if not self.files:
            raise InputError(f"{path}: no .png, .jpg or .jpeg files in this folder")
        first = self._read(self.files[0])
        self.shape = (len(self.files), *first.shape)

    def _read(self, file: Path) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(file) as image:
                array = np.asarray(image.convert("RGB"))
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise InputError(f"{file}: not a readable image ({e})") from None
        return array

    def batches(self, size: int) -> Iterator[np.ndarray]:
        n, h, w, c = self.shape
        for i in range(0, n, size):
            batch = np.empty((min(size, n - i), h, w, c), np.uint8)
            for j, file in enumerate(self.files[i : i + size]):
                image = self._read(file)
                if image.shape != (h, w, c):
                    raise InputError(
                        f"{file}: {image.shape[1]}x{image.shape[0]}, but the folder's first "
                        f"image ({self.files[0].name}) is {w}x{h}: all images must be one size"
                    )
                batch[j] = image
            yield batch
