"""fastsample's errors: one base, `FastsampleError`, that the CLI reports in one line.

Each error also subclasses the builtin it replaces, so `except ValueError` (or TypeError,
RuntimeError, FileExistsError) around fastsample calls keeps working.
"""

from __future__ import annotations


class FastsampleError(Exception):
    """Base of every error fastsample raises on purpose; the message says what to do."""


class InputError(FastsampleError, ValueError):
    """An argument, option or input file with a value outside what is accepted."""


class InputTypeError(FastsampleError, TypeError):
    """An argument of the wrong kind (a Classifier where a UNet is expected, ...)."""


class CheckpointError(FastsampleError, ValueError):
    """A checkpoint that cannot be read, or that does not fit the network it is loaded into."""


class NonFiniteError(FastsampleError, RuntimeError):
    """Sampling produced NaN or inf; the message names the samples and the step."""


class OutputExistsError(FastsampleError, FileExistsError):
    """An output file exists and overwriting was not asked for."""


class MissingFileError(FastsampleError, FileNotFoundError):
    """An input file that does not exist."""


class ExportError(FastsampleError, ValueError):
    """An export that cannot be made or a directory that is not a valid export."""


class IntegrityError(ExportError):
    """A file of an export is missing or differs from its manifest's sha256."""


class BackendUnavailable(FastsampleError, RuntimeError):
    """A runtime or export target whose package or device is missing here."""


class RuntimeFailure(FastsampleError, RuntimeError):
    """An inference runtime (TensorRT, ONNX Runtime) that failed to build or run a graph."""


class RunError(FastsampleError):
    """A run that cannot go on as asked; the message says why and what to do."""


__all__ = [
    "BackendUnavailable",
    "CheckpointError",
    "ExportError",
    "FastsampleError",
    "InputError",
    "InputTypeError",
    "IntegrityError",
    "MissingFileError",
    "NonFiniteError",
    "OutputExistsError",
    "RunError",
    "RuntimeFailure",
]
