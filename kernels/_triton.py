"""Triton, where it is installed. Without it the kernel modules still import (their plain-torch
references work); launching a kernel then raises a clear error."""

from __future__ import annotations

try:
    import triton
    import triton.language as tl

    AVAILABLE = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    AVAILABLE = False

    class _Missing:
        def __getattr__(self, name):
            raise RuntimeError("the triton backend needs Triton: pip install 'fastsample[triton]'")

    class _Jit:
        """Stands in for triton.jit: the decorated kernel raises when launched."""

        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            raise RuntimeError("the triton backend needs Triton: pip install 'fastsample[triton]'")

    class _TritonStub(_Missing):
        jit = staticmethod(lambda fn=None, **kw: _Jit(fn) if fn else _Jit)

        @staticmethod
        def next_power_of_2(n: int) -> int:
            return 1 << (int(n) - 1).bit_length()

        @staticmethod
        def cdiv(a: int, b: int) -> int:
            return -(-a // b)

    class _LanguageStub:
        constexpr = object  # annotations only

    triton = _TritonStub()
    tl = _LanguageStub()

__all__ = ["AVAILABLE", "tl", "triton"]
