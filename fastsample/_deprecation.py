"""Renamed keywords that keep working for one release, with a DeprecationWarning."""

from __future__ import annotations

import warnings

from .errors import InputError

_UNSET = object()


def renamed(new_name: str, new, old_name: str, old, default, stacklevel: int = 3):
    """The value of a keyword renamed from old_name to new_name: the new one, else the old one
    (warning), else the default; both with different values is an error."""
    if old is _UNSET or old is None:
        return default if new is _UNSET or new is None else new
    warnings.warn(
        f"{old_name}= is renamed {new_name}= (the old name goes in the next release)",
        DeprecationWarning,
        stacklevel=stacklevel,
    )
    if new is not _UNSET and new is not None and new != old:
        raise InputError(f"{old_name}={old!r} and {new_name}={new!r}: give {new_name}= only")
    return old
