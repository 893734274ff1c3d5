"""Test-wide set-up: without CUDA, Triton kernels run in the interpreter (must be set before kernels import)."""

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
