"""Word embeddings tied across the language model's pipeline stages.

With ``model.language.tie_word_embeddings = true`` the single-process model has one ``[V, H]`` tensor that is both
the input embedding and the output head. With ``parallelism.language.pp > 1`` the first stage needs it as
``embed_tokens.weight`` and the last stage as ``lm_head.weight``, so each holds a copy, split from the same full
model (equal at the start). Each step, after the backward, the two copies' gradients are summed between each rank
of the first stage and the rank of the last stage with the same ``(dp_replicate, dp_shard, cp, tp)`` coordinate
(:meth:`~mimo_titan.topology.Topology.embedding_group`): both stages shard the weight over same-shaped meshes, so
their local shards cover the same rows and columns, and the sum is the tied tensor's gradient shard. Both copies
then take the same optimizer update and stay bit-identical. The global gradient norm counts the first stage's copy
only (:attr:`TiedEmbedding.norm_duplicates`), so it equals the single-process norm.

Reference semantics: Megatron-LM's embedding group (``_allreduce_word_embedding_grads`` sums the word-embedding
gradient of the first and the last pipeline stage).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed import ProcessGroup
from torch.distributed.tensor import DTensor

from mimo_titan.models.decoder import DecoderLM

__all__ = ["TiedEmbedding", "tied_embedding"]


@dataclass
class TiedEmbedding:
    """This rank's copy of the tied embedding and its 2-rank embedding group.

    Attributes:
        param: ``embed_tokens.weight`` on the first stage, ``lm_head.weight`` on the last: ``[V, H]`` (an FSDP
            ``DTensor`` shard in training), the optimizer's dtype (fp32).
        group: the first-stage rank and its last-stage partner.
        first: whether this rank is on the first stage (its copy counts towards the gradient norm).
    """

    param: nn.Parameter
    group: ProcessGroup
    first: bool

    @property
    def norm_duplicates(self) -> tuple[nn.Parameter, ...]:
        """The parameters this rank leaves out of the gradient norm: the last stage's copy (counted on the first)."""
        return () if self.first else (self.param,)

    def all_reduce_grad(self) -> None:
        """Sum this rank's local gradient shard of the tied weight with its partner's, in place (both ranks must
        call it, after the step's backward and before the gradient norm / clipping / optimizer step).

        A copy without a gradient (no loss reached it) takes part with zeros. Each shard is reduced as a contiguous
        tensor (gloo can reduce a non-contiguous view wrongly without error). ``a + b`` is computed the same way on
        both ranks, so the two copies' gradients are bit-identical afterwards.
        """
        if self.param.grad is None:
            self.param.grad = torch.zeros_like(self.param)
        grad = self.param.grad
        local = grad.to_local() if isinstance(grad, DTensor) else grad
        buf = local.contiguous()
        dist.all_reduce(buf, group=self.group)
        if buf is not local:
            local.copy_(buf)


def tied_embedding(stage: nn.Module, group: ProcessGroup | None) -> TiedEmbedding | None:
    """The :class:`TiedEmbedding` of a language pipeline stage, or None where the stage holds no copy or the tied
    weight is frozen.

    Args:
        stage: this rank's language stage (a :class:`~mimo_titan.models.mimo.LanguageStage`, FSDP-wrapped or not;
            under Interleaved1F1B its :class:`~mimo_titan.pipeline.stages.LanguageChunks`, whose chunk 0 / last
            chunk hold the copies; or a :class:`DecoderLM` part from
            :func:`~mimo_titan.pipeline.stages.split_language_model`).
        group: this rank's embedding group (:meth:`~mimo_titan.topology.Topology.embedding_group`); None on a
            rank that holds no copy.

    Raises:
        ValueError: ``stage`` contains no :class:`DecoderLM`, or the group and the stage disagree (a group but
            neither or both of ``embed_tokens`` / ``lm_head``, or a copy but no group).
    """
    lm = next((m for m in stage.modules() if isinstance(m, DecoderLM)), None)
    if lm is None:
        raise ValueError(f"{type(stage).__name__} holds no DecoderLM, so no tied embedding")
    embed, head = lm.model.embed_tokens, lm.lm_head
    if (embed is None) == (head is None):  # a middle stage, or the whole model (one tensor already)
        if group is not None:
            raise ValueError("an embedding group on a stage that holds both or neither of embed_tokens and lm_head")
        return None
    if group is None:
        raise ValueError("a pipeline stage holding one copy of the tied embedding needs its embedding group")
    param = embed.weight if embed is not None else head.weight  # type: ignore[union-attr]
    assert isinstance(param, nn.Parameter)
    if not param.requires_grad:  # frozen (both copies alike: split from one tensor): no gradient to sum
        return None
    return TiedEmbedding(param=param, group=group, first=embed is not None)
