"""Zigzag sharding of the sequence dimension for context parallelism (causal ring attention).

With causal attention, query ``i`` attends to ``i + 1`` keys, so cutting a sequence into ``cp_size``
contiguous pieces gives the last rank far more work than the first. Zigzag load balancing cuts it into
``2 * cp_size`` equal chunks instead and gives rank ``r`` chunks ``r`` and ``2 * cp_size - 1 - r``: one cheap
chunk from the front and one expensive chunk from the back, so every rank does the same attention work.

Worked example (``S = 8``, ``cp_size = 2``, so 4 chunks of 2 positions)::

    positions   0 1 | 2 3 | 4 5 | 6 7
    chunk         0     1     2     3
    rank 0 keeps chunks 0 and 3 -> positions [0, 1, 6, 7]
    rank 1 keeps chunks 1 and 2 -> positions [2, 3, 4, 5]

With ``cp_size = 4`` and ``S = 16`` (8 chunks of 2), rank 1 keeps chunks 1 and 6: positions
``[2, 3, 12, 13]``. In general rank ``r``'s local row ``j`` (``c = S / (2 * cp_size)``) is global position
``r * c + j`` for ``j < c`` and ``(2 * cp_size - 1 - r) * c + (j - c)`` otherwise. ``zigzag_unshard`` inverts
this: global chunk ``k`` lives on rank ``k`` (first half of its shard) if ``k < cp_size``, else on rank
``2 * cp_size - 1 - k`` (second half).

Packed sequences (THD layout: tokens of several documents concatenated, boundaries in ``cu_seqlens``) are
split per document, so that attention inside each document stays balanced: every document's length must be
divisible by ``2 * cp_size`` (pad with :func:`pad_cu_seqlens`), and the local tokens are the documents'
zigzag shards, document after document; the local ``cu_seqlens`` is ``cu_seqlens // cp_size``.

All ops are row gathers along the sequence dim, run by the Triton kernel of :mod:`kernels._gather`. Index
maps are built with a few small torch ops on the tensor's device, without host syncs (except the single
validation sync of the THD ops on device-resident ``cu_seqlens``); BSHD maps are cached (see "index maps"). A
gather reads and writes each kept element once: ``2 * numel(out) * itemsize`` bytes. Backwards are gathers
with the inverse map (zeros for the positions a rank does not keep).

Sources: zigzag load balancing for causal ring attention (Zhu, "zigzag ring attention" in
``ring-flash-attention``), as used by Megatron-LM context parallelism and TransformerEngine's
``get_batch_on_this_cp_rank``; the per-document THD split follows TransformerEngine's
``thd_get_partitioned_indices``. This is an independent implementation.
"""

from __future__ import annotations

import functools

import torch

from . import reference_cp as ref
from ._backend import use_triton
from ._gather import gather_rows, inverse_index

__all__ = [
    "pad_cu_seqlens",
    "zigzag_position_ids",
    "zigzag_shard",
    "zigzag_shard_thd",
    "zigzag_unshard",
    "zigzag_unshard_thd",
]


# ----------------------------------------------------------------------------------------------- validation


def _check_cp(cp_size: int, cp_rank: int | None = None) -> None:
    if not isinstance(cp_size, int) or isinstance(cp_size, bool) or cp_size < 1:
        raise ValueError(f"cp_size must be a positive int, got {cp_size!r}")
    if cp_rank is not None and (not isinstance(cp_rank, int) or not 0 <= cp_rank < cp_size):
        raise ValueError(f"cp_rank must be an int in [0, {cp_size}), got {cp_rank!r}")


def _seq_dim(x: torch.Tensor, seq_dim: int) -> int:
    if x.dim() == 0 or not -x.dim() <= seq_dim < x.dim():
        raise ValueError(f"seq_dim={seq_dim} out of range for a tensor of shape {tuple(x.shape)}")
    return seq_dim % x.dim()


def _check_divisible(S: int, cp_size: int, what: str) -> None:
    if S % (2 * cp_size):
        raise ValueError(
            f"{what} {S} is not divisible by 2 * cp_size = {2 * cp_size} (zigzag uses 2 * cp_size equal chunks)"
        )


