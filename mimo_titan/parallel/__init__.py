"""Parallelisms applied to plain modules through a mesh: FSDP2, tensor + sequence parallel plans (``tp``), context
parallelism (``cp``, ``cp_attention``) and expert parallelism (``ep``)."""

from mimo_titan.parallel.fsdp import apply_fsdp, resolve_dtype
from mimo_titan.parallel.tp import apply_tp_language, apply_tp_vision, check_tp

__all__ = ["apply_fsdp", "apply_tp_language", "apply_tp_vision", "check_tp", "resolve_dtype"]
