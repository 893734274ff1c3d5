"""Triton kernels with plain-torch references: MoE token permutation and zigzag context-parallel sharding.

Every op takes ``backend=None`` (the process-wide choice: ``MIMO_TITAN_KERNELS``, then :func:`set_backend`, then
``"auto"``), ``"auto"`` (Triton on CUDA tensors, the torch reference elsewhere), ``"triton"`` (forces the
kernels; on CPU they run in Triton's interpreter, ``TRITON_INTERPRET=1`` before import) or ``"torch"``. See
:mod:`kernels._backend`. No dependency on ``mimo_titan``.
"""

# first: with MIMO_TITAN_KERNELS=triton on a CPU machine this turns the interpreter on before any kernel exists
from kernels._backend import (
    BACKENDS,
    ENV_VAR,
    check_backend,
    dispatch_counts,
    get_backend,
    interpreter_active,
    reset_dispatch_counts,
    set_backend,
)
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
    "BACKENDS",
    "ENV_VAR",
    "check_backend",
    "dispatch_counts",
    "get_backend",
    "interpreter_active",
    "reset_dispatch_counts",
    "set_backend",
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
