"""Corrupt checkpoints: whatever the bytes, loading either succeeds or raises CheckpointError.

A tiny network is saved three ways (.safetensors, .pt zip, .pt legacy pickle); deterministic
mutations of those files (random bytes, truncations, byte overwrites in headers and bodies, zip
members replaced by garbage, corrupt safetensors metadata) must never escape as another
exception type.
"""

from __future__ import annotations

import io
import json
import random
import struct
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastsample import CheckpointError, UNet, load_model, save_checkpoint
from fastsample.checkpoint import read_checkpoint, read_diffusion
from fastsample.cli import main
from fastsample.schedule import Diffusion
from fastsample.unet import _Network

SEED = 20240611


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict:
    """The tiny network's config and its three files' bytes."""
    root = tmp_path_factory.mktemp("originals")
    model = UNet(
        image_size=8,
        in_channels=1,
        model_channels=32,
        out_channels=1,
        num_res_blocks=1,
        attention_resolutions=[],
        channel_mult=[1],
        num_heads=1,
    )
    diffusion = Diffusion(noise_schedule="linear", timestep_respacing="ddim4")
    safetensors = save_checkpoint(model, root / "m.safetensors", diffusion=diffusion)
    state_dict = {k: v.clone() for k, v in model.state_dict().items()}
    zipped, legacy = io.BytesIO(), io.BytesIO()
    torch.save(state_dict, zipped)
    torch.save(state_dict, legacy, _use_new_zipfile_serialization=False)
    return {
        "config": model.config,
        "safetensors": safetensors.read_bytes(),
        "zip": zipped.getvalue(),
        "legacy": legacy.getvalue(),
    }


def _suffix(kind: str) -> str:
    return ".safetensors" if kind == "safetensors" else ".pt"


def _overwrite(rng: random.Random, data: bytes, lo: int, hi: int, count: int) -> bytes:
    out = bytearray(data)
    for _ in range(count):
        out[rng.randrange(lo, hi)] = rng.randrange(256)
    return bytes(out)


def _zip_regions(data: bytes) -> tuple[list[int], int]:
    """(offsets of the local headers, offset of the central directory) of a zip."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        offsets = [info.header_offset for info in z.infolist()]
    return offsets, data.find(b"PK\x01\x02", max(offsets))


def _replace_member(rng: random.Random, data: bytes, member: str) -> bytes:
    """The zip with one member's content replaced by random bytes (empty to 1 KB)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            body = src.read(info)
            if info.filename == member:
                body = rng.randbytes(rng.choice([0, 1, 7, 64, 1024]))
            dst.writestr(info, body)
    return out.getvalue()


def _with_metadata(data: bytes, key: str, value: str) -> bytes:
    """A safetensors file with its metadata `key` set to `value`."""
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    header["__metadata__"][key] = value
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + size :]


def _metadata_cases(rng: random.Random, data: bytes) -> Iterator[tuple[str, bytes]]:
    keys = ("fastsample.network", "fastsample.diffusion", "fastsample.preset")
    values = ["", "{", "[]", "null", "1e999", '"x"', "[" * 5000, '{"kind": "unet"}']
    values += ['{"kind": "unet", "config": []}', '{"kind": "nope", "config": {}}']
    network = json.loads(
        json.loads(data[8 : 8 + struct.unpack("<Q", data[:8])[0]])["__metadata__"][
            "fastsample.network"
        ]
    )
    for key in keys:
        for value in values:
            yield (
                f"metadata {key}={value[:20]!r}",
                _with_metadata(data, key, value),
            )
    for field in network["config"]:
        for value in (None, -1, 0, 3, "x", [1, 2], 1.5):
            bad = {"kind": network["kind"], "config": {**network["config"], field: value}}
            text = json.dumps(bad)
            yield (
                f"metadata config {field}={value!r}",
                _with_metadata(data, "fastsample.network", text),
            )
    for _ in range(40):
        text = json.dumps(network)
        cut = _overwrite(rng, text.encode(), 0, len(text), rng.randrange(1, 4))
        cut_text = cut.decode("latin-1")
        yield (
            "metadata config bytes overwritten",
            _with_metadata(data, "fastsample.network", cut_text),
        )


