"""Context parallelism (CP) for the language module: zigzag-sharded sequences and all-gather-KV attention.

After the image embeddings are merged, the first language stage keeps its zigzag shard of the sequence
(``kernels.zigzag_shard``: chunks ``r`` and ``2·cp − 1 − r`` of ``2·cp``, which balances causal work); every
stage gives RoPE and attention the global positions of its tokens; attention gathers K/V over the cp group
(:class:`~mimo_titan.parallel.cp_attention.ContextParallelAttention`); the loss takes the same shard of the labels
(``mimo_titan.pipeline.schedule``). Parameters are replicated over cp: FSDP shards them over dp x cp
(``Topology.fsdp_mesh``), so their gradients are summed over both.

Reference semantics: Megatron-LM context parallelism (``get_batch_on_this_cp_rank``), torchtitan ``dp_shard_cp``.
"""

from __future__ import annotations

from torch import nn

from mimo_titan.models.decoder import Attention
from mimo_titan.models.mimo import LanguageStage
from mimo_titan.parallel.cp_attention import ContextParallelAttention

__all__ = ["apply_cp"]


def apply_cp(stage: LanguageStage, cp_group, cp_size: int, cp_rank: int) -> nn.Module:
    """Make ``stage`` run on this rank's zigzag shard of every sequence; returns ``stage``."""
    stage.cp_size, stage.cp_rank = cp_size, cp_rank
    attn = ContextParallelAttention(cp_group, cp_size)
    for m in stage.modules():
        if isinstance(m, Attention):
            m.attn_fn = attn
    return stage
