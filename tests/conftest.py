"""Shared fixtures: a fixed seed for every test, and the gpu marker's skip."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is available here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def fake_mnist(tmp_path_factory: pytest.TempPathFactory):
    """A folder holding a tiny synthetic MNIST (400 train / 100 test images) in torchvision's layout."""
    from helpers import write_fake_mnist

    return write_fake_mnist(tmp_path_factory.mktemp("fake_mnist"))
