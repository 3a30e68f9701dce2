"""The command line: summaries of presets and flag lines, one-line errors."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from hypothesis import example, given, settings
from hypothesis import strategies as st

from conftest import load_manifest, manifest_stems
from fastsample.cli import main


@pytest.mark.parametrize("stem", ["256x256_diffusion", "64x64_classifier"])
def test_info_prints_parameters_flops_and_attention(stem):
    assert stem in manifest_stems(), "checkpoint manifests missing from tests/data"
    m = load_manifest(stem)
    result = CliRunner().invoke(main, ["info", stem])
    assert result.exit_code == 0, result.output
    assert f"{m['parameter_count']:,} parameters" in result.output
    assert f"{m['state_dict_num_keys']} state_dict keys" in result.output
    assert f"attention layers ({len(m['structure']['attention_layers'])})" in result.output
    for layer in m["structure"]["attention_layers"]:
        assert layer["module"] in result.output
    if m["kind"] == "UNetModel":
        assert f"{m['flops']['forward_batch1'] / 1e9:,.2f} GFLOPs" in result.output


def test_info_from_flags():
    flags = "--image_size 64 --num_channels 64 --attention_resolutions 16 --learn_sigma True"
    result = CliRunner().invoke(main, ["info", "--flags", flags])
    assert result.exit_code == 0, result.output
    assert "image 64x64, model_channels 64, channel_mult (1, 2, 3, 4)" in result.output
    assert "attention at ds (4,)" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["info", "nope"], "error: unknown preset 'nope'; valid presets: 64x64_diffusion"),
        (["info", "--flags", "--num_chanels 8"], "error: unknown flag(s) --num_chanels"),
        (["info"], "error: give a preset name"),
        (["info", "--network", "classifier", "--flags", "--classifier_pool max"], "pool='max'"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(args, message):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_presets_lists_every_preset():
    from fastsample import presets

    result = CliRunner().invoke(main, ["presets"])
    assert result.exit_code == 0
    assert [line.split()[0] for line in result.output.strip().splitlines()] == list(presets)
    line = next(x for x in result.output.splitlines() if x.startswith("256x256_diffusion_uncond "))
    assert "steps 250 (ddpm), guided by 256x256_classifier at scale 10.0" in line


def _sample_args(tiny, out, *extra):
    return [
        "sample",
        "--model",
        str(tiny["model"]),
        "--out",
        str(out),
        "--quiet",
        "--num-samples",
        "5",
        "--batch-size",
        "2",
        *extra,
    ]


def test_sample_writes_the_evaluator_format_and_a_grid(tiny_checkpoints, tmp_path):
    import numpy as np
    from PIL import Image

    out = tmp_path / "run"
    args = _sample_args(
        tiny_checkpoints,
        out,
        "--classifier",
        str(tiny_checkpoints["classifier"]),
        "--scale",
        "2.5",
        "--classes",
        "3,7",
        "--seed",
        "4",
    )
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert f"wrote 5 images to {out / 'samples.npz'}" in result.output
    with np.load(out / "samples.npz") as data:
        assert sorted(data.files) == ["arr_0", "arr_1"]
        images, labels = data["arr_0"], data["arr_1"]
    assert images.shape == (5, 16, 16, 3) and images.dtype == np.uint8
    assert labels.tolist() == [3, 7, 3, 7, 3] and labels.dtype == np.int64
    grid = Image.open(out / "grid.png")
    assert grid.size == (3 * 16, 2 * 16)
    assert len(images.reshape(5, -1).std(axis=1).nonzero()[0]) == 5  # not blank images
    # the merged files, the run record and the shards; no temporaries
    assert sorted(p.name for p in out.iterdir()) == [
        "grid.png",
        "run.json",
        "samples.npz",
        "shards",
    ]
    assert not list(out.rglob("*.tmp"))


def test_sample_is_reproducible_and_batch_size_independent(tiny_checkpoints, tmp_path):
    import numpy as np

    runs = []
    for i, batch in enumerate(["5", "2"]):
        out = tmp_path / f"b{i}"
        result = CliRunner().invoke(
            main, _sample_args(tiny_checkpoints, out, "--seed", "9") + ["--batch-size", batch]
        )
        assert result.exit_code == 0, result.output
        with np.load(out / "samples.npz") as data:
            runs.append((data["arr_0"], data["arr_1"]))
    (a, la), (b, lb) = runs
    assert np.array_equal(la, lb)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # float rounding across batch sizes


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--steps", "ddimx"], "respacing 'ddimx'"),
        (["--steps", "fast"], "expected '', 'ddimN', or comma-separated"),
        (["--classes", "3,12"], "class labels [12] out of range: expected integers in 0..9"),
        (["--classes", "three"], "--classes 'three': expected comma-separated integer"),
        (["--scale", "2"], "guidance_scale=2.0 needs a classifier"),
        (["--num-samples", "0"], "--num-samples 0: expected a positive integer"),
        (["--device", "cuda:7"], None),
    ],
)
def test_sample_refuses_bad_input_in_one_line(tiny_checkpoints, tmp_path, extra, message):
    import torch

    if extra[0] == "--device":
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA; the no-CUDA message is for CPU machines")
        message = "--device cuda:7: no CUDA device is available here"
    out = tmp_path / "run"
    result = CliRunner().invoke(main, _sample_args(tiny_checkpoints, out, *extra))
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists() or not any(out.iterdir())


def test_sample_refuses_unknown_model_and_keeps_existing_files(tiny_checkpoints, tmp_path):
    result = CliRunner().invoke(main, ["sample", "--model", "nope", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "model 'nope' is neither an existing checkpoint file nor a preset" in result.output
    (tmp_path / "samples.npz").write_bytes(b"earlier results")
    result = CliRunner().invoke(main, _sample_args(tiny_checkpoints, tmp_path))
    assert result.exit_code == 2 and "holds samples from another run" in result.output
    assert "pass --overwrite" in result.output
    assert (tmp_path / "samples.npz").read_bytes() == b"earlier results"


def test_sample_help_has_examples():
    result = CliRunner().invoke(main, ["sample", "--help"])
    assert result.exit_code == 0
    assert "--steps ddim25 --scale 2.5" in result.output


# --- every error the CLI reports is a FastsampleError ----------------------------------------

# Each error and the builtin it replaced, so `except ValueError` (...) around fastsample calls
# keeps working; RunError was a plain Exception.
REPLACED_BUILTIN = {
    "InputError": ValueError,
    "InputTypeError": TypeError,
    "CheckpointError": ValueError,
    "NonFiniteError": RuntimeError,
    "OutputExistsError": FileExistsError,
    "MissingFileError": FileNotFoundError,
    "ExportError": ValueError,
    "IntegrityError": ValueError,
    "BackendUnavailable": RuntimeError,
    "RuntimeFailure": RuntimeError,
    "RunError": Exception,
}


def test_every_error_is_a_fastsample_error_and_its_old_builtin():
    from fastsample import FastsampleError, errors

    classes = {
        name: value
        for name, value in vars(errors).items()
        if isinstance(value, type) and issubclass(value, BaseException)
    }
    assert set(classes) - {"FastsampleError"} == set(REPLACED_BUILTIN), "add it to the table"
    for name, builtin in REPLACED_BUILTIN.items():
        assert issubclass(classes[name], FastsampleError) and issubclass(classes[name], builtin)
    assert issubclass(classes["IntegrityError"], classes["ExportError"])


def _reported(args, needle=None):
    """The command failed on a FastsampleError: `_one_line_errors` catches that base only (any
    other exception would leave exit code 1 and the exception), one line, exit code 2."""
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, (args, result.output, result.exception)
    assert isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), (args, result.stderr)
    assert "Traceback" not in result.output
    if needle is not None:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    import numpy as np

    root = tmp_path_factory.mktemp("cli-bad")
    (root / "a-file").write_text("not a directory")
    (root / "not.npz").write_bytes(b"not a zip file")
    np.savez(root / "no-images.npz", labels=np.zeros(3, dtype=np.int64))
    (root / "export-like").mkdir()
    (root / "export-like" / "manifest.json").write_text("{ not json")
    (root / "full").mkdir()
    (root / "full" / "something").write_text("x")
    return root


# args, a part of the message ({root}: the bad_files directory)
COMMAND_CASES = [
    (["info", "nope"], "unknown preset 'nope'"),
    (["info", "--flags", "--image_size"], "has no value"),
    (["info", "--flags", "image_size 64"], "expected '--name value'"),
    (["info", "--flags", "--num_channels many"], "--num_channels 'many'"),
    (["info", "--flags", "--image_size 100"], "has no default channel_mult"),
    (["info", "--flags", "--attention_resolutions 32,x"], "comma-separated pixel sizes"),
    (["info", "--flags", "--channel_mult 1,a"], "comma-separated integers"),
    (["info", "--flags", "--num_channels 0"], "model_channels=0"),
    (["info", "--flags", "--num_head_channels 48"], "does not divide"),
    (["info", "--flags", "--image_size 'unclosed"], "--image_size 'unclosed"),
    (["info", "--network", "superres", "--flags", "--large_size 128"], "large_size=128"),
    (["sample", "--seed", "-1"], "--seed -1"),
    (["sample", "--batch-size", "0"], "--batch-size 0"),
    (["sample", "--classes", ""], "--classes ''"),
    (["sample", "--device", "gpu"], "--device 'gpu'"),
    (["sample", "--out", "{root}/a-file"], "not a directory"),
    (["sample", "--low-res", "{root}/not.npz"], "--low-res"),
    (["sample", "--low-res", "{root}/no-images.npz"], "arr_0"),
    (["sample", "--low-res", "{root}/missing.npz"], "--low-res"),
    (["sample", "--model", "{root}/export-like"], "not valid JSON"),
    (["sample", "--model", "{root}/export-like", "--classifier", "x"], "--classifier"),
    (["sample", "--model", "{root}/a-file"], None),
    (["sample", "--runtime", "aoti", "--backend", "eager"], "--runtime aoti and --backend"),
    (["sample", "--steps", "ddim7x"], "respacing 'ddim7x'"),
    (["sample", "--steps", "5000"], "cannot take 5000 steps"),
    (["sample", "--sampler", "ddim", "--eta", "-1"], None),
    (["eval", "{root}/missing.npz"], "no such file"),
    (["eval", "{root}/not.npz", "--ref", "{root}/missing.npz"], "no such file"),
    (["eval", "{root}/not.npz"], None),
    (["export", "--out", "{root}/full"], "not empty"),
    (["export", "--out", "{root}/a-file"], "not a directory"),
    (["export", "--device", "gpu", "--out", "{root}/new"], "--device 'gpu'"),
    (["export", "--model", "nope", "--out", "{root}/new"], "neither an existing checkpoint"),
    (["export", "--max-batch", "0", "--out", "{root}/new"], "max_batch=0"),
    (["verify", "{root}/full"], "no manifest.json"),
    (["verify", "{root}/export-like"], "not valid JSON"),
]


@pytest.mark.parametrize("args, needle", COMMAND_CASES, ids=[" ".join(c[0]) for c in COMMAND_CASES])
def test_every_command_reports_bad_input_as_one_line(bad_files, tmp_path, args, needle):
    args = [a.format(root=bad_files) for a in args]
    if args[0] == "sample":  # small runs, in tmp_path (the case's own options come last)
        quick = ["--out", str(tmp_path / "out"), "--quiet", "--num-samples", "2", "--steps", "2"]
        args = ["sample", *quick, *args[1:]]
    _reported(args, needle)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.sampled_from(["--image_size", "--num_channels", "--attention_resolutions",
                         "--channel_mult", "--learn_sigma", "--num_head_channels", "--nope"])
        | st.text(alphabet="0123456789,-.x'\" ", max_size=6),
        max_size=6,
    )
)  # fmt: skip
@example(["--num_channels", "1"])  # widths GroupNorm32 cannot split (found by this test)
@example(["--num_channels", "48", "--channel_mult", "1,2"])
def test_any_flag_line_is_described_or_refused_in_one_line(tokens):
    result = CliRunner().invoke(main, ["info", "--flags", " ".join(tokens)])
    if result.exit_code == 0:
        assert "parameters" in result.output
        return
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.exception
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: ")


def test_backend_is_a_deprecated_spelling_of_runtime(tmp_path):
    # (only the option handling: the out directory under a file stops the run before any model)
    (tmp_path / "f").write_text("")
    args = ["sample", "--backend", "eager", "--out", str(tmp_path / "f" / "run")]
    result = CliRunner().invoke(main, args)
    assert result.stderr.splitlines()[0] == "warning: --backend is deprecated; use --runtime"
    assert result.exit_code == 2 and "is a file, not a directory" in result.stderr
    same = CliRunner().invoke(main, [*args, "--runtime", "eager"])
    assert same.stderr == result.stderr
    assert "--backend" not in CliRunner().invoke(main, ["sample", "--help"]).output
