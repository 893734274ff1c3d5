"""Reorder row chunks of a tensor: the regroup around an expert-parallel all-to-all.

After the all-to-all of MoE token dispatch, a rank holds its tokens *rank-major* (all tokens from source
rank 0, grouped by local expert, then all from rank 1, ...), while the grouped expert GEMM wants them
*expert-major* (all tokens of local expert 0, from every source rank, then expert 1, ...). With
``split_sizes`` the chunk sizes in the current layout and ``order`` the chunk indices in the desired layout,
``sort_chunks_by_index`` does that regroup; the combine direction uses the inverse order.

Example (2 source ranks, 2 local experts; chunk ``(rank, expert)`` has ``n_re`` tokens)::

    rank-major chunks:   [r0e0, r0e1, r1e0, r1e1]   split_sizes = [n00, n01, n10, n11]
    order = [0, 2, 1, 3] -> [r0e0, r1e0, r0e1, r1e1]  (expert-major)

The Triton path builds the row map on the device with ``cumsum``/``searchsorted`` (no host sync; the output
size ``N`` is ``x.shape[0]``) and copies rows with the gather kernel of :mod:`kernels._gather`: it reads and
writes each element once, ``2 * x.numel() * itemsize`` bytes. The backward is the same gather with the
inverse permutation.

Source: the chunk sort of Megatron-LM's MoE token dispatcher (``sort_chunks_by_idxs``); independent code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import reference_cp as ref
from ._backend import use_triton
from ._gather import gather_rows

__all__ = ["sort_chunks_by_index"]


def _as_index_tensor(v: Sequence[int] | torch.Tensor, name: str) -> torch.Tensor:
    t = v if isinstance(v, torch.Tensor) else torch.as_tensor(list(v), dtype=torch.int64)
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if t.numel() and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise ValueError(f"{name} must hold integers, got {t.dtype}")
    return t.to(torch.int64)


def _validate(sizes: torch.Tensor, order: torch.Tensor, N: int) -> None:
    """Sizes >= 0 summing to ``N``; ``order`` a permutation of ``range(len(sizes))``. One host sync if on CUDA."""
    D = sizes.numel()
    if order.numel() != D:
        raise ValueError(f"order has {order.numel()} entries but there are {D} chunks (split_sizes)")
    if D == 0:
        if N:
            raise ValueError(f"split_sizes is empty (sums to 0) but x has {N} rows")
        return
    order = order.to(sizes.device)
    perm_ok = (torch.sort(order).values == torch.arange(D, device=order.device)).all()
    total, smallest, perm = torch.stack([sizes.sum(), sizes.min(), perm_ok.to(torch.int64)]).tolist()
    if smallest < 0:
        raise ValueError(f"split_sizes must be >= 0, got a chunk of size {smallest}")
    if total != N:
        raise ValueError(f"split_sizes sum to {total} but x has {N} rows")
    if not perm:
        shown = order[:32].tolist()
        raise ValueError(f"order must be a permutation of range({D}), got {shown}{' ...' if D > 32 else ''}")


def _row_index(sizes: torch.Tensor, order: torch.Tensor, N: int) -> torch.Tensor:
    """int64 ``[N]``: source row of each output row (device ops only; robust to unvalidated input)."""
    D = sizes.numel()
    rows = torch.arange(N, dtype=torch.int64, device=sizes.device)
    if D == 0:
        return torch.full_like(rows, -1)
    order = order.clamp(0, D - 1)
    in_starts = torch.cumsum(sizes, 0) - sizes
    out_sizes = sizes[order]
    out_ends = torch.cumsum(out_sizes, 0)
    k = torch.searchsorted(out_ends, rows, right=True).clamp_(max=D - 1)  # output chunk; skips empty chunks
    return in_starts[order[k]] + rows - (out_ends[k] - out_sizes[k])


def sort_chunks_by_index(
    x: torch.Tensor,
    split_sizes: Sequence[int] | torch.Tensor,
    order: Sequence[int] | torch.Tensor,
    *,
    backend: str | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Cut ``x``'s rows into chunks of ``split_sizes`` and concatenate the chunks in ``order``.

    Equivalent to ``torch.cat([torch.split(x, split_sizes)[i] for i in order])`` without host syncs on the
    Triton path (``split_sizes`` and ``order`` may be CUDA tensors).

    Example: ``x = [a, b, c, d, e]`` (rows), ``split_sizes = [2, 0, 3]``, ``order = [2, 0, 1]`` gives
    ``[c, d, e, a, b]``.

    Args:
        x: ``[N, ...]``, any dtype and strides.
        split_sizes: int ``[D]`` (list or tensor, any device), each >= 0, summing to ``N``; zero-size chunks
            are allowed.
        order: int ``[D]`` (list or tensor), a permutation of ``range(D)``: output chunk ``k`` is input chunk
            ``order[k]``.
        backend: None (the process-wide choice, :func:`kernels.get_backend`), ``"auto"`` (Triton on CUDA, else
            torch), ``"triton"`` or ``"torch"``.
        validate: check the sizes and the permutation (one host sync when they are CUDA tensors). With
            ``validate=False`` invalid input gives unspecified rows (never out-of-bounds reads).

    Returns:
        A new contiguous ``[N, ...]`` tensor, differentiable with respect to ``x``.

    Raises:
        ValueError: sizes negative or not summing to ``N``, ``order`` not a permutation of the chunk indices,
            ``x`` 0-D, unknown backend.
    """
    if x.dim() == 0:
        raise ValueError("x must be [N, ...] with at least one dimension")
    N = x.shape[0]
    sizes = _as_index_tensor(split_sizes, "split_sizes")
    order_t = _as_index_tensor(order, "order")
    if validate:
        _validate(sizes, order_t, N)
    if not use_triton(backend, x):
        return ref.sort_chunks_by_index_reference(x, sizes, order_t)
    sizes = sizes.to(x.device, non_blocking=True)
    order_t = order_t.to(x.device, non_blocking=True)
    return gather_rows(x, _row_index(sizes, order_t, N), 0)
