"""Mixture-of-Experts feed-forward layer (Qwen3-MoE / DeepSeek-V3 style), dropless, with pluggable dispatch.

- Router: ``gate`` (``[E, H]``, HF name ``mlp.gate.weight``) → softmax or sigmoid scores ``[N, E]`` → top-k
  experts per token; the top-k weights are optionally renormalised to sum to 1. With aux-loss-free balancing a
  per-expert bias (``e_score_correction_bias``, a buffer updated outside the optimizer) shifts the *selection*
  only, never the weights (DeepSeek-V3, Wang et al. 2024 "Auxiliary-Loss-Free Load Balancing").
- Routed experts: SwiGLU experts stored stacked (``w_gate``, ``w_up``: ``[E, H, I]``; ``w_down``: ``[E, I, H]``)
  and run as one grouped GEMM over expert-major rows (``torch._grouped_mm`` on CUDA bf16, a per-expert loop
  elsewhere).
- Optional shared expert (a dense SwiGLU every token passes through, Qwen2-MoE / DeepSeek).
- Load-balancing auxiliary loss (Switch / GShard form ``coeff · E · Σ_e f_e · P_e``) computed with *global*
  statistics of the microbatch: ``f_e`` (fraction of routed copies to expert e) and ``P_e`` (mean score) are
  summed over the module's token-sharded ranks when a ``stats_group`` is set, so the loss is the same whatever
  the layout (global-batch balancing, Qiu et al. 2025 "Demons in the Detail"). The loss joins the backward
  through the layer output (Megatron's ``MoEAuxLossAutoScaler``), scaled by ``aux_loss_scale``.

Token movement is delegated to ``self.dispatcher`` (:class:`LocalDispatch` by default); an expert-parallel
plan replaces it with an all-to-all dispatcher and slices the expert weights (``mimo_titan.parallel.ep``), so
the model itself knows nothing of meshes.

Shape legend: N tokens (B·S), H hidden, E experts, K top-k, I expert width, L local experts.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kernels import permute_tokens, unpermute_tokens
from mimo_titan.models.init import InitRule
from mimo_titan.models.mlp import SwiGLU

if TYPE_CHECKING:
    from mimo_titan.config import MoEConfig
    from mimo_titan.parallel.ep import ExpertParallelDispatch

__all__ = ["MoE", "TopKRouter", "GroupedExperts", "LocalDispatch", "grouped_mm", "excluded_from_stats"]


def grouped_mm(x_NI: torch.Tensor, w_EIO: torch.Tensor, counts_E: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """``out[rows of group e] = x[rows of group e] @ w[e]`` for expert-major rows.

    Args:
        x_NI: ``[N, in]`` rows grouped by expert (``counts_E[e]`` rows for expert e, in order).
        w_EIO: ``[E, in, out]``.
        counts_E: ``[E]`` int rows per group (sum N).
        impl: ``"auto"`` (``torch._grouped_mm`` on CUDA bf16 with compute capability >= 9, else the loop),
            ``"grouped_mm"`` or ``"loop"``.

    Returns:
        ``[N, out]`` in x's dtype. Both paths are differentiable. ``_grouped_mm`` needs 16-row aligned groups: rows
        are copied into a padded buffer and back.
    """
    counts = counts_E.tolist()
    if impl == "auto":
        impl = (
            "grouped_mm"
            if (
                x_NI.is_cuda
                and x_NI.dtype == torch.bfloat16
                and hasattr(torch, "_grouped_mm")
                and torch.cuda.get_device_capability(x_NI.device)[0] >= 9
                and x_NI.shape[1] % 8 == 0
                and w_EIO.shape[-1] % 8 == 0  # 16-byte strides
                and x_NI.shape[0] > 0
            )
            else "loop"
        )
    if impl == "loop":
        outs = [xe @ w_EIO[e] for e, xe in enumerate(torch.split(x_NI, counts))]
        return torch.cat(outs) if outs else x_NI.new_zeros(0, w_EIO.shape[-1])
    padded = [(c + 15) // 16 * 16 for c in counts]
    starts = torch.tensor([0, *padded[:-1]], device=x_NI.device).cumsum(0)
    idx = torch.cat([torch.arange(c, device=x_NI.device) + s for c, s in zip(counts, starts.tolist())])
    buf = x_NI.new_zeros(sum(padded), x_NI.shape[1]).index_copy(0, idx, x_NI)
    offs = torch.tensor(padded, device=x_NI.device).cumsum(0).to(torch.int32)
    return torch._grouped_mm(buf, w_EIO, offs=offs).index_select(0, idx)


class TopKRouter(nn.Module):
    """Scores and top-k selection. Forward: ``x [N, H]`` → ``(weights [N, K] fp32, ids [N, K] int64,
    scores [N, E] fp32)``."""

    e_score_correction_bias: torch.Tensor  # registered buffer

    def __init__(self, hidden: int, moe_cfg: MoEConfig):
        super().__init__()
        self.num_experts, self.top_k = moe_cfg.num_experts, moe_cfg.top_k
        self.score_func, self.norm_topk_prob = moe_cfg.score_func, moe_cfg.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(moe_cfg.num_experts, hidden))
        self.register_buffer("e_score_correction_bias", torch.zeros(moe_cfg.num_experts), persistent=True)
        self.use_bias = moe_cfg.load_balance == "aux_free"

    def forward(self, x_NH: torch.Tensor):
        logits = F.linear(x_NH, self.weight).float()
        scores = logits.softmax(-1) if self.score_func == "softmax" else logits.sigmoid()
        select = scores + self.e_score_correction_bias if self.use_bias else scores
        ids = select.topk(self.top_k, dim=-1).indices
        weights = scores.gather(-1, ids)
        if self.norm_topk_prob and self.top_k > 1:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights, ids, scores


class GroupedExperts(nn.Module):
    """SwiGLU experts with stacked weights: ``w_down · (silu(x · w_gate) * (x · w_up))`` per expert.

    ``w_gate``/``w_up`` are ``[E, H, I]`` and ``w_down`` ``[E, I, H]``; an expert-parallel plan keeps a slice
    (local experts, and a column/row split of I under expert TP). Forward: expert-major rows ``[R, H]`` and
    ``counts [E_local]`` → ``[R, H]`` (a partial sum when I is split).
    """

    def __init__(self, num_experts: int, hidden: int, inter: int):
        super().__init__()
        self.w_gate = nn.Parameter(torch.empty(num_experts, hidden, inter))
        self.w_up = nn.Parameter(torch.empty(num_experts, hidden, inter))
        self.w_down = nn.Parameter(torch.empty(num_experts, inter, hidden))

    def forward(self, x_RH: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        h = F.silu(grouped_mm(x_RH, self.w_gate, counts)) * grouped_mm(x_RH, self.w_up, counts)
        return grouped_mm(h, self.w_down, counts)


class LocalDispatch:
    """All experts on this rank: permute → experts → weighted unpermute (the kernels' ops)."""

    def __call__(self, x_NH, ids, weights, experts: GroupedExperts, num_experts: int) -> torch.Tensor:
        permuted, _, row_map, counts = permute_tokens(x_NH, ids, num_experts)
        return unpermute_tokens(experts(permuted, counts), row_map, weights)


@contextlib.contextmanager
def excluded_from_stats(module: nn.Module):
    """Within the block, MoE layers of ``module`` route as usual (collectives included) but add nothing to the
    routing counts, the aux loss or its gradient: for dummy inputs that only keep collectives in step."""
    layers = [m for m in module.modules() if isinstance(m, MoE)]
    for m in layers:
        m.exclude_from_stats = True
    try:
        yield
    finally:
        for m in layers:
            m.exclude_from_stats = False


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on ``out``; the backward also gives ``aux_loss`` the gradient ``scale`` (Megatron
    MoEAuxLossAutoScaler)."""

    @staticmethod
    def forward(ctx, out, aux_loss, scale):
        ctx.scale = scale
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.full((), ctx.scale, dtype=torch.float32, device=grad.device), None


class MoE(nn.Module):
    """The MoE feed-forward block. Forward: ``x [B, S, H]`` → ``[B, S, H]``.

    Args:
        hidden: H.
        moe_cfg: ``MoEConfig`` (num_experts, top_k, intermediate_size, score_func, norm_topk_prob,
            shared_expert_intermediate_size, load_balance, aux_loss_coeff, bias_update_rate).

    Attributes set by parallel plans (defaults: single process): ``dispatcher``; ``stats_group`` (process group
    over which routing statistics are summed for the aux loss); ``aux_loss_scale`` (gradient scale of the aux
    loss, e.g. 1 / microbatches). After each forward, ``last_aux_loss`` holds this rank's share of the aux loss
    (the shares of ``stats_group`` sum to the global value);
    ``aux_loss_sum`` (0-dim tensor) and ``tokens_per_expert`` (this rank's routed-copy counts ``[E]`` int64) accumulate
    until :meth:`reset_stats`.
    """

    tokens_per_expert: torch.Tensor  # registered buffer

    def __init__(self, hidden: int, moe_cfg: MoEConfig):
        super().__init__()
        self.cfg = moe_cfg
        self.num_experts = moe_cfg.num_experts
        self.gate = TopKRouter(hidden, moe_cfg)
        self.experts = GroupedExperts(moe_cfg.num_experts, hidden, moe_cfg.intermediate_size)
        self.shared_expert: SwiGLU | None = None
        if moe_cfg.shared_expert_intermediate_size > 0:
            self.shared_expert = SwiGLU(hidden, moe_cfg.shared_expert_intermediate_size)
        self.dispatcher: LocalDispatch | ExpertParallelDispatch = LocalDispatch()
        self.stats_group: dist.ProcessGroup | None = None
        self.aux_loss_scale = 1.0
        self.exclude_from_stats = False  # set by :func:`excluded_from_stats` for padding-only (dummy) forwards
        self.register_buffer("tokens_per_expert", torch.zeros(moe_cfg.num_experts, dtype=torch.int64), persistent=False)
        self.last_aux_loss = torch.zeros(())
        self.aux_loss_sum = torch.zeros(())

    def init_rules(self, std: float = 0.02) -> dict[str, InitRule]:
        """Init of every tensor of this layer (names relative to it; :mod:`mimo_titan.models.init`): truncated
        normal(std) router, expert and shared-expert weights; zero routing bias and counts."""
        normal = InitRule("trunc_normal", std)
        rules = {"gate.weight": normal, "gate.e_score_correction_bias": InitRule("zeros")}
        rules.update({f"experts.{w}": normal for w in ("w_gate", "w_up", "w_down")})
        if self.shared_expert is not None:
            rules.update({f"shared_expert.{n}": normal for n, _ in self.shared_expert.named_parameters()})
        rules["tokens_per_expert"] = InitRule("zeros")
        return rules

    def reset_stats(self) -> None:
        """Zero the per-step statistics (routed-copy counts, aux-loss sum over microbatches)."""
        self.tokens_per_expert.zero_()
        self.aux_loss_sum = torch.zeros((), device=self.tokens_per_expert.device)

    def _aux_loss(self, ids_NK: torch.Tensor, scores_NE: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """``coeff · E · Σ_e f_e P_e`` with f (routed fraction) and P (mean score) over all ranks of ``stats_group``.

        This rank's return value is its share (its tokens' scores); the shares of the group sum to the loss.
        """
        n_local = torch.full((1,), 0.0 if self.exclude_from_stats else float(ids_NK.shape[0]), device=scores_NE.device)
        stats = torch.cat([counts_E.float(), n_local])
        if self.stats_group is not None:
            stats = stats.clone()
            dist.all_reduce(stats, group=self.stats_group)
        counts_g, n_g = stats[:-1], stats[-1].clamp(min=1.0)
        f = counts_g / (n_g * self.cfg.top_k)
        p_local_sum = scores_NE.sum(0)  # differentiable; summing the per-rank terms gives the global P
        if self.exclude_from_stats:
            p_local_sum = p_local_sum * 0.0
        return self.cfg.aux_loss_coeff * self.num_experts * (f * p_local_sum / n_g).sum()

    def forward(self, x_BSH: torch.Tensor) -> torch.Tensor:
        shape = x_BSH.shape
        x = x_BSH.reshape(-1, shape[-1])
        weights, ids, scores = self.gate(x)
        flat = ids.flatten()
        counts = flat.new_zeros(self.num_experts)
        if not self.exclude_from_stats:  # scatter_add, not bincount: no device sync
            counts.scatter_add_(0, flat, torch.ones_like(flat))
        self.tokens_per_expert += counts
        out = self.dispatcher(x, ids, weights, self.experts, self.num_experts)
        if self.shared_expert is not None:
            out = out + self.shared_expert(x)
        if self.cfg.load_balance == "aux_loss" and self.cfg.aux_loss_coeff > 0 and self.training:
            aux = self._aux_loss(ids, scores, counts)
            self.last_aux_loss = aux.detach()
            self.aux_loss_sum = self.aux_loss_sum + self.last_aux_loss  # a tensor: no host sync per layer
            out = _AttachAuxLoss.apply(out, aux, self.aux_loss_scale)
        return out.view(shape)

    @torch.no_grad()
    def update_bias(self, global_counts_E: torch.Tensor) -> None:
        """Aux-loss-free balancing step: ``bias += rate · sign(mean load − load_e)`` from the step's global counts."""
        if self.cfg.load_balance != "aux_free":
            return
        load = global_counts_E.float().to(self.gate.e_score_correction_bias.device)
        self.gate.e_score_correction_bias += self.cfg.bias_update_rate * torch.sign(load.mean() - load)