def _check_cu_seqlens(cu_seqlens: torch.Tensor, T: int | None, multiple: int) -> None:
    """Validate ``cu_seqlens`` with one host sync: 1-D integer, starts at 0, non-decreasing, ends at ``T``
    (if given), every document length divisible by ``multiple``."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() == 0:
        raise ValueError("cu_seqlens must be a non-empty 1-D tensor [num_docs + 1]")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    cu = cu_seqlens.to(torch.int64)
    lengths = cu[1:] - cu[:-1]
    bad = lengths % multiple != 0
    first_bad = torch.argmax(bad.to(torch.int32)) if lengths.numel() else cu.new_zeros(())
    zero = cu.new_zeros(())
    summary = torch.stack(
        [
            cu[0],
            cu[-1],
            (lengths < 0).any().to(torch.int64) if lengths.numel() else zero,
            bad.any().to(torch.int64) if lengths.numel() else zero,
            first_bad.to(torch.int64),
            lengths[first_bad] if lengths.numel() else zero,
        ]
    ).tolist()  # the one host sync
    start, end, negative, any_bad, doc, length = (int(v) for v in summary)
    if start != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {start}")
    if negative:
        raise ValueError("cu_seqlens must be non-decreasing (document lengths >= 0)")
    if T is not None and end != T:
        raise ValueError(f"cu_seqlens[-1] = {end} but x has {T} tokens")
    if any_bad:
        raise ValueError(
            f"document {doc} has length {length}, not divisible by 2 * cp_size = {multiple}; pad every document "
            f"to a multiple of {multiple} first (see kernels.zigzag.pad_cu_seqlens)"
        )


# ----------------------------------------------------------------------------------------------- index maps


def _shard_index(S: int, cp_size: int, cp_rank: int, device) -> torch.Tensor:
    """int64 ``[S / cp_size]``: global positions of rank ``cp_rank``'s zigzag shard."""
    c = S // (2 * cp_size)
    j = torch.arange(2 * c, dtype=torch.int64, device=device)
    second = j >= c
    chunk = torch.where(second, 2 * cp_size - 1 - cp_rank, cp_rank)
    return chunk * c + j - second * c


def _unshard_index(S: int, cp_size: int, device) -> torch.Tensor:
    """int64 ``[S]``: for each global position, its row in the concatenation of all ranks' shards."""
    n = 2 * cp_size
    c = S // n
    p = torch.arange(S, dtype=torch.int64, device=device)
    if S == 0:
        return p
    k, o = p // c, p % c
    second = k >= cp_size
    rank = torch.where(second, n - 1 - k, k)
    return rank * 2 * c + second * c + o


