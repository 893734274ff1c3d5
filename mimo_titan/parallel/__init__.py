"""Parallelisms applied to plain modules through a mesh: FSDP2 (and later TP / CP / EP plans)."""

from mimo_titan.parallel.fsdp import apply_fsdp, resolve_dtype

__all__ = ["apply_fsdp", "resolve_dtype"]
