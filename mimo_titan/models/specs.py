"""Encoder model specs: what the rest of the package needs to know about each ``[model.<name>] type``.

A MIMO model is one decoder LM and any number of encoders; each encoder's ``type`` selects an
:class:`EncoderSpec` here. The spec says how to build the module, which medium it reads (its placeholder token and
the data fields behind it), how to take its inputs from a :class:`~mimo_titan.data.collate.Batch`, what to feed it
when a rank has none of its inputs in a microbatch, and which blocks FSDP wraps. Nothing else in the package
branches on an encoder's type; the parallelisation of each type (tensor-parallel plan, pipeline split) is
registered next to its plan in :mod:`mimo_titan.parallel.plans`.

Every encoder maps its inputs to *rows*: ``[R, H]`` embeddings in the LM's width, one per placeholder token of its
medium, in placeholder order (sample by sample, left to right). ``rows_of(output)`` flattens a module's output into
that form (a ViT returns ``[N, P, H]``, the audio encoder ``[R, H]`` already).

Reference: torchtitan's ``TrainSpec`` registry (a model name → builder, parallelize function, state-dict adapter).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from mimo_titan.data.collate import Batch

__all__ = ["ENCODER_SPECS", "EncoderSpec", "encoder_spec", "rows_of"]


@dataclass(frozen=True)
class EncoderSpec:
    """One encoder type.

    Attributes:
        type: the ``[model.<name>] type`` value.
        media: ``"image"`` or ``"audio"``: the placeholder token ``<|media|>`` and the data behind it.
        data_fields: WebDataset member extensions that carry this medium (in order of preference).
        build: ``(section config, lm_hidden_size) -> nn.Module``, on the current default device.
        inputs: ``batch -> tuple`` of forward arguments (CPU tensors) of every item of ``batch``, or ``None`` when
            the batch holds none.
        dummy_inputs: ``(section config) -> tuple``: one minimal item, fed when a rank has nothing to encode in a
            microbatch (its FSDP collectives must still run; its rows are dropped).
        fsdp_blocks: ``module -> list`` of the sub-modules FSDP wraps one by one (transformer blocks).
    """

    type: str
    media: str
    data_fields: tuple[str, ...]
    build: Callable[[Any, int], nn.Module]
    inputs: Callable[[Batch], tuple[torch.Tensor, ...] | None]
    dummy_inputs: Callable[[Any], tuple[torch.Tensor, ...]]
    fsdp_blocks: Callable[[nn.Module], list[nn.Module]]


def rows_of(output: torch.Tensor) -> torch.Tensor:
    """An encoder output ``[..., H]`` as rows ``[R, H]`` in placeholder order (a view)."""
    return output.flatten(0, -2)


# -- vit ------------------------------------------------------------------------------------------------------------
def _build_vit(cfg, lm_hidden: int) -> nn.Module:
    from mimo_titan.models.vit import VisionEncoder

    return VisionEncoder(cfg, lm_hidden)


def _vit_inputs(batch: Batch) -> tuple[torch.Tensor, ...] | None:
    return (batch.pixel_values,) if batch.pixel_values.shape[0] else None


def _vit_dummy(cfg) -> tuple[torch.Tensor, ...]:
    return (torch.zeros(1, cfg.num_channels, cfg.image_size, cfg.image_size),)


def _vit_blocks(module: nn.Module) -> list[nn.Module]:
    return list(module.vision_model.encoder.layers.values())  # type: ignore[union-attr, operator]


# -- audio ----------------------------------------------------------------------------------------------------------
def _build_audio(cfg, lm_hidden: int) -> nn.Module:
    from mimo_titan.models.audio import AudioEncoder

    return AudioEncoder(cfg, lm_hidden)


def _audio_inputs(batch: Batch) -> tuple[torch.Tensor, ...] | None:
    frames = getattr(batch, "audio_frames", None)  # packed rows carry no audio (refused before training)
    if frames is None or frames.numel() == 0:
        return None
    features = batch.audio_features
    assert features is not None, "a batch with audio_frames has audio_features"
    return features, frames


def _audio_dummy(cfg) -> tuple[torch.Tensor, ...]:
    return torch.zeros(1, cfg.num_mel_bins, 2), torch.tensor([2])  # one LM token


def _audio_blocks(module: nn.Module) -> list[nn.Module]:
    return list(module.encoder.layers)  # type: ignore[union-attr, arg-type]


ENCODER_SPECS: dict[str, EncoderSpec] = {
    "vit": EncoderSpec(
        "vit", "image", ("jpg", "jpeg", "png", "webp"), _build_vit, _vit_inputs, _vit_dummy, _vit_blocks
    ),
    "audio": EncoderSpec("audio", "audio", ("wav", "flac"), _build_audio, _audio_inputs, _audio_dummy, _audio_blocks),
}


def encoder_spec(type_: str) -> EncoderSpec:
    """The spec of encoder type ``type_``.

    Raises:
        KeyError: an unknown type (the config validates ``type`` first, so this is a programming error).
    """
    return ENCODER_SPECS[type_]
