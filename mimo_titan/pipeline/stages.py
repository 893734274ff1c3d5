"""Split the language model into pipeline stages (contiguous layer ranges, global layer names kept).

With ``parallelism.pipeline_schedule = "Interleaved1F1B"`` and ``parallelism.virtual_stages = v`` the language
model is split into ``pp · v`` stages (chunks) and pp rank ``r`` holds stages ``r, r + pp, ..., r + (v - 1)·pp``
(:func:`virtual_stage_indices`); :class:`LanguageChunks` holds them as one module under the single stage's names.

Method: torchtitan's manual pipeline split (copy, then drop the layers and heads a stage does not own; here the
dropped parts are never copied, and the trainer splits a meta-device model);
virtual stages as Megatron-LM's ``virtual_pipeline_model_parallel_size`` (Narayanan et al. 2021) and torchtitan's
looped stage-to-rank assignment for ``ScheduleInterleaved1F1B``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TypeVar

import torch
from torch import nn

from mimo_titan.models.decoder import DecoderLM
from mimo_titan.models.vit import VisionEncoder

__all__ = [
    "LanguageChunks",
    "merge_language_chunks",
    "split_language_model",
    "split_vision_encoder",
    "stage_layer_range",
    "virtual_stage_indices",
    "vision_stage_of",
]


def stage_layer_range(num_layers: int, pp: int, stage: int, module: str = "language") -> range:
    """Layers ``[start, end)`` owned by pipeline ``stage`` of ``pp``: an even split, earlier stages take the remainder.

    Example: 5 layers, pp=2 → stage 0 owns 0..2, stage 1 owns 3..4.

    Raises:
        ValueError: if ``num_layers < pp`` (a stage would own no layer).
    """
    if num_layers < pp:
        raise ValueError(
            f"model.{module}.num_layers={num_layers} is smaller than parallelism.{module}.pp={pp}: every pipeline "
            "stage needs at least one layer; lower pp or add layers"
        )
    base, extra = divmod(num_layers, pp)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (1 if stage < extra else 0))


_M = TypeVar("_M", bound=nn.Module)


def _copy_without(module: _M, dropped: Sequence[nn.Module | None]) -> _M:
    """A deep copy of ``module`` in which the ``dropped`` submodules are ``None`` and were never copied: a meta-device
    module stays on meta (no memory), a real one copies only the parts it keeps. Parameters shared between a kept and
    a dropped submodule (tied embeddings) are copied with the kept one."""
    memo: dict[int, object] = {id(m): None for m in dropped if m is not None}
    return copy.deepcopy(module, memo)


def _keep_layers(layers: nn.ModuleDict, keep: range) -> None:
    """Drop, in place, the layers (keyed by global index) outside ``keep`` (also the ``None`` left by
    :func:`_copy_without`)."""
    for name in list(layers.keys()):
        if int(name) not in keep:
            del layers[name]


def split_language_model(lm: DecoderLM, pp: int, stage: int) -> DecoderLM:
    """The part of ``lm`` that pipeline ``stage`` of ``pp`` runs (a copy of the kept parts only; ``lm`` is
    untouched; a meta-device ``lm`` gives a meta-device part, to be materialised after parallelisation). With virtual
    stages ``pp`` is the number of stages of the whole pipeline (``pp · virtual_stages``) and ``stage`` a global stage
    index (:func:`virtual_stage_indices`).

    Stage 0 keeps ``embed_tokens``; the last stage keeps ``norm`` and ``lm_head``; parameter names are the
    full model's names, so a stage's state dict is a subset of the full one. With tied embeddings and ``pp > 1``
    stage 0's ``embed_tokens.weight`` and the last stage's ``lm_head.weight`` are two copies ``[V, H]`` of the one
    tied tensor (equal values); :mod:`mimo_titan.pipeline.tied` keeps them equal during training.

    Raises:
        ValueError: on ``num_layers < pp``.
    """
    keep = stage_layer_range(len(lm.model.layers), pp, stage)
    dropped: list[nn.Module | None] = [layer for key, layer in lm.model.layers.items() if int(key) not in keep]
    if stage != 0:
        dropped.append(lm.model.embed_tokens)
    if stage != pp - 1:
        dropped += [lm.model.norm, lm.lm_head]
    part = _copy_without(lm, dropped)
    _keep_layers(part.model.layers, keep)
    if stage != 0:
        part.model.embed_tokens = None
    if stage != pp - 1:
        part.model.norm = None
        part.lm_head = None
    return part


def split_vision_encoder(encoder: VisionEncoder, pp: int, stage: int, module: str = "vision") -> VisionEncoder:
    """The part of a vision ``encoder`` that pipeline ``stage`` of ``pp`` runs (a copy of the kept parts only;
    ``encoder`` is untouched; meta stays meta).

    Stage 0 keeps the patch embeddings; the last stage keeps ``post_layernorm`` and the projector; each stage keeps
    its contiguous range of blocks (:func:`stage_layer_range`) under their global names. Between stages travels
    ``[N, P, D]`` (D the ViT width); the last stage returns ``[N, P, H]``.

    Raises:
        ValueError: ``num_layers < pp``.
    """
    keep = stage_layer_range(len(encoder.vision_model.encoder.layers), pp, stage, module)
    vit = encoder.vision_model
    dropped: list[nn.Module | None] = [layer for key, layer in vit.encoder.layers.items() if int(key) not in keep]
    if stage != 0:
        dropped.append(vit.embeddings)
    if stage != pp - 1:
        dropped += [vit.post_layernorm, encoder.multi_modal_projector]
    part = _copy_without(encoder, dropped)
    _keep_layers(part.vision_model.encoder.layers, keep)
    if stage != 0:
        part.vision_model.embeddings = None
    if stage != pp - 1:
        part.vision_model.post_layernorm = None
        part.multi_modal_projector = None
    return part


def vision_stage_of(name: str, num_layers: int, pp: int) -> int:
    """The pipeline stage (of ``pp``) of a vision encoder that holds parameter ``name`` (relative to the encoder,
    as :func:`split_vision_encoder` splits it): the patch embeddings on stage 0, block ``i`` on its
    :func:`stage_layer_range`, ``post_layernorm`` and the projector on the last stage."""
    if name.startswith("vision_model.embeddings."):
        return 0
    if name.startswith("vision_model.encoder.layers."):
        layer = int(name.split(".")[3])
        return next(s for s in range(pp) if layer in stage_layer_range(num_layers, pp, s))
    return pp - 1


def virtual_stage_indices(pp: int, virtual_stages: int, rank: int) -> list[int]:
    """The global stages (of ``pp · virtual_stages``) that language pp rank ``rank`` holds: ``rank + j·pp`` for
    ``j < virtual_stages`` (the looped assignment of ``torch.distributed.pipelining.ScheduleInterleaved1F1B``).

    Example: pp = 2, virtual_stages = 2 → rank 0 holds stages [0, 2] (layers 0-1 and 4-5 of 8), rank 1 [1, 3]."""
    if not 0 <= rank < pp:
        raise ValueError(f"pp rank {rank} is outside [0, {pp})")
    return [rank + j * pp for j in range(virtual_stages)]


def merge_language_chunks(parts: Sequence[DecoderLM]) -> DecoderLM:
    """A :class:`DecoderLM` that *shares* the submodules of ``parts`` (one rank's virtual stages, in stage order):
    its ``model.layers`` holds every part's layers under their global indices (ascending), ``embed_tokens`` is the
    part's that has it, ``norm`` / ``lm_head`` those of the part that has them (None where no part does).

    Nothing is copied: its parameters *are* the parts' (FSDP-sharded ``DTensor`` s when the parts are), so
    ``named_parameters()`` / ``state_dict()`` give the single stage's names (``model.layers.<i>.*``,
    ``model.embed_tokens.weight``, ...) for the parts' tensors. Never run it: each part runs as its own stage.

    Raises:
        ValueError: no part, or two parts holding the same layer, embedding, norm or head.
    """
    if not parts:
        raise ValueError("no language model part to merge")
    with torch.device("meta"):  # the skeleton's own (full-size) tensors are replaced below: no memory
        view = DecoderLM(parts[0].cfg)
    layers: dict[str, nn.Module] = {}
    for part in parts:
        for key, layer in part.model.layers.items():
            if key in layers:
                raise ValueError(f"two language model parts hold layer {key}")
            layers[key] = layer
    view.model.layers = nn.ModuleDict({k: layers[k] for k in sorted(layers, key=int)})

    def only(name: str, get) -> nn.Module | None:
        held = [m for m in map(get, parts) if m is not None]
        if len(held) > 1:
            raise ValueError(f"{len(held)} language model parts hold {name}")
        return held[0] if held else None

    view.model.embed_tokens = only("embed_tokens", lambda p: p.model.embed_tokens)  # type: ignore[assignment]
    view.model.norm = only("norm", lambda p: p.model.norm)  # type: ignore[assignment]
    view.lm_head = only("lm_head", lambda p: p.lm_head)  # type: ignore[assignment]
    return view


class LanguageChunks(nn.Module):
    """One language pp rank's virtual pipeline stages (Interleaved1F1B) as one module.

    Args:
        chunks: the rank's stage modules in stage order, each run as its own ``PipelineStage`` (in training
            :class:`~mimo_titan.models.mimo.LanguageStage` s, each FSDP-wrapped on its own).
        stage_indices: their global stage indices (:func:`virtual_stage_indices`).
        num_stages: stages of the whole language pipeline (``pp · virtual_stages``).

    Names: when every chunk is a ``LanguageStage``, ``language`` is :func:`merge_language_chunks` of their decoders,
    so ``named_parameters()``, ``state_dict()``, ``named_modules()`` and ``parameters()`` give exactly what one
    stage holding all these layers would (``language.model.layers.<i>.*``, ``language.model.embed_tokens.weight``,
    ``language.lm_head.weight``, ...), each tensor once: checkpoints, optimizers, the gradient norm, MoE statistics and
    tied embeddings treat it like a single stage. Other chunk modules (a benchmark's stand-ins) are registered as
    ``parts.<j>``. ``chunks`` itself is a plain tuple (not registered): its tensors would otherwise appear twice.
    """

    chunks: tuple[nn.Module, ...]

    def __init__(self, chunks: Sequence[nn.Module], stage_indices: Sequence[int], num_stages: int):
        super().__init__()
        if len(chunks) != len(stage_indices) or not chunks:
            raise ValueError(f"{len(chunks)} chunks for stage indices {list(stage_indices)}")
        object.__setattr__(self, "chunks", tuple(chunks))
        self.stage_indices, self.num_stages = tuple(stage_indices), num_stages
        decoders = [getattr(c, "language", None) for c in chunks]
        if all(isinstance(d, DecoderLM) for d in decoders):
            self.language = merge_language_chunks(decoders)  # type: ignore[arg-type]
        else:
            self.parts = nn.ModuleList(chunks)

    def forward(self, *args, **kwargs):
        raise RuntimeError("LanguageChunks is not run as a whole: the pipeline schedule runs each of its chunks")
