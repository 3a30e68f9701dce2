"""Building presets, and loading checkpoints safely and strictly.

Checkpoints are untrusted input: `.pt` files are read with `torch.load(weights_only=True)` (no
code runs while unpickling) and `.safetensors` files with safetensors. The network config comes
from the `preset` argument, else the file name, else the file's fastsample metadata, else it is
detected by matching the state_dict's keys and shapes against every preset.

Every error that a malformed file causes while it is read or parsed is a CheckpointError naming
the file and what it should hold (`_untrusted`): torch's and safetensors' readers raise
IndexError, KeyError, struct.error, ... on some corrupt bytes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import pickle
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from . import ops
from ._deprecation import renamed
from .catalog import PRESETS, get_preset
from .config import NetworkConfig, config_from_dict, config_to_dict
from .errors import CheckpointError, InputError, InputTypeError
from .image_io import atomic_write
from .ops import Kernels
from .schedule import Diffusion
from .unet import _Network, network_class

METADATA_KEY = "fastsample.network"
PRESET_KEY = "fastsample.preset"
DIFFUSION_KEY = "fastsample.diffusion"

StateDict = Mapping[str, torch.Tensor]

PT_EXPECTED = "a torch checkpoint (.pt zip or legacy pickle) holding a state_dict"
SAFETENSORS_EXPECTED = "a safetensors file"


def _expected(path: Path) -> str:
    return SAFETENSORS_EXPECTED if path.suffix == ".safetensors" else PT_EXPECTED


def _detail(error: Exception) -> str:
    """An error's type and message on one line of at most 200 characters: the CLI prints a
    CheckpointError as one line, and a corrupt file's bytes can end up in a message."""
    text = " ".join(str(error).split())
    text = text if len(text) <= 200 else text[:197] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


@contextlib.contextmanager
def _untrusted(path: Path) -> Iterator[None]:
    """Reading or parsing the bytes of `path`: any error becomes a CheckpointError that names the
    file and what it should hold. CheckpointErrors (the more specific messages) pass through, and
    so does MemoryError, which is the machine's condition, not the file's."""
    try:
        yield
    except (CheckpointError, MemoryError):
        raise
    except Exception as e:  # torch's unpickler alone raises IndexError, KeyError, struct.error...
        raise CheckpointError(
            f"{path} cannot be read (truncated or corrupt?): not {_expected(path)} ({_detail(e)})"
        ) from e


def _resolve(preset: str | NetworkConfig) -> tuple[NetworkConfig, str | None]:
    if isinstance(preset, str):
        return get_preset(preset).network, preset
    network_class(preset)  # raises TypeError for anything that is not a config
    return preset, None


def auto_dtype(config: NetworkConfig, device: str | torch.device) -> torch.dtype:
    """The torso's precision for dtype=None: float32 on the CPU (no fast float16 convolutions
    there; bfloat16, about 1.5x faster on AVX-512 cores and about 1e-2 from float32, is asked
    for explicitly), else the README's (float16 where the config's use_fp16 is set)."""
    if torch.device(device).type == "cpu" or not config.use_fp16:
        return torch.float32
    return torch.float16


DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_dtype(dtype: torch.dtype | None, device: str | torch.device) -> None:
    """Refuse a precision the networks cannot run, in one line naming the valid ones (before
    any file is read), and warn where this CPU has no fast kernels for bfloat16."""
    if dtype is None:
        return
    valid = "torch.float32, torch.float16, torch.bfloat16 or None (auto)"
    if not isinstance(dtype, torch.dtype):
        raise InputTypeError(f"dtype={dtype!r}: expected a torch.dtype: {valid}")
    if dtype not in DTYPES:
        raise InputError(f"dtype={dtype}: expected {valid}")
    device = torch.device(device)
    if device.type == "cpu" and dtype == torch.bfloat16 and not ops.onednn_dtype(dtype):
        warnings.warn(
            "dtype=torch.bfloat16: oneDNN has no bfloat16 kernels for this CPU (they need "
            "AVX-512); the torso runs on torch's generic kernels, slower than float32",
            stacklevel=3,
        )