def _thd_shard_index(cu: torch.Tensor, T: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """int64 ``[T / cp_size]``: global token of each local token (``cu``: int64 on the target device)."""
    n = 2 * cp_size
    t = torch.arange(T // cp_size, dtype=torch.int64, device=cu.device)
    if t.numel() == 0:
        return t
    lcu = cu // cp_size
    num_docs = cu.numel() - 1
    doc = torch.searchsorted(lcu[1:], t, right=True).clamp_(max=num_docs - 1)  # skips empty documents
    j = t - lcu[doc]
    c = (cu[doc + 1] - cu[doc]) // n
    second = j >= c
    chunk = torch.where(second, n - 1 - cp_rank, cp_rank)
    return cu[doc] + chunk * c + j - second * c


def _thd_unshard_index(cu: torch.Tensor, T: int, cp_size: int) -> torch.Tensor:
    """int64 ``[T]``: for each global token, its row in all ranks' local tokens concatenated."""
    n = 2 * cp_size
    g = torch.arange(T, dtype=torch.int64, device=cu.device)
    if T == 0:
        return g
    num_docs = cu.numel() - 1
    doc = torch.searchsorted(cu[1:], g, right=True).clamp_(max=num_docs - 1)
    o = g - cu[doc]
    c = (cu[doc + 1] - cu[doc]) // n  # > 0 for every token's document
    k = o // c
    second = k >= cp_size
    rank = torch.where(second, n - 1 - k, k)
    return rank * (T // cp_size) + cu[doc] // cp_size + second * c + o % c


# ----------------------------------------------------------------------------------------------- index maps
#
# BSHD maps (and their inverses, for the backward) depend only on (S, cp_size, rank, device) and are cached;
# THD maps are rebuilt per call (a few small ops, plus one validation of ``cu_seqlens``, which costs a device
# sync only when ``cu_seqlens`` lives on the GPU).


@functools.lru_cache(maxsize=16)
def _bshd_maps(kind: str, S: int, cp_size: int, cp_rank: int, device: torch.device):
    idx = _shard_index(S, cp_size, cp_rank, device) if kind == "shard" else _unshard_index(S, cp_size, device)
    return idx, inverse_index(idx, S)


def _thd_maps(kind: str, cu_seqlens: torch.Tensor, T: int, cp_size: int, cp_rank: int, device: torch.device):
    """Validated ``(idx, inverse)`` for a THD shard (``kind="shard"``) or unshard."""
    _check_cu_seqlens(cu_seqlens, T, 2 * cp_size)
    cu = cu_seqlens.to(device=device, dtype=torch.int64, non_blocking=True)
    idx = _thd_shard_index(cu, T, cp_size, cp_rank) if kind == "shard" else _thd_unshard_index(cu, T, cp_size)
    return idx, inverse_index(idx, T)


# ----------------------------------------------------------------------------------------------- public ops


def zigzag_position_ids(seq_len: int, cp_size: int, cp_rank: int, device=None) -> torch.Tensor:
    """Global positions of the tokens in rank ``cp_rank``'s zigzag shard (e.g. for RoPE).

    Args:
        seq_len: the full sequence length ``S`` (divisible by ``2 * cp_size``).
        cp_size: context-parallel world size.
        cp_rank: this rank, in ``[0, cp_size)``.
        device: where to build the result.

    Returns:
        int64 ``[S / cp_size]``; e.g. ``zigzag_position_ids(8, 2, 0)`` is ``[0, 1, 6, 7]`` and
        ``zigzag_position_ids(8, 2, 1)`` is ``[2, 3, 4, 5]``.

    Raises:
        ValueError: bad ``cp_size``/``cp_rank``, or ``seq_len`` not divisible by ``2 * cp_size``.
    """
    _check_cp(cp_size, cp_rank)
    _check_divisible(int(seq_len), cp_size, "sequence length")
    return _shard_index(int(seq_len), cp_size, cp_rank, device)


def zigzag_shard(
    x: torch.Tensor, cp_size: int, cp_rank: int, seq_dim: int, *, backend: str | None = None
) -> torch.Tensor:
    """Keep rank ``cp_rank``'s zigzag shard of the sequence dim: chunks ``cp_rank`` and ``2*cp_size-1-cp_rank``.

    The sequence dim is viewed as ``2 * cp_size`` equal chunks of ``c = S / (2 * cp_size)`` positions; the
    result is the two kept chunks concatenated in that order (see the module docstring for a worked example).

    Args:
        x: any shape, e.g. BSHD (``seq_dim=1``) or SBHD (``seq_dim=0``); any dtype, any strides.
        cp_size: context-parallel world size (>= 1).
        cp_rank: this rank, in ``[0, cp_size)``.
        seq_dim: the sequence dim (negative counts from the end).
        backend: None (the process-wide choice, :func:`kernels.get_backend`), ``"auto"`` (Triton on CUDA, else
            torch), ``"triton"`` or ``"torch"``.

    Returns:
        A new contiguous tensor shaped like ``x`` with ``S / cp_size`` at ``seq_dim``. Differentiable with
        respect to ``x`` (the gradient is zero at the positions this rank does not keep).

    Raises:
        ValueError: ``S`` not divisible by ``2 * cp_size``, bad ``cp_size``/``cp_rank``/``seq_dim``/backend.
    """
    _check_cp(cp_size, cp_rank)
    dim = _seq_dim(x, seq_dim)
    S = x.shape[dim]
    _check_divisible(S, cp_size, f"sequence length (x.shape[{dim}] of {tuple(x.shape)})")
    if not use_triton(backend, x):
        return ref.zigzag_shard_reference(x, cp_size, cp_rank, dim)
    idx, inv = _bshd_maps("shard", S, cp_size, cp_rank, x.device)
    return gather_rows(x, idx, dim, inverse=inv)


def zigzag_unshard(x: torch.Tensor, cp_size: int, seq_dim: int, *, backend: str | None = None) -> torch.Tensor:
    """Restore the global sequence order from all ranks' zigzag shards concatenated along ``seq_dim``.

    ``zigzag_unshard(torch.cat([zigzag_shard(x, cp, r, d) for r in range(cp)], d), cp, d)`` equals ``x``.

    Args:
        x: the concatenation (rank 0's shard first) along ``seq_dim`` of length ``S``; any dtype and strides.
        cp_size: context-parallel world size (>= 1).
        seq_dim: the sequence dim (negative counts from the end).
        backend: None (process-wide), ``"auto"``, ``"triton"`` or ``"torch"``.

    Returns:
        A new contiguous tensor of ``x``'s shape in global order. Differentiable with respect to ``x``.

    Raises:
        ValueError: ``S`` not divisible by ``2 * cp_size``, bad ``cp_size``/``seq_dim``/backend.
    """
    _check_cp(cp_size)
    dim = _seq_dim(x, seq_dim)
    S = x.shape[dim]
    _check_divisible(S, cp_size, f"sequence length (x.shape[{dim}] of {tuple(x.shape)})")
    if not use_triton(backend, x):
        return ref.zigzag_unshard_reference(x, cp_size, dim)
    idx, inv = _bshd_maps("unshard", S, cp_size, 0, x.device)
    return gather_rows(x, idx, dim, inverse=inv)


def zigzag_shard_thd(
    x: torch.Tensor, cu_seqlens: torch.Tensor, cp_size: int, cp_rank: int, *, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zigzag-shard every document of a packed (THD) batch separately.

    Each document ``d`` (tokens ``cu_seqlens[d]:cu_seqlens[d+1]``) is cut into ``2 * cp_size`` equal chunks
    and this rank keeps chunks ``cp_rank`` and ``2 * cp_size - 1 - cp_rank``. Local tokens are ordered
    document by document, each document's two chunks in order.

    Example (``cp_size = 2``, ``cu_seqlens = [0, 4, 4, 12]``: documents of 4, 0 and 8 tokens)::

        rank 0: tokens [0, 3, 4, 5, 10, 11]  local cu_seqlens [0, 2, 2, 6]
        rank 1: tokens [1, 2, 6, 7, 8, 9]    local cu_seqlens [0, 2, 2, 6]

    Args:
        x: ``[T, ...]`` packed tokens (tokens first), any dtype and strides.
        cu_seqlens: int32/int64 ``[D + 1]``: 0, then cumulative document lengths; the last entry is ``T``.
            May live on another device than ``x``. Validating it costs one host sync when it is on CUDA (keep it
            on the CPU, as the collator makes it, to avoid that).
        cp_size: context-parallel world size (>= 1).
        cp_rank: this rank, in ``[0, cp_size)``.
        backend: None (process-wide), ``"auto"``, ``"triton"`` or ``"torch"``.

    Returns:
        ``(local_x [T / cp_size, ...], local_cu_seqlens [D + 1])``; ``local_cu_seqlens = cu_seqlens // cp_size``
        keeps ``cu_seqlens``'s dtype and device. ``local_x`` is differentiable with respect to ``x``.

    Raises:
        ValueError: a document length not divisible by ``2 * cp_size`` (naming the document and its length;
            pad with :func:`pad_cu_seqlens`), malformed ``cu_seqlens``, ``cu_seqlens[-1] != T``, bad
            ``cp_size``/``cp_rank``/backend.
    """
    _check_cp(cp_size, cp_rank)
    if x.dim() == 0:
        raise ValueError("x must be [T, ...] with tokens first")
    T = x.shape[0]
    if not use_triton(backend, x, cu_seqlens):
        _check_cu_seqlens(cu_seqlens, T, 2 * cp_size)
        return ref.zigzag_shard_thd_reference(x, cu_seqlens, cp_size, cp_rank)[0], cu_seqlens // cp_size
    idx, inv = _thd_maps("shard", cu_seqlens, T, cp_size, cp_rank, x.device)
    return gather_rows(x, idx, 0, inverse=inv), cu_seqlens // cp_size


def zigzag_unshard_thd(
    x: torch.Tensor, cu_seqlens: torch.Tensor, cp_size: int, *, backend: str | None = None
) -> torch.Tensor:
    """Inverse of :func:`zigzag_shard_thd`: global token order from all ranks' local tokens concatenated.

    Args:
        x: ``[T, ...]``: rank 0's ``T / cp_size`` local tokens, then rank 1's, ...
        cu_seqlens: the *global* int32/int64 ``[D + 1]`` boundaries (as passed to ``zigzag_shard_thd``).
        cp_size: context-parallel world size (>= 1).
        backend: None (process-wide), ``"auto"``, ``"triton"`` or ``"torch"``.

    Returns:
        ``[T, ...]`` in global order, differentiable with respect to ``x``.

    Raises:
        ValueError: as :func:`zigzag_shard_thd`.
    """
    _check_cp(cp_size)
    if x.dim() == 0:
        raise ValueError("x must be [T, ...] with tokens first")
    T = x.shape[0]
    if not use_triton(backend, x, cu_seqlens):
        _check_cu_seqlens(cu_seqlens, T, 2 * cp_size)
        return ref.zigzag_unshard_thd_reference(x, cu_seqlens, cp_size)
    idx, inv = _thd_maps("unshard", cu_seqlens, T, cp_size, 0, x.device)
    return gather_rows(x, idx, 0, inverse=inv)


def pad_cu_seqlens(cu_seqlens: torch.Tensor, multiple: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round every document length up to a multiple of ``multiple`` (e.g. ``2 * cp_size`` for THD zigzag).

    Example (``multiple = 4``)::

        cu_seqlens        = [0, 3, 3, 8]            # documents of 3, 0 and 5 tokens
        padded_cu_seqlens = [0, 4, 4, 12]           # lengths 4, 0, 8
        pad_index         = [0, 1, 2, 4, 5, 6, 7, 8]

    A collator scatters the tokens into a zero-padded buffer::

        padded = x.new_zeros(int(padded_cu_seqlens[-1]), *x.shape[1:])
        padded[pad_index] = x                       # or padded.index_copy_(0, pad_index, x)

    and recovers them with ``padded[pad_index]``.

    Args:
        cu_seqlens: int32/int64 ``[D + 1]``, starting at 0 and non-decreasing.
        multiple: the length multiple (>= 1).

    Returns:
        ``(padded_cu_seqlens, pad_index)``: ``padded_cu_seqlens`` has ``cu_seqlens``'s dtype and device;
        ``pad_index`` is int64 ``[T]`` (``T = cu_seqlens[-1]``), the padded position of each original token.
        Computing ``pad_index`` costs a host sync when ``cu_seqlens`` is on CUDA (its length is ``T``).

    Raises:
        ValueError: ``multiple < 1`` or malformed ``cu_seqlens``.
    """
    if not isinstance(multiple, int) or isinstance(multiple, bool) or multiple < 1:
        raise ValueError(f"multiple must be a positive int, got {multiple!r}")
    _check_cu_seqlens(cu_seqlens, None, 1)
    cu = cu_seqlens.to(torch.int64)
    lengths = cu[1:] - cu[:-1]
    padded_lengths = (lengths + multiple - 1) // multiple * multiple
    padded_cu = torch.cat([cu[:1], cu[:1] + torch.cumsum(padded_lengths, 0)])
    T = int(cu[-1])
    shift = padded_cu[:-1] - cu[:-1]  # per document: padded start - original start
    pad_index = torch.repeat_interleave(shift, lengths, output_size=T) + torch.arange(T, device=cu.device)
    return padded_cu.to(cu_seqlens.dtype), pad_index
