"""How each encoder type is parallelised beyond FSDP: its tensor-parallel plan and its pipeline split.

The per-type half of the model spec (:mod:`mimo_titan.models.specs` holds the model half): a type missing here
supports neither ``tp > 1`` nor ``pp > 1``, which :func:`mimo_titan.train.trainer.validate_job` says before any
process group exists.

Reference: torchtitan's per-model ``parallelize_*`` functions registered in its ``TrainSpec``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from mimo_titan.parallel.tp import apply_tp_vision
from mimo_titan.pipeline.stages import split_vision_encoder, vision_stage_of

__all__ = ["ENCODER_PLANS", "EncoderPlans", "encoder_plans"]


@dataclass(frozen=True)
class EncoderPlans:
    """Parallelisation of one encoder type (``None``: not supported).

    Attributes:
        apply_tp: ``(module, tp_mesh) -> module``: tensor + sequence parallelism, in place.
        split: ``(module, pp, stage, name) -> module``: the part pipeline ``stage`` of ``pp`` runs (a copy of the
            kept parts only; a meta-device module gives a meta-device part).
        stage_of: ``(param name relative to the encoder, num_layers, pp) -> stage`` holding it.
        tokens_per_item: ``section config -> int``: rows each item gives (what travels between its stages per
            item is ``[tokens_per_item, hidden_size]``).
    """

    apply_tp: Callable[..., nn.Module] | None = None
    split: Callable[..., nn.Module] | None = None
    stage_of: Callable[[str, int, int], int] | None = None
    tokens_per_item: Callable[..., int] | None = None


ENCODER_PLANS: dict[str, EncoderPlans] = {
    "vit": EncoderPlans(
        apply_tp=apply_tp_vision,
        split=split_vision_encoder,
        stage_of=vision_stage_of,
        # the real patch count P, also under tensor parallelism (its padding to a multiple of tp stays inside the
        # encoder, which runs as one stage then): one row per LM placeholder
        tokens_per_item=lambda cfg: (cfg.image_size // cfg.patch_size) ** 2,
    ),
    "audio": EncoderPlans(),
}


def encoder_plans(type_: str) -> EncoderPlans:
    """The plans of encoder type ``type_`` (an empty :class:`EncoderPlans` for an unknown one)."""
    return ENCODER_PLANS.get(type_, EncoderPlans())
