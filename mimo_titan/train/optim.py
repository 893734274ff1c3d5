"""Optimizers and learning-rate schedule per module, and one gradient norm over all modules.

- AdamW per module (``torch.optim.AdamW``, Loshchilov & Hutter 2019) over that module's local parameters.
- LR multiplier: linear warmup then cosine (or linear / constant) decay to ``min_lr_ratio``, as in torchtitan's
  ``linear_warmup_stable_decay`` family and Megatron's ``OptimizerParamScheduler``.
- :func:`clip_grad_norm_` computes the L2 norm of *every* gradient of the model, across all modules and ranks,
  with one all-reduce, and scales all gradients by the same factor (Megatron's global clipping; torchtitan's
  ``clip_grad_norm_`` with pipeline parallelism does the same over the PP group).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

if TYPE_CHECKING:
    from mimo_titan.config import LRScheduleConfig, OptimizerConfig

__all__ = [
    "build_optimizer",
    "lr_multiplier",
    "build_lr_scheduler",
    "global_grad_sq_norm",
    "clip_grad_norm_",
    "all_reduce_sum",
]


def build_optimizer(module: nn.Module, cfg: OptimizerConfig) -> torch.optim.AdamW | None:
    """AdamW over ``module``'s trainable parameters (``requires_grad``) from an ``OptimizerConfig`` (lr, betas, eps,
    weight_decay); ``None`` when every parameter is frozen (no optimizer state at all)."""
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        return None
    return torch.optim.AdamW(
        params, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]), eps=cfg.eps, weight_decay=cfg.weight_decay
    )


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, decay: str, min_lr_ratio: float) -> float:
    """Multiplier of the base LR for 0-based optimizer step ``step``.

    Warmup: ``(step + 1) / (warmup_steps + 1)`` for ``step < warmup_steps``. Then, with
    ``p = (step - warmup) / max(1, total - warmup)`` in [0, 1): cosine ``min + (1 - min) * (1 + cos(pi p)) / 2``,
    linear ``1 - (1 - min) p``, or constant 1.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    p = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if decay == "cosine":
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))
    if decay == "linear":
        return 1 - (1 - min_lr_ratio) * p
    if decay == "constant":
        return 1.0
    raise ValueError(f"lr_schedule.decay={decay!r}; choose cosine, linear or constant")


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, cfg: LRScheduleConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` applying :func:`lr_multiplier` with an ``LRScheduleConfig``."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, total_steps, cfg.warmup_steps, cfg.decay, cfg.min_lr_ratio)
    )


def _owned_local(grad: torch.Tensor) -> torch.Tensor | None:
    """The part of ``grad`` this rank counts towards the norm: its local shard, or None on a replica other
    than coordinate 0 of every ``Replicate`` mesh dim (so each element is counted exactly once)."""
    if not isinstance(grad, DTensor):
        return grad
    coord = grad.device_mesh.get_coordinate()
    assert coord is not None, "a rank holding a DTensor is in its mesh"
    for dim, placement in enumerate(grad.placements):
        if placement.is_replicate() and coord[dim] != 0:
            return None
    return grad.to_local()


def global_grad_sq_norm(
    modules: Iterable[nn.Module], device: torch.device, exclude: Iterable[torch.Tensor] = ()
) -> torch.Tensor:
    """This rank's contribution (fp32, 0-dim) to the squared L2 norm of all gradients of all modules.

    Args:
        modules: this rank's modules.
        device: where the result lives.
        exclude: parameters not counted: copies of a tensor that another rank counts (the last pipeline stage's
            copy of tied word embeddings, :attr:`~mimo_titan.pipeline.tied.TiedEmbedding.norm_duplicates`).
    """
    skip = {id(p) for p in exclude}
    total = torch.zeros((), dtype=torch.float32, device=device)
    for module in modules:
        for p in module.parameters():
            if p.grad is None or id(p) in skip:
                continue
            g = _owned_local(p.grad)
            if g is not None and g.numel():
                total += g.detach().float().pow(2).sum()
    return total


def clip_grad_norm_(modules: list[nn.Module], max_norm: float, sq_norm_global: torch.Tensor) -> torch.Tensor:
    """Scale every gradient of ``modules`` by ``min(1, max_norm / (norm + 1e-6))``.

    Args:
        modules: this rank's modules.
        max_norm: clipping threshold (``training.max_grad_norm``); ``<= 0`` disables clipping.
        sq_norm_global: the squared global norm, already summed over all ranks.

    Returns:
        The global gradient norm (0-dim fp32), before clipping.
    """
    norm = sq_norm_global.sqrt()
    if max_norm > 0:
        coef = float(torch.clamp(max_norm / (norm + 1e-6), max=1.0))  # one host sync, not one per parameter
        if coef < 1.0:
            for module in modules:
                for p in module.parameters():
                    if p.grad is not None:
                        p.grad.mul_(coef)
    return norm


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a contiguous ``t`` over the world in place (every rank must call it); returns ``t``."""
    assert t.is_contiguous(), "gloo can reduce a non-contiguous view wrongly without error"
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t
