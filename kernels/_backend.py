"""Choosing between the Triton kernels and the plain-torch reference.

``backend="auto"`` (the default of every public op) runs Triton on CUDA tensors and the torch reference
elsewhere. ``backend="triton"`` forces the kernels: on CPU this needs ``TRITON_INTERPRET=1`` set *before*
``kernels`` is imported (Triton reads it when a kernel is decorated); the tests do that. ``backend="torch"``
forces the reference.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "torch")


def use_triton(backend: str, x: torch.Tensor) -> bool:
    """Whether an op on ``x`` runs its Triton kernel.

    Raises:
        ValueError: for an unknown backend, or ``"triton"`` on a CPU tensor without ``TRITON_INTERPRET=1``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; choose one of {BACKENDS}")
    if backend == "torch":
        return False
    if backend == "auto":
        return x.is_cuda
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend='triton' on a CPU tensor needs TRITON_INTERPRET=1 set before importing kernels")
    return True
