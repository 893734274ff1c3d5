"""MoE token permutation (tokens → expert-major rows) and unpermutation (weighted sum back), in Triton.

Definitions (Megatron-LM's dropless ``permute`` / ``unpermute``):

- ``permute_tokens``: every token ``t`` has K expert choices ``topk_ids[t, k]``. Its K copies go to rows of
  ``permuted`` grouped by expert ascending and, inside an expert, by token index ascending. ``row_map[t, k]``
  is the row of copy k. With ``align > 1`` each expert's group is padded with zero rows to a multiple of
  ``align`` (grouped-GEMM friendly) and ``tokens_per_expert`` counts the padded rows.
- ``unpermute_tokens``: ``out[t] = Σ_k probs[t, k] · permuted[row_map[t, k]]`` accumulated in fp32.

Kernels (``[BLOCK_T, BLOCK_H]`` tiles):

- ``_block_hist_kernel`` + ``_block_rank_kernel``: the routing map in two block-parallel passes over the flat
  ``[T·K]`` expert ids (per-block expert histograms; then each entry's row = its expert's offset + the entries of
  that expert in earlier blocks + its rank inside its own block). Stable and deterministic, no atomics, no host
  sync (except to size the output when ``align > 1``).
- ``_scatter_rows_kernel``: ``dst[row_map[t, k]] = w[t, k] · src[t]`` (permute forward with w = 1; unpermute
  backward with w = probs). Reads T·H, writes T·K·H elements.
- ``_gather_sum_kernel``: ``dst[t] = Σ_k w[t, k] · src[row_map[t, k]]`` in fp32 (unpermute forward; permute
  backward with w = 1).
- ``_row_dot_kernel``: ``g[t, k] = <grad_out[t], permuted[row_map[t, k]]>`` (probs gradient of unpermute).

Bytes moved (bf16): permute and unpermute each ``2 · T · H · (1 + K)``. Loop bounds (K, the number of H blocks)
are compile-time constants: the loops unroll, and Triton 3.6's interpreter cannot loop over a runtime int.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from kernels._backend import use_triton
from kernels.reference import permute_tokens_ref, unpermute_tokens_ref

__all__ = ["permute_tokens", "unpermute_tokens"]


# ----------------------------------------------------------------------------------------------- kernels
@triton.jit
def _block_hist_kernel(ids_ptr, cnt_ptr, TK, E, BLOCK: tl.constexpr, E_POW2: tl.constexpr):
    """cnt[b, e] = number of entries of flat block b routed to expert e."""
    b = tl.program_id(0)
    idx = b * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(ids_ptr + idx, mask=idx < TK, other=-1)
    experts = tl.arange(0, E_POW2)
    hist = tl.sum((ids[:, None] == experts[None, :]).to(tl.int32), axis=0)
    tl.store(cnt_ptr + b * E + experts, hist, mask=experts < E)


@triton.jit
def _block_rank_kernel(ids_ptr, base_ptr, row_map_ptr, TK, E, BLOCK: tl.constexpr):
    """row_map[i] = base[b, e_i] + #{j < i in block b : e_j = e_i} (stable rank inside the expert)."""
    b = tl.program_id(0)
    lane = tl.arange(0, BLOCK)
    idx = b * BLOCK + lane
    valid = idx < TK
    ids = tl.load(ids_ptr + idx, mask=valid, other=-1)
    valid = valid & (ids >= 0) & (ids < E)  # an out-of-range id must not read outside base (its row stays unset)
    same_earlier = (ids[:, None] == ids[None, :]) & (lane[None, :] < lane[:, None])
    rank = tl.sum(same_earlier.to(tl.int32), axis=1)
    base = tl.load(base_ptr + b * E + ids, mask=valid, other=0)
    tl.store(row_map_ptr + idx, base + rank, mask=valid)


