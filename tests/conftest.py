"""Shared fixtures: deterministic seeds and the GPU skip."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none here)")
    for item in items:
        # the marker, not ``"gpu" in item.keywords``: keywords hold parent names too (tests/gpu/),
        # which would skip the TTDIST_GPU_TEST_DEVICE=cpu self-check of tests/gpu as well
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
