"""The fast engine's fused loop (its update kernel interpreted) against the eager sampler, with
the golden tiny UNet and classifier (their GroupNorm / attention kernels are checked in
check_networks.py; here they run on the torch backend to keep the interpreter's time down)."""

import pytest
import torch
from _helpers import DEVICE, golden, rel_err

from fastsample import Classifier, Diffusion, UNet, sample
from fastsample.engine import FastEngine

_golden = golden
pytestmark = pytest.mark.usefixtures("no_fma_contraction")


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpm++2m"])
def test_engine_matches_eager(sampler):
    config, g = _golden()

    def networks():
        unet = UNet(**config["unet_a"])
        unet.load_state_dict(g["unet_a_state_dict"])
        clf = Classifier(**config["classifier"])
        clf.load_state_dict(g["classifier_state_dict"])
        return unet.to(DEVICE).eval(), clf.to(DEVICE).eval()

    d = Diffusion(timestep_respacing="ddim3")
    y = torch.tensor([2, 8]).to(DEVICE)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(d.num_steps + 1, 2, 3, 16, 16, generator=gen).to(DEVICE)
    unet, clf = networks()
    want = sample(unet, d, (2, 3, 16, 16), y=y, sampler=sampler, classifier=clf,
                  guidance_scale=1.5, noise=noise)  # fmt: skip
    unet, clf = networks()
    engine = FastEngine(unet.set_backend("torch"), clf.set_backend("torch"))
    got = engine.sample(sampler, d, lambda k: noise[k], y=y, model_y=y, guidance_scale=1.5)
    assert rel_err(got, want) < 1e-4
