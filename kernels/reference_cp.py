"""Plain-torch references for the context-parallel (zigzag) and chunk-sorting ops.

These are written with ``narrow``/``split``/``cat`` and Python loops, independently of the index maps that
the Triton paths in :mod:`kernels.zigzag` and :mod:`kernels.sort_chunks` compute, so the tests compare two
different derivations. They are also the ``backend="torch"`` implementations (autograd comes from torch).
They assume validated arguments (the public ops validate before dispatching) and may sync with the host
(``tolist``) for sizes held in tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch

__all__ = [
    "gather_rows_reference",
    "sort_chunks_by_index_reference",
    "zigzag_position_ids_reference",
    "zigzag_shard_reference",
    "zigzag_shard_thd_reference",
    "zigzag_unshard_reference",
    "zigzag_unshard_thd_reference",
]


def _ints(v: Sequence[int] | torch.Tensor) -> list[int]:
    return [int(i) for i in (v.tolist() if isinstance(v, torch.Tensor) else v)]


def _cat(pieces: list[torch.Tensor], x: torch.Tensor, dim: int) -> torch.Tensor:
    # ``torch.cat`` of an empty list is an error; an empty result is an empty slice (kept in the graph).
    return torch.cat(pieces, dim) if pieces else x.narrow(dim, 0, 0).clone()


def gather_rows_reference(x: torch.Tensor, idx: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Reference of :func:`kernels._gather.gather_rows`: ``index_select``, zero slices for out-of-range idx."""
    dim = dim % x.dim()
    n = x.shape[dim]
    idx = idx.to(device=x.device, dtype=torch.int64)
    ok = (idx >= 0) & (idx < n)
    if n == 0:
        shape = list(x.shape)
        shape[dim] = idx.numel()
        return x.new_zeros(shape)
    out = x.index_select(dim, torch.where(ok, idx, 0))
    mask_shape = [1] * x.dim()
    mask_shape[dim] = idx.numel()
    return out.masked_fill(~ok.view(mask_shape), 0)


def sort_chunks_by_index_reference(
    x: torch.Tensor, split_sizes: Sequence[int] | torch.Tensor, order: Sequence[int] | torch.Tensor
) -> torch.Tensor:
    """Split ``x``'s rows into chunks of ``split_sizes`` and concatenate them in ``order``."""
    chunks = torch.split(x, _ints(split_sizes), dim=0)
    return _cat([chunks[i] for i in _ints(order)], x, 0)


def zigzag_shard_reference(x: torch.Tensor, cp_size: int, cp_rank: int, seq_dim: int) -> torch.Tensor:
    """Chunks ``cp_rank`` and ``2*cp_size-1-cp_rank`` of ``2*cp_size`` equal chunks of ``seq_dim``."""
    seq_dim %= x.dim()
    c = x.shape[seq_dim] // (2 * cp_size)
    first, second = cp_rank, 2 * cp_size - 1 - cp_rank
    return torch.cat([x.narrow(seq_dim, first * c, c), x.narrow(seq_dim, second * c, c)], seq_dim)


def zigzag_unshard_reference(x: torch.Tensor, cp_size: int, seq_dim: int) -> torch.Tensor:
    """Inverse of :func:`zigzag_shard_reference` given all ranks' shards concatenated along ``seq_dim``."""
    seq_dim %= x.dim()
    n = 2 * cp_size
    c = x.shape[seq_dim] // n
    shards = [x.narrow(seq_dim, r * 2 * c, 2 * c) for r in range(cp_size)]
    pieces = []
    for k in range(n):
        rank, half = (k, 0) if k < cp_size else (n - 1 - k, 1)
        pieces.append(shards[rank].narrow(seq_dim, half * c, c))
    return torch.cat(pieces, seq_dim)


def zigzag_position_ids_reference(seq_len: int, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """Global positions of ``cp_rank``'s zigzag shard of a length-``seq_len`` sequence."""
    return zigzag_shard_reference(torch.arange(seq_len, device=device), cp_size, cp_rank, 0)


def zigzag_shard_thd_reference(
    x: torch.Tensor, cu_seqlens: torch.Tensor, cp_size: int, cp_rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zigzag-shard each packed document of ``x`` (``[T, ...]``) separately; see ``zigzag_shard_thd``."""
    bounds = _ints(cu_seqlens)
    pieces = [zigzag_shard_reference(x[s:e], cp_size, cp_rank, 0) for s, e in pairwise(bounds) if e > s]
    return _cat(pieces, x, 0), cu_seqlens // cp_size


def zigzag_unshard_thd_reference(x: torch.Tensor, cu_seqlens: torch.Tensor, cp_size: int) -> torch.Tensor:
    """Inverse of the THD shard: ``x`` is all ranks' local tokens concatenated (rank 0 first)."""
    bounds = _ints(cu_seqlens)
    local = x.shape[0] // cp_size
    ranks = [x[r * local : (r + 1) * local] for r in range(cp_size)]
    pieces = []
    for s, e in pairwise(bounds):
        if e > s:
            ls, le = s // cp_size, e // cp_size
            doc = torch.cat([ranks[r][ls:le] for r in range(cp_size)], 0)
            pieces.append(zigzag_unshard_reference(doc, cp_size, 0))
    return _cat(pieces, x, 0)
