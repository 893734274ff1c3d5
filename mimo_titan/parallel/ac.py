"""Per-module memory and speed options of transformer blocks: activation checkpointing and ``torch.compile``.

Both are applied to each transformer block of a module (the blocks FSDP wraps one by one), after the tensor /
context / expert-parallel plans and *before* FSDP, as in torchtitan (``parallelize`` applies TP, then AC, then
compile, then FSDP). The options are installed on the block's ``forward`` (an instance attribute), not by wrapping
the block in another module: parameter names, checkpoints, HF import and the tensor-parallel plans stay exactly as
without the options, and the FSDP / TP hooks, which run in ``nn.Module.__call__``, stay outside the recomputed
(or compiled) region.

Activation checkpointing (``parallelism.<module>.activation_checkpointing``), non-reentrant
``torch.utils.checkpoint.checkpoint`` with the RNG state preserved:

* ``"full"``: a block keeps only its inputs; its whole forward is re-run at the start of its backward
  (Chen et al., "Training Deep Nets with Sublinear Memory Cost", 2016).
* ``"selective"``: op-level selective checkpointing (Korthikanti et al., "Reducing Activation Recomputation in
  Large Transformer Models", 2022; the op policy of torchtitan's ``activation_checkpoint.py``): the outputs of
  attention kernels, of matrix multiplications (all but every second one, counted separately in the forward and
  in the recompute) and of collectives (reduce-scatter, expert all-to-all) are saved; the cheap elementwise ops
  (norms, activations, RoPE, residual adds) are recomputed. Saving the all-to-all outputs means an
  expert-parallel MoE block would re-run no token all-to-all in its recompute; with this torch, though, selective
  checkpointing is refused under expert parallelism (see :func:`check_module_options`), and ``"full"`` re-runs it.

MoE layers re-run their router in the recompute; the routing statistics a forward accumulates
(``tokens_per_expert``, ``aux_loss_sum``, ``last_aux_loss``) are restored afterwards, so a recomputed microbatch is
counted once, and a dummy forward (``excluded_from_stats``) is recomputed as one. Collectives that are not saved
(the count all-to-all of the expert dispatch, the aux loss's statistics all-reduce, the token all-to-alls and the
tensor- and context-parallel collectives under ``"full"``) run again in the recompute, on every rank of their
group in the same block order, as the backward itself does.

``compile``: ``torch.compile`` of each block's forward separately (torchtitan's per-block compile: one small graph
reused by every block of the same structure), after activation checkpointing, so a selective policy is compiled
into the graph. Refused for MoE modules (their dispatch reads split sizes on the host and calls kernels by raw
pointer), see :func:`check_module_options`.
"""

from __future__ import annotations

import functools
import os
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from mimo_titan.errors import ConfigError
from mimo_titan.models.moe import MoE

__all__ = [
    "AC_MODES",
    "apply_activation_checkpointing",
    "apply_compile",
    "apply_module_options",
    "check_module_options",
    "describe_module_options",
]

AC_MODES = ("none", "full", "selective")


def _ops(*names: str) -> set[Any]:
    """The ``torch.ops`` overloads named ``namespace.op.overload`` that exist in this torch build."""
    out = set()
    for name in names:
        namespace, op, overload = name.split(".")
        packet = getattr(getattr(torch.ops, namespace), op, None) if hasattr(torch.ops, namespace) else None
        if packet is not None and hasattr(packet, overload):
            out.add(getattr(packet, overload))
    return out


#: the matrix multiplications counted by the selective policy (every second one is recomputed)
_MATMULS = _ops("aten.mm.default", "aten.addmm.default")
#: ops whose outputs the selective policy always saves: attention kernels and collectives
_ALWAYS_SAVED = _ops(
    "aten._scaled_dot_product_flash_attention.default",
    "aten._scaled_dot_product_flash_attention_for_cpu.default",
    "aten._scaled_dot_product_efficient_attention.default",
    "aten._scaled_dot_product_cudnn_attention.default",
    "aten._scaled_dot_product_attention_math.default",
    "aten._scaled_dot_product_fused_attention_overrideable.default",
    "_c10d_functional.reduce_scatter_tensor.default",
    "_c10d_functional.all_to_all_single.default",
    "aten.max.default",  # cheap to keep, and low-precision recipes scale by it
)


