"""Test-wide set-up: without CUDA, Triton kernels run in the interpreter (must be set before kernels import)."""

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))


import pytest


@pytest.fixture(autouse=True)
def _process_wide_kernel_backend():
    """Each test starts with the default kernel backend: a test that sets one (``kernels.set_backend`` through a
    config) must not change what later tests in this process run."""
    yield
    import kernels

    kernels.set_backend("auto")