@triton.jit
def _scatter_rows_kernel(
    src_ptr,
    dst_ptr,
    row_map_ptr,
    w_ptr,
    T,
    H,
    src_stride,
    dst_stride,
    K: tl.constexpr,
    HAS_W: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    tmask = t < T
    mask = tmask[:, None] & (h < H)[None, :]
    x = tl.load(src_ptr + t[:, None].to(tl.int64) * src_stride + h[None, :], mask=mask)
    for k in tl.static_range(K):
        rows = tl.load(row_map_ptr + t * K + k, mask=tmask, other=0).to(tl.int64)
        if HAS_W:
            w = tl.load(w_ptr + t * K + k, mask=tmask, other=0.0).to(tl.float32)
            val = (x.to(tl.float32) * w[:, None]).to(dst_ptr.dtype.element_ty)
        else:
            val = x
        tl.store(dst_ptr + rows[:, None] * dst_stride + h[None, :], val, mask=mask)


@triton.jit
def _gather_sum_kernel(
    src_ptr,
    dst_ptr,
    row_map_ptr,
    w_ptr,
    T,
    H,
    src_stride,
    dst_stride,
    K: tl.constexpr,
    HAS_W: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    tmask = t < T
    mask = tmask[:, None] & (h < H)[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
    for k in tl.static_range(K):
        rows = tl.load(row_map_ptr + t * K + k, mask=tmask, other=0).to(tl.int64)
        x = tl.load(src_ptr + rows[:, None] * src_stride + h[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_W:
            w = tl.load(w_ptr + t * K + k, mask=tmask, other=0.0).to(tl.float32)
            x = x * w[:, None]
        acc += x
    tl.store(dst_ptr + t[:, None].to(tl.int64) * dst_stride + h[None, :], acc.to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _row_dot_kernel(
    g_ptr,
    src_ptr,
    row_map_ptr,
    out_ptr,
    T,
    H,
    g_stride,
    src_stride,
    K: tl.constexpr,
    N_HBLOCKS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < T
    for k in tl.static_range(K):
        rows = tl.load(row_map_ptr + t * K + k, mask=tmask, other=0).to(tl.int64)
        acc = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for hb in range(N_HBLOCKS):
            h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
            mask = tmask[:, None] & (h < H)[None, :]
            g = tl.load(g_ptr + t[:, None].to(tl.int64) * g_stride + h[None, :], mask=mask, other=0.0).to(tl.float32)
            x = tl.load(src_ptr + rows[:, None] * src_stride + h[None, :], mask=mask, other=0.0).to(tl.float32)
            acc += tl.sum(g * x, axis=1)
        tl.store(out_ptr + t * K + k, acc, mask=tmask)


# ----------------------------------------------------------------------------------------------- launch helpers
def _tiles(T: int, H: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_H): small token blocks on GPU; few, large tiles in the CPU interpreter (~1 ms per program)."""
    if device.type == "cuda":
        return 4, min(1024, triton.next_power_of_2(max(H, 16)))
    return min(64, triton.next_power_of_2(max(T, 1))), min(4096, triton.next_power_of_2(max(H, 16)))


def _routing_block(TK: int, device: torch.device) -> int:
    """Entries per routing program: 128 on GPU (the rank pass is a [BLOCK, BLOCK] compare); one large block in
    the CPU interpreter."""
    return 128 if device.type == "cuda" else min(1024, triton.next_power_of_2(max(TK, 16)))


def _routing(topk_ids: torch.Tensor, num_experts: int, align: int):
    """Triton routing map: ``(row_map [T·K] int32, tokens_per_expert [E] int64, n_rows, pad_rows)``.

    Two block-parallel passes over the flat ids: per-block expert histograms, then (after a cumsum over blocks
    giving each block's first row per expert) each entry's stable rank inside its block and expert.
    """
    ids = topk_ids.reshape(-1).to(torch.int32).contiguous()
    TK = ids.numel()
    dev = ids.device
    E = num_experts
    if TK == 0:
        return ids, torch.zeros(E, dtype=torch.int64, device=dev), 0, None
    block = _routing_block(TK, dev)
    nblk = triton.cdiv(TK, block)
    cnt = torch.empty(nblk, E, dtype=torch.int32, device=dev)
    _block_hist_kernel[(nblk,)](ids, cnt, TK, E, BLOCK=block, E_POW2=triton.next_power_of_2(E))
    within = torch.cumsum(cnt, 0, dtype=torch.int32)
    counts = within[-1].long()
    padded = (counts + align - 1) // align * align if align > 1 else counts
    offsets = torch.cumsum(padded, 0) - padded
    base = (within - cnt + offsets.to(torch.int32)).contiguous()
    row_map = torch.empty(TK, dtype=torch.int32, device=dev)
    _block_rank_kernel[(nblk,)](ids, base, row_map, TK, E, BLOCK=block)
    n_rows = TK if align == 1 else int(padded.sum())
    pad_rows = None
    if align > 1 and n_rows > TK:
        pad = padded - counts
        starts = (offsets + counts).repeat_interleave(pad)
        within_pad = torch.arange(int(pad.sum()), device=dev) - (torch.cumsum(pad, 0) - pad).repeat_interleave(pad)
        pad_rows = starts + within_pad
    return row_map, padded, n_rows, pad_rows


def _scatter_rows(src, row_map, w, n_rows, K, pad_rows=None, zero_all=False):
    """``dst [n_rows, H]`` with ``dst[row_map[t, k]] = w[t, k] · src[t]``; rows nobody maps to are zeroed
    (``pad_rows`` when known, else every row first with ``zero_all``)."""
    T, H = src.shape
    dst = (torch.zeros if zero_all else torch.empty)(n_rows, H, dtype=src.dtype, device=src.device)
    if pad_rows is not None:
        dst.index_fill_(0, pad_rows, 0)
    if T and H:
        bt, bh = _tiles(T, H, src.device)
        _scatter_rows_kernel[(triton.cdiv(T, bt), triton.cdiv(H, bh))](
            src,
            dst,
            row_map,
            w if w is not None else src,
            T,
            H,
            src.stride(0),
            dst.stride(0),
            K=K,
            HAS_W=w is not None,
            BLOCK_T=bt,
            BLOCK_H=bh,
        )
    return dst


def _gather_sum(src, row_map, w, T, K):
    H = src.shape[1]
    dst = torch.empty(T, H, dtype=src.dtype, device=src.device)
    if T and H:
        bt, bh = _tiles(T, H, src.device)
        _gather_sum_kernel[(triton.cdiv(T, bt), triton.cdiv(H, bh))](
            src,
            dst,
            row_map,
            w if w is not None else src,
            T,
            H,
            src.stride(0),
            dst.stride(0),
            K=K,
            HAS_W=w is not None,
            BLOCK_T=bt,
            BLOCK_H=bh,
        )
    return dst


def _row_dot(g, src, row_map, T, K):
    out = torch.empty(T, K, dtype=torch.float32, device=g.device)
    H = g.shape[1]
    if T:
        bt, bh = _tiles(T, H, g.device)
        if g.device.type == "cuda":
            bt = 1
        _row_dot_kernel[(triton.cdiv(T, bt),)](
            g,
            src,
            row_map,
            out,
            T,
            H,
            g.stride(0),
            src.stride(0),
            K=K,
            N_HBLOCKS=triton.cdiv(H, bh),
            BLOCK_T=bt,
            BLOCK_H=bh,
        )
    return out


# ----------------------------------------------------------------------------------------------- autograd
class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, probs, row_map, n_rows, K, pad_rows):
        permuted = _scatter_rows(tokens, row_map, None, n_rows, K, pad_rows)
        permuted_probs = None
        if probs is not None:
            permuted_probs = probs.new_zeros(n_rows)
            permuted_probs[row_map.long()] = probs.reshape(-1)
        ctx.save_for_backward(row_map)
        ctx.K, ctx.T, ctx.has_probs = K, tokens.shape[0], probs is not None
        return permuted, permuted_probs

    @staticmethod
    @once_differentiable
    def backward(ctx, g_permuted, g_pprobs):
        (row_map,) = ctx.saved_tensors
        g_tokens = g_probs = None
        if ctx.needs_input_grad[0]:
            g_tokens = _gather_sum(g_permuted.contiguous(), row_map, None, ctx.T, ctx.K)
        if ctx.has_probs and ctx.needs_input_grad[1] and g_pprobs is not None:
            g_probs = g_pprobs[row_map.long()].view(ctx.T, ctx.K)
        return g_tokens, g_probs, None, None, None, None


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, permuted, row_map, probs, T, K):
        probs_c = probs.reshape(-1).contiguous() if probs is not None else None
        out = _gather_sum(permuted, row_map, probs_c, T, K)
        ctx.save_for_backward(permuted, row_map, probs_c)
        ctx.T, ctx.K, ctx.has_probs, ctx.probs_dtype = (
            T,
            K,
            probs is not None,
            probs.dtype if probs is not None else None,
        )
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g_out):
        permuted, row_map, probs_c = ctx.saved_tensors
        g_out = g_out.contiguous()
        g_permuted = g_probs = None
        if ctx.needs_input_grad[0]:  # rows no token maps to (padding, only when N > T·K) get zero gradient
            g_permuted = _scatter_rows(
                g_out, row_map, probs_c, permuted.shape[0], ctx.K, zero_all=permuted.shape[0] > ctx.T * ctx.K
            )
        if ctx.has_probs and ctx.needs_input_grad[2]:
            g_probs = _row_dot(g_out, permuted, row_map, ctx.T, ctx.K).to(ctx.probs_dtype)
        return g_permuted, None, g_probs, None, None


# ----------------------------------------------------------------------------------------------- public API
def _check_route_inputs(tokens, topk_ids, num_experts, probs, align):
    if tokens.dim() != 2 or topk_ids.dim() != 2 or tokens.shape[0] != topk_ids.shape[0]:
        raise ValueError(
            f"tokens must be [T, H] and topk_ids [T, K]; got {tuple(tokens.shape)} and {tuple(topk_ids.shape)}"
        )
    if probs is not None and probs.shape != topk_ids.shape:
        raise ValueError(f"probs must have topk_ids' shape {tuple(topk_ids.shape)}; got {tuple(probs.shape)}")
    if topk_ids.dtype.is_floating_point:
        raise ValueError(f"topk_ids must be an integer tensor; got {topk_ids.dtype}")
    if num_experts < 1 or align < 1:
        raise ValueError(f"num_experts ({num_experts}) and align ({align}) must be >= 1")
    if not topk_ids.is_cuda and topk_ids.numel():  # a cheap range check where it costs no device sync
        lo, hi = int(topk_ids.min()), int(topk_ids.max())
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"topk_ids must lie in [0, num_experts={num_experts}); found values in [{lo}, {hi}]")


def permute_tokens(
    tokens: torch.Tensor,
    topk_ids: torch.Tensor,
    num_experts: int,
    probs: torch.Tensor | None = None,
    align: int = 1,
    *,
    backend: str | None = None,
):
    """Group token copies by expert (Megatron's dropless order).

    Args:
        tokens: ``[T, H]`` fp32 / fp16 / bf16 (any strides).
        topk_ids: ``[T, K]`` integer expert ids in ``[0, num_experts)`` (K = 1..8; each token's ids distinct).
        num_experts: E (up to 256 tested).
        probs: optional ``[T, K]`` routing weights, carried along to ``permuted_probs``.
        align: pad each expert's group with zero rows to a multiple of ``align``.
        backend: None (the process-wide choice, :func:`kernels.get_backend`), ``"auto"`` (Triton on CUDA, torch
            elsewhere), ``"triton"`` or ``"torch"``.

    Returns:
        ``(permuted [N, H] tokens' dtype, permuted_probs [N] or None, row_map [T, K] int32,
        tokens_per_expert [E] int64)`` with ``N = Σ tokens_per_expert`` (``T·K`` when ``align == 1``).
        Gradients flow to ``tokens`` and ``probs``.

    Raises:
        ValueError: on shape / dtype mismatch, ``align < 1``, or (CPU inputs) expert ids out of range. On CUDA the
        range is not checked (it would cost a device sync).

    Example: topk_ids ``[[1, 0], [1, 2]]``, E = 3 → expert 0 gets (t0), expert 1 (t0, t1), expert 2 (t1):
    rows ``[t0, t0, t1, t1]``, row_map ``[[1, 0], [2, 3]]``, tokens_per_expert ``[1, 2, 1]``.
    """
    _check_route_inputs(tokens, topk_ids, num_experts, probs, align)
    if not use_triton(backend, tokens, topk_ids, probs):
        return permute_tokens_ref(tokens, topk_ids, num_experts, probs, align)
    T, K = topk_ids.shape
    tokens_c = tokens if tokens.stride(-1) == 1 else tokens.contiguous()
    row_map, per_expert, n_rows, pad_rows = _routing(topk_ids, num_experts, align)
    permuted, permuted_probs = _Permute.apply(tokens_c, probs, row_map, n_rows, K, pad_rows)
    return permuted, permuted_probs, row_map.view(T, K), per_expert


def unpermute_tokens(
    permuted: torch.Tensor, row_map: torch.Tensor, probs: torch.Tensor | None = None, *, backend: str | None = None
) -> torch.Tensor:
    """Weighted sum of each token's expert outputs: ``out[t] = Σ_k probs[t, k] · permuted[row_map[t, k]]``.

    Args:
        permuted: ``[N, H]`` fp32 / fp16 / bf16.
        row_map: ``[T, K]`` int rows of ``permuted`` (as returned by :func:`permute_tokens`).
        probs: optional ``[T, K]`` weights (None means 1).
        backend: see :func:`permute_tokens`.

    Returns:
        ``[T, H]`` in ``permuted``'s dtype, accumulated in fp32 (k ascending). Gradients flow to ``permuted``
        (rows that no token maps to get zero) and ``probs``.

    Raises:
        ValueError: on shape mismatch.
    """
    if permuted.dim() != 2 or row_map.dim() != 2 or (probs is not None and probs.shape != row_map.shape):
        raise ValueError(
            f"permuted must be [N, H], row_map [T, K] and probs [T, K]; got {tuple(permuted.shape)}, "
            f"{tuple(row_map.shape)}, {None if probs is None else tuple(probs.shape)}"
        )
    if not use_triton(backend, permuted, row_map, probs):
        return unpermute_tokens_ref(permuted, row_map, probs)
    T, K = row_map.shape
    permuted_c = permuted if permuted.stride(-1) == 1 else permuted.contiguous()
    return _Unpermute.apply(permuted_c, row_map.to(torch.int32).contiguous().view(-1), probs, T, K)
