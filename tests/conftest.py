"""Test-wide set-up: without CUDA, Triton kernels run in the interpreter (must be set before kernels import)."""

import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))


import pytest

# first global batches shared by a test and the ranks it launches (tests/_tiny.py); set before any rank is forked
_BATCHES = None
if "MIMO_TITAN_TEST_BATCH_CACHE" not in os.environ:
    _BATCHES = os.environ["MIMO_TITAN_TEST_BATCH_CACHE"] = tempfile.mkdtemp(prefix="mimo_titan_test_batches_")


@pytest.fixture(autouse=True)
def _process_wide_kernel_backend():
    """Each test starts with the default kernel backend: a test that sets one (``kernels.set_backend`` through a
    config) must not change what later tests in this process run."""
    yield
    import kernels

    kernels.set_backend("auto")


def pytest_sessionfinish(session, exitstatus):
    if _BATCHES:
        shutil.rmtree(_BATCHES, ignore_errors=True)
