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

Tied word embeddings are one tensor under two keys, ``language.model.embed_tokens.weight`` and
``language.lm_head.weight``, as in the single-process state dict, and their AdamW state is keyed by the embedding
alone (the parameter's name in ``MimoModel.named_parameters()``). With language ``pp > 1`` the first stage's
``embed_tokens.weight`` and the last stage's ``lm_head.weight`` are equal copies (:mod:`mimo_titan.pipeline.tied`)
and each stage writes its copy under both keys and its AdamW state under the embedding's key: the same entries as
``pp = 1`` (DCP keeps one of the equal duplicates), so a checkpoint loads into either layout and both copies read the
same values.

The optimizer state (AdamW ``exp_avg`` / ``exp_avg_sq`` / ``step``) is keyed ``{param key}.{state name}`` and
laid out like its parameter. ``model_state`` / ``optimizer_state`` return *views* of the live tensors: DCP's
load writes into them in place.

Before any process group exists, :func:`model_mismatch` compares a checkpoint's ``.metadata`` with the configured
model (:func:`model_shapes`, a meta-device :class:`MimoModel`) and names the first differing key, both shapes and
the ``model.*`` setting behind the difference (found by rebuilding the meta model with one setting changed).

Method: torch.distributed.checkpoint (DCP) with resharding by chunk offsets, as torchtitan's checkpointing;
per-expert keys as in Megatron-LM's distributed checkpoint of grouped experts.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import warnings
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from mimo_titan.errors import CheckpointError
from mimo_titan.models.decoder import DecoderLM
from mimo_titan.models.mimo import MimoModel, full_model_key
from mimo_titan.models.moe import MoE
from mimo_titan.parallel.ep import ExpertParallelDispatch, moe_modules

if TYPE_CHECKING:
    from mimo_titan.config import Config, ModelConfig

__all__ = [
    "EXPERT_WEIGHTS",
    "expert_key",
    "split_experts",
    "stack_experts",
    "model_state",
    "optimizer_state",
    "init_optimizer_state",
    "save_full_model_state",
    "load_full_model_state",
    "meta_model",
    "stacked_key",
    "model_shapes",
    "saved_shapes",
    "missing_data",
    "model_mismatch",
]

# stacked routed-expert weights of GroupedExperts and the per-expert dim split by expert TP
EXPERT_WEIGHTS = {"w_gate": 1, "w_up": 1, "w_down": 0}


def expert_key(stacked_key: str, e: int) -> str:
    """``a.mlp.experts.w_gate`` → ``a.mlp.experts.{e}.w_gate`` (the checkpoint key of expert ``e``)."""
    prefix, name = stacked_key.rsplit(".", 1)
    return f"{prefix}.{e}.{name}"


def stacked_key(key: str) -> str:
    """``a.mlp.experts.{e}.w_gate`` → ``a.mlp.experts.w_gate`` (the inverse of :func:`expert_key`); other keys
    unchanged."""
    parts = key.split(".")
    if len(parts) >= 3 and parts[-3] == "experts" and parts[-1] in EXPERT_WEIGHTS and parts[-2].isdigit():
        return ".".join([*parts[:-2], parts[-1]])
    return key


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
        stacked = stacked_key(key)
        if stacked != key:
            if stacked not in groups:
                groups[stacked] = {}
                out[stacked] = None  # type: ignore[assignment]  # keeps the key order; the stack replaces it below
            groups[stacked][int(key.split(".")[-2])] = value
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
            piece = DTensor.from_local(
                piece,
                etp_mesh,
                [Shard(split_dim)],
                run_check=False,
                shape=torch.Size(shape),
                stride=torch.empty(shape, device="meta").stride(),
            )
        out[expert_key(key, first + offset + i)] = piece
    return out


def _expert_owners(module_name: str, module: nn.Module) -> dict[str, MoE]:
    """``{canonical stacked expert weight key: its MoE layer}`` of ``module``."""
    owners = {}
    for qual, moe in moe_modules(module):
        for w in EXPERT_WEIGHTS:
            owners[full_model_key(module_name, f"{qual}.experts.{w}")] = moe
    return owners


def _tied_copy_keys(module_name: str, module: nn.Module) -> tuple[str, str] | None:
    """``(key of this part's copy, key of the other copy)`` when ``module`` is a pipeline stage holding exactly one
    of the two tied word-embedding matrices (``embed_tokens`` on the first stage or ``lm_head`` on the last, with
    ``tie_word_embeddings``); None otherwise (untied, a middle stage, or the whole language model)."""
    for qual, sub in module.named_modules():
        if isinstance(sub, DecoderLM) and sub.cfg.tie_word_embeddings:
            pre = f"{qual}." if qual else ""
            embed = full_model_key(module_name, f"{pre}model.embed_tokens.weight")
            head = full_model_key(module_name, f"{pre}lm_head.weight")
            if (sub.model.embed_tokens is None) == (sub.lm_head is None):
                return None
            return (embed, head) if sub.model.embed_tokens is not None else (head, embed)
    return None


def model_state(module_name: str, module: nn.Module, etp_mesh=None) -> dict[str, torch.Tensor]:
    """This rank's part of module ``module_name`` as checkpoint entries (views of the live tensors).

    Args:
        module_name: ``"vision"`` / ``"language"`` (the prefix of the full model's keys).
        module: this rank's (FSDP / TP / EP-parallelised) part of it, e.g. a pipeline stage.
        etp_mesh: the 1-D expert-TP mesh when the module's ``etp > 1``.

    Returns:
        ``{key: tensor}`` with full-model keys; expert weights per expert; a pipeline stage's copy of tied word
        embeddings under both of their keys (module docstring).
    """
    owners = _expert_owners(module_name, module)
    out: dict[str, torch.Tensor] = {}
    for key, value in module.state_dict().items():
        key = full_model_key(module_name, key)
        if key in owners:
            out.update(_expert_entries(key, value, owners[key], etp_mesh))
        else:
            out[key] = value
    tied = _tied_copy_keys(module_name, module)
    if tied is not None:  # the single-process state dict has both keys of the one tensor
        own, other = tied
        out[other] = out[own]
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


def optimizer_state(
    module_name: str, module: nn.Module, optimizer: torch.optim.Optimizer, etp_mesh=None
) -> dict[str, torch.Tensor]:
    """AdamW state of ``module``'s parameters as checkpoint entries ``{param key}.{exp_avg|exp_avg_sq|step}``.

    Calls :func:`init_optimizer_state` first. Moments are laid out like their parameter (per expert for expert
    weights); ``step`` is a 0-dim fp32 tensor keyed by the (stacked) parameter key. The last pipeline stage's copy
    of tied word embeddings (``lm_head.weight``) is keyed by ``...embed_tokens.weight``, as the one tied parameter of
    the single-process model.

    Raises:
        KeyError: a parameter of the optimizer is not a parameter of ``module``.
    """
    init_optimizer_state(optimizer)
    owners = _expert_owners(module_name, module)
    names = {p: full_model_key(module_name, n) for n, p in module.named_parameters()}
    tied = _tied_copy_keys(module_name, module)
    if tied is not None and tied[0].endswith("lm_head.weight"):
        names = {p: tied[1] if key == tied[0] else key for p, key in names.items()}
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
        dcp.save(
            {"model": split_experts({k: v.detach().contiguous() for k, v in state.items()})},
            checkpoint_id=path,
            no_dist=True,
        )


def load_full_model_state(path: str, cfg: Config) -> dict[str, torch.Tensor]:
    """Read the full single-process model state (keys as ``MimoModel.state_dict()``, stacked experts) from a
    checkpoint directory (a training checkpoint ``step-N`` or a model-only one), in one process.

    Args:
        path: the checkpoint directory (holds DCP's ``.metadata``).
        cfg: the run's ``Config`` (the model's shapes come from ``cfg.model``).

    Raises:
        CheckpointError: ``path`` is not a checkpoint directory; a key missing or a shape different from
            ``cfg.model`` (:func:`model_mismatch`).
    """
    import os

    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise CheckpointError(f"{path} is not a checkpoint directory (no .metadata); pass a step-N directory")
    problem = model_mismatch(saved_shapes(path), cfg.model)
    if problem is not None:
        raise CheckpointError(
            f"checkpoint {path} does not fit the configured model: {problem}. Pass the model.* "
            "settings it was saved with"
        )
    with torch.device("cpu"):
        template = split_experts(MimoModel(cfg.model, image_token_id=0, audio_token_id=1).state_dict())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        dcp.load({"model": template}, checkpoint_id=path, no_dist=True)
    return stack_experts(template)


# ---------------------------------------------------------------------------------------------- shape checks
def meta_model(model_cfg: ModelConfig) -> MimoModel:
    """The single-process :class:`MimoModel` of ``model_cfg`` on the meta device: shapes and dtypes, no memory."""
    with torch.device("meta"):
        return MimoModel(model_cfg, image_token_id=0, audio_token_id=1)


def model_shapes(model_cfg: ModelConfig, parameters_only: bool = False) -> dict[str, tuple[int, ...]]:
    """``{checkpoint key without the "model." prefix: shape}`` of the model ``model_cfg`` describes (experts one
    key per expert, as :func:`model_state` writes them), in state-dict order.

    Args:
        model_cfg: a ``ModelConfig``.
        parameters_only: only the parameters (the tensors with AdamW state), not the persistent buffers.
    """
    model = meta_model(model_cfg)
    state: dict[str, torch.Tensor] = dict(model.named_parameters()) if parameters_only else model.state_dict()
    return {k: tuple(v.shape) for k, v in split_experts(state).items()}


def saved_shapes(path: str, metadata: Metadata | None = None) -> dict[str, tuple[int, ...] | None]:
    """``{key: shape}`` of every entry of the DCP checkpoint directory ``path`` (``model.*``, ``optimizer.*``,
    ``rng.*``; None for the non-tensor ``extra.*`` entries), read from its ``.metadata`` alone (or ``metadata``,
    already read), in this process (no process group, no tensor data).

    Raises:
        OSError: ``path`` has no readable ``.metadata``.
    """
    meta = (metadata or dcp.FileSystemReader(path).read_metadata()).state_dict_metadata
    return {k: tuple(v.size) if isinstance(v, TensorStorageMetadata) else None for k, v in meta.items()}


def missing_data(path: str, metadata: Metadata | None = None) -> str | None:
    """What is missing from the data files of the DCP checkpoint directory ``path``, from its ``.metadata`` alone
    (or ``metadata``, already read): the first file that does not exist or is shorter than the entries stored in
    it need (a copy cut short, a rank's file lost); None when every file is there and long enough.

    Raises:
        OSError: ``path`` has no readable ``.metadata``.
    """
    storage = (metadata or dcp.FileSystemReader(path).read_metadata()).storage_data or {}
    need: dict[str, int] = {}
    for info in storage.values():
        rel = getattr(info, "relative_path", None)
        if rel is not None:
            need[rel] = max(need.get(rel, 0), int(info.offset) + int(info.length))
    for rel, size in sorted(need.items()):
        file = os.path.join(path, rel)
        if not os.path.isfile(file):
            return f"its data file {rel} is missing"
        if os.path.getsize(file) < size:
            return f"its data file {rel} has {os.path.getsize(file)} bytes but its entries need {size}"
    return None


def _shape_fields(model_cfg: Any, prefix: str = "") -> list[tuple[str, object]]:
    """``(path relative to cfg.model, value)`` of every int, bool and optional-int setting of ``model_cfg`` and
    its sub-tables (``language.hidden_size``, ``language.moe.num_experts``, ``language.head_dim``, ...)."""
    out = []
    for f in dataclasses.fields(model_cfg):
        value = getattr(model_cfg, f.name)
        if f.name == getattr(model_cfg, "_open", None):  # [model.<name>] tables: paths by module name
            for name, section in value.items():
                out += _shape_fields(section, f"{prefix}{name}.")
        elif dataclasses.is_dataclass(value):
            out += _shape_fields(value, f"{prefix}{f.name}.")
        elif isinstance(value, int) or (value is None and "int" in str(f.type)):
            out.append((prefix + f.name, value))
    return out


def _trial_values(value, presence: bool) -> list:
    """Other values of a setting to rebuild the model with: flipped for a bool; 16, 32 for an unset optional int
    (one of them differs from the derived default); for an int ``v``: 1, 2 when 0, else ``2v`` and ``v // 2``
    (a size the setting scales changes) and, when a tensor is present on one side only (``presence``), also 0,
    ``v + 1``, ``v - 1`` (0 turns a feature such as MoE off, ``± 1`` adds or removes one layer)."""
    if isinstance(value, bool):
        return [not value]
    if value is None:
        return [16, 32]
    trials = [1, 2] if value == 0 else [2 * value, value // 2] + ([0, value + 1, value - 1] if presence else [])
    return [v for v in dict.fromkeys(trials) if v != value and v >= 0]


def _shapes_with(model_cfg: ModelConfig, path: str, value, cache: dict) -> dict[str, tuple[int, ...]] | None:
    """:func:`model_shapes` with setting ``path`` set to ``value`` (memoised in ``cache``); None if that model
    cannot be built."""
    if (path, value) not in cache:
        cfg = copy.deepcopy(model_cfg)
        *parents, name = path.split(".")
        obj = cfg
        for p in parents:
            obj = getattr(obj, p)
        setattr(obj, name, value)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cache[path, value] = model_shapes(cfg)
        except Exception:  # noqa: BLE001 - an invalid combination of settings says nothing about this key
            cache[path, value] = None
    return cache[path, value]


def _under(shapes: dict, prefix: str) -> dict:
    return {k: v for k, v in shapes.items() if k.startswith(prefix)}


def _explaining_settings(model_cfg: ModelConfig, key: str, have: dict, want: dict) -> tuple[list, list]:
    """Which ``cfg.model`` settings decide the tensor ``key`` where the checkpoint (shapes ``have``) and the
    configured model (shapes ``want``) differ (keys without the ``model.`` prefix; ``key`` may be on one side
    only).

    Method: rebuild the meta-device model with one setting changed at a time (:func:`_trial_values`).

    - Shapes differ: a setting is *related* if a change alters a differing dimension of ``key``. The dimension is
      taken as linear in the setting (sizes are products of settings) and solved for the value giving the
      checkpoint's size; that value (or a trial value) is a *fit* if the rebuilt model has the checkpoint's shape.
    - One side lacks ``key``: take the deepest block (dotted prefix) of ``key`` that both sides have tensors in
      (``...layers.0.self_attn`` for a missing q_norm, ``...layers`` for a missing layer). A setting is *related* if
      a change adds / removes ``key`` but keeps that block (so ``num_layers = 0`` does not explain a missing norm),
      a *fit* if the block's tensors then equal the checkpoint's.

    Returns:
        ``(exact, related)``: ``exact`` lists ``(path, value)`` fits with the fewest tensors left differing from
        the checkpoint over the whole model (ties all kept); ``related`` the paths (relative to ``cfg.model``) of
        every related setting.
    """
    cache: dict = {}
    saved, wanted = have.get(key), want.get(key)
    if saved is not None and wanted is not None:
        dims = [d for d in range(len(wanted)) if saved[d] != wanted[d]] if len(saved) == len(wanted) else None
        block = None
    else:
        dims, block, parts = None, "", key.split(".")
        for i in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:i]) + "."
            if _under(have, prefix) and _under(want, prefix):
                block = prefix
                break

    def fits(shapes) -> bool:
        return shapes.get(key) == saved if block is None else _under(shapes, block) == _under(have, block)

    def mismatches(shapes) -> int:
        return sum(shapes.get(k) != v for k, v in have.items()) + sum(k not in have for k in shapes)

    related, exact = [], []
    for path, value in _shape_fields(model_cfg):
        found = None
        for trial in _trial_values(value, presence=block is not None):
            shapes = _shapes_with(model_cfg, path, trial, cache)
            if shapes is None:
                continue
            got = shapes.get(key)
            if block is None:
                assert wanted is not None  # block is None: both sides have key
                if got is None or not (
                    len(got) != len(wanted) if dims is None else any(got[d] != wanted[d] for d in dims)
                ):
                    continue
            elif (got is None) == (wanted is None) or (block and not _under(shapes, block)):
                continue
            if path not in related:
                related.append(path)
            if fits(shapes):
                found = trial
            elif (
                dims
                and got is not None
                and saved is not None
                and wanted is not None  # dims: both sides have key
                and isinstance(value, int)
                and not isinstance(value, bool)
                and len(got) == len(wanted)
            ):
                d = next(d for d in dims if got[d] != wanted[d])
                need = value + (saved[d] - wanted[d]) * (trial - value) / (got[d] - wanted[d])
                if need > 0 and need == int(need) and fits(_shapes_with(model_cfg, path, int(need), cache) or {}):
                    found = int(need)
            if found is not None:
                exact.append((path, found, mismatches(cache[path, found])))
                break
    best = min((m for *_, m in exact), default=None)
    return [(p, v) for p, v, m in exact if m == best], related


