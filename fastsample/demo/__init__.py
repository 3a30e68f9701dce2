"""The embedded demo: a small class-conditional ADM, its noisy-image classifier and a judge,
trained on MNIST digits (32x32) by `python -m fastsample.demo.train`."""

from pathlib import Path

WEIGHTS_DIR = Path(__file__).parent / "weights"
