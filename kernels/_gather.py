"""A generic Triton row gather along one dimension, with autograd.

Every op in :mod:`kernels.zigzag` and :mod:`kernels.sort_chunks` is a *row gather*: an index map ``idx`` of
length ``R`` picks, for each output row ``r``, the input row ``idx[r]`` along one dimension. The tensor is
viewed as ``[B, S, H]`` (``B`` = product of the dims before ``dim``, ``S`` = ``x.shape[dim]``, ``H`` = product
of the dims after it), and the kernel computes::

    out[b, r, :] = x[b, idx[r], :]    if 0 <= idx[r] < S
    out[b, r, :] = 0                  otherwise (e.g. idx[r] == -1)

Out-of-range entries give zero rows, which is what the backward of a *selection* needs: the gradient of
``out = x[idx]`` is ``grad_x = grad_out[inverse_index(idx, S)]``, where rows of ``x`` that were not selected
map to ``-1`` and receive zeros. So the backward is the same gather kernel (one pass that writes every
element of ``grad_x`` once, instead of zero-filling and then scattering), and double backward works too.

The kernel is a pure copy: elements are moved as same-width integers (``bf16`` is copied as ``int16``), so it
is bit-exact for every dtype of element size 1, 2, 4 or 8 bytes, and it never does arithmetic in low
precision. Bytes moved: ``2 * B * R * H * itemsize`` (each output element is read once and written once;
zero rows are only written) plus the ``8 * R`` bytes of the index.

Grid: output rows are flattened over ``(batch, row)`` (``B * R`` of them, so one tile may span batches and
a small problem is one program) and cut into ``[BLOCK_R, BLOCK_H]`` tiles, enumerated on a 1-D grid (so no
grid axis can exceed CUDA's 65535 limit). The input may have any strides (a non-contiguous ``[B, S, H]``
view is read in place; ``reshape`` copies only when the trailing dims cannot be merged); the output is
contiguous. Tiles are small on CUDA (about 4K elements) and large under ``TRITON_INTERPRET=1``, where every
program instance costs milliseconds of Python.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

__all__ = ["gather_rows", "inverse_index"]

_BITS_DTYPE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@triton.jit
def _gather_rows_kernel(
    src_ptr,
    dst_ptr,
    idx_ptr,
    S,
    R,
    H,
    n_rows,
    stride_sb,
    stride_ss,
    stride_sh,
    n_hblocks,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # Output rows are flattened over (batch, row): row q is batch q // R, index-map entry q % R. So a tile can
    # span batches and small problems need one program.
    pid = tl.program_id(0)
    pid_r = pid // n_hblocks
    pid_h = pid % n_hblocks

    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    batch = rows // R
    src_rows = tl.load(idx_ptr + (rows - batch * R), mask=row_ok, other=-1).to(tl.int64)
    valid = row_ok & (src_rows >= 0) & (src_rows < S)
    # (where() on the row index, not on the whole offset, keeps the loads vectorizable on Triton 3.9)
    src_row_off = batch.to(tl.int64) * stride_sb + tl.where(valid, src_rows, 0) * stride_ss
    dst_row_off = rows.to(tl.int64) * H

    cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < H
    vals = tl.load(
        src_ptr + (src_row_off[:, None] + cols.to(tl.int64)[None, :] * stride_sh),
        mask=valid[:, None] & col_ok[None, :],
        other=0,
    )
    tl.store(dst_ptr + (dst_row_off[:, None] + cols[None, :]), vals, mask=row_ok[:, None] & col_ok[None, :])


def _block_sizes(R: int, H: int, on_cuda: bool) -> tuple[int, int, int]:
    """``(BLOCK_R, BLOCK_H, num_warps)``: ~4K-element tiles on CUDA, ~64K-element tiles in the interpreter."""
    h_cap, elems = (1024, 4096) if on_cuda else (8192, 65536)
    block_h = min(triton.next_power_of_2(max(H, 1)), h_cap)
    block_r = min(triton.next_power_of_2(max(R, 1)), max(1, elems // block_h))
    num_warps = 8 if block_r * block_h >= 4096 else 4
    return block_r, block_h, num_warps


def _launch(x3: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Run the kernel on a ``[B, S, H]`` (any strides) tensor; returns a contiguous ``[B, len(idx), H]``."""
    B, S, H = x3.shape
    R = idx.numel()
    out = torch.empty((B, R, H), dtype=x3.dtype, device=x3.device)
    if out.numel() == 0:
        return out
    if S == 0:  # nothing to read: every index is out of range
        return out.zero_()
    itemsize = x3.element_size()
    if itemsize not in _BITS_DTYPE:
        raise TypeError(f"gather_rows: unsupported dtype {x3.dtype} (element size {itemsize} bytes)")
    bits = _BITS_DTYPE[itemsize]
    src = x3.view(bits) if x3.dtype != bits else x3
    dst = out.view(bits) if out.dtype != bits else out
    n_rows = B * R
    block_r, block_h, num_warps = _block_sizes(n_rows, H, x3.is_cuda)
    n_hblocks = triton.cdiv(H, block_h)
    grid = (triton.cdiv(n_rows, block_r) * n_hblocks,)
    _gather_rows_kernel[grid](
        src,
        dst,
        idx,
        S,
        R,
        H,
        n_rows,
        src.stride(0),
        src.stride(1),
        src.stride(2),
        n_hblocks,
        BLOCK_R=block_r,
        BLOCK_H=block_h,
        num_warps=num_warps,
    )
    return out