def _config_value(model_cfg: ModelConfig, path: str) -> Any:
    obj = model_cfg
    for p in path.split("."):
        obj = getattr(obj, p)
    return obj


def model_mismatch(saved: dict[str, tuple[int, ...] | None], model_cfg: ModelConfig) -> str | None:
    """Compare a checkpoint's ``model.*`` tensor shapes with the model ``model_cfg`` describes.

    Args:
        saved: ``{key: shape}`` of the checkpoint (:func:`saved_shapes`); keys other than ``model.*`` are ignored.
        model_cfg: the configured ``ModelConfig``.

    Returns:
        None when every key and shape agrees, else one sentence naming the first differing key (in the model's
        state-dict order; then keys only the checkpoint has), both shapes, the ``model.*`` setting(s) that decide
        it (:func:`_explaining_settings`) and how many other tensors differ.
    """
    want = {f"model.{k}": v for k, v in model_shapes(model_cfg).items()}
    have = {k: v for k, v in saved.items() if k.startswith("model.") and v is not None}
    if not have:
        return "the checkpoint holds no model.* tensors"
    diff = [k for k in want if have.get(k) != want[k]] + [k for k in have if k not in want]
    if not diff:
        return None
    key = diff[0]
    s, w = have.get(key), want.get(key)
    if s is None:
        assert w is not None  # key is in diff: the model or the checkpoint has it
        what = f"{key} {list(w)} is in the configured model but not in the checkpoint"
    elif w is None:
        what = f"{key} {list(s)} is in the checkpoint but not in the configured model"
    else:
        what = f"{key} is {list(s)} in the checkpoint but {list(w)} in the config"
    n = len("model.")
    exact, related = _explaining_settings(
        model_cfg, key[n:], {k[n:]: v for k, v in have.items()}, {k[n:]: v for k, v in want.items()}
    )
    if exact:
        why = " or ".join(
            f"model.{p} (the checkpoint fits {v}, the config has {_config_value(model_cfg, p)})" for p, v in exact
        )
        why = f"; that is set by {why}"
    elif related:
        why = "; that is set by " + " / ".join(
            f"model.{p} (= {_config_value(model_cfg, p)} in the config)" for p in related
        )
    else:
        why = "; no single model.* setting explains it"
    n = len(diff) - 1
    more = f" ({n} more tensor{'s differ' if n > 1 else ' differs'})" if n else ""
    return what + why + more
