"""pytest-benchmark cases of the sampling paths: `pytest bench --benchmark-only` (tiny shapes,
the embedded demo model) or `pytest bench --benchmark-only --full-shapes` (the 64x64 preset)."""

import pytest


def pytest_addoption(parser):
    parser.addoption(
        "--full-shapes",
        action="store_true",
        help="benchmark the 64x64 preset (random weights) instead of the demo model",
    )


@pytest.fixture(scope="session")
def full_shapes(request) -> bool:
    return request.config.getoption("--full-shapes")
