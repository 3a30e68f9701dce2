"""k-diffusion's samplers, loaded without the package's __init__ (tests only).

k_diffusion/__init__.py imports its training stack (kornia, clean-fid, CLIP, wandb, ...), and
k_diffusion/utils.py imports torchvision at the top for image helpers the samplers never call;
torchvision's PyPI wheel is a CUDA build that does not load beside the CPU torch. So the package
is entered as a bare namespace and torchvision stubbed while `k_diffusion.sampling` (and the
utils it reads: append_dims, append_zero, to_d) is imported; the stubs are removed after.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import pytest

STUBS = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")


def load_sampling():
    if "k_diffusion.sampling" in sys.modules:
        return sys.modules["k_diffusion.sampling"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("k-diffusion is not installed: pip install --no-deps k-diffusion (.ci/run)")
    package = types.ModuleType("k_diffusion")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["k_diffusion"] = package
    saved = {name: sys.modules.get(name) for name in STUBS}
    for name in STUBS:
        sys.modules[name] = types.ModuleType(name)
    try:
        return importlib.import_module("k_diffusion.sampling")
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