def inverse_index(idx: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of a (partial) injective index map, computed on ``idx``'s device without a host sync.

    Args:
        idx: int64 ``[R]``; entries in ``[0, n)`` are distinct, other entries (e.g. ``-1``) are ignored.
        n: the number of source rows.

    Returns:
        int64 ``[n]`` ``inv`` with ``inv[idx[r]] = r`` and ``-1`` for rows that no ``idx[r]`` names.

    Example:
        ``inverse_index(tensor([3, 0, -1]), 4)`` is ``tensor([1, -1, -1, 0])``.
    """
    inv = torch.full((n + 1,), -1, dtype=torch.int64, device=idx.device)
    if idx.numel():
        target = torch.where((idx >= 0) & (idx < n), idx, n)  # invalid entries land in the dump slot n
        inv.scatter_(0, target, torch.arange(idx.numel(), dtype=torch.int64, device=idx.device))
    return inv[:n]


class _GatherRows(torch.autograd.Function):
    """``[B, S, H] -> [B, R, H]`` gather; its backward is the gather with the inverse map (and vice versa)."""

    @staticmethod
    def forward(ctx, x3: torch.Tensor, idx: torch.Tensor, inv: torch.Tensor | None):
        ctx.save_for_backward(idx, inv)
        ctx.n_src = x3.shape[1]
        return _launch(x3, idx)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        idx, inv = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        if inv is None:
            inv = inverse_index(idx, ctx.n_src)
        # ``idx`` is the inverse of ``inv`` (entries out of range act as -1 in both), for double backward
        return _GatherRows.apply(grad, inv, idx), None, None


def gather_rows(
    x: torch.Tensor, idx: torch.Tensor, dim: int = 0, *, inverse: torch.Tensor | None = None
) -> torch.Tensor:
    """Triton gather of slices of ``x`` along ``dim``: ``out.select(dim, r) = x.select(dim, idx[r])``.

    Entries of ``idx`` outside ``[0, x.shape[dim])`` (e.g. ``-1``) give zero slices. Differentiable with respect
    to ``x`` (the backward is the same kernel with :func:`inverse_index`, so ``idx`` must not repeat a valid
    entry when gradients are needed). Launches the Triton kernel whatever the device (CPU needs
    ``TRITON_INTERPRET=1``); backend selection is the caller's job.

    Args:
        x: ``[..., S, ...]`` any dtype of element size 1, 2, 4 or 8 bytes, any strides.
        idx: integer ``[R]`` index map (moved to ``x.device`` as int64 if needed). Not modified.
        dim: the gathered dimension (negative counts from the end).
        inverse: optional precomputed ``inverse_index(idx, x.shape[dim])`` for the backward (e.g. cached by
            the caller); computed in the backward when omitted.

    Returns:
        A new contiguous tensor shaped like ``x`` with ``R`` at ``dim``.

    Raises:
        ValueError: ``dim`` out of range or ``idx`` not 1-D.
        TypeError: unsupported element size.
    """
    if x.dim() == 0:
        raise ValueError("gather_rows needs a tensor with at least one dimension")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim={dim} out of range for a {x.dim()}-D tensor")
    if idx.dim() != 1:
        raise ValueError(f"idx must be 1-D, got shape {tuple(idx.shape)}")
    dim = dim % x.dim()
    idx = idx.to(device=x.device, dtype=torch.int64).contiguous()
    if inverse is not None:
        inverse = inverse.to(device=x.device, dtype=torch.int64).contiguous()
    shape = x.shape
    B = math.prod(shape[:dim])
    H = math.prod(shape[dim + 1 :])
    out3 = _GatherRows.apply(x.reshape(B, shape[dim], H), idx, inverse)
    return out3.view(*shape[:dim], idx.numel(), *shape[dim + 1 :])
