"""Test setup: Triton's interpreter runs the kernels on CPU tensors, so CI checks the Triton code itself.

TRITON_INTERPRET must be set before triton is first imported, hence at the top of conftest.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from fastrlhf.kernels._backend import triton_interpreting


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def torch_backend(monkeypatch):
    """Force the PyTorch path for code under test (e.g. trainer tests that are not about the kernels)."""
    monkeypatch.setenv("FASTRLHF_KERNELS", "torch")


@pytest.fixture
def triton_backend(monkeypatch):
    """Force the Triton path (through the interpreter on CPU)."""
    monkeypatch.setenv("FASTRLHF_KERNELS", "triton")


@pytest.fixture(params=["torch", "triton"])
def backend(request):
    """Each kernel test once per backend; Triton runs on CPU tensors only through the interpreter."""
    if request.param == "triton" and not triton_interpreting():
        pytest.skip("Triton on CPU tensors runs through the interpreter (TRITON_INTERPRET=1)")
    request.getfixturevalue(f"{request.param}_backend")
    return request.param


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cuda: checks the compiled kernels; runs on a GPU with TRITON_INTERPRET=0"
    )


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() and not triton_interpreting():
        return
    skip = pytest.mark.skip(reason="needs CUDA and TRITON_INTERPRET=0")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