def _selective_context_fn() -> Any:
    """Fresh ``(forward, recompute)`` contexts for one checkpointed call under the op-level selective policy."""
    matmuls: dict[bool, int] = defaultdict(int)  # per phase: the forward and its recompute count alike

    def policy(ctx, func, *args, **kwargs) -> CheckpointPolicy:
        if func in _MATMULS:
            matmuls[ctx.is_recompute] += 1
            keep = matmuls[ctx.is_recompute] % 2 == 1
            return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE
        return CheckpointPolicy.MUST_SAVE if func in _ALWAYS_SAVED else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def _checkpointed(forward: Callable[..., Any], mode: str, moe_layers: list[MoE]) -> Callable[..., Any]:
    """``forward`` run under non-reentrant activation checkpointing (``mode`` ``"full"`` or ``"selective"``)."""

    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        fn = forward
        if moe_layers:
            # The second call of ``fn`` is the recompute, in the backward: its MoE layers route as in the forward
            # (a dummy forward's ``exclude_from_stats`` included), count into scratch buffers allocated here, and
            # get their statistics back afterwards, without running any op of their own inside the recompute
            # (selective checkpointing replays the forward's ops by their order).
            scratch = [torch.empty_like(m.tokens_per_expert) for m in moe_layers]
            excluded = [m.exclude_from_stats for m in moe_layers]
            calls = [0]

            def fn(*a: Any, **k: Any) -> Any:
                calls[0] += 1
                if calls[0] == 1:
                    return forward(*a, **k)
                kept = [
                    (m.tokens_per_expert, m.aux_loss_sum, m.last_aux_loss, m.exclude_from_stats) for m in moe_layers
                ]
                for m, buf, flag in zip(moe_layers, scratch, excluded, strict=True):
                    m.tokens_per_expert, m.exclude_from_stats = buf, flag
                try:
                    return forward(*a, **k)
                finally:
                    for m, (tokens, aux_sum, last, flag) in zip(moe_layers, kept, strict=True):
                        m.tokens_per_expert, m.aux_loss_sum, m.last_aux_loss, m.exclude_from_stats = (
                            tokens,
                            aux_sum,
                            last,
                            flag,
                        )

        if mode == "selective":
            return checkpoint(
                fn, *args, use_reentrant=False, preserve_rng_state=True, context_fn=_selective_context_fn, **kwargs
            )
        return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)

    return run


def apply_activation_checkpointing(blocks: Iterable[nn.Module], mode: str) -> None:
    """Recompute each block's activations in its backward (see the module docstring), in place.

    Args:
        blocks: the transformer blocks; each keeps its class, parameters and names (``forward`` is replaced).
        mode: ``"none"`` (nothing changes), ``"full"`` or ``"selective"``.

    Raises:
        ValueError: an unknown ``mode``.
    """
    if mode not in AC_MODES:
        raise ValueError(f"activation checkpointing mode {mode!r}; choose one of {', '.join(AC_MODES)}")
    if mode == "none":
        return
    for block in blocks:
        moe_layers = [m for m in block.modules() if isinstance(m, MoE)]
        block.forward = _checkpointed(block.forward, mode, moe_layers)


def apply_compile(blocks: Iterable[nn.Module], backend: str | None = None) -> None:
    """``torch.compile`` each block's forward separately, in place (after activation checkpointing, before FSDP).

    Args:
        blocks: the transformer blocks (dense: no MoE layer inside).
        backend: a ``torch.compile`` backend; ``None`` is torch's default (inductor). Tests pass a cheaper one.
    """
    for block in blocks:
        if backend is None:
            block.forward = torch.compile(block.forward)
        else:
            block.forward = torch.compile(block.forward, backend=backend)


