"""Layout-independent state dicts of a rank's model parts and optimizers, for torch.distributed.checkpoint.

A checkpoint must load under any other parallel layout (resharding), so every key names a tensor of the
*single-process* :class:`~mimo_titan.models.mimo.MimoModel` (``vision.*``, ``language.*``) and every value
describes where this rank's piece sits inside that full tensor:

- dense parameters are FSDP2 / TP ``DTensor`` shards; DCP records their offsets and reshards them on load;
- persistent buffers (the MoE router's ``e_score_correction_bias``) are plain tensors, equal on every rank
  that holds them (DCP saves one copy);
- routed-expert weights are stored **one key per expert**: ``...mlp.experts.{e}.w_gate`` ``[H, I]``,
  ``...mlp.experts.{e}.w_up`` ``[H, I]``, ``...mlp.experts.{e}.w_down`` ``[I, H]``. Under expert parallelism
  a rank's ``[L, H, I]`` slice is a plain tensor made by ``apply_ep`` (experts ``[ep_rank·L, (ep_rank+1)·L)``)
  and FSDP-sharded over edp along the expert dim, so it always holds whole experts; their global index is
  ``ep_rank·L + (edp offset) + i``. Under expert TP each expert is a ``DTensor`` over the etp ranks
  (``Shard`` of the width I). So ep / etp / edp may all change between save and load.

The optimizer state (AdamW ``exp_avg`` / ``exp_avg_sq`` / ``step``) is keyed ``{param key}.{state name}`` and
laid out like its parameter. ``model_state`` / ``optimizer_state`` return *views* of the live tensors: DCP's
load writes into them in place.

Method: torch.distributed.checkpoint (DCP) with resharding by chunk offsets, as torchtitan's checkpointing;
per-expert keys as in Megatron-LM's distributed checkpoint of grouped experts.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from mimo_titan.models.mimo import full_model_key
from mimo_titan.models.moe import MoE
from mimo_titan.parallel.ep import ExpertParallelDispatch, moe_modules

__all__ = [
    "EXPERT_WEIGHTS", "expert_key", "split_experts", "stack_experts", "model_state", "optimizer_state",
    "init_optimizer_state", "save_full_model_state", "load_full_model_state",
]

# stacked routed-expert weights of GroupedExperts and the per-expert dim split by expert TP
EXPERT_WEIGHTS = {"w_gate": 1, "w_up": 1, "w_down": 0}


def expert_key(stacked_key: str, e: int) -> str:
    """``a.mlp.experts.w_gate`` → ``a.mlp.experts.{e}.w_gate`` (the checkpoint key of expert ``e``)."""
    prefix, name = stacked_key.rsplit(".", 1)
    return f"{prefix}.{e}.{name}"


def _is_expert_weight(key: str) -> bool:
    parts = key.split(".")
    return len(parts) >= 2 and parts[-2] == "experts" and parts[-1] in EXPERT_WEIGHTS


def split_experts(full_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full single-process state (stacked experts ``[E, ...]``) → checkpoint keys (one entry per expert, views)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in full_state.items():
        if _is_expert_weight(key):
            for e in range(value.shape[0]):
                out[expert_key(key, e)] = value[e]
        else:
            out[key] = value
    return out


def stack_experts(ckpt_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`split_experts`: per-expert entries → stacked ``[E, ...]`` tensors (keys in order).

    Raises:
        ValueError: the experts of a weight are not numbered ``0..E-1``.
    """
    out: dict[str, torch.Tensor] = {}
    groups: dict[str, dict[int, torch.Tensor]] = {}
    for key, value in ckpt_state.items():
        parts = key.split(".")
        if len(parts) >= 3 and parts[-3] == "experts" and parts[-1] in EXPERT_WEIGHTS and parts[-2].isdigit():
            stacked = ".".join(parts[:-2] + [parts[-1]])
            if stacked not in groups:
                groups[stacked] = {}
                out[stacked] = None  # keep the key order
            groups[stacked][int(parts[-2])] = value
        else:
            out[key] = value
    for stacked, experts in groups.items():
        if sorted(experts) != list(range(len(experts))):
            raise ValueError(f"checkpoint experts of {stacked} are {sorted(experts)}, expected 0..{len(experts) - 1}")
        out[stacked] = torch.stack([experts[e] for e in range(len(experts))])
    return out