def fuzz_cases(originals: dict) -> Iterator[tuple[str, str, bytes]]:
    """(description, suffix, bytes) of every deterministic case."""
    rng = random.Random(SEED)
    for suffix in (".pt", ".safetensors"):
        for size in [*range(0, 64), *(rng.randrange(64, 4096) for _ in range(80))]:
            yield f"random {size} bytes", suffix, rng.randbytes(size)
    for kind in ("safetensors", "zip", "legacy"):
        data, suffix = originals[kind], _suffix(kind)
        n = len(data)
        # A valid start, then garbage.
        for keep in (2, 4, 8, 16, 64, 256):
            for size in (0, 10, 1000):
                yield (
                    f"{kind} first {keep} bytes + {size} random",
                    suffix,
                    data[:keep] + rng.randbytes(size),
                )
        # Truncation in the header, the middle and the end.
        cuts = [*range(0, 128), *(rng.randrange(n) for _ in range(40)), *range(n - 128, n)]
        for cut in cuts:
            yield f"{kind} truncated to {cut} of {n} bytes", suffix, data[:cut]
        # Overwrites in the header (first 1 KB) and anywhere.
        for count in (1, 1, 2, 8):
            for _ in range(25):
                yield (
                    f"{kind} {count} header bytes overwritten",
                    suffix,
                    _overwrite(rng, data, 0, 1024, count),
                )
        for count in (1, 4, 32):
            for _ in range(15):
                yield (
                    f"{kind} {count} bytes overwritten",
                    suffix,
                    _overwrite(rng, data, 0, n, count),
                )
        for _ in range(20):
            yield f"{kind} last 1 KB overwritten", suffix, _overwrite(rng, data, n - 1024, n, 4)
    data, n = originals["zip"], len(originals["zip"])
    locals_, central = _zip_regions(data)
    for offset in [*locals_[:3], *locals_[-3:], *rng.sample(locals_, 10)]:
        for delta in (0, 4, 20, 30, 40):
            yield (
                f"zip truncated in a local header ({offset}+{delta})",
                ".pt",
                data[: offset + delta],
            )
            yield (
                f"zip local header at {offset}+{delta} overwritten",
                ".pt",
                _overwrite(rng, data, offset + delta, min(n, offset + delta + 4), 2),
            )
    for cut in [central + d for d in range(0, 200, 7)] + [n - 22 + d for d in range(22)]:
        yield f"zip truncated in the central directory ({cut})", ".pt", data[:cut]
    for _ in range(60):
        yield "zip central directory overwritten", ".pt", _overwrite(rng, data, central, n, 2)
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        names = z.namelist()
    members = [m for m in names if not m.split("/data/")[-1].isdigit()] + rng.sample(names, 8)
    for member in members:
        for _ in range(3):
            yield (
                f"zip member {member} replaced by garbage",
                ".pt",
                _replace_member(rng, data, member),
            )
    for description, case in _metadata_cases(rng, originals["safetensors"]):
        yield description, ".safetensors", case


def check_case(path: Path, config) -> str | None:
    """None where the file loads (as a network) or is refused with CheckpointError; else what
    went wrong."""
    preset = config if path.suffix == ".pt" else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                state_dict, metadata = read_checkpoint(path)
                assert isinstance(state_dict, dict) and isinstance(metadata, dict)
                read_diffusion(path)
            except CheckpointError:
                pass
            try:
                model = load_model(path, preset=preset)
            except CheckpointError:
                return None
        if not isinstance(model, _Network):
            return f"load_model returned {type(model).__name__}"
    except Exception as e:
        return f"{type(e).__name__}: {str(e)[:200]}"
    return None


def test_every_corrupt_checkpoint_loads_or_raises_checkpoint_error(originals, tmp_path):
    failures, count = [], 0
    for i, (description, suffix, data) in enumerate(fuzz_cases(originals)):
        path = tmp_path / f"model{suffix}"
        path.write_bytes(data)
        count += 1
        problem = check_case(path, originals["config"])
        if problem:
            failures.append(f"case {i} ({description}): {problem}")
    assert count >= 1000
    assert not failures, f"{len(failures)} of {count} cases:\n" + "\n".join(failures[:30])


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    kind=st.sampled_from(["random", "safetensors", "zip", "legacy"]),
    noise=st.binary(max_size=2048),
    cut=st.floats(0, 1),
    flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=6),
)
def test_random_bytes_and_damaged_files_load_or_raise_checkpoint_error(
    originals, tmp_path, kind, noise, cut, flips
):
    if kind == "random":
        data, suffix = noise, rng_suffix(noise)
    else:
        data, suffix = bytearray(originals[kind][: int(cut * len(originals[kind]))]), _suffix(kind)
        for where, value in flips if data else ():
            data[int(where * len(data))] = value
    path = tmp_path / f"hyp{suffix}"
    path.write_bytes(bytes(data))
    assert check_case(path, originals["config"]) is None


def rng_suffix(noise: bytes) -> str:
    return ".safetensors" if len(noise) % 2 else ".pt"


def test_cli_reports_a_corrupt_checkpoint_in_one_line(originals, tmp_path):
    cases = [case for i, case in enumerate(fuzz_cases(originals)) if i % 97 == 0][:8]
    for description, suffix, data in cases:
        path = tmp_path / f"corrupt{suffix}"
        path.write_bytes(data)
        if check_case(path, originals["config"]) is None and _loads(path):
            continue  # this mutation left a loadable file
        result = CliRunner().invoke(
            main,
            ["sample", "--model", str(path), "--out", str(tmp_path / "out"), "--num-samples", "1"],
        )
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert result.exit_code == 2, (description, result.output)
        assert len(errors) == 1 and str(path) in errors[0], (description, result.output)
        assert "Traceback" not in result.output, description
        assert not isinstance(result.exception, Exception) or isinstance(
            result.exception, SystemExit
        )


def _loads(path: Path) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_model(path)
    except CheckpointError:
        return False
    return True