def create_model(
    preset: str | NetworkConfig,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    kernels: Kernels | None = None,
    *,
    backend: str | None = None,
) -> _Network:
    """Build a preset (by stem, e.g. "256x256_diffusion") or a config with random weights.

    dtype None is "auto" (`auto_dtype`): the README's precision (float16 torso where use_fp16
    is set) off the CPU, float32 on the CPU, which has no fast float16 convolutions;
    torch.float32 / float16 / bfloat16 choose explicitly. `device="meta"` allocates nothing.
    kernels: "auto" (triton on CUDA where Triton is installed, onednn on a CPU torch built with
    it, else torch), "torch", "triton" or "onednn" (see fastsample.ops). backend: the old name
    of kernels (kept for one release).
    """
    kernels = renamed("kernels", kernels, "backend", backend, "auto")
    check_dtype(dtype, device)
    config, name = _resolve(preset)
    with torch.device(device):
        model = network_class(config)(config)
    model.preset = name
    model.set_precision(dtype if dtype is not None else auto_dtype(config, device))
    model.set_kernels(kernels)
    return model.eval().requires_grad_(False)


@functools.cache
def preset_layout(name: str) -> dict[str, tuple[int, ...]]:
    """state_dict key -> shape of a preset, in state_dict order (built on the meta device)."""
    return layout_of(create_model(name, device="meta", dtype=torch.float32).state_dict())


