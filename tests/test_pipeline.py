"""Batched generation: seeds, labels, output files, upsampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fastsample import Pipeline, SuperResUNet, UNet
from fastsample.schedule import Diffusion


@pytest.fixture(scope="module")
def pipe(tiny_checkpoints):
    return Pipeline.from_pretrained(
        tiny_checkpoints["model"], tiny_checkpoints["classifier"], guidance_scale=2.0
    )


def test_from_pretrained_reads_the_saved_diffusion_settings(pipe, tiny_checkpoints):
    assert pipe.diffusion == tiny_checkpoints["diffusion"]
    assert pipe.guidance_scale == 2.0 and pipe.classifier is not None


def test_images_depend_only_on_seed_and_index(pipe):
    whole = pipe.generate(6, batch_size=6, seed=5, progress=False)
    split = pipe.generate(6, batch_size=4, seed=5, progress=False)
    shard = pipe.generate(3, batch_size=2, seed=5, progress=False, first_index=3)
    assert whole.images.shape == (6, 16, 16, 3) and whole.images.dtype == np.uint8
    assert np.array_equal(whole.labels, split.labels)
    assert np.array_equal(whole.labels[3:], shard.labels)
    # Same noise; another batch size may round a conv differently: at most one level apart.
    assert np.abs(whole.images.astype(int) - split.images.astype(int)).max() <= 1
    assert np.abs(whole.images[3:].astype(int) - shard.images.astype(int)).max() <= 1
    other = pipe.generate(6, batch_size=6, seed=6, progress=False)
    assert not np.array_equal(other.images, whole.images)


def test_drawn_labels_are_seeded_uniform_and_independent_of_batching(pipe):
    many = pipe.generate(120, batch_size=120, seed=1, progress=False, steps="ddim2").labels
    assert many.dtype == np.int64 and many.min() >= 0 and many.max() <= 9
    # Uniform over the 10 classes: 12 expected per class, binomial spread ~3.3.
    counts = np.bincount(many, minlength=10)
    assert counts.min() >= 3 and counts.max() <= 25, counts
    again = pipe.generate(7, batch_size=3, seed=1, progress=False, steps="ddim2").labels
    assert np.array_equal(again, many[:7])  # determined by seed and index alone
    shard = pipe.generate(5, seed=1, first_index=100, progress=False, steps="ddim2").labels
    assert np.array_equal(shard, many[100:105])
    other = pipe.generate(120, batch_size=120, seed=2, progress=False, steps="ddim2").labels
    assert (other != many).mean() > 0.75  # another seed, another draw (10% agree by chance)


def test_classes_are_used_in_turn_and_checked(pipe):
    assert pipe.generate(3, classes=8, progress=False, steps="ddim2").labels.tolist() == [8, 8, 8]
    used = pipe.generate(5, classes=[4, 0, 9], progress=False, steps="ddim2").labels
    assert used.tolist() == [4, 0, 9, 4, 0]
    with pytest.raises(ValueError, match=r"class labels \[10\] out of range"):
        pipe.generate(2, classes=[1, 10], progress=False)
    with pytest.raises(ValueError, match="respacing 'x'"):
        pipe.generate(2, steps="x", progress=False)


def test_steps_pick_the_sampler(pipe):
    calls = []

    def spy(module, args):
        calls.append(int(args[1][0]))

    handle = pipe.model.register_forward_pre_hook(spy)
    try:
        pipe.generate(1, steps="ddim3", progress=False)
        assert calls == [668, 334, 0]
        calls.clear()
        pipe.generate(1, steps="3", sampler="dpm++2m", progress=False)
        assert calls == [999, 500, 0]
    finally:
        handle.remove()
    default = pipe.generate(2, steps="ddim3", seed=3, progress=False).images
    ddim = pipe.generate(2, steps="ddim3", seed=3, sampler="ddim", progress=False).images
    ddpm = pipe.generate(2, steps="ddim3", seed=3, sampler="ddpm", progress=False).images
    assert np.array_equal(default, ddim) and not np.array_equal(default, ddpm)


def test_save_writes_npz_and_grid(pipe, tmp_path):
    result = pipe.generate(5, batch_size=3, seed=2, progress=False, steps="ddim2")
    paths = result.save(tmp_path / "out")
    with np.load(paths["npz"]) as data:
        assert np.array_equal(data["arr_0"], result.images)
        assert np.array_equal(data["arr_1"], result.labels)
    assert Image.open(paths["grid"]).size == (3 * 16, 2 * 16)
    with pytest.raises(FileExistsError, match="exists"):
        result.save(tmp_path / "out")


def test_unconditional_generation_has_no_labels(golden, tmp_path):
    config, g = golden
    model = UNet(**{**config["unet_a"], "num_classes": None})
    model.load_state_dict({k: v for k, v in g["unet_a_state_dict"].items() if "label_emb" not in k})
    pipe = Pipeline(model, Diffusion(timestep_respacing="ddim2"))
    result = pipe.generate(2, progress=False)
    assert result.labels is None
    with np.load(result.save(tmp_path)["npz"]) as data:
        assert data.files == ["arr_0"]
    with pytest.raises(ValueError, match="classes were given, but the model is unconditional"):
        pipe.generate(2, classes=1, progress=False)


def test_upsampler_takes_uint8_low_res_like_the_reference(golden):
    config, g = golden
    model = SuperResUNet(**config["sr"])
    model.load_state_dict(g["sr_state_dict"])
    pipe = Pipeline(model, Diffusion(timestep_respacing="ddim2"))
    low = ((g["in_low_res"].clamp(-1, 1) + 1) * 127.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    result = pipe.generate(2, classes=[1, 2], low_res=low, progress=False)
    assert result.images.shape == (2, 16, 16, 3)
    with pytest.raises(ValueError, match="an upsampler needs low_res"):
        pipe.generate(2, classes=[1, 2], progress=False)


def test_bad_pipeline_arguments():
    with pytest.raises(TypeError, match="expected a UNet"):
        Pipeline(torch.nn.Linear(2, 2), Diffusion())
