"""Triton kernels of fastsample (installed as fastsample.kernels): the lowest layer.

Each op lives in its own file; `reference.py` holds the plain-torch references (ADM's arithmetic,
also the torch kernels of `fastsample.ops`). Nothing here imports the rest of fastsample:
`fastsample.ops` (GroupNorm, attention) and `fastsample.engine` (the fused sampler update, fed
coefficient tables by name) call in, and the kernels import alone.
"""