def _local_and_offset(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The local tensor of ``t`` and the global offset of its first row along dim 0 (0 for a plain tensor)."""
    if isinstance(t, DTensor):
        _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        return t.to_local(), int(offset[0]) if len(offset) else 0
    return t, 0


def _expert_entries(key: str, value: torch.Tensor, moe: MoE, etp_mesh) -> dict[str, torch.Tensor]:
    """Per-expert checkpoint entries of this rank's slice ``value`` of the stacked expert weight ``key``."""
    dispatch = moe.dispatcher
    ep_rank, ep_size = (dispatch.ep_rank, dispatch.ep_size) if isinstance(dispatch, ExpertParallelDispatch) else (0, 1)
    etp_size = dispatch.etp_size if isinstance(dispatch, ExpertParallelDispatch) else 1
    first = ep_rank * (moe.num_experts // ep_size)
    local, offset = _local_and_offset(value)
    split_dim = EXPERT_WEIGHTS[key.rsplit(".", 1)[1]]
    out = {}
    for i in range(local.shape[0]):
        piece = local[i]
        if etp_size > 1:
            shape = list(piece.shape)
            shape[split_dim] *= etp_size
            piece = DTensor.from_local(piece, etp_mesh, [Shard(split_dim)], run_check=False, shape=torch.Size(shape),
                                       stride=torch.empty(shape, device="meta").stride())
        out[expert_key(key, first + offset + i)] = piece
    return out


def _expert_owners(module_name: str, module: nn.Module) -> dict[str, MoE]:
    """``{canonical stacked expert weight key: its MoE layer}`` of ``module``."""
    owners = {}
    for qual, moe in moe_modules(module):
        for w in EXPERT_WEIGHTS:
            owners[full_model_key(module_name, f"{qual}.experts.{w}")] = moe
    return owners


def model_state(module_name: str, module: nn.Module, etp_mesh=None) -> dict[str, torch.Tensor]:
    """This rank's part of module ``module_name`` as checkpoint entries (views of the live tensors).

    Args:
        module_name: ``"vision"`` / ``"language"`` (the prefix of the full model's keys).
        module: this rank's (FSDP / TP / EP-parallelised) part of it, e.g. a pipeline stage.
        etp_mesh: the 1-D expert-TP mesh when the module's ``etp > 1``.

    Returns:
        ``{key: tensor}`` with full-model keys; expert weights per expert (module docstring).
    """
    owners = _expert_owners(module_name, module)
    out: dict[str, torch.Tensor] = {}
    for key, value in module.state_dict().items():
        key = full_model_key(module_name, key)
        if key in owners:
            out.update(_expert_entries(key, value, owners[key], etp_mesh))
        else:
            out[key] = value
    return out


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create AdamW's per-parameter state (``step`` 0, zero moments) where it does not exist yet, so a freshly
    built optimizer has tensors for a checkpoint to load into (the state ``torch.optim.AdamW`` would create)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if not state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def optimizer_state(module_name: str, module: nn.Module, optimizer: torch.optim.Optimizer,
                    etp_mesh=None) -> dict[str, torch.Tensor]:
    """AdamW state of ``module``'s parameters as checkpoint entries ``{param key}.{exp_avg|exp_avg_sq|step}``.

    Calls :func:`init_optimizer_state` first. Moments are laid out like their parameter (per expert for expert
    weights); ``step`` is a 0-dim fp32 tensor keyed by the (stacked) parameter key.

    Raises:
        KeyError: a parameter of the optimizer is not a parameter of ``module``.
    """
    init_optimizer_state(optimizer)
    owners = _expert_owners(module_name, module)
    names = {p: full_model_key(module_name, n) for n, p in module.named_parameters()}
    out: dict[str, torch.Tensor] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            key = names[p]
            state = optimizer.state[p]
            out[f"{key}.step"] = state["step"]
            for moment in ("exp_avg", "exp_avg_sq"):
                if key in owners:
                    for k, v in _expert_entries(key, state[moment], owners[key], etp_mesh).items():
                        out[f"{k}.{moment}"] = v
                else:
                    out[f"{key}.{moment}"] = state[moment]
    return out


def save_full_model_state(state: dict[str, torch.Tensor], path: str) -> None:
    """Write a model-only checkpoint from a full single-process state (keys as ``MimoModel.state_dict()``).

    No process group is needed. The result loads like a training checkpoint's model (e.g. through
    ``checkpoint.initial_load_path``) under any layout.
    """
    with warnings.catch_warnings():  # DCP warns that it runs in one process, which is the intent here
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        dcp.save({"model": split_experts({k: v.detach().contiguous() for k, v in state.items()})},
                 checkpoint_id=path, no_dist=True)


def load_full_model_state(path: str, cfg) -> dict[str, torch.Tensor]:
    """Read the full single-process model state (keys as ``MimoModel.state_dict()``, stacked experts) from a
    checkpoint directory (a training checkpoint ``step-N`` or a model-only one), in one process.

    Args:
        path: the checkpoint directory (holds DCP's ``.metadata``).
        cfg: the run's ``Config`` (the model's shapes come from ``cfg.model``).

    Raises:
        FileNotFoundError: ``path`` is not a checkpoint directory.
        RuntimeError / ValueError (from DCP): a key missing or a shape different from ``cfg.model``.
    """
    import os

    from mimo_titan.models.mimo import MimoModel

    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise FileNotFoundError(f"{path} is not a checkpoint directory (no .metadata); pass a step-N directory")
    with torch.device("cpu"):
        template = split_experts(MimoModel(cfg.model, image_token_id=0).state_dict())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        dcp.load({"model": template}, checkpoint_id=path, no_dist=True)
    return stack_experts(template)
