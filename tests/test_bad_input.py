"""Bad input to `fastsample sample`: one line on stderr, exit code 2, no traceback, nothing
written; NaN/inf during sampling never reaches an image; property tests of the respacing parser
and of the CLI's options."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastsample
from fastsample import Classifier, NonFiniteError, Pipeline, save_checkpoint
from fastsample.cli import main
from fastsample.schedule import Diffusion, space_timesteps

QUICK = ["--num-samples", "2", "--batch-size", "2", "--steps", "3", "--quiet", "--device", "cpu"]


class _Payload:
    """Unpickling this would run code (touch a marker file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    demo = fastsample.load_model("demo-mnist")
    save_checkpoint(demo, root / "demo.safetensors")
    data = (root / "demo.safetensors").read_bytes()
    (root / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    torch.save(demo.state_dict(), root / "demo.pt")
    data = (root / "demo.pt").read_bytes()
    (root / "truncated.pt").write_bytes(data[: len(data) // 3])
    (root / "noise.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    marker = root / "payload-ran"
    torch.save({"weight": _Payload(marker)}, root / "payload.pt")
    # the demo network's weights under a released preset's name
    torch.save(demo.state_dict(), root / "64x64_diffusion.pt")
    small = Classifier(image_size=16, in_channels=1, model_channels=32, out_channels=10,
                       num_res_blocks=1, attention_resolutions=(2,), channel_mult=(1, 2),
                       num_head_channels=16, use_scale_shift_norm=True, resblock_updown=True,
                       pool="attention")  # fmt: skip
    save_checkpoint(small, root / "classifier16.safetensors")
    (root / "a-file").write_text("not a directory")
    return root


def _invoke(args):
    return CliRunner().invoke(main, ["sample", *args])


def _one_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


CASES = {
    "corrupt checkpoint": (["--model", "{root}/noise.pt"], ["cannot be read", "corrupt"]),
    "truncated .pt": (["--model", "{root}/truncated.pt"], ["truncated or corrupt"]),
    "truncated .safetensors": (
        ["--model", "{root}/truncated.safetensors"],
        ["not a readable safetensors file"],
    ),
    "pickle that runs code": (["--model", "{root}/payload.pt"], ["weights_only", "system"]),
    "checkpoint of another preset": (
        ["--model", "{root}/64x64_diffusion.pt"],
        ["does not fit preset '64x64_diffusion'", "closest preset is 'demo-mnist'"],
    ),
    "classifier of another resolution": (
        ["--classifier", "{root}/classifier16.safetensors"],
        ["16x16", "32x32"],
    ),
    "label out of range": (["--classes", "3,10"], ["[10]", "0..9"]),
    "labels not integers": (["--classes", "three"], ["--classes 'three'"]),
    "unknown preset": (["--model", "256x256_diffuson"], ["neither an existing checkpoint"]),
    "malformed respacing": (["--steps", "ddim2x"], ["respacing 'ddim2x'"]),
    "more steps than T": (["--steps", "1001"], ["cannot take 1001 steps", "T=1000"]),
    "batch size 0": (["--batch-size", "0"], ["--batch-size 0", "positive"]),
    "no samples": (["--num-samples", "0"], ["--num-samples 0"]),
    "output under a file": (["--out", "{root}/a-file/run"], ["is a file, not a directory"]),
    "output is a file": (["--out", "{root}/a-file"], ["not a directory"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_and_writes_nothing(files, tmp_path, case):
    args, needles = CASES[case]
    out = tmp_path / "out"
    argv = [*QUICK, "--out", str(out), *(a.format(root=files) for a in args)]
    before = sorted(p.name for p in files.iterdir())
    _one_line_error(_invoke(argv), *needles)
    assert not out.exists()  # not even an empty directory
    assert sorted(p.name for p in files.iterdir()) == before
    assert not (files / "payload-ran").exists()  # the payload never ran


def _spiking(pipe, when):
    """Make the model's output inf at its third call whenever when(dtype) holds."""
    calls = {"n": 0}

    def hook(module, args, output):
        calls["n"] += 1
        if calls["n"] == 3 and when(module.dtype):
            return output * float("inf")
        return output

    return pipe.model.register_forward_hook(hook)


def test_fp16_overflow_retries_the_batch_in_fp32():
    pipe = Pipeline.from_pretrained("demo-mnist", "demo-mnist-classifier", dtype=torch.float16)
    assert pipe.classifier.dtype == torch.float16  # an explicit dtype is both networks'
    # The retry runs the same (fp16-rounded) weights of both networks in float32.
    reference = Pipeline.from_pretrained("demo-mnist", "demo-mnist-classifier",
                                         dtype=torch.float16)  # fmt: skip
    reference.model.set_precision(torch.float32)
    reference.classifier.set_precision(torch.float32)
    _spiking(pipe, lambda dtype: dtype == torch.float16)
    with pytest.warns(UserWarning, match=r"samples 4..5: NaN/inf at step 3 of 4 in float16"):
        got = pipe.generate(2, steps="4", seed=1, first_index=4, progress=False)
    expected = reference.generate(2, steps="4", seed=1, first_index=4, progress=False)
    assert np.array_equal(got.images, expected.images)
    assert pipe.model.dtype == pipe.classifier.dtype == torch.float16  # their precision is back


def test_nan_in_fp32_is_an_error_naming_the_step_and_nothing_is_written(tmp_path, monkeypatch):
    pipe = Pipeline.from_pretrained("demo-mnist", "demo-mnist-classifier", dtype=torch.float32)
    _spiking(pipe, lambda dtype: True)
    with pytest.raises(NonFiniteError, match=r"samples 0..1: .*NaN/inf at step 3 of 4 in float32"):
        pipe.generate(2, steps="4", progress=False)
    # the CLI: one line, and no shard or image file for that batch
    original = Pipeline.from_pretrained

    def spiking_pretrained(*args, **kwargs):
        made = original(*args, **kwargs)
        _spiking(made, lambda dtype: True)
        return made

    monkeypatch.setattr(Pipeline, "from_pretrained", spiking_pretrained)
    out = tmp_path / "out"
    _one_line_error(_invoke([*QUICK, "--out", str(out)]), "NaN/inf at step 3 of 3")
    assert not list(out.rglob("*.npz")) and not (out / "grid.png").exists()


# --- properties -------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 2000).flatmap(
        lambda t: st.tuples(st.just(t), st.lists(st.integers(1, 40), min_size=1, max_size=6))
    )
)
def test_section_respacing_properties(case):
    t, counts = case
    sizes = [t // len(counts) + (i < t % len(counts)) for i in range(len(counts))]
    text = ",".join(map(str, counts))
    if any(c > s for c, s in zip(counts, sizes, strict=True)):
        with pytest.raises(ValueError, match="cannot take"):
            space_timesteps(t, text)
        return
    kept = space_timesteps(t, text)
    assert kept == sorted(set(kept)) and len(kept) == sum(counts)
    assert all(0 <= k < t for k in kept)
    starts = np.cumsum([0, *sizes[:-1]])
    for start, size, count in zip(starts, sizes, counts, strict=True):
        section = [k for k in kept if start <= k < start + size]
        assert len(section) == count and section[0] == start
        if count > 1:
            assert section[-1] == start + size - 1  # each section spans its ends
    # the same spec as a list, and surrounding blanks, mean the same
    assert space_timesteps(t, counts) == kept == space_timesteps(t, f" {text} ")


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 2000), st.integers(1, 300))
def test_ddim_respacing_properties(t, n):
    strides = [k for k in range(1, t) if len(range(0, t, k)) == n]
    if not strides:
        with pytest.raises(ValueError, match=f"exactly {n} steps"):
            space_timesteps(t, f"ddim{n}")
        return
    kept = space_timesteps(t, f"ddim{n}")
    assert kept == list(range(0, t, strides[0]))  # the smallest stride that gives n steps


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=12))
def test_any_respacing_text_parses_or_says_why(text):
    try:
        kept = space_timesteps(1000, text)
    except ValueError as e:
        assert repr(text) in str(e) or "respacing" in str(e)
        return
    assert kept == sorted(set(kept)) and all(0 <= k < 1000 for k in kept) and kept
    assert Diffusion(timestep_respacing=text).num_steps == len(kept)


def _invalid_steps(text: str) -> bool:
    try:
        space_timesteps(4000, text)  # (the demo model has T=4000)
    except ValueError:
        return True
    return False


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    option=st.sampled_from(["--batch-size", "--num-samples"]),
    value=st.integers(-(10**6), 0),
)
def test_cli_refuses_non_positive_counts(tmp_path, option, value):
    out = tmp_path / f"o{value}"
    result = _invoke([*QUICK, "--out", str(out), option, str(value)])
    _one_line_error(result, f"{option} {value}")
    assert not out.exists()


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(steps=st.text(alphabet="ddim0123456789,- x", min_size=1, max_size=8).filter(_invalid_steps))
def test_cli_refuses_bad_respacing(tmp_path, steps):
    out = tmp_path / "o"
    result = _invoke([*QUICK, "--out", str(out), "--steps", steps])
    _one_line_error(result, "respacing")
    assert not out.exists()


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(classes=st.lists(st.integers(-50, 60), min_size=1, max_size=4))
def test_cli_checks_every_label(tmp_path, classes):
    bad = [c for c in classes if not 0 <= c <= 9]
    if not bad:
        return  # (valid labels would start sampling: covered elsewhere)
    out = tmp_path / "o"
    result = _invoke([*QUICK, "--out", str(out), "--classes", ",".join(map(str, classes))])
    _one_line_error(result, "out of range", "0..9")
    assert not out.exists()
