"""Differentiable collectives whose outputs are ready to read: the only door to functional collectives.

``torch.distributed._functional_collectives`` returns an ``AsyncCollectiveTensor`` in eager mode: a wrapper
*without storage of its own* (``data_ptr() == 0``) that waits on the collective the first time a torch op touches
it. Code that reads raw pointers never triggers that wait: a Triton kernel launched on such a tensor reads a null
pointer on CUDA (and "an invalid python storage" in the interpreter). So every collective of mimo_titan goes
through this module, whose functions return plain tensors that have been waited on (:func:`wait`); the kernels
refuse a storage-less input (:func:`kernels._backend.use_triton`).

All functions are autograd-aware (the backward of an all-to-all is the reverse all-to-all, of an all-gather a
reduce-scatter, and so on, as in ``funcol``'s ``*_autograd`` ops) and run on gloo and NCCL.
"""

from __future__ import annotations

import torch
from torch.distributed import _functional_collectives as funcol
from torch.distributed._functional_collectives import AsyncCollectiveTensor

__all__ = ["wait", "all_to_all_single", "all_gather", "reduce_scatter_sum"]

# torch >= 2.12 renamed the functional all-gathers (the old names warn); both versions have autograd variants.
_all_gather_autograd = getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd
_all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor


class _Wait(torch.autograd.Function):
    """Identity that waits on an ``AsyncCollectiveTensor`` and returns a plain tensor over its storage (a view,
    no copy). The gradient passes through, made contiguous: the collective's backward sends it, and gloo can
    reduce a non-contiguous buffer wrongly without an error."""

    @staticmethod
    def forward(ctx, t):
        ready = t.trigger_wait() if isinstance(t, AsyncCollectiveTensor) else t
        return ready.view_as(ready)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def wait(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a plain tensor with storage: waits on the collective that produced an ``AsyncCollectiveTensor``
    (blocking on CPU, a stream dependency on CUDA). Differentiable; the gradient reaching ``t`` is contiguous."""
    if t.requires_grad:
        return _Wait.apply(t)
    return t.trigger_wait() if isinstance(t, AsyncCollectiveTensor) else t


def all_to_all_single(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Uneven all-to-all of the rows of ``x`` ``[N, ...]`` over ``group``: ``in_splits[r]`` rows go to rank r,
    ``out_splits[r]`` rows come from rank r (rank-major). Returns ``[sum(out_splits), ...]``, waited.
    Backward: the reverse all-to-all."""
    return wait(funcol.all_to_all_single_autograd(x.contiguous(), out_splits, in_splits, group))


def all_gather(x: torch.Tensor, group, *, differentiable: bool = True) -> torch.Tensor:
    """All-gather along dim 0: ``[N, ...]`` per rank → ``[group_size · N, ...]`` (rank-major), waited.
    Backward (``differentiable``): a reduce-scatter sum to each rank's own rows."""
    gather = _all_gather_autograd if differentiable else _all_gather
    return wait(gather(x.contiguous(), 0, group))


def reduce_scatter_sum(x: torch.Tensor, group) -> torch.Tensor:
    """Sum ``x`` ``[group_size · N, ...]`` over ``group`` and keep this rank's rows ``[N, ...]``, waited.
    Backward: an all-gather."""
    return wait(funcol.reduce_scatter_tensor_autograd(x.contiguous(), "sum", 0, group))