def layout_of(state_dict: StateDict) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def layout_mismatch(
    expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]]
) -> tuple[list[str], list[str], list[tuple[str, tuple, tuple]]]:
    """(missing keys, unexpected keys, [(key, expected shape, found shape)])."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    mis_shaped = [
        (k, expected[k], found[k]) for k in expected if k in found and expected[k] != found[k]
    ]
    return missing, unexpected, mis_shaped


def detect_presets(state_dict: StateDict) -> list[str]:
    """Every preset whose keys and shapes equal the state_dict's. Several presets share one
    network (256x256_diffusion_uncond and the four LSUN files); they differ only in diffusion
    settings."""
    found = layout_of(state_dict)
    return [name for name in PRESETS if preset_layout(name) == found]


def closest_preset(state_dict: StateDict) -> tuple[str, int]:
    """The preset with the fewest missing + unexpected + mis-shaped keys, and that count."""
    found = layout_of(state_dict)
    scored = []
    for name in PRESETS:
        missing, unexpected, shaped = layout_mismatch(preset_layout(name), found)
        scored.append((len(missing) + len(unexpected) + len(shaped), name))
    count, name = min(scored)
    return name, count


def _describe_mismatch(missing, unexpected, mis_shaped, limit: int = 8) -> str:
    def head(items, fmt):
        shown = ", ".join(fmt(i) for i in items[:limit])
        return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")

    parts = []
    if missing:
        parts.append(f"missing keys: {head(missing, str)}")
    if unexpected:
        parts.append(f"unexpected keys: {head(unexpected, str)}")
    if mis_shaped:
        parts.append(
            "mis-shaped keys: "
            + head(mis_shaped, lambda m: f"{m[0]} (expected {list(m[1])}, found {list(m[2])})")
        )
    return "; ".join(parts)


# Globals that a plain tensor state_dict's pickle names (what weights_only=True accepts).
_TENSOR_GLOBALS = ("torch.", "collections.OrderedDict", "_codecs.encode", "builtins.set")


def _pickle_globals(path: Path) -> list[str] | None:
    """The globals (module.name) a checkpoint's pickle asks for, read by walking its opcodes
    without running them; None where the bytes are not a well-formed pickle."""
    import pickletools

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                name = next(n for n in z.namelist() if n.endswith("data.pkl"))
                data = z.read(name)
        else:
            data = path.read_bytes()
        found, strings = [], []
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL":
                found.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
    except MemoryError:
        raise
    except Exception:  # a corrupt zip or pickle raises many types (struct.error, zlib.error, ...)
        return None
    return list(dict.fromkeys(found))


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a .pt or .safetensors file -> (state_dict on CPU, metadata). Never runs a pickle.
    A file that cannot be read as one raises CheckpointError, whatever the reader raised."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    with _untrusted(path):
        return _read_torch(path)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            state_dict = {k: f.get_tensor(k) for k in f.keys()}
    except MemoryError:
        raise
    except Exception as e:  # safetensors raises its own error types for bad headers/data
        raise CheckpointError(
            f"{path} is not a readable safetensors file (truncated or corrupt?): {_detail(e)}"
        ) from e
    return state_dict, metadata


def _read_torch(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        asked = _pickle_globals(path)
        foreign = [g for g in asked or () if not g.startswith(_TENSOR_GLOBALS)]
        if not foreign:  # a malformed pickle, or one that holds no tensors
            raise CheckpointError(
                f"{path} cannot be read (truncated or corrupt?): not {PT_EXPECTED}"
            ) from None
        raise CheckpointError(
            f"refusing to load {path}: it needs Python code to run while unpickling "
            f"({', '.join(foreign[:3])}), and fastsample loads checkpoints with "
            "weights_only=True only. Convert it to a plain state_dict or to .safetensors where "
            "you trust its source."
        ) from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise CheckpointError(
            f"{path} does not hold a state_dict (a mapping of names to tensors); "
            f"found {type(obj).__name__}"
        )
    return dict(obj), {}


def _metadata_json(path: Path, metadata: Mapping[str, str], key: str) -> object:
    try:
        return json.loads(metadata[key])
    except (ValueError, RecursionError) as e:  # RecursionError: nesting too deep
        raise CheckpointError(
            f"{path}: its {key!r} metadata is not valid JSON (truncated or corrupt?): {_detail(e)}"
        ) from e


def _config_from_metadata(path: Path, metadata: Mapping[str, str]) -> NetworkConfig:
    data = _metadata_json(path, metadata, METADATA_KEY)
    try:
        if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
            raise TypeError(f"expected an object with 'kind' and 'config', found {data!r}")
        config = config_from_dict(data)
    except (CheckpointError, MemoryError):
        raise
    except Exception as e:
        raise CheckpointError(
            f"{path}: its {METADATA_KEY!r} metadata is not a network config (corrupt?): "
            f"{_detail(e)}"
        ) from e
    return config


def _choose_config(
    path: Path, state_dict: StateDict, metadata: Mapping[str, str]
) -> tuple[NetworkConfig, str | None]:
    """The config for a file loaded without preset=: its name's, its metadata's, or detected."""
    if path.stem in PRESETS:
        return _resolve(path.stem)
    if METADATA_KEY in metadata:
        return _config_from_metadata(path, metadata), metadata.get(PRESET_KEY) or None
    matches = detect_presets(state_dict)
    if not matches:
        name, count = closest_preset(state_dict)
        missing, unexpected, shaped = layout_mismatch(preset_layout(name), layout_of(state_dict))
        raise CheckpointError(
            f"{path}: the state_dict matches no preset; the closest is {name!r} ({count} keys "
            f"differ: {_describe_mismatch(missing, unexpected, shaped)}). Pass preset= a preset "
            "name or a config for a custom network."
        )
    if len(matches) > 1:
        warnings.warn(
            f"{path.name}: the network is shared by presets {', '.join(matches)}; using "
            f"{matches[0]!r} (pass preset= to choose another's diffusion settings)",
            stacklevel=3,
        )
    return _resolve(matches[0])


def load_model(
    path: str | os.PathLike,
    preset: str | NetworkConfig | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    kernels: Kernels | None = None,
    *,
    backend: str | None = None,
) -> _Network:
    """Load a released (or fastsample-saved) checkpoint strictly, in eval mode. `path` may also
    name a preset whose weights ship with fastsample ("demo-mnist", "demo-mnist-classifier").

    dtype None is "auto" as for create_model (the README's precision off the CPU, float32 on
    it); float32, float16 or bfloat16 choose explicitly. kernels (and its old name backend): as
    for create_model.
    """
    kernels = renamed("kernels", kernels, "backend", backend, "auto")
    check_dtype(dtype, device)
    path = Path(path)
    if not path.exists() and str(path) in PRESETS and PRESETS[str(path)].weights:
        # A preset whose weights ship with fastsample (the demo).
        from .demo import WEIGHTS_DIR

        preset = preset or str(path)
        path = WEIGHTS_DIR / PRESETS[str(path)].weights
    model = None
    if preset is not None:  # the caller's choice, so its errors are the caller's (not the file's)
        config, name = _resolve(preset)
        model = create_model(config, device="meta", dtype=torch.float32)
    state_dict, metadata = read_checkpoint(path)
    # From here on everything derives from the file's bytes (a config in its metadata included).
    with _untrusted(path):
        if model is None:
            config, name = _choose_config(path, state_dict, metadata)
            model = create_model(config, device="meta", dtype=torch.float32)
        _check_fit(path, model, state_dict, name, config)
        # Parameters are held in float32 (exact for any float16/bfloat16 file), each in its own
        # fresh allocation: tensors read from a file can be unaligned views into one buffer,
        # which makes CPU kernels pick other code paths. The precision step converts the torso.
        params = {k: v.to(torch.float32, copy=True) for k, v in state_dict.items()}
        del state_dict
        model.load_state_dict(params, strict=True, assign=True)
    model = model.to(device)
    model.preset = name
    model.set_precision(dtype if dtype is not None else auto_dtype(config, device))
    model.set_kernels(kernels)
    return model.eval().requires_grad_(False)


def _check_fit(
    path: Path, model: _Network, state_dict: StateDict, name: str | None, config: NetworkConfig
) -> None:
    missing, unexpected, shaped = layout_mismatch(
        layout_of(model.state_dict()), layout_of(state_dict)
    )
    if missing or unexpected or shaped:
        label = f"preset {name!r}" if name else f"the given {type(config).__name__}"
        hint = ""
        if name is None or detect_presets(state_dict) != [name]:
            best, _ = closest_preset(state_dict)
            hint = f" The closest preset is {best!r}."
        raise CheckpointError(
            f"{path} does not fit {label}: {_describe_mismatch(missing, unexpected, shaped)}.{hint}"
        )
    for key, value in state_dict.items():
        if not value.is_floating_point():
            raise CheckpointError(f"{path}: {key} has dtype {value.dtype}; expected floating point")


def read_diffusion(path: str | os.PathLike) -> Diffusion | None:
    """The diffusion settings saved in a .safetensors file's metadata, if any."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
    except MemoryError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {_detail(e)}") from e
    if not metadata.get(DIFFUSION_KEY):
        return None
    data = _metadata_json(path, metadata, DIFFUSION_KEY)
    try:
        if not isinstance(data, dict):
            raise TypeError(f"expected an object, found {data!r}")
        return Diffusion(**data)
    except MemoryError:
        raise
    except Exception as e:
        raise CheckpointError(
            f"{path}: its {DIFFUSION_KEY!r} metadata is not diffusion settings (corrupt?): "
            f"{_detail(e)}"
        ) from e


def save_checkpoint(
    model: _Network, path: str | os.PathLike, diffusion: Diffusion | None = None
) -> Path:
    """Write the model's state_dict as .pt (plain dict) or .safetensors (with the network config,
    and the diffusion settings if given, in the metadata, so that loading needs no preset).
    The file appears only once complete."""
    path = Path(path)
    if path.suffix not in (".pt", ".safetensors"):
        raise InputError(f"checkpoint path {str(path)!r}: expected a .pt or .safetensors suffix")
    state_dict = {
        k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()
    }
    if path.suffix == ".safetensors":
        from safetensors.torch import save

        metadata = {METADATA_KEY: json.dumps(config_to_dict(model.config))}
        if model.preset:
            metadata[PRESET_KEY] = model.preset
        if diffusion is not None:
            metadata[DIFFUSION_KEY] = json.dumps(dataclasses.asdict(diffusion))
        data = save(state_dict, metadata=metadata)
        atomic_write(path, lambda f: f.write(data))
    else:
        atomic_write(path, lambda f: torch.save(state_dict, f))
    return path
