"""Test setup: Triton's interpreter runs the kernels on CPU tensors, so CI checks the Triton code itself.

TRITON_INTERPRET must be set before triton is first imported, hence at the top of conftest.
"""

import gc
import os
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from fastrlhf.kernels._backend import triton_interpreting


@pytest.fixture
def one_thread():
    """Tiny matmuls: one thread is ~10x faster than two on a loaded 2-core machine (no spin-waiting). Frozen
    objects: the gc.collect() calls of transformers' paged generation (two per call) do not rescan the test
    process (nothing here leaks cycles)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    gc.freeze()
    yield
    gc.unfreeze()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    """A tiny random Llama (1 layer, hidden 32) with the demo tokenizer, saved once per test module."""
    from transformers import LlamaForCausalLM

    from fastrlhf.demo_task import build_tokenizer, tiny_llama_config

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base")
    tok = build_tokenizer()
    LlamaForCausalLM(tiny_llama_config(tok, hidden_size=32, layers=1, intermediate=64)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


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
