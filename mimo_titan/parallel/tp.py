"""Tensor parallelism (TP) with sequence parallelism (SP) per module, as DTensor ``parallelize_module`` plans.

Megatron-style TP (Shoeybi et al., "Megatron-LM", 2019) with sequence parallelism (Korthikanti et al.,
"Reducing Activation Recomputation in Large Transformer Models", 2022), written as torch's parallel styles the
way torchtitan's ``apply_tp`` does for Llama:

- attention: q/k/v projections column-parallel (each rank keeps ``heads / tp`` heads), the output projection
  row-parallel with a reduce-scatter onto the sequence (``output_layouts=Shard(1)``);
- MLP: gate/up (or fc1) column-parallel, down (or fc2) row-parallel, reduce-scattered onto the sequence;
- norms: ``SequenceParallel`` (each rank normalises its ``S / tp`` tokens; the weights are replicated DTensors,
  whose gradients DTensor sums over tp); Qwen3's per-head q / k norms the same way over the heads dim of
  ``[B, S, heads, hd]``, which the column-parallel projections shard;
- the module inputs of attention and MLP are all-gathered from ``Shard(1)`` to ``Replicate()``
  (``PrepareModuleInput``);
- LM vocabulary: the embedding is row-parallel over the vocabulary (``Replicate`` output, then the
  :class:`~mimo_titan.models.mimo.LanguageStage` merges the image embeddings, CP-shards and SP-scatters); the LM
  head is column-parallel with a vocabulary-sharded output, consumed by vocabulary-parallel cross-entropy
  (``torch.distributed.tensor.parallel.loss_parallel``, in ``mimo_titan.pipeline.schedule``).

Between blocks, and between pipeline stages, hidden states are plain local tensors ``[B, S / tp, H]`` (the SP
shard; ``S`` being the CP-local length under context parallelism). FSDP2 then shards the same DTensor
parameters over the module's dp (or dp x cp) mesh: 2-D FSDP x TP, the TP mesh being a slice of the same root mesh.

The vision encoder is split the same way over its patch sequence: its patch embedding is replicated and its
output is padded to ``P_pad = ceil(P / tp) * tp`` patches (only when tp does not divide ``P``) and scattered,
``P_pad / tp`` patches per rank; attention masks the padded patches out as keys and the projector drops them after
its all-gather. The projector ends row-parallel with a ``Replicate`` output, so every tp rank holds the full
``[N, P, H]`` image embeddings that cross the bridge (exactly ``P`` rows per image, one per LM placeholder).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from mimo_titan.models.decoder import Attention
from mimo_titan.models.mimo import LanguageStage
from mimo_titan.models.vit import VisionEncoder

if TYPE_CHECKING:
    from mimo_titan.config import LanguageModelConfig, VisionModelConfig

__all__ = ["apply_tp_language", "apply_tp_vision", "check_tp", "sp_scatter"]


def check_tp(module: str, model_cfg: LanguageModelConfig | VisionModelConfig, tp: int) -> None:
    """Raise if module ``module`` (the decoder or a ViT, told apart by ``model_cfg.type``) cannot be split ``tp`` ways;
    no process group needed.

    Args:
        module: the module's name (its config section ``model.<module>``).
        model_cfg: ``LanguageModelConfig`` or ``VisionModelConfig``.
        tp: the module's tensor-parallel degree.

    A ViT's patch count need not be divisible: :func:`apply_tp_vision` pads the patch sequence.

    Raises:
        ValueError: naming the first field not divisible by ``tp`` (heads, KV heads, MLP widths, vocabulary) and
            the fix.
    """
    if tp == 1:
        return
    if model_cfg.type == "decoder":
        fields = {f: getattr(model_cfg, f) for f in ("num_heads", "num_kv_heads", "intermediate_size", "vocab_size")}
    else:
        fields = {f: getattr(model_cfg, f) for f in ("num_heads", "intermediate_size", "projector_intermediate_size")}
    for field, value in fields.items():
        if value % tp:
            raise ValueError(
                f"model.{module}.{field}={value} must be divisible by parallelism.{module}.tp={tp}: "
                "tensor parallelism splits it evenly; change one of them"
            )


def _gather_input(n_args: int) -> PrepareModuleInput:
    """All-gather the first positional input from the SP shard ``Shard(1)`` to ``Replicate()``; pass the rest."""
    return PrepareModuleInput(
        input_layouts=(Shard(1),) + (None,) * (n_args - 1),
        desired_input_layouts=(Replicate(),) + (None,) * (n_args - 1),
        use_local_output=True,
    )


def sp_scatter(x_BSH, tp_mesh: DeviceMesh):
    """This tp rank's sequence shard ``[B, S / tp, ...]`` of a tensor ``[B, S, ...]`` that is identical on every tp
    rank. Backward all-gathers the gradient, so every tp rank gets the full (identical) ``[B, S, ...]`` gradient."""
    d = DTensor.from_local(x_BSH, tp_mesh, [Replicate()], run_check=False)
    return d.redistribute(tp_mesh, [Shard(1)]).to_local()


def _qk_norm_plan(prefix: str) -> dict:
    """Plan entries for the per-head q / k norms (Qwen3) of layer ``prefix``.

    The column-parallel q / k projections leave each rank ``heads / tp`` heads of the ``[B, S, heads, hd]`` view the
    norms act on, so the norms run as ``SequenceParallel`` over dim 2 (the heads, torchtitan's Qwen3 plan): the
    weight ``[hd]`` is a replicated DTensor whose gradient DTensor sums over tp; the output is the local tensor.
    """
    return {
        prefix + f"self_attn.{name}": SequenceParallel(sequence_dim=2, use_local_output=True)
        for name in ("q_norm", "k_norm")
    }


def apply_tp_language(stage: LanguageStage, tp_mesh: DeviceMesh) -> LanguageStage:
    """Tensor + sequence parallelism for a language pipeline stage, in place; returns ``stage``.

    Args:
        stage: the stage (its ``language`` may lack ``embed_tokens`` / ``norm`` / ``lm_head``, see
            ``pipeline.stages``); dense MLPs only (MoE layers with TP are rejected by ``train.trainer.validate_job``).
        tp_mesh: the 1-D tp mesh of this rank (``tp`` ranks), a slice of the mesh FSDP will use.

    After this, the first stage returns / every stage passes on ``[B, S / tp, H]`` local hidden states and the
    last stage returns vocabulary-sharded logits ``[B, S, V / tp]`` (``S`` CP-local).

    Raises:
        ValueError: heads, KV heads, intermediate size or vocabulary not divisible by ``tp``.
    """
    tp = tp_mesh.size()
    lm = stage.language
    check_tp("language", lm.cfg, tp)
    plan: dict[str, ParallelStyle] = {}
    if lm.model.embed_tokens is not None:
        plan["language.model.embed_tokens"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    if lm.model.norm is not None:
        plan["language.model.norm"] = SequenceParallel()
    if lm.lm_head is not None:
        plan["language.lm_head"] = ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1))
    for key in lm.model.layers:
        p = f"language.model.layers.{key}."
        plan.update(
            {
                p + "input_layernorm": SequenceParallel(),
                p + "self_attn": _gather_input(5),  # (x, cos, sin, positions, doc_ids)
                p + "self_attn.q_proj": ColwiseParallel(),
                p + "self_attn.k_proj": ColwiseParallel(),
                p + "self_attn.v_proj": ColwiseParallel(),
                p + "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
                p + "post_attention_layernorm": SequenceParallel(),
                p + "mlp": _gather_input(1),
                p + "mlp.gate_proj": ColwiseParallel(),
                p + "mlp.up_proj": ColwiseParallel(),
                p + "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1)),
            }
        )
        attn = lm.model.layers[key].self_attn
        assert isinstance(attn, Attention)
        if attn.q_norm is not None:
            plan.update(_qk_norm_plan(p))
    parallelize_module(stage, tp_mesh, plan)
    stage.sp_size, stage.sp_scatter = tp, functools.partial(sp_scatter, tp_mesh=tp_mesh)
    return stage


def _replicate_pad_scatter(embeddings: nn.Module, tp_mesh: DeviceMesh, padded_len: int) -> None:
    """Replicate ``embeddings``' parameters over tp; its output ``[N, P, D]`` is zero-padded to
    ``[N, padded_len, D]`` and leaves as this rank's local ``Shard(1)`` slice ``[N, padded_len / tp, D]``."""

    def input_fn(mod, inputs, mesh):
        return tuple(DTensor.from_local(x, mesh, [Replicate()], run_check=False) for x in inputs)

    def output_fn(mod, out, mesh):
        if out.shape[1] == padded_len:
            return out.redistribute(mesh, [Shard(1)]).to_local()
        # identical on every rank; the scatter's backward all-gathers the (padded) gradient, the pad drops its tail
        return sp_scatter(F.pad(out.to_local(), (0, 0, 0, padded_len - out.shape[1])), mesh)

    distribute_module(embeddings, tp_mesh, input_fn=input_fn, output_fn=output_fn)


def _drop_padded_patches(num_patches: int):
    """A forward pre-hook (run after the projector's all-gather) keeping the first ``num_patches`` rows of
    ``[N, P_pad, D]``; the backward gives the padded rows a zero gradient."""

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return (args[0][:, :num_patches], *args[1:])

    return hook


def apply_tp_vision(vision: VisionEncoder, tp_mesh: DeviceMesh) -> VisionEncoder:
    """Tensor + sequence parallelism for the vision encoder (ViT over its patches, then the projector), in place.

    Args:
        vision: the encoder; dense MLPs only.
        tp_mesh: the 1-D tp mesh of this rank.

    Forward after this: pixel values ``[N, C, H_img, W_img]`` (the same on every tp rank) → ``[N, P, H]``
    replicated over tp. Inside, blocks run on ``P_pad / tp`` patches per rank, ``P_pad = ceil(P / tp) * tp``.

    When tp does not divide the patch count ``P`` (729 patches of SigLIP-so400m/14 at 384 px with tp = 2), the
    patch sequence is zero-padded to ``P_pad`` after the patch embedding: the all-gather before each attention
    gathers ``P_pad`` rows, attention masks the padded keys (a boolean key-padding mask for SDPA), the norms and
    MLPs also run on the padded rows (row-wise, so the real rows are unaffected) and the projector drops them
    after its all-gather. The real patches' outputs and every gradient equal the unpadded model's. Example:
    ``P = 9``, tp = 2: ``P_pad = 10``, rank 0 holds patches 0-4, rank 1 patches 5-8 and one padded row.

    Raises:
        ValueError: heads or MLP widths not divisible by ``tp``.
    """
    tp = tp_mesh.size()
    vit = vision.vision_model
    check_tp("vision", vision.cfg, tp)
    assert vit.embeddings is not None, "an encoder with tp > 1 runs as one pipeline stage (validate_job)"
    assert vision.multi_modal_projector is not None
    num_patches = vit.embeddings.num_patches
    padded_len = -(-num_patches // tp) * tp
    _replicate_pad_scatter(vit.embeddings, tp_mesh, padded_len)
    plan = {
        "vision_model.post_layernorm": SequenceParallel(),
        "multi_modal_projector": _gather_input(1),
        "multi_modal_projector.linear_1": ColwiseParallel(),
        "multi_modal_projector.linear_2": RowwiseParallel(output_layouts=Replicate()),
    }
    for i in vit.encoder.layers:
        p = f"vision_model.encoder.layers.{i}."
        plan.update(
            {
                p + "layer_norm1": SequenceParallel(),
                p + "self_attn": _gather_input(1),
                p + "self_attn.q_proj": ColwiseParallel(),
                p + "self_attn.k_proj": ColwiseParallel(),
                p + "self_attn.v_proj": ColwiseParallel(),
                p + "self_attn.out_proj": RowwiseParallel(output_layouts=Shard(1)),
                p + "layer_norm2": SequenceParallel(),
                p + "mlp": _gather_input(1),
                p + "mlp.fc1": ColwiseParallel(),
                p + "mlp.fc2": RowwiseParallel(output_layouts=Shard(1)),
            }
        )
    parallelize_module(vision, tp_mesh, plan)
    if padded_len > num_patches:
        vit.mask_padded_patches(padded_len)
        # registered after the plan's all-gather hook on the same module, so it runs after it
        vision.multi_modal_projector.register_forward_pre_hook(_drop_padded_patches(num_patches))
    return vision
