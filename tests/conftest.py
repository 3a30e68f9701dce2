"""Shared test fixtures: where ../shared is, and the reference data in it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FASTSAMPLE_SHARED_DIR", ROOT.parent / "shared"))
GOLDEN_DIR = Path(
    os.environ.get("FASTSAMPLE_GOLDEN_DIR", SHARED / "reference_data" / "golden_tiny")
)
MANIFEST_DIR = SHARED / "checkpoint_manifests"


def manifest_stems() -> list[str]:
    if not MANIFEST_DIR.is_dir():
        return []
    return sorted(p.stem for p in MANIFEST_DIR.glob("*.json") if not p.stem.startswith("_"))


def load_manifest(stem: str) -> dict:
    return json.loads((MANIFEST_DIR / f"{stem}.json").read_text())


@pytest.fixture(scope="session")
def golden():
    """(config.json as a dict, golden.pt as a dict of tensors) from the reference run."""
    if not (GOLDEN_DIR / "config.json").is_file():
        pytest.skip(f"reference golden data not found at {GOLDEN_DIR}")
    config = json.loads((GOLDEN_DIR / "config.json").read_text())
    tensors = torch.load(GOLDEN_DIR / "golden.pt", map_location="cpu", weights_only=True)
    return config, tensors


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| relative to the scale (max |expected|) of the reference output."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def golden_labels(model_config: dict, tensors: dict) -> torch.Tensor | None:
    """The golden labels for a class-conditional config, None for an unconditional one."""
    return tensors["in_y"] if model_config.get("num_classes") is not None else None


@pytest.fixture(scope="session")
def tiny_checkpoints(golden, tmp_path_factory):
    """The golden tiny UNet and classifier saved as .safetensors (config and diffusion settings
    in the metadata), as a user's own small checkpoints would be."""
    from fastsample import Classifier, Diffusion, UNet, save_checkpoint

    config, g = golden
    root = tmp_path_factory.mktemp("tiny")
    unet = UNet(**config["unet_a"])
    unet.load_state_dict(g["unet_a_state_dict"])
    classifier = Classifier(**config["classifier"])
    classifier.load_state_dict(g["classifier_state_dict"])
    diffusion = Diffusion(noise_schedule="linear", timestep_respacing="ddim4")
    return {
        "model": save_checkpoint(unet, root / "tiny.safetensors", diffusion=diffusion),
        "classifier": save_checkpoint(classifier, root / "tiny_classifier.safetensors"),
        "diffusion": diffusion,
    }
