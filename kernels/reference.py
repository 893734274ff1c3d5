"""Plain-torch references for the MoE permutation ops: the CPU fallback and the tests' oracle.

Method: Megatron-LM ``moe_utils.permute`` / ``unpermute`` (dropless: argsort of the expert ids, index_select,
scatter_add), written here from the op definitions in :mod:`kernels.permute`.
"""

from __future__ import annotations

import torch

__all__ = ["routing_map_ref", "permute_tokens_ref", "unpermute_tokens_ref"]


def routing_map_ref(topk_ids: torch.Tensor, num_experts: int, align: int = 1):
    """``(row_map [T, K] int64, tokens_per_expert [E] int64, n_rows)`` of the dropless, expert-major order.

    Rows are grouped by expert ascending and, inside an expert, by flat index ``t * K + k`` ascending (token
    order); each expert's group is padded to a multiple of ``align`` rows.
    """
    T, K = topk_ids.shape
    flat = topk_ids.reshape(-1).long()
    counts = torch.bincount(flat, minlength=num_experts)[:num_experts]
    padded = (counts + align - 1) // align * align
    offsets = torch.cumsum(padded, 0) - padded
    order = torch.argsort(flat, stable=True)
    sorted_e = flat[order]
    start_unpadded = torch.cumsum(counts, 0) - counts
    rows_sorted = offsets[sorted_e] + torch.arange(flat.numel(), device=flat.device) - start_unpadded[sorted_e]
    row_map = torch.empty_like(flat)
    row_map[order] = rows_sorted
    return row_map.view(T, K), padded, int(padded.sum())


def permute_tokens_ref(tokens, topk_ids, num_experts, probs=None, align=1):
    """Reference of :func:`kernels.permute_tokens` (same contract; autograd through torch ops)."""
    T, K = topk_ids.shape
    row_map, tokens_per_expert, n = routing_map_ref(topk_ids, num_experts, align)
    flat_rows = row_map.reshape(-1)
    src = tokens.index_select(0, torch.arange(T, device=tokens.device).repeat_interleave(K))
    permuted = tokens.new_zeros(n, tokens.shape[1]).index_copy(0, flat_rows, src)
    permuted_probs = None
    if probs is not None:
        permuted_probs = probs.new_zeros(n).index_copy(0, flat_rows, probs.reshape(-1))
    return permuted, permuted_probs, row_map.to(torch.int32), tokens_per_expert


def unpermute_tokens_ref(permuted, row_map, probs=None):
    """Reference of :func:`kernels.unpermute_tokens`: fp32 scatter_add of (weighted) rows, cast back."""
    T, K = row_map.shape
    rows = permuted.index_select(0, row_map.reshape(-1).long()).float()
    if probs is not None:
        rows = rows * probs.reshape(-1, 1).float()
    index = torch.arange(T, device=permuted.device).repeat_interleave(K).unsqueeze(1).expand(-1, permuted.shape[1])
    out = torch.zeros(T, permuted.shape[1], dtype=torch.float32, device=permuted.device).scatter_add(0, index, rows)
    return out.to(permuted.dtype)
