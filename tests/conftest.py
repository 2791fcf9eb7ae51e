"""Test setup: Triton's interpreter runs the kernels on CPU tensors, so CI checks the Triton code itself.

TRITON_INTERPRET must be set before triton is first imported, hence at the top of conftest.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch


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
