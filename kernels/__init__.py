"""Triton kernels with plain-torch references: MoE token permutation and zigzag context-parallel sharding.

Every op takes ``backend="auto"`` (Triton on CUDA tensors, the torch reference elsewhere), ``"triton"``
(forces the kernels; on CPU needs ``TRITON_INTERPRET=1`` before import) or ``"torch"``. No dependency on
``mimo_titan``.
"""

from kernels.permute import permute_tokens, unpermute_tokens
from kernels.sort_chunks import sort_chunks_by_index
from kernels.zigzag import (
    pad_cu_seqlens,
    zigzag_position_ids,
    zigzag_shard,
    zigzag_shard_thd,
    zigzag_unshard,
    zigzag_unshard_thd,
)

__all__ = [
    "pad_cu_seqlens",
    "permute_tokens",
    "sort_chunks_by_index",
    "unpermute_tokens",
    "zigzag_position_ids",
    "zigzag_shard",
    "zigzag_shard_thd",
    "zigzag_unshard",
    "zigzag_unshard_thd",
]
