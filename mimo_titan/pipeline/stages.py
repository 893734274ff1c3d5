"""Split the language model into pipeline stages (contiguous layer ranges, global layer names kept).

Method: torchtitan's manual pipeline split (deep-copy, then drop the layers and heads a stage does not own).
"""

from __future__ import annotations

import copy

from torch import nn

from mimo_titan.models.decoder import DecoderLM
from mimo_titan.models.vit import VisionEncoder

__all__ = ["split_language_model", "split_vision_encoder", "stage_layer_range", "vision_stage_of"]


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


def _keep_layers(layers: nn.ModuleDict, keep: range) -> None:
    """Drop, in place, the layers (keyed by global index) outside ``keep``."""
    for name in list(layers.keys()):
        if int(name) not in keep:
            del layers[name]


def split_language_model(lm: DecoderLM, pp: int, stage: int) -> DecoderLM:
    """The part of ``lm`` that pipeline ``stage`` of ``pp`` runs (a deep copy; ``lm`` is untouched).

    Stage 0 keeps ``embed_tokens``; the last stage keeps ``norm`` and ``lm_head``; parameter names are the
    full model's names, so a stage's state dict is a subset of the full one. With tied embeddings and ``pp > 1``
    stage 0's ``embed_tokens.weight`` and the last stage's ``lm_head.weight`` are two copies ``[V, H]`` of the one
    tied tensor (equal values); :mod:`mimo_titan.pipeline.tied` keeps them equal during training.

    Raises:
        ValueError: on ``num_layers < pp``.
    """
    keep = stage_layer_range(len(lm.model.layers), pp, stage)
    part = copy.deepcopy(lm)
    _keep_layers(part.model.layers, keep)
    if stage != 0:
        part.model.embed_tokens = None
    if stage != pp - 1:
        part.model.norm = None
        part.lm_head = None
    return part


def split_vision_encoder(encoder: VisionEncoder, pp: int, stage: int, module: str = "vision") -> VisionEncoder:
    """The part of a vision ``encoder`` that pipeline ``stage`` of ``pp`` runs (a deep copy; ``encoder`` is untouched).

    Stage 0 keeps the patch embeddings; the last stage keeps ``post_layernorm`` and the projector; each stage keeps
    its contiguous range of blocks (:func:`stage_layer_range`) under their global names. Between stages travels
    ``[N, P, D]`` (D the ViT width); the last stage returns ``[N, P, H]``.

    Raises:
        ValueError: ``num_layers < pp``.
    """
    keep = stage_layer_range(len(encoder.vision_model.encoder.layers), pp, stage, module)
    part = copy.deepcopy(encoder)
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
