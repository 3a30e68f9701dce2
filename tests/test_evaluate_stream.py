"""Evaluation at ImageNet scale: the reference evaluator's figures from streamed files against an
independent numpy re-implementation of its formulas, stored statistics used only with their own
extractor, and the readers (memory-mapped, compressed, image folders) on generated files.

The numpy oracle below follows guided-diffusion's evaluations/evaluator.py: FID with
scipy.linalg.sqrtm of S1 S2 (real part; an eps offset where it is not finite), np.cov, the
Inception Score per split of softmax probabilities, precision/recall from np.partition radii.
fastsample computes the same in float64 another way (symmetric eigendecompositions, running
sums, blocked distances). With few images in Inception's 2048 dimensions S1 S2 is singular, and
the oracle takes tr sqrt(S1 S2) as a nuclear norm instead of sqrtm (`oracle_fid_features`);
sqrtm itself is checked where the covariances have full rank. 1e-6 relative covers float32
features summed in different orders; the moment sums agree to 1e-9.
"""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
import scipy.linalg
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from fastsample.cli import main
from fastsample.errors import InputError, OutputExistsError
from fastsample.evaluate import evaluate, inception_extractor
from fastsample.imagesource import open_images
from fastsample.metrics import RunningMoments, ScoreAccumulator


def oracle_fid(mu1, s1, mu2, s2, eps=1e-6):
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(s1.dot(s2))
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((s1 + offset).dot(s2 + offset))
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def oracle_fid_features(fa, fb):
    """The same Frechet distance from two feature sets with fewer images than dimensions, where
    S1 S2 is singular: with centred features A, B, the nonzero eigenvalues of S1 S2 =
    A^T A B^T B / ((n1-1)(n2-1)) are those of (A B^T)(A B^T)^T, so tr sqrt(S1 S2) is the
    nuclear norm of A B^T over sqrt((n1-1)(n2-1)): exact, where sqrtm of 2048 x 2048 singular
    products is slow and loses digits."""
    fa, fb = np.asarray(fa, np.float64), np.asarray(fb, np.float64)
    a, b = fa - fa.mean(0), fb - fb.mean(0)
    n1, n2 = len(fa) - 1, len(fb) - 1
    tr_sqrt = np.linalg.svd(a @ b.T, compute_uv=False).sum() / np.sqrt(n1 * n2)
    diff = fa.mean(0) - fb.mean(0)
    return float(diff @ diff + (a * a).sum() / n1 + (b * b).sum() / n2 - 2 * tr_sqrt)


def oracle_is(logits, split_size=5000):
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    preds = e / e.sum(axis=1, keepdims=True)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i : i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


def oracle_pr(ref, samples, k=3):
    def sqdist(a, b):
        return ((a[:, None, :].astype(np.float64) - b[None, :, :]) ** 2).sum(-1)

    radii_r = np.partition(sqdist(ref, ref), k, axis=1)[:, k]
    radii_s = np.partition(sqdist(samples, samples), k, axis=1)[:, k]
    d = sqdist(samples, ref)
    return float((d <= radii_r[None]).any(1).mean()), float((d <= radii_s[:, None]).any(0).mean())


