"""The FID Inception-v3 against torch-fidelity's own outputs (../shared/reference_data/
inception_golden: its port of the 2015-12-05 TF graph on seeded random weights, fp32, CPU), and
the weight file's loading: cache location, one-line refusals, no pickle executed.

Tolerance: the golden tensors were computed in float32; the unfolded network repeats their
arithmetic (1e-5 relative), the folded one (batch norms merged into the convolutions, what the
extractor runs) rounds differently, within the issue's 1e-4 relative of each tensor's scale.
"""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from fastsample import inception
from fastsample.cli import main
from fastsample.errors import CheckpointError, MissingFileError
from fastsample.evaluate import inception_extractor
from fastsample.inception import FIDInception, load_inception, tf1_resize_bilinear

GOLDEN = {"pool": "pool_3", "logits": "logits_unbiased", "spatial": "mixed_6_conv"}


def _assert_close(actual, expected, rel):
    scale = float(expected.abs().max())
    err = float((actual - expected).abs().max()) / scale
    assert err <= rel, (err, rel)


@pytest.fixture(scope="module")
def nets(inception_golden):
    weights, _ = inception_golden
    state = torch.load(weights, map_location="cpu", weights_only=True)
    unfolded = FIDInception()
    unfolded.load_state_dict(
        {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    )
    folded, sha = load_inception(weights)
    return unfolded.eval(), folded, sha


@pytest.mark.parametrize("size", [64, 256])
def test_network_reproduces_torch_fidelity(nets, inception_golden, size):
    _, golden = inception_golden
    images = golden[f"images_{size}"].permute(0, 3, 1, 2)  # NCHW uint8 values, as it was fed
    for net, rel in ((nets[0], 1e-5), (nets[1], 1e-4)):
        with torch.no_grad():
            out = net(images, all_spatial=True)
        for ours, theirs in GOLDEN.items():
            _assert_close(out[ours], golden[f"{theirs}_{size}"], rel)


@pytest.mark.parametrize("size", [64, 256])
def test_extractor_features_are_the_reference_evaluators(inception_golden, size):
    """uint8 NHWC in; sFID's features are mixed_6/conv's first 7 channels in TF's HWC order."""
    weights, golden = inception_golden
    ex = inception_extractor(weights, device="cpu")
    feats = ex(golden[f"images_{size}"].numpy())
    assert {k: v.shape for k, v in feats.items()} == {
        "pool": (8, 2048), "spatial": (8, 2023), "logits": (8, 1008)}  # fmt: skip
    assert all(v.dtype == np.float32 for v in feats.values())
    _assert_close(torch.from_numpy(feats["pool"]), golden[f"pool_3_{size}"], 1e-4)
    _assert_close(torch.from_numpy(feats["logits"]), golden[f"logits_unbiased_{size}"], 1e-4)
    spatial = golden[f"mixed_6_conv_{size}"][:, :7].permute(0, 2, 3, 1).reshape(8, -1)
    _assert_close(torch.from_numpy(feats["spatial"]), spatial, 1e-4)
    # The unbiased logits are pool_3 times the final weight, no bias.
    fc = torch.load(weights, weights_only=True)["fc.weight"].float().numpy()
    assert np.allclose(feats["logits"], feats["pool"] @ fc.T, rtol=1e-4, atol=1e-4)


def _tf1_resize_reference(image: np.ndarray, out: int) -> np.ndarray:
    """TF1 ResizeBilinear (align_corners=False, half_pixel_centers=False), one pixel at a time
    in float64: in = out_index * in_size / out_size, neighbours clamped to the last index."""
    h, w = image.shape
    result = np.empty((out, out))
    for i in range(out):
        y = i * h / out
        y0 = int(np.floor(y))
        y1, fy = min(y0 + 1, h - 1), y - y0
        for j in range(out):
            x = j * w / out
            x0 = int(np.floor(x))
            x1, fx = min(x0 + 1, w - 1), x - x0
            top = image[y0, x0] * (1 - fx) + image[y0, x1] * fx
            bottom = image[y1, x0] * (1 - fx) + image[y1, x1] * fx
            result[i, j] = top * (1 - fy) + bottom * fy
    return result


@pytest.mark.parametrize("shape", [(7, 5), (64, 64), (300, 301), (299, 299)])
def test_tf1_resize_matches_a_pixel_by_pixel_reference(shape):
    rng = np.random.default_rng(sum(shape))
    image = rng.integers(0, 256, size=shape).astype(np.float64)
    ours = tf1_resize_bilinear(torch.tensor(image, dtype=torch.float32)[None, None], 41)[0, 0]
    # The source coordinate is float32, as in TF: the scale's and the product's rounding (2 x
    # 2^-24 relative, 3.6e-5 px at 300) times a neighbour difference up to 255 allows 1e-2.
    assert np.allclose(ours.numpy(), _tf1_resize_reference(image, 41), rtol=0, atol=1e-2)
    if shape == (299, 299):  # the identity at the network's own size
        same = tf1_resize_bilinear(torch.tensor(image, dtype=torch.float32)[None, None])
        assert torch.equal(same[0, 0], torch.tensor(image, dtype=torch.float32))


def test_weights_are_found_in_torch_hubs_cache(inception_golden, tmp_path, monkeypatch, nets):
    weights, _ = inception_golden
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for name in inception.WEIGHTS_NAMES:  # pytorch-fid's name, then torch-fidelity's
        cached = tmp_path / "hub" / "checkpoints" / name
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(weights, cached)
        assert inception.find_weights() == cached
        net, sha = load_inception(download=False)
        assert sha == nets[2]
        cached.unlink()


def test_missing_weights_offline_say_what_to_fetch_and_where(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(inception, "WEIGHTS_URL", "http://127.0.0.1:9/pt_inception.pth")
    with pytest.raises(MissingFileError) as e:
        load_inception(download=False)
    assert str(tmp_path / "hub" / "checkpoints") in str(e.value)
    assert "pt_inception-2015-12-05-6726825d.pth" in str(e.value)
    # With a download attempted (and failing: nothing listens there), the same one line.
    with pytest.raises(MissingFileError) as e:
        inception.fetch_weights("http://127.0.0.1:9/pt_inception.pth", timeout=5)
    assert "could not be downloaded" in str(e.value) and "\n" not in str(e.value)
    assert not list((tmp_path / "hub" / "checkpoints").iterdir())  # no partial file left
    images = tmp_path / "s.npz"
    np.savez(images, np.zeros((4, 64, 64, 3), np.uint8))
    result = CliRunner().invoke(main, ["eval", str(images), "--ref", str(images)])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "--inception-weights" in result.output and "6726825d" in result.output


class _Evil:
    def __reduce__(self):
        return (print, ("executed",))


def test_bad_weight_files_are_refused_in_one_line(tmp_path, inception_golden):
    weights, _ = inception_golden
    state = torch.load(weights, weights_only=True)
    cases = {
        "pickle.pth": lambda p: p.write_bytes(pickle.dumps({"x": _Evil()})),
        "torchpickle.pth": lambda p: torch.save({"x": _Evil()}, p),
        "text.pth": lambda p: p.write_text("not weights"),
        "missing_key.pth": lambda p: torch.save(
            {k: v for k, v in state.items() if k != "fc.bias"}, p),
        "wrong_shape.pth": lambda p: torch.save({**state, "fc.weight": torch.zeros(1000, 2048)}, p),
    }  # fmt: skip
    for name, write in cases.items():
        path = tmp_path / name
        write(path)
        with pytest.raises(CheckpointError) as e:
            load_inception(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value), name
    with pytest.raises(MissingFileError):
        load_inception(tmp_path / "absent.pth")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_features_and_precision_recall_match_the_cpu(tmp_path):
    """The extractor on CUDA (fp32, TF32 off) against the CPU, on variance-preserving random
    weights (no weight file needed on the device): convolution algorithms differ in summation
    order only, 1e-4 relative as folded vs unfolded. Precision/recall's float64 distances on the
    GPU give the CPU's figures."""
    from bench.eval_stream import random_inception
    from fastsample.metrics import precision_recall

    random_inception(tmp_path / "w.pth", seed=0)
    images = np.random.default_rng(0).integers(0, 256, (24, 256, 256, 3), dtype=np.uint8)
    cpu = inception_extractor(tmp_path / "w.pth", device="cpu")(images)
    gpu = inception_extractor(tmp_path / "w.pth", device="cuda")(images)
    for key in ("pool", "spatial", "logits"):
        _assert_close(torch.from_numpy(gpu[key]), torch.from_numpy(cpu[key]), 1e-4)
    ref, samples = cpu["pool"][:12], cpu["pool"][12:]
    assert precision_recall(ref, samples, device="cuda") == precision_recall(ref, samples)