def check_module_options(name: str, parallelism: Any, model: Any, *, packed: bool = False) -> None:
    """Options that the module's model cannot take, refused before any process group exists.

    Args:
        name: the module's name (``[parallelism.<name>]``).
        parallelism: its ``ModuleParallelism`` (``activation_checkpointing``, ``compile``).
        model: its model table (``moe`` for the MoE check; encoders without one are dense).
        packed: the module is the language model and ``data.packing`` is on (rows of several documents).

    Raises:
        ConfigError: ``compile = true`` on a module with MoE layers; ``activation_checkpointing = "selective"``
            on a module with expert parallelism, whose experts are an FSDP unit of their own inside each block:
            selective checkpointing replays the forward's ops by their order, and FSDP's all-gather internals and
            profiler ops run a different number of times in the recompute (fixed in PyTorch after 2.13,
            pytorch/pytorch#196862); ``"full"`` works there. ``"selective"`` on a language model with packed rows
            or ``cp > 1``: its attention builds a per-forward document plan (host-synced index ops and
            ``causal_lower_right`` bias subclasses, :mod:`mimo_titan.models.varlen_attention`) inside the block,
            which selective checkpointing cannot replay (a recompute after another microbatch's forward rebuilds the
            plan; the bias subclass cannot be created under its caching mode); ``"full"`` works there.
    """
    if parallelism.activation_checkpointing == "selective" and (packed or parallelism.cp > 1):
        why = f"cp={parallelism.cp}" if parallelism.cp > 1 else "data.packing = true"
        raise ConfigError(
            f"parallelism.{name}.activation_checkpointing = 'selective' with {why} is not supported yet: the "
            "document-causal attention plan is built inside each block, and selective checkpointing cannot replay "
            f"it in the recompute; set parallelism.{name}.activation_checkpointing = 'full' (or 'none')"
        )
    moe = getattr(model, "moe", None)
    experts_sharded = moe is not None and moe.num_experts > 0 and parallelism.ep * parallelism.etp > 1
    if parallelism.activation_checkpointing == "selective" and experts_sharded:
        raise ConfigError(
            f"parallelism.{name}.activation_checkpointing = 'selective' with expert parallelism (ep={parallelism.ep}, "
            f"etp={parallelism.etp}) is not supported: the experts' own FSDP unit inside each block all-gathers a "
            "different number of times in the recompute than in the forward, which selective checkpointing cannot "
            f"replay; set parallelism.{name}.activation_checkpointing = 'full' (or 'none')"
        )
    if parallelism.compile and moe is not None and moe.num_experts > 0:
        raise ConfigError(
            f"parallelism.{name}.compile = true with model.{name}.moe.num_experts = {moe.num_experts}: compiling MoE "
            "blocks is not supported (the expert dispatch reads its split sizes on the host and runs its permutation "
            f"kernels outside torch.compile); set parallelism.{name}.compile = false"
        )


def apply_module_options(blocks: Iterable[nn.Module], parallelism: Any) -> None:
    """Apply a module's ``activation_checkpointing`` and ``compile`` options to its transformer blocks, in place.

    Call after the TP / CP / EP plans and before FSDP (:func:`mimo_titan.parallel.fsdp.apply_fsdp`).

    Args:
        blocks: the module's transformer blocks (those FSDP shards one by one).
        parallelism: the module's ``ModuleParallelism`` table.
    """
    blocks = list(blocks)
    apply_activation_checkpointing(blocks, parallelism.activation_checkpointing)
    if parallelism.compile:
        # MIMO_TITAN_COMPILE_BACKEND (e.g. "aot_eager": graph capture without code generation) is for tests and
        # debugging; unset, torch's default backend (inductor) compiles the blocks
        apply_compile(blocks, os.environ.get("MIMO_TITAN_COMPILE_BACKEND") or None)


def describe_module_options(parallelism: Any) -> str:
    """The module's options for the log: ``"ac=full compile reshard_after_forward=off"``."""
    from mimo_titan.parallel.fsdp import reshard_after_forward

    reshard = reshard_after_forward(parallelism.fsdp_reshard_after_forward, parallelism.pp)
    return (
        f"ac={parallelism.activation_checkpointing}"
        + (" compile" if parallelism.compile else "")
        + f" reshard_after_forward={'on' if reshard else 'off'}"
    )
