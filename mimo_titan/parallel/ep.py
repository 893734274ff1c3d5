"""Expert parallelism (EP) and expert tensor parallelism (ETP) for MoE layers, as a plan over a module.

Layout (Megatron-LM's expert grid): inside a pipeline stage the module's ranks are re-read as
``(edp, ep, etp)``; experts are split over ``ep`` (rank r holds experts ``[r·L, (r+1)·L)``, ``L = E / ep``),
each expert's SwiGLU width over ``etp`` (``w_gate``/``w_up`` column slices, ``w_down`` row slice), and FSDP
shards the local expert weights over ``edp``.

Token flow of one MoE layer (:class:`ExpertParallelDispatch`), N local tokens:

1. ``etp > 1``: all-gather tokens, expert ids and weights over the etp group (ETP ranks must see the same
   tokens; they hold different weight slices);
2. ``permute_tokens`` → rows grouped by global expert, ``tokens_per_expert [E]``;
3. all-to-all of the counts, then an uneven ``all_to_all_single`` (autograd) of the rows over the ep group:
   rank r receives, from every source rank, the rows for its L local experts (rank-major);
4. ``sort_chunks_by_index`` regroups them expert-major, the local experts run (grouped GEMM), and the
   reverse ``sort_chunks_by_index`` + all-to-all bring every row home;
5. ``unpermute_tokens`` sums each token's K weighted expert outputs; with ``etp > 1`` the outputs are partial
   sums over the width split: a reduce-scatter over etp sums them and returns each rank its own tokens.

Every collective output is waited on before a kernel reads it (:mod:`mimo_titan.parallel.comm`): the permute,
sort and unpermute kernels take raw pointers, and an unwaited functional-collective output has none.

Reference semantics: Megatron-LM ``MoEAlltoAllTokenDispatcher`` (+ ETP), torchtitan ``ExpertParallel``;
collectives are ``torch.distributed._functional_collectives`` autograd ops (correct on gloo and NCCL).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from kernels import permute_tokens, sort_chunks_by_index, unpermute_tokens
from mimo_titan.models.moe import MoE
from mimo_titan.parallel import comm

__all__ = ["ExpertParallelDispatch", "apply_ep", "moe_modules"]


def moe_modules(module: nn.Module) -> list[tuple[str, MoE]]:
    """``(qualified name, MoE)`` of every MoE layer inside ``module``, in module order."""
    return [(n, m) for n, m in module.named_modules() if isinstance(m, MoE)]


class ExpertParallelDispatch:
    """All-to-all token dispatch over an ep group, with optional expert TP (see the module docstring).

    Args:
        ep_group / ep_size / ep_rank: the expert-parallel group of this rank and its size and rank in it.
        etp_group / etp_size: the expert-TP group (``None`` / 1 without ETP).
    """

    def __init__(self, ep_group, ep_size: int, ep_rank: int, etp_group=None, etp_size: int = 1):
        self.ep_group, self.ep_size, self.ep_rank = ep_group, ep_size, ep_rank
        self.etp_group, self.etp_size = etp_group, etp_size

    def _all_to_all(self, x: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:
        if self.ep_size == 1:
            return x
        return comm.all_to_all_single(x, out_splits, in_splits, self.ep_group)

    def __call__(self, x_NH, ids_NK, weights_NK, experts, num_experts: int) -> torch.Tensor:
        n_local = x_NH.shape[0]
        if self.etp_size > 1:
            x_NH = comm.all_gather(x_NH, self.etp_group)
            weights_NK = comm.all_gather(weights_NK, self.etp_group)
            ids_NK = comm.all_gather(ids_NK, self.etp_group, differentiable=False)
        P, L = self.ep_size, num_experts // self.ep_size
        permuted, _, row_map, counts = permute_tokens(x_NH, ids_NK, num_experts)
        if P > 1:
            recv_counts = torch.empty_like(counts)
            dist.all_to_all_single(recv_counts, counts.contiguous(), group=self.ep_group)
        else:
            recv_counts = counts
        send_PL, recv_PL = counts.view(P, L), recv_counts.view(P, L)
        in_splits, out_splits = send_PL.sum(1).tolist(), recv_PL.sum(1).tolist()
        received = self._all_to_all(permuted, out_splits, in_splits)
        if P > 1:  # rank-major → expert-major; sizes come from a collective, so skip re-validating (a host sync)
            to_expert_major = torch.arange(P * L).view(P, L).t().flatten()  # chunk (src s, expert l) → l·P + s
            grouped = sort_chunks_by_index(received, recv_PL.flatten(), to_expert_major, validate=False)
        else:
            grouped = received
        y = experts(grouped, recv_PL.sum(0))
        if P > 1:
            to_rank_major = torch.arange(P * L).view(L, P).t().flatten()
            y = sort_chunks_by_index(y, recv_PL.t().flatten(), to_rank_major, validate=False)
        back = self._all_to_all(y, in_splits, out_splits)
        out = unpermute_tokens(back, row_map, weights_NK)
        if self.etp_size > 1:
            out = comm.reduce_scatter_sum(out, self.etp_group)
        assert out.shape[0] == n_local
        return out


@torch.no_grad()
def _slice_param(module: nn.Module, name: str, index) -> None:
    old = getattr(module, name)  # a frozen expert weight stays frozen
    setattr(module, name, nn.Parameter(old[index].clone(), requires_grad=old.requires_grad))


def apply_ep(
    module: nn.Module, ep_group, ep_size: int, ep_rank: int, etp_group=None, etp_size: int = 1, etp_rank: int = 0
) -> list[MoE]:
    """Keep this rank's experts (and width slice) in every MoE layer of ``module`` and install the EP dispatch.

    Must run on the full (unsharded) module, before FSDP. Returns the MoE layers it changed.

    Raises:
        ValueError: ``num_experts`` not divisible by ``ep`` or the expert width not divisible by ``etp``.
    """
    layers = [m for _, m in moe_modules(module)]
    for moe in layers:
        E, inter = moe.num_experts, moe.experts.w_gate.shape[-1]
        if E % ep_size or inter % etp_size:
            raise ValueError(
                f"MoE with num_experts={E}, intermediate_size={inter} cannot be split over ep={ep_size}, "
                f"etp={etp_size}: ep must divide num_experts and etp must divide intermediate_size"
            )
        L, w = E // ep_size, inter // etp_size
        experts = slice(ep_rank * L, (ep_rank + 1) * L)
        width = slice(etp_rank * w, (etp_rank + 1) * w)
        _slice_param(moe.experts, "w_gate", (experts, slice(None), width))
        _slice_param(moe.experts, "w_up", (experts, slice(None), width))
        _slice_param(moe.experts, "w_down", (experts, width, slice(None)))
        moe.dispatcher = ExpertParallelDispatch(ep_group, ep_size, ep_rank, etp_group, etp_size)
    return layers