def oracle_stats(f):
    f = np.asarray(f, np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _rgb_set(seed, n, size=64):
    """Smooth random RGB images (blurred noise plus a per-image colour), uint8 NHWC."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, size=(n, 8, 8, 3))
    up = np.repeat(np.repeat(coarse, size // 8, axis=1), size // 8, axis=2)
    return np.clip(up + rng.normal(0, 20, size=up.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def rgb(inception_golden, tmp_path_factory):
    """Two RGB sets as .npz files and their Inception features (computed once, directly)."""
    weights, _ = inception_golden
    tmp = tmp_path_factory.mktemp("rgb")
    samples, ref = _rgb_set(0, 16), _rgb_set(1, 12)
    np.savez(tmp / "samples.npz", samples)
    np.savez_compressed(tmp / "ref.npz", ref)
    ex = inception_extractor(weights, device="cpu")
    return dict(dir=tmp, weights=weights, samples=samples, ref=ref,
                fs=ex(samples), fr=ex(ref))  # fmt: skip


def test_inception_figures_match_the_numpy_oracle(rgb):
    report = evaluate(rgb["dir"] / "samples.npz", rgb["dir"] / "ref.npz", extractor="auto",
                      inception_weights=rgb["weights"], device="cpu")  # fmt: skip
    assert report.extractor.startswith("inception") and report.ref_statistics == "computed"
    fs, fr = rgb["fs"], rgb["fr"]
    fid = oracle_fid_features(fs["pool"], fr["pool"])
    sfid = oracle_fid_features(fs["spatial"], fr["spatial"])
    assert report.fid == pytest.approx(fid, rel=1e-6)
    assert report.sfid == pytest.approx(sfid, rel=1e-6)
    assert report.inception_score == pytest.approx(oracle_is(fs["logits"].astype(np.float64)),
                                                   rel=1e-6)  # fmt: skip
    assert (report.precision, report.recall) == oracle_pr(fr["pool"], fs["pool"])
    assert (report.num_samples, report.num_ref) == (16, 12)


def test_pixel_figures_match_the_numpy_oracle_with_full_rank_covariances(tmp_path):
    """Many images in few dimensions: S1 S2 full rank, sqrtm well conditioned."""
    a, b = _rgb_set(2, 400, size=8), _rgb_set(3, 300, size=8)
    b[:, :4] = 255 - b[:, :4]  # a visible difference
    np.savez(tmp_path / "a.npz", a)
    np.savez(tmp_path / "b.npz", b)
    report = evaluate(tmp_path / "a.npz", tmp_path / "b.npz", extractor="pixels")
    fa, fb = a.reshape(400, -1) / 255, b.reshape(300, -1) / 255
    assert report.fid == pytest.approx(oracle_fid(*oracle_stats(fa), *oracle_stats(fb)), rel=1e-9)
    assert report.sfid == pytest.approx(report.fid, rel=1e-12)
    assert (report.precision, report.recall) == oracle_pr(fb, fa)
    assert 0 < report.precision < 1 and report.fid > 1


def test_stored_statistics_are_used_only_with_their_extractor(rgb, tmp_path):
    """A reference batch (arr_0 plus mu, sigma, mu_s, sigma_s, no extractor named: the
    reference evaluator's) is Inception's: used with inception, refused with pixels."""
    other = _rgb_set(7, 10)
    stored = inception_extractor(rgb["weights"], device="cpu")(other)
    mu, sigma = oracle_stats(stored["pool"])
    mu_s, sigma_s = oracle_stats(stored["spatial"])
    ref = tmp_path / "VIRTUAL_ref.npz"
    np.savez(ref, rgb["ref"], mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    report = evaluate(rgb["dir"] / "samples.npz", ref, inception_weights=rgb["weights"],
                      device="cpu")  # fmt: skip
    assert report.ref_statistics == "stored" and not report.notes
    fs = rgb["fs"]
    # (the stored statistics are `other`'s, so the figures are those of samples vs other)
    assert report.fid == pytest.approx(oracle_fid_features(fs["pool"], stored["pool"]), rel=1e-6)
    assert report.sfid == pytest.approx(
        oracle_fid_features(fs["spatial"], stored["spatial"]), rel=1e-6)  # fmt: skip
    # Precision/recall still read the reference's images (the stats cannot give them).
    assert (report.precision, report.recall) == oracle_pr(rgb["fr"]["pool"], fs["pool"])
    # Another extractor: the stored statistics are refused (one line) and the images used.
    small = _rgb_set(8, 20, size=8)
    np.savez(tmp_path / "small_ref.npz", small, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    np.savez(tmp_path / "small.npz", small[::-1])
    args = ["eval", str(tmp_path / "small.npz"), "--ref", str(tmp_path / "small_ref.npz"),
            "--extractor", "pixels"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "inception's, not pixels's" in notes[0]
    assert "reference statistics computed" in result.output
    # The same images: FID 0 up to the square roots of the rank-deficient covariances' rounding
    # (eigenvalues of +-1e-13 around zero give up to 3e-7 each).
    assert abs(float(result.stdout.split("FID: ")[1].split()[0])) < 1e-4


def test_saved_reference_is_reused_with_the_same_extractor_only(rgb, tmp_path):
    saved = tmp_path / "ref_inception.npz"
    args = [str(rgb["dir"] / "samples.npz"), "--ref", str(rgb["dir"] / "ref.npz"),
            "--inception-weights", str(rgb["weights"]), "--device", "cpu"]  # fmt: skip
    first = CliRunner().invoke(main, ["eval", *args, "--save-ref", str(saved), "--json"])
    assert first.exit_code == 0, first.output
    first = json.loads(first.stdout)
    with np.load(saved) as data:
        assert str(data["extractor"]) == "inception" and "arr_0" not in data
        assert data["pool"].shape == (12, 2048) and data["pool"].dtype == np.float32
    again = CliRunner().invoke(main, ["eval", *args[:1], "--ref", str(saved), *args[3:], "--json"])
    again = json.loads(again.stdout)
    assert again["ref_statistics"] == "stored"
    for key in ("fid", "sfid", "precision", "recall", "inception_score"):
        assert again[key] == pytest.approx(first[key], rel=1e-9), key
    # Features without images cannot serve another extractor: one line.
    result = CliRunner().invoke(main, ["eval", str(rgb["dir"] / "samples.npz"), "--ref",
                                       str(saved), "--extractor", "pixels"])  # fmt: skip
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert "error:" in result.output and "--extractor inception" in result.output
    # An existing --save-ref file is never overwritten.
    with pytest.raises(OutputExistsError):
        evaluate(rgb["dir"] / "samples.npz", rgb["dir"] / "ref.npz", save_reference=saved,
                 inception_weights=rgb["weights"])  # fmt: skip


def test_running_moments_and_split_scores_match_whole_array_formulas():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(103, 6)) * 50 + 1e3  # a large offset: the shifted sums keep precision
    moments = RunningMoments()
    for i in range(0, 103, 10):
        moments.add(x[i : i + 10])
    mu, sigma = moments.result()
    assert np.allclose(mu, x.mean(0), rtol=1e-12)
    assert np.allclose(sigma, np.cov(x, rowvar=False), rtol=1e-9)
    logits = rng.normal(size=(23, 5)) * 3
    acc = ScoreAccumulator(split_size=7)  # splits 7, 7, 7, 2 across batches of 5
    for i in range(0, 23, 5):
        acc.add(logits[i : i + 5])
    assert acc.result() == pytest.approx(oracle_is(logits, 7), rel=1e-12)


def _npz_bytes(arrays: dict, compressed: bool) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    n=st.integers(0, 9), h=st.integers(1, 6), w=st.integers(1, 6), c=st.sampled_from([1, 3]),
    compressed=st.booleans(), batch=st.integers(1, 5), seed=st.integers(0, 2**16),
)  # fmt: skip
def test_readers_return_every_image_in_order(tmp_path, n, h, w, c, compressed, batch, seed):
    images = np.random.default_rng(seed).integers(0, 256, size=(n, h, w, c), dtype=np.uint8)
    path = tmp_path / f"x{seed}_{compressed}.npz"
    path.write_bytes(_npz_bytes({"arr_0": images, "arr_1": np.arange(n)}, compressed))
    source = open_images(path)
    assert source.shape == images.shape and np.array_equal(source.labels, np.arange(n))
    got = list(source.batches(batch))
    assert all(len(b) <= batch for b in got)
    assert np.array_equal(np.concatenate(got) if got else images[:0], images)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data(), compressed=st.booleans())
def test_damaged_npz_files_fail_in_one_line_or_read_whole(tmp_path, data, compressed):
    images = np.arange(5 * 4 * 4 * 3, dtype=np.uint8).reshape(5, 4, 4, 3)
    good = _npz_bytes({"arr_0": images}, compressed)
    cut = data.draw(st.integers(0, len(good)))
    damaged = bytearray(good[:cut] if data.draw(st.booleans()) else good)
    for _ in range(data.draw(st.integers(0, 3))):
        if damaged:
            damaged[data.draw(st.integers(0, len(damaged) - 1))] ^= data.draw(st.integers(1, 255))
    path = tmp_path / "damaged.npz"
    path.write_bytes(bytes(damaged))
    try:
        got = open_images(path).read_all()
    except InputError as e:
        assert str(path) in str(e) and "\n" not in str(e)
    else:
        assert got.dtype == np.uint8 and got.ndim == 4  # (damage in the pixel bytes only)


def test_image_folders_read_like_npz_and_refuse_mixed_sizes(tmp_path):
    images = _rgb_set(5, 6, size=16)
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:05d}.png")
    (folder / "notes.txt").write_text("not an image")  # ignored
    np.savez(tmp_path / "same.npz", images)
    from_folder = evaluate(folder, tmp_path / "same.npz", extractor="pixels")
    from_npz = evaluate(tmp_path / "same.npz", tmp_path / "same.npz", extractor="pixels")
    assert from_folder.fid == pytest.approx(from_npz.fid, abs=1e-9)
    assert (from_folder.precision, from_folder.recall) == (1.0, 1.0)
    Image.fromarray(images[0, :8]).save(folder / "99999.png")
    result = CliRunner().invoke(main, ["eval", str(folder), "--ref", str(tmp_path / "same.npz"),
                                       "--extractor", "pixels"])  # fmt: skip
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "99999.png: 16x8" in result.output and "one size" in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no .png, .jpg or .jpeg"):
        open_images(empty)


def test_eval_prints_the_reference_evaluators_lines_and_json(tmp_path):
    a, b = _rgb_set(8, 30, size=8), _rgb_set(9, 30, size=8)
    np.savez(tmp_path / "a.npz", a)
    np.savez(tmp_path / "b.npz", b, mu=np.zeros(192), sigma=np.eye(192), mu_s=np.zeros(192),
             sigma_s=np.eye(192))  # fmt: skip
    args = ["eval", str(tmp_path / "a.npz"), "--ref", str(tmp_path / "b.npz"), "--extractor",
            "pixels"]  # fmt: skip
    result = CliRunner().invoke(main, [*args, "--json", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if not line.startswith("note:")]
    names = [line.split(":")[0] for line in lines[1:]]
    assert names == ["Inception Score", "FID", "sFID", "Precision", "Recall"]
    saved = json.loads((tmp_path / "r.json").read_text())
    assert float(lines[2].split(": ")[1]) == saved["fid"]  # full precision, as the reference
    # Samples and reference swapped (the reference evaluator's order): said in one line.
    args = ["eval", str(tmp_path / "b.npz"), "--ref", str(tmp_path / "a.npz"), "--extractor",
            "pixels"]  # fmt: skip
    swapped = CliRunner().invoke(main, args)
    notes = [line for line in swapped.output.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "takes the reference first" in notes[0]


@pytest.mark.parametrize("shape, message", [
    ((4, 48, 48, 1), "no default extractor"),
    ((4, 20, 20, 3), "no default extractor"),
])  # fmt: skip
def test_auto_extractor_refuses_sizes_without_a_default(tmp_path, shape, message):
    np.savez(tmp_path / "x.npz", np.zeros(shape, np.uint8))
    result = CliRunner().invoke(main, ["eval", str(tmp_path / "x.npz"), "--ref",
                                       str(tmp_path / "x.npz")])  # fmt: skip
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert message in result.output and f"{shape[2]}x{shape[1]}" in result.output


def test_npz_member_layout_is_what_the_mapped_reader_assumes(tmp_path):
    """np.savez stores arr_0 uncompressed (the memory-mapped path); savez_compressed deflates."""
    for fn, kind in ((np.savez, zipfile.ZIP_STORED), (np.savez_compressed, zipfile.ZIP_DEFLATED)):
        fn(tmp_path / "m.npz", np.zeros((2, 2, 2, 3), np.uint8))
        with zipfile.ZipFile(tmp_path / "m.npz") as z:
            assert z.getinfo("arr_0.npy").compress_type == kind


def _open_fds_to(path) -> int:
    import os

    fds = os.listdir("/proc/self/fd")
    return sum(os.path.realpath(f"/proc/self/fd/{fd}") == str(path.resolve()) for fd in fds)


def test_evaluate_closes_the_files_it_opens_and_only_those(tmp_path):
    a, b = _rgb_set(4, 20, size=8), _rgb_set(5, 16, size=8)
    np.savez(tmp_path / "a.npz", a)
    np.savez_compressed(tmp_path / "b.npz", b)
    evaluate(tmp_path / "a.npz", tmp_path / "b.npz", extractor="pixels")
    assert _open_fds_to(tmp_path / "a.npz") == _open_fds_to(tmp_path / "b.npz") == 0
    with open_images(tmp_path / "b.npz") as ref:  # a caller's source stays the caller's
        evaluate(tmp_path / "a.npz", ref, extractor="pixels")
        assert _open_fds_to(tmp_path / "b.npz") == 1
        np.testing.assert_array_equal(ref.read_all(), b)
    assert _open_fds_to(tmp_path / "b.npz") == 0
    np.savez(tmp_path / "bad.npz", np.zeros((2, 3), np.float32))  # refused: not uint8 NHWC
    with pytest.raises(InputError):
        open_images(tmp_path / "bad.npz")
    assert _open_fds_to(tmp_path / "bad.npz") == 0


def test_zip64_members_written_as_streams_are_mapped(tmp_path):
    """What a writer that streams arr_0 produces (zip64 extra field, sizes after the data)."""
    images = _rgb_set(6, 9, size=5)
    header = {"descr": "|u1", "fortran_order": False, "shape": images.shape}
    with zipfile.ZipFile(tmp_path / "s.npz", "w") as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_2_0(f, header)
            for i in range(0, 9, 4):
                f.write(images[i : i + 4].tobytes())
    source = open_images(tmp_path / "s.npz")
    assert source.shape == images.shape
    np.testing.assert_array_equal(np.concatenate(list(source.batches(2))), images)
