"""Triton kernels of fastsample (installed as fastsample.kernels).

Each op lives in its own file with its plain-torch reference; `fastsample.ops` is the only module
of the package that imports from here.
"""
